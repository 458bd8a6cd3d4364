"""Entry point of one rank of a multi-process policy update (started by ``launch_update``
through torchrun or the deepspeed launcher)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", default=None, help="a resident server's folder (server.py): "
                    "take updates from it until told to stop")
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--sequences")
    ap.add_argument("--loss")
    ap.add_argument("--update", required=True)
    ap.add_argument("--ref", default=None)
    a = ap.parse_args()
    from ibtpo_core.runtime import set_accelerator_default

    set_accelerator_default()
    import torch

    torch.set_num_threads(1)
    from ibtpo_core.algo.losses import LossSpec
    from ibtpo_core.rl import load_sequences
    from ibtpo_core.training.deepspeed_trainer import UpdateSpec, train_on_sequences

    up = json.loads(a.update)
    up["betas"] = tuple(up["betas"])
    if a.serve:
        from ibtpo_core.training.server import serve

        serve(a.serve, UpdateSpec(**up))
    else:
        metrics = train_on_sequences(a.model, a.out, load_sequences(Path(a.sequences)),
                                     LossSpec(**json.loads(a.loss)), UpdateSpec(**up),
                                     ref_dir=a.ref)
        if int(os.environ.get("RANK", "0")) == 0:
            (Path(a.out) / "update_metrics.json").write_text(json.dumps(metrics))
    # no rank leaves while another still writes; then leave at once, without the interpreter's
    # teardown: there, C++ threads of gloo and DeepSpeed still joinable at destruction aborted
    # the rank ("terminate called without an active exception", SIGABRT) after a correct update
    # and failed the launch, now and then under ZeRO-3, even after destroy_process_group
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

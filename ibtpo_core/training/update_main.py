"""Entry point of one rank of a multi-process policy update (started by ``launch_update``
through torchrun or the deepspeed launcher)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sequences", required=True)
    ap.add_argument("--loss", required=True)
    ap.add_argument("--update", required=True)
    ap.add_argument("--ref", default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from ibtpo_core.algo.losses import LossSpec
    from ibtpo_core.rl import load_sequences
    from ibtpo_core.training.deepspeed_trainer import UpdateSpec, update_policy

    up = json.loads(a.update)
    up["betas"] = tuple(up["betas"])
    metrics = update_policy(a.model, a.out, load_sequences(Path(a.sequences)),
                            LossSpec(**json.loads(a.loss)), UpdateSpec(**up), ref_dir=a.ref)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(a.out) / "update_metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()

"""Resident update ranks (``algo.update.resident_ranks``): the ranks of a multi-process update
start once and stay alive across RL iterations, each keeping its part of the DeepSpeed engine,
optimizer and reference model in memory (resident.py), instead of a torchrun launch, an engine
build and an optimizer-state load every iteration (launch.py).

The parent (the update stage) writes each update as a request file into the server's folder;
rank 0 reads it and hands it to every rank (a broadcast over the process group), every rank runs
``train_on_sequences`` on it, rank 0 writes the metrics (or the error) as the reply. A held state
answers only for the checkpoint it wrote (its fingerprint), so a cache hit, a resume or a changed
config builds from disk as before, in the same ranks. Other launch settings (a new config in the
same process) restart the ranks; the ranks are tethered to the parent (tether.py) and stop with
it, even when it is SIGKILLed. One node; multi-node updates launch each iteration.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

from ibtpo_core.algo.losses import LossSpec
from ibtpo_core.training.deepspeed_trainer import SERVING_ENV, UpdateSpec

POLL_S = 0.05
_SERVER: dict = {}


def served_update(model_dir: str, out_dir: str, seqs_path: str, loss: LossSpec, spec: UpdateSpec,
                  ref_dir: str | None = None) -> dict[str, float]:
    """One update by the process's resident ranks (started on first use, restarted when the
    launch settings change); returns the metrics, as ``launch_update`` does."""
    from ibtpo_core.training.retention import require_optimizer_state

    require_optimizer_state(model_dir)
    server = _server_for(spec)
    n = server["n"] = server["n"] + 1
    request = {"model": model_dir, "out": out_dir, "sequences": seqs_path,
               "loss": dataclasses.asdict(loss), "ref": ref_dir}
    folder = Path(server["dir"])
    tmp = folder / f"request-{n}.json.tmp"
    tmp.write_text(json.dumps(request))
    tmp.rename(folder / f"request-{n}.json")  # whole or absent for rank 0
    reply = folder / f"reply-{n}.json"
    proc = server["proc"]
    while not reply.exists():
        if proc.poll() is not None:
            stop_server()
            raise RuntimeError(f"the resident update ranks exited (code {proc.returncode}) "
                               f"during update {n}; their log ends:\n{_log_tail(folder)}")
        time.sleep(POLL_S)
    answer = json.loads(reply.read_text())
    reply.unlink()
    if "error" in answer:
        stop_server()  # a rank's state after a failed step is unknown: the next update restarts
        raise RuntimeError(f"the resident update failed in rank 0:\n{answer['error']}")
    return answer["metrics"]


def _server_for(spec: UpdateSpec) -> dict:
    key = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    if _SERVER.get("key") == key and _SERVER["proc"].poll() is None:
        return _SERVER
    stop_server()
    _SERVER.update(_start(spec), key=key, n=0)
    return _SERVER


def _start(spec: UpdateSpec) -> dict:
    import tempfile

    from ibtpo_core import tether
    from ibtpo_core.runtime import free_port
    from ibtpo_core.training.launch import clear_stale_lock_on_cpu, local_torchrun, rank_env

    clear_stale_lock_on_cpu()
    folder = tempfile.mkdtemp(prefix="ibtpo-update-server-")
    cmd = local_torchrun(spec.num_processes, free_port()) + [
        "-m", "ibtpo_core.training.update_main", "--serve", folder,
        "--update", json.dumps(dataclasses.asdict(spec))]
    env = {**rank_env(), SERVING_ENV: "1"}
    log = open(Path(folder) / "ranks.log", "w")  # a file: a long-lived pipe would fill and block
    proc = tether.spawn(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return {"proc": proc, "dir": folder}


def stop_server() -> None:
    """Stop the resident ranks, if any (their held state goes with them)."""
    import shutil

    from ibtpo_core import tether

    proc = _SERVER.pop("proc", None)
    folder = _SERVER.pop("dir", None)
    _SERVER.clear()
    if proc is not None:
        if proc.poll() is None:
            (Path(folder) / "stop").touch()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        tether.stop(proc)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def server_pid() -> int | None:
    """The watcher pid of the running resident ranks (tests: the same ranks across updates)."""
    proc = _SERVER.get("proc")
    return proc.pid if proc is not None and proc.poll() is None else None


def _log_tail(folder: Path) -> str:
    try:
        return (folder / "ranks.log").read_text()[-3000:]
    except OSError:
        return "(no log)"


def serve(folder: str, spec: UpdateSpec) -> None:
    """A rank's loop (``update_main --serve``): wait for each request, run it, reply (rank 0),
    until the parent asks to stop."""
    import traceback

    import torch

    from ibtpo_core.rl import load_sequences
    from ibtpo_core.training.deepspeed_trainer import _setup, train_on_sequences

    _setup(spec)  # the process group, once
    rank = int(os.environ.get("RANK", "0"))
    where, n = Path(folder), 0
    while True:
        n += 1
        box: list = [None]
        if rank == 0:
            path = where / f"request-{n}.json"
            while not path.exists() and not (where / "stop").exists():
                time.sleep(POLL_S)
            box = [json.loads(path.read_text()) if path.exists() else None]
        torch.distributed.broadcast_object_list(box, src=0)
        req = box[0]
        if req is None:
            return
        try:
            metrics = train_on_sequences(req["model"], req["out"],
                                         load_sequences(Path(req["sequences"])),
                                         LossSpec(**req["loss"]), spec, ref_dir=req["ref"])
            answer = {"metrics": metrics}
        except Exception:  # noqa: BLE001 - the parent raises it
            answer = {"error": traceback.format_exc()}
        if rank == 0:
            tmp = where / f"reply-{n}.json.tmp"
            tmp.write_text(json.dumps(answer))
            tmp.rename(where / f"reply-{n}.json")
        if "error" in answer:
            return

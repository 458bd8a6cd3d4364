"""Launching one policy update over several processes or nodes: ``spec.num_processes`` ranks
on each of ``spec.nodes`` nodes, through torchrun (a c10d rendezvous across nodes) or the deepspeed
launcher; every rank runs ``deepspeed_trainer.train_on_sequences`` (``update_main``), tethered to
this process so a killed run takes them with it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ibtpo_core.algo.losses import LossSpec
from ibtpo_core.training.comm_op import clear_stale_lock
from ibtpo_core.training.deepspeed_trainer import UpdateSpec
from ibtpo_core.training.retention import require_optimizer_state


def launch_update(model_dir: str, out_dir: str, seqs_path: str, loss: LossSpec, spec: UpdateSpec,
                  ref_dir: str | None = None) -> dict[str, float]:
    """Run ``train_on_sequences`` in ``spec.num_processes`` ranks on each of ``spec.nodes`` nodes,
    through torchrun or the deepspeed launcher (rank 0 saves and writes the metrics); returns
    the metrics."""
    import dataclasses
    import json
    import subprocess
    import sys

    from ibtpo_core import tether
    from ibtpo_core.runtime import free_port

    require_optimizer_state(model_dir)  # before any rank starts
    clear_stale_lock_on_cpu()
    port = free_port()
    bindir = Path(sys.executable).parent
    args = ["-m", "ibtpo_core.training.update_main", "--model", model_dir, "--out", out_dir,
            "--sequences", seqs_path, "--loss", json.dumps(dataclasses.asdict(loss)),
            "--update", json.dumps(dataclasses.asdict(spec))]
    if ref_dir:
        args += ["--ref", ref_dir]
    n = str(spec.num_processes)
    if spec.nodes > 1:
        cmds = node_agent_commands(spec, bindir / "torchrun", args, out_dir)
    elif spec.launcher == "torchrun":
        cmds = [local_torchrun(spec.num_processes, port) + args]
    else:  # the deepspeed launcher; on CPU --num_gpus counts CPU ranks
        cmds = [[str(bindir / "deepspeed"), "--no_local_rank", "--num_gpus", n,
                 "--master_addr", "127.0.0.1", "--master_port", str(port), "--module"] + args[1:]]
    # tethered: a killed run takes its launchers and ranks with it
    procs = [tether.spawn(c, env=rank_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) for c in cmds]
    try:
        errs = [p.communicate()[1] for p in procs]
    finally:
        for p in procs:
            tether.stop(p)
    failed = [(i, p.returncode, e) for i, (p, e) in enumerate(zip(procs, errs)) if p.returncode]
    if failed:
        i, code, stderr = failed[0]
        where = f" on node {i} ({spec.node_hosts[i]})" if spec.nodes > 1 else ""
        raise RuntimeError(f"the {spec.launcher} update with {spec.nodes} x {n} processes failed"
                           f"{where} (exit {code}):\n{stderr[-3000:]}")
    return json.loads((Path(out_dir) / "update_metrics.json").read_text())


def clear_stale_lock_on_cpu() -> None:
    """Before ranks start on CPU: clear a killed build's lock of DeepSpeed's communication op
    (said in this process, where the run's log shows it, not in a rank)."""
    if not torch.cuda.is_available():
        clear_stale_lock()


def local_torchrun(num_processes: int, port: int) -> list[str]:
    """The torchrun command that starts ``num_processes`` ranks on this machine (the module and
    its arguments to follow)."""
    import sys

    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node",
            str(num_processes), "--master_addr", "127.0.0.1", "--master_port", str(port)]


def rank_env() -> dict[str, str]:
    """This process's environment without the rank variables of a launch it may run in: the
    ranks it starts get theirs from their own launcher."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def node_agent_commands(spec: UpdateSpec, torchrun: Path, args: list[str], out_dir: str
                        ) -> list[list[str]]:
    """One torchrun agent per node, all joining one c10d rendezvous at node_hosts[0]; each agent
    started through ``node_launch`` on its host (or here, when it is empty)."""
    import shlex

    from ibtpo_core.artifacts import digest_json
    from ibtpo_core.runtime import free_port

    port = spec.rdzv_port or free_port()
    run_id = digest_json([out_dir, port])[:16]  # one rendezvous per update
    cmds = []
    for host in spec.node_hosts:
        agent = [str(torchrun), "--nnodes", str(spec.nodes), "--nproc_per_node",
                 str(spec.num_processes), "--rdzv_backend", "c10d", "--rdzv_endpoint",
                 f"{spec.node_hosts[0]}:{port}", "--rdzv_id", run_id] + args
        if spec.node_launch:  # the agent as one shell string, as ssh (or `bash -c`) takes it
            cmds.append(shlex.split(spec.node_launch.format(host=host)) + [shlex.join(agent)])
        else:
            cmds.append(agent)
    return cmds

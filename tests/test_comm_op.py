"""DeepSpeed's CPU communication op: one rank builds nothing, and a build lock left by a killed
build is cleared instead of waited on forever (issue 13, item 1; the kill itself is in the
fault suite, test_faults.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ibtpo_core.training import comm_op

ROOT = Path(__file__).resolve().parents[1]


def test_a_one_process_update_builds_no_op(tiny_model_dir, tmp_path):
    """In a fresh extensions folder, a single-rank update leaves no build (and so no lock)."""
    ext = tmp_path / "ext"
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_deepspeed_update import sequences
        from ibtpo_core.algo.losses import LossSpec
        from ibtpo_core.training.deepspeed_trainer import UpdateSpec, train_on_sequences
        train_on_sequences({tiny_model_dir!r}, {str(tmp_path / 'out')!r},
                           sequences({tiny_model_dir!r}), LossSpec(), UpdateSpec(lr=1e-3))
    """)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not list(ext.rglob(comm_op.OP_NAME)), "a one-process update built the comm op"
    assert "built successfully" not in out.stdout + out.stderr


def test_the_lock_is_where_torch_builds_the_op(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert comm_op.lock_path() == tmp_path / comm_op.OP_NAME / "lock"


def test_a_lock_nobody_holds_is_removed(tmp_path, caplog):
    lock = tmp_path / "lock"
    lock.touch()  # what a build killed by SIGKILL leaves behind
    assert comm_op.clear_stale_lock(lock, settle_s=0.05)
    assert not lock.exists()
    assert "left by a process killed while compiling it" in caplog.text


def test_a_lock_held_by_a_live_build_is_kept(tmp_path):
    lock = tmp_path / "lock"
    # a stand-in for torch's FileBaton: create the lock exclusively and hold it open
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert comm_op.lock_holders(lock) == [holder.pid]
        assert not comm_op.clear_stale_lock(lock, settle_s=0.05)
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without removing its lock: now it is stale
    assert comm_op.clear_stale_lock(lock, settle_s=0.05) and not lock.exists()


def test_no_lock_nothing_to_do(tmp_path):
    t0 = time.monotonic()
    assert not comm_op.clear_stale_lock(tmp_path / "lock", settle_s=5)
    assert time.monotonic() - t0 < 1  # no settle wait without a lock

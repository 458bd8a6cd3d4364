"""The resident update worker (training/resident.py): a kept engine takes the same steps as
rebuilds from disk, bit for bit; it answers only for the checkpoint it wrote, unaltered; the
rollout engine gets its weights in memory."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ibtpo_core.algo.losses import LossSpec
from ibtpo_core.training import deepspeed_trainer, resident
from ibtpo_core.training.deepspeed_trainer import UpdateSpec, train_on_sequences
from tests.test_deepspeed_update import sequences


@pytest.fixture
def builds(monkeypatch):
    """Counts the trainers built from disk."""
    calls = []
    real = deepspeed_trainer.build_trainer

    def counting(model_dir, *args, **kwargs):
        calls.append(model_dir)
        return real(model_dir, *args, **kwargs)

    monkeypatch.setattr(deepspeed_trainer, "build_trainer", counting)
    resident.release()
    yield calls
    resident.release()


def three_updates(start, out: Path, seqs, keep: bool) -> list[Path]:
    spec = UpdateSpec(lr=1e-3, micro_batch_size=4, resident=keep)
    dirs, parent = [], start
    for k in range(3):
        d = out / f"it{k}"
        train_on_sequences(str(parent), str(d), seqs[k:] + seqs[:k], LossSpec(), spec)
        dirs.append(d)
        parent = d
    return dirs


def assert_same_checkpoint(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa = torch.load(a / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "optimizer.pt", weights_only=True)["state"]
    for i in oa:
        for key in oa[i]:
            assert torch.equal(oa[i][key], ob[i][key]), (i, key)


def test_a_kept_engine_takes_the_steps_of_rebuilds_bit_for_bit(tiny_model_dir, tmp_path, builds):
    seqs = sequences(tiny_model_dir)
    kept = three_updates(tiny_model_dir, tmp_path / "kept", seqs, keep=True)
    assert builds == [tiny_model_dir]  # built once, then held
    rebuilt = three_updates(tiny_model_dir, tmp_path / "rebuilt", seqs, keep=False)
    assert builds[1:] == [tiny_model_dir, str(rebuilt[0]), str(rebuilt[1])]
    for a, b in zip(kept, rebuilt):
        assert_same_checkpoint(a, b)


def test_the_held_state_answers_only_for_its_own_unaltered_checkpoint(tiny_model_dir, tmp_path,
                                                                      builds):
    seqs = sequences(tiny_model_dir)
    spec = UpdateSpec(lr=1e-3, micro_batch_size=4)
    first = tmp_path / "a"
    train_on_sequences(tiny_model_dir, str(first), seqs, LossSpec(), spec)
    # other settings: rebuilt (and the held state dropped)
    train_on_sequences(str(first), str(tmp_path / "b"), seqs, LossSpec(), UpdateSpec(lr=2e-3))
    assert builds == [tiny_model_dir, str(first)]
    # a rewritten weights file (same content, another file): read from disk again
    weights = load_file(tmp_path / "b" / "model.safetensors")
    os.remove(tmp_path / "b" / "model.safetensors")
    save_file(weights, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    assert resident.weights_for(str(tmp_path / "b")) is None
    train_on_sequences(str(tmp_path / "b"), str(tmp_path / "c"), seqs, LossSpec(),
                       UpdateSpec(lr=2e-3))
    assert builds[-1] == str(tmp_path / "b")
    # its own checkpoint, untouched: taken from memory
    train_on_sequences(str(tmp_path / "c"), str(tmp_path / "d"), seqs, LossSpec(),
                       UpdateSpec(lr=2e-3))
    assert len(builds) == 3


def test_the_rollout_engine_gets_the_new_weights_in_memory(tiny_model_dir, tmp_path, builds):
    from ibtpo_core.engines import held

    seqs = sequences(tiny_model_dir)
    held._HELD.clear()
    engine = held.held_engine("hf", tiny_model_dir)
    out = tmp_path / "new"
    train_on_sequences(tiny_model_dir, str(out), seqs, LossSpec(),
                       UpdateSpec(lr=1e-3, micro_batch_size=4))
    weights = resident.weights_for(str(out))
    assert weights is not None
    assert held.held_engine("hf", str(out), weights) is engine
    assert held._HELD["loads_in_memory"] == 1
    on_disk = load_file(out / "model.safetensors")
    got = engine.model.state_dict()
    for k, v in on_disk.items():
        assert torch.equal(got[k], v), k
    held._HELD.clear()


def chain_without_optimizer_states(start, out: Path, seqs, saved_at: int):
    """Three updates, the optimizer state written with the ``saved_at``-th only (1-based), each
    checkpoint's manifest recording its parent and sequences as the update stage does."""
    import json

    from ibtpo_core.rl import save_sequences

    spec = UpdateSpec(lr=1e-3, micro_batch_size=4)
    dirs, parent = [], str(start)
    out.mkdir(parents=True)
    for k in range(3):
        d = out / f"it{k}"
        part = seqs[k:] + seqs[:k]
        save_sequences(part, out / f"seqs{k}.json")
        train_on_sequences(parent, str(d), part, LossSpec(), spec, save_optimizer=k + 1 == saved_at)
        manifest = {"parent_path": parent, "sequences": str(out / f"seqs{k}.json")}
        if k + 1 != saved_at:
            manifest["optimizer_state"] = "not_saved"
        (d / "manifest.json").write_text(json.dumps(manifest))
        dirs.append(d)
        parent = str(d)
    return dirs


def test_a_lost_resident_state_is_replayed_from_the_last_saved_optimizer_state(
        tiny_model_dir, tmp_path, builds):
    from ibtpo_core.rl import load_sequences
    from ibtpo_core.training import replay

    seqs = sequences(tiny_model_dir)
    dirs = chain_without_optimizer_states(tiny_model_dir, tmp_path / "run", seqs, saved_at=1)
    assert not (dirs[1] / "optimizer.pt").exists() and (dirs[0] / "optimizer.pt").exists()
    assert replay.plan(str(dirs[2])) == (str(dirs[0]), [(str(dirs[1]), str(tmp_path / "run" /
                                                                          "seqs1.json")),
                                                        (str(dirs[2]), str(tmp_path / "run" /
                                                                          "seqs2.json"))])
    # the uninterrupted run's fourth update, from the held state
    spec = UpdateSpec(lr=1e-3, micro_batch_size=4)
    train_on_sequences(str(dirs[2]), str(tmp_path / "kept"), seqs, LossSpec(), spec)
    # a new process: nothing held; the fourth update replays it1 and it2 from it0's state
    resident.release()
    builds.clear()
    train_on_sequences(str(dirs[2]), str(tmp_path / "replayed"), seqs, LossSpec(), spec,
                       load_sequences=load_sequences)
    assert builds == [str(dirs[0])]
    assert_same_checkpoint(tmp_path / "kept", tmp_path / "replayed")
    # a replay that does not reach a checkpoint's weights stops instead of training on
    resident.release()
    w = load_file(dirs[1] / "model.safetensors")
    name = next(iter(w))
    w[name] = w[name] + 1e-3
    save_file(w, dirs[1] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="did not give its weights"):
        train_on_sequences(str(dirs[2]), str(tmp_path / "x"), seqs, LossSpec(), spec,
                           load_sequences=load_sequences)
    # and a build straight from a checkpoint without its state is refused
    resident.release()
    with pytest.raises(ValueError, match="resident"):
        train_on_sequences(str(dirs[2]), str(tmp_path / "y"), seqs, LossSpec(),
                           UpdateSpec(lr=1e-3, resident=False))

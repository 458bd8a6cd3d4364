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


def test_weights_kept_in_memory_are_handed_over_and_replayed_after_a_loss(
        tiny_model_dir, tmp_path, builds):
    """rl.save_every: the middle update of three writes no weights, only their checksum; the
    next update takes the held trainer, the rollout engine the held weights; a new process
    replays to them from the last durable checkpoint, bit for bit."""
    import json

    from ibtpo_core.engines import held
    from ibtpo_core.rl import load_sequences, save_sequences
    from ibtpo_core.training import replay

    seqs = sequences(tiny_model_dir)
    spec = UpdateSpec(lr=1e-3, micro_batch_size=4)
    run = tmp_path / "run"
    run.mkdir()
    a, b = run / "it0", run / "it1"
    for k, (parent, d, save) in enumerate([(tiny_model_dir, a, True), (str(a), b, False)]):
        save_sequences(seqs[k:] + seqs[:k], run / f"seqs{k}.json")
        train_on_sequences(parent, str(d), seqs[k:] + seqs[:k], LossSpec(), spec,
                           save_optimizer=save, save_weights=save)
        manifest = {"parent_path": parent, "sequences": str(run / f"seqs{k}.json")}
        if not save:
            manifest.update(optimizer_state="not_saved", weights="not_saved")
        (d / "manifest.json").write_text(json.dumps(manifest))
    assert not (b / "model.safetensors").exists() and not (b / "optimizer.pt").exists()
    assert (b / "held.json").exists() and (b / "config.json").exists()
    assert replay.weights_not_saved(str(b)) and replay.weights_home(str(b)) == str(a)
    assert builds == [tiny_model_dir]
    # the rollout engine: built from the durable checkpoint's files, then given the held weights
    held._HELD.clear()
    weights = resident.weights_for(str(b))
    engine = held.held_engine("hf", str(b), weights, base_path=str(a))
    assert held._HELD["loads_in_memory"] == 1
    got = engine.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights.items() if k in got)
    held._HELD.clear()
    # the uninterrupted third update, from the held trainer (no build)
    train_on_sequences(str(b), str(tmp_path / "kept"), seqs, LossSpec(), spec)
    assert builds == [tiny_model_dir]
    # a new process: the weights are rebuilt by replaying it1 from it0, then the update
    resident.release()
    builds.clear()
    rebuilt = deepspeed_trainer.held_weights(str(b), spec, LossSpec(), None, load_sequences)
    assert builds == [str(a)]
    assert replay.checksum(rebuilt) == replay.read_held(str(b))
    train_on_sequences(str(b), str(tmp_path / "replayed"), seqs, LossSpec(), spec,
                       load_sequences=load_sequences)
    assert builds == [str(a)]  # the replayed trainer is held, not built again
    assert_same_checkpoint(tmp_path / "kept", tmp_path / "replayed")
    # a replay that misses the recorded checksum stops
    resident.release()
    want = replay.read_held(str(b))
    name = next(iter(want))
    (b / "held.json").write_text(json.dumps({**want, name: want[name] + "0"}))
    with pytest.raises(RuntimeError, match="did not give its weights"):
        deepspeed_trainer.held_weights(str(b), spec, LossSpec(), None, load_sequences)


def test_checksum_changes_with_any_one_byte():
    base = {"w": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    c0 = replay_checksum(base)
    assert c0 == replay_checksum({k: v.clone() for k, v in base.items()})
    flipped = base["w"].clone()
    flipped.reshape(-1).view(torch.uint8)[17] = 1  # one byte of the fifth float
    assert replay_checksum({**base, "w": flipped})["w"] != c0["w"]
    assert replay_checksum({**base, "w": flipped})["b"] == c0["b"]
    moved = base["w"].clone()
    moved.reshape(-1).view(torch.uint8)[16] = 1
    # bytes 0..: weights 1, 2, ...; byte 16 = 1 gives 17, byte 17 = 1 gives 18
    assert replay_checksum({"w": moved})["w"] == "torch.float32:(3, 4):17"
    assert replay_checksum({"w": flipped})["w"] == "torch.float32:(3, 4):18"


def replay_checksum(state):
    from ibtpo_core.training.replay import checksum

    return checksum(state)

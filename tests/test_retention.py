"""Optimizer-state retention (rl.keep_optimizer_states): pruning keeps a stage output's digest
and validity, keeps exactly the last N states, and an update that would need a pruned state
stops with the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ibtpo_core.artifacts import prune, pruned_files, read_manifest
from pipeline import stage


def _checkpoint(folder: Path, tag: str) -> dict:
    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_text(f"weights {tag}")
        (tmp / "optimizer.pt").write_bytes(b"x" * 100)
        (tmp / "zero_state" / "state").mkdir(parents=True)
        (tmp / "zero_state" / "state" / "rank0.pt").write_bytes(b"y" * 20)
        return {"loss": 1.0}

    return stage.publish(folder, write)


def test_prune_keeps_the_digest_and_the_output_valid(tmp_path):
    rec = _checkpoint(tmp_path / "ck", "a")
    freed = prune(tmp_path / "ck", ("optimizer.pt", "zero_state"))
    assert freed == 120  # 100 + 20 bytes
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "manifest.json",
        "model.safetensors",
    ]
    again = stage.cached(tmp_path / "ck")
    assert again == rec  # same digest, so stages keyed by it stay cache hits
    assert pruned_files(tmp_path / "ck") == ["optimizer.pt", "zero_state/state/rank0.pt"]
    assert prune(tmp_path / "ck", ("optimizer.pt", "zero_state")) == 0  # nothing left to remove
    (tmp_path / "ck" / "model.safetensors").write_text("tampered")  # kept files are still checked
    assert read_manifest(tmp_path / "ck") is None


def test_a_prune_killed_after_its_manifest_leaves_a_valid_folder(tmp_path):
    _checkpoint(tmp_path / "ck", "a")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    # the manifest was rewritten, then the process died before deleting the file
    manifest["pruned"] = {"optimizer.pt": manifest["files"].pop("optimizer.pt")}
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(tmp_path / "ck") is not None
    assert prune(tmp_path / "ck", ("optimizer.pt",)) == 100  # the next prune finishes the job
    assert not (tmp_path / "ck" / "optimizer.pt").exists()


def test_only_the_last_n_optimizer_states_are_kept(tmp_path):
    from ibtpo_core.training.retention import prune_optimizer_states

    paths = [_checkpoint(tmp_path / f"it{k}", str(k))["path"] for k in range(4)]
    assert prune_optimizer_states(paths, None) == 0
    assert prune_optimizer_states(paths, 2) == 240  # it0 and it1
    assert [(Path(p) / "optimizer.pt").exists() for p in paths] == [False, False, True, True]
    assert prune_optimizer_states(paths, 1) == 120  # then it2, with keep 1
    assert (Path(paths[3]) / "optimizer.pt").exists()


def test_an_update_from_a_pruned_state_stops_with_the_fix(tmp_path):
    from ibtpo_core.algo.losses import LossSpec
    from ibtpo_core.algo.tree import TrainingSequence
    from ibtpo_core.training.deepspeed_trainer import UpdateSpec, train_on_sequences
    from ibtpo_core.training.launch import launch_update

    _checkpoint(tmp_path / "ck", "a")
    prune(tmp_path / "ck", ("optimizer.pt", "zero_state"))
    seq = TrainingSequence(prompt=[1], tokens=[2, 3], old_logprobs=[0.0, 0.0],
                           advantages=[1.0, 1.0], step_ids=[0, 0], reward=1.0)
    with pytest.raises(ValueError, match="keep_optimizer_states=null"):
        train_on_sequences(str(tmp_path / "ck"), str(tmp_path / "out"), [seq], LossSpec(),
                           UpdateSpec())
    with pytest.raises(ValueError, match="optimizer state was deleted"):
        launch_update(str(tmp_path / "ck"), str(tmp_path / "out"), "seqs.json", LossSpec(),
                      UpdateSpec(num_processes=2))


def test_weights_kept_are_the_last_n_and_every_kth(tmp_path):
    from ibtpo_core.training.retention import prune_checkpoints

    paths = [_checkpoint(tmp_path / f"it{k}", str(k))["path"] for k in range(6)]
    digests = [stage.cached(Path(p))["digest"] for p in paths]
    assert prune_checkpoints(paths, None, 2) == 0  # null keeps them all
    # the last 2 (after iterations 5 and 6) and every 2nd (after iterations 2 and 4) stay:
    # the weights after iterations 1 and 3 go, 9 bytes each ("weights 0", "weights 2")
    assert prune_checkpoints(paths, 2, 2) == 18
    kept = [(Path(p) / "model.safetensors").exists() for p in paths]
    assert kept == [False, True, False, True, True, True]
    assert [stage.cached(Path(p))["digest"] for p in paths] == digests  # still cache hits
    assert (Path(paths[0]) / "optimizer.pt").exists()  # the optimizer state is the other knob
    assert prune_checkpoints(paths, 1, 0) == 3 * 9  # now only the last: 1, 3, 4 go too


def test_the_last_optimizer_state_keeps_its_weights(tmp_path):
    """rl.save_every: a replay starts from the last checkpoint holding an optimizer state, so
    its weights stay even when newer checkpoints hold weights alone."""
    from ibtpo_core.artifacts import prune
    from ibtpo_core.training.retention import prune_checkpoints

    paths = [_checkpoint(tmp_path / f"it{k}", str(k))["path"] for k in range(6)]
    for k in (0, 2, 3, 4, 5):
        prune(Path(paths[k]), ("optimizer.pt", "zero_state"))
    # the last (it5) and the last state's (it1) stay; it0, it2, it3, it4 go, 9 bytes each
    assert prune_checkpoints(paths, 1, 0) == 4 * 9
    kept = [(Path(p) / "model.safetensors").exists() for p in paths]
    assert kept == [False, True, False, False, False, True]


def test_reading_deleted_weights_stops_with_the_fix(tmp_path):
    from configs.schema import EngineConfig, EvalConfig
    from ibtpo_core.algo.losses import LossSpec
    from ibtpo_core.algo.tree import TrainingSequence
    from ibtpo_core.training.deepspeed_trainer import UpdateSpec, train_on_sequences
    from ibtpo_core.training.retention import prune_checkpoints
    from tasks.evaluate_policy import evaluate_policy

    paths = [_checkpoint(tmp_path / f"it{k}", str(k))["path"] for k in range(2)]
    prune_checkpoints(paths, 1, 0)
    seq = TrainingSequence(prompt=[1], tokens=[2, 3], old_logprobs=[0.0, 0.0],
                           advantages=[1.0, 1.0], step_ids=[0, 0], reward=1.0)
    with pytest.raises(ValueError, match="weights were deleted by rl.keep_checkpoints"):
        train_on_sequences(paths[0], str(tmp_path / "out"), [seq], LossSpec(), UpdateSpec())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text('{"numbers": [1, 2], "target": 3}\n')
    with pytest.raises(ValueError, match="rl.keep_checkpoints=null"):
        evaluate_policy.fn(EvalConfig(), EngineConfig(), stage.cached(Path(paths[0])),
                           {"path": str(tmp_path / "data"), "digest": "d", "metrics": {}},
                           store=str(tmp_path / "eval"))

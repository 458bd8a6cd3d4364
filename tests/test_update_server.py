"""Resident update ranks (``algo.update.resident_ranks``, training/server.py): two ranks started
once take two updates in a row, the second from the state they kept, and reach the weights of
two updates in one process; a failed update names the rank's error and stops the ranks."""
import pytest

from ibtpo_core.algo.losses import LossSpec
from ibtpo_core.training.deepspeed_trainer import UpdateSpec, train_on_sequences
from tests.test_deepspeed_update import assert_same_update, sequences


def test_resident_ranks_keep_their_state_across_updates(tiny_model_dir, tmp_path):
    from ibtpo_core.rl import save_sequences
    from ibtpo_core.training import server

    seqs = sequences(tiny_model_dir)
    save_sequences(seqs, tmp_path / "seqs.json")
    s = str(tmp_path / "seqs.json")
    spec = UpdateSpec(lr=1e-3, num_processes=2, resident_ranks=True)
    try:
        a1 = server.served_update(tiny_model_dir, str(tmp_path / "a1"), s, LossSpec(), spec)
        pid = server.server_pid()
        a2 = server.served_update(str(tmp_path / "a1"), str(tmp_path / "a2"), s, LossSpec(), spec)
        assert server.server_pid() == pid is not None  # the same ranks took both updates
        assert (a1["update/held"], a2["update/held"]) == (0.0, 1.0)  # built once, then kept
        assert a2["world_size"] == 2.0
        with pytest.raises(RuntimeError, match="resident update failed in rank 0:(.|\\n)*"
                                               "none.json"):
            server.served_update(str(tmp_path / "a2"), str(tmp_path / "x"),
                                 str(tmp_path / "none.json"), LossSpec(), spec)
        assert server.server_pid() is None  # stopped: its state after a failure is unknown
    finally:
        server.stop_server()
    # the same two steps in one process (the float order of the all-reduce aside)
    b1 = train_on_sequences(tiny_model_dir, str(tmp_path / "b1"), seqs, LossSpec(),
                            UpdateSpec(lr=1e-3))
    b2 = train_on_sequences(str(tmp_path / "b1"), str(tmp_path / "b2"), seqs, LossSpec(),
                            UpdateSpec(lr=1e-3))
    assert_same_update(b1, a1, tmp_path / "b1", tmp_path / "a1")
    assert_same_update(b2, a2, tmp_path / "b2", tmp_path / "a2")

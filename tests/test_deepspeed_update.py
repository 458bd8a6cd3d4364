"""One DeepSpeed update step changes every trainable parameter and equals a plain torch step."""
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ibtpo_core.algo.losses import LossSpec, policy_loss
from ibtpo_core.algo.tree import TrainingSequence
from ibtpo_core.training.deepspeed_trainer import UpdateSpec, sequence_logprobs, train_on_sequences
from ibtpo_core.training.policy import collate, token_logprobs


def sequences(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(6):
        prompt = [4, 12 + i, 13, 5, 30]
        toks = torch.randint(6, 60, (7,), generator=g).tolist()
        b = collate([TrainingSequence(prompt, toks, [0.0] * 7, [0.0] * 7, [1] * 7, 0.0)], 0)
        with torch.no_grad():
            lp, _ = token_logprobs(model, b)
        old = lp[0, len(prompt) - 1:].tolist()
        adv = [(-1.0) ** i * (0.5 + 0.1 * i)] * 7
        seqs.append(TrainingSequence(prompt, toks, old, adv, [1] * 7, float(i % 2)))
    return seqs


def assert_same_update(one: dict, two: dict, one_dir, two_dir) -> None:
    """Two updates took the same step: same loss, same weights (to float tolerance)."""
    assert two["loss/total"] == pytest.approx(one["loss/total"], abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(one_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(two_dir).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=k)


def torch_steps(model, parts, loss, lr):
    """The reference in plain torch: one AdamW step per part (token mean within it), gradients
    clipped at norm 1.0 as the DeepSpeed config does."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    norms = []
    for part in parts:
        b = collate(part, 0)
        lp, ent = sequence_logprobs(model, b, UpdateSpec())  # the trainer's log-probs
        value, _ = policy_loss(lp, b.old_logprobs, b.advantages, b.response_mask, loss, entropy=ent)
        opt.zero_grad()
        value.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
    return norms  # before the clip


def test_one_update_matches_torch_and_moves_every_parameter(tiny_model_dir, tmp_path):
    seqs = sequences(tiny_model_dir)
    spec = UpdateSpec(lr=1e-3, micro_batch_size=4)  # two micro-batches, accumulated
    loss = LossSpec()
    metrics = train_on_sequences(tiny_model_dir, str(tmp_path / "ds"), seqs, loss, spec)
    assert metrics["num_sequences"] == 6 and metrics["num_tokens"] == 42
    assert math.isfinite(metrics["loss/total"])

    # the same step in plain torch: full-batch token mean, clip at 1.0, AdamW
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    norms = torch_steps(ref, [seqs], loss, lr=1e-3)
    # the gradient norm before the clip, and whether the clip at 1.0 bound
    assert metrics["grad_norm"] == pytest.approx(norms[0], rel=1e-4)
    assert metrics["update/clipped_frac"] == float(norms[0] > 1.0)
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ds[k], v, atol=2e-6, rtol=1e-5, msg=k)
        if "rotary" not in k:
            assert not torch.equal(ds[k], before[k]), f"{k} did not change"
    assert (tmp_path / "ds" / "optimizer.pt").is_file()


def test_mini_batches_are_sequential_steps_and_the_clip_binds(tiny_model_dir, tmp_path):
    """mini_batches=3: three AdamW steps, each on a third of the batch in order (token mean within
    it), the second and third with pi_theta != pi_old, so the clipped ratio is reported."""
    seqs = sequences(tiny_model_dir)
    loss = LossSpec(eps_low=0.001, eps_high=0.001)  # a narrow band: any policy change is clipped
    metrics = train_on_sequences(tiny_model_dir, str(tmp_path / "ds"), seqs, loss,
                            UpdateSpec(lr=1e-2, mini_batches=3))
    assert metrics["loss/clipfrac"] > 0
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    norms = torch_steps(ref, [seqs[0:2], seqs[2:4], seqs[4:6]], loss, lr=1e-2)
    assert metrics["grad_norm"] == pytest.approx(sum(norms) / 3, rel=1e-4)
    assert metrics["grad_norm_max"] == pytest.approx(max(norms), rel=1e-4)
    assert metrics["update/clipped_frac"] == pytest.approx(sum(n > 1.0 for n in norms) / 3)
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ds[k], v, atol=2e-5, rtol=1e-4, msg=k)
    with pytest.raises(ValueError, match="cannot fill 7 mini-batches"):
        train_on_sequences(tiny_model_dir, str(tmp_path / "x"), seqs, loss,
                           UpdateSpec(mini_batches=7))


def test_missing_deepspeed_config_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="DeepSpeed config .* does not exist"):
        train_on_sequences(tiny_model_dir, str(tmp_path / "x"), sequences(tiny_model_dir),
                           LossSpec(), UpdateSpec(deepspeed_config="configs/deepspeed/nope.yaml"))


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_processes_equal_one(tiny_model_dir, tmp_path, launcher):
    """Two ranks (gloo on CPU), each on half the sequences, take the same step as one."""
    from ibtpo_core.rl import save_sequences
    from ibtpo_core.training.launch import launch_update

    seqs = sequences(tiny_model_dir)
    save_sequences(seqs, tmp_path / "seqs.json")
    one = train_on_sequences(
        tiny_model_dir, str(tmp_path / "one"), seqs, LossSpec(), UpdateSpec(lr=1e-3)
    )
    two = launch_update(tiny_model_dir, str(tmp_path / "two"), str(tmp_path / "seqs.json"),
                        LossSpec(), UpdateSpec(lr=1e-3, num_processes=2, launcher=launcher))
    assert two["num_tokens"] == one["num_tokens"] == 42
    assert_same_update(one, two, tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("zero", [pytest.param(2, marks=pytest.mark.integration), 3])
def test_sharded_zero_stages_carry_the_optimizer_state_and_save_whole_weights(
        tiny_model_dir, tmp_path, zero):
    """Two ranks under ZeRO-2 / ZeRO-3 (the multi-GPU configs), two updates in a row: the second
    resumes DeepSpeed's sharded optimizer state, and the saved checkpoints hold the full
    (gathered) weights, equal to the unsharded ZeRO-0 run's."""
    from ibtpo_core.rl import save_sequences
    from ibtpo_core.training.launch import launch_update
    from ibtpo_core.training.retention import ZERO_STATE_DIR

    save_sequences(sequences(tiny_model_dir), tmp_path / "seqs.json")
    seqs = str(tmp_path / "seqs.json")
    runs = {}
    for name, cfg in (("zero0", "configs/deepspeed/zero0_cpu.yaml"),
                      ("sharded", f"configs/deepspeed/zero{zero}.yaml")):
        spec = UpdateSpec(lr=1e-3, num_processes=2, deepspeed_config=cfg)
        first, second = tmp_path / f"{name}1", tmp_path / f"{name}2"
        launch_update(tiny_model_dir, str(first), seqs, LossSpec(), spec)
        launch_update(str(first), str(second), seqs, LossSpec(), spec)
        runs[name] = (first, second)
    assert (runs["sharded"][0] / ZERO_STATE_DIR).is_dir()
    for step in (0, 1):
        a = AutoModelForCausalLM.from_pretrained(runs["zero0"][step]).state_dict()
        b = AutoModelForCausalLM.from_pretrained(runs["sharded"][step]).state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=f"step {step} {k}")
    # without the carried state the second step would differ (Adam's moments restart)
    fresh = tmp_path / "fresh"
    launch_update(
        str(runs["zero0"][0]),
        str(fresh),
        seqs,
        LossSpec(),
        UpdateSpec(lr=1e-3, num_processes=2, deepspeed_config=f"configs/deepspeed/zero{zero}.yaml"),
    )
    c = AutoModelForCausalLM.from_pretrained(fresh).state_dict()
    b = AutoModelForCausalLM.from_pretrained(runs["sharded"][1]).state_dict()
    assert any(not torch.allclose(c[k], b[k], atol=1e-6) for k in c)


@pytest.mark.parametrize("n,world,size,expected", [
    # 17 on 2 ranks at 8: shards 9 and 8; ceil(9 / 8) = 2 micro-batches each: 4 + 5 and 4 + 4
    (17, 2, 8, [[4, 5], [4, 4]]),
    # 3 on 2 ranks at 1: shards 2 and 1; 2 micro-batches each, rank 1 adds a weight-0 stand-in
    (3, 2, 1, [[1, 1], [0, 1]]),
    (6, 1, 256, [[6]]),
])
def test_every_rank_runs_the_same_number_of_micro_batches(n, world, size, expected):
    from ibtpo_core.training.micro_batches import rank_micro_batches

    mini = list(range(n))
    seen = []
    for rank in range(world):
        chunks = rank_micro_batches(mini, rank, world, size)
        assert [len(c) if w else 0 for c, w in chunks] == expected[rank]
        assert all(c for c, _ in chunks)  # never an empty micro-batch
        seen += [x for c, w in chunks if w for x in c]
    assert sorted(seen) == mini  # every sequence once, with weight 1


def test_uneven_shards_across_micro_batches_train_like_one_process(tiny_model_dir, tmp_path):
    """5 sequences on 2 ranks at 2 a micro-batch, ZeRO-2 (which reduces gradients in every
    backward): shards of 3 and 2 used to run 2 and 1 backward passes, and the rank with fewer
    left its peer in a reduction (the launch aborted)."""
    from ibtpo_core.rl import save_sequences
    from ibtpo_core.training.launch import launch_update

    seqs = sequences(tiny_model_dir)[:5]
    save_sequences(seqs, tmp_path / "seqs.json")
    one = train_on_sequences(tiny_model_dir, str(tmp_path / "one"), seqs, LossSpec(),
                        UpdateSpec(lr=1e-3, micro_batch_size=2))
    two = launch_update(tiny_model_dir, str(tmp_path / "two"), str(tmp_path / "seqs.json"),
                        LossSpec(), UpdateSpec(lr=1e-3, micro_batch_size=2, num_processes=2,
                                               deepspeed_config="configs/deepspeed/zero2.yaml"))
    assert two["num_tokens"] == one["num_tokens"] == 35
    assert_same_update(one, two, tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("node_launch", ["", "env IBTPO_NODE={host} bash -c"])
def test_two_nodes_of_one_process_equal_one_node_of_two(tiny_model_dir, tmp_path, node_launch):
    """Two torchrun agents on loopback, one rank each, joined by a c10d rendezvous (what two
    machines do), take the same step as two ranks under one agent; with node_launch the agents
    start through a command prefix, as over ssh or srun."""
    from ibtpo_core.rl import save_sequences
    from ibtpo_core.training.launch import launch_update

    save_sequences(sequences(tiny_model_dir), tmp_path / "seqs.json")
    one = launch_update(tiny_model_dir, str(tmp_path / "one"), str(tmp_path / "seqs.json"),
                        LossSpec(), UpdateSpec(lr=1e-3, num_processes=2))
    two = launch_update(tiny_model_dir, str(tmp_path / "two"), str(tmp_path / "seqs.json"),
                        LossSpec(), UpdateSpec(lr=1e-3, nodes=2, rdzv_port=0,
                                               node_hosts=("127.0.0.1", "127.0.0.1"),
                                               node_launch=node_launch))
    assert two["world_size"] == one["world_size"] == 2  # the agents joined one group
    assert two["num_tokens"] == one["num_tokens"] == 42
    assert_same_update(one, two, tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 2}, "needs node_hosts with 2 addresses"),
    ({"nodes": 2, "node_hosts": ("a", "b"), "launcher": "deepspeed"}, "set launcher: torchrun"),
    ({"node_launch": "ssh"}, "must name {host}"),
    ({"nodes": 2, "node_hosts": ("a", "b"), "resident_ranks": True},
     "with nodes=2 set resident_ranks: false"),
])
def test_bad_multi_node_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UpdateSpec(**kwargs)


PORT_RACE = """
import os, socket, sys
import torch
import ibtpo_core.runtime as runtime
from ibtpo_core.training import deepspeed_trainer as dt

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()  # another process got the port between our choosing and binding it
real, picks = runtime.free_port, []
def free_port(host="127.0.0.1"):
    picks.append(taken.getsockname()[1] if not picks else real(host))
    return picks[-1]
runtime.free_port = free_port
if sys.argv[1] == "launcher":  # a launcher's port: its error is the launcher's to fix
    os.environ["MASTER_PORT"] = str(taken.getsockname()[1])
dt._ensure_dist_env()
try:
    dt.init_process_group()
except torch.distributed.DistNetworkError as err:
    print("RAISED", "EADDRINUSE" in str(err))
    sys.exit(0)
print("INIT", torch.distributed.is_initialized(), os.environ["MASTER_PORT"] != str(picks[0]),
      len(picks))
"""


@pytest.mark.parametrize("who, expected", [("self", "INIT True True 2"),
                                           ("launcher", "RAISED True")])
def test_a_port_taken_before_the_bind_is_chosen_again_only_when_ours(tmp_path, who, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK",
                                                            "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, "-c", PORT_RACE, who], capture_output=True, text=True,
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},
                         timeout=300)
    assert res.stdout.strip().splitlines()[-1:] == [expected], res.stdout + res.stderr[-3000:]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
def test_each_aggregation_over_micro_batches_equals_one_full_batch_step(tiny_model_dir, tmp_path,
                                                                         agg):
    """Sequences of 3..8 tokens in two micro-batches: the trainer's step equals the full-batch
    step in plain torch under each ``loss.agg`` (a micro-batch weighs its share of the
    mini-batch's tokens, or of its sequences)."""
    seqs = [TrainingSequence(s.prompt, s.tokens[:3 + i], s.old_logprobs[:3 + i],
                             s.advantages[:3 + i], s.step_ids[:3 + i], s.reward)
            for i, s in enumerate(sequences(tiny_model_dir))]
    seqs[5] = TrainingSequence(seqs[5].prompt, seqs[5].tokens + [7], seqs[5].old_logprobs + [0.0],
                               seqs[5].advantages + [seqs[5].advantages[0]], [1] * 9, 1.0)
    loss = LossSpec(agg=agg, agg_tokens=10 if agg == "seq_sum_norm" else None)
    train_on_sequences(tiny_model_dir, str(tmp_path / "ds"), seqs, loss,
                       UpdateSpec(lr=1e-3, micro_batch_size=4))
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch_steps(ref, [seqs], loss, lr=1e-3)
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").state_dict()
    # padded micro-batches round differently from the full batch (up to ~1e-5 here); a wrong
    # weighting of the micro-batches moves some weight by a whole AdamW step (2e-3 at lr 1e-3)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ds[k], v, atol=1e-4, rtol=0, msg=k)

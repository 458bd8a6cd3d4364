"""One policy update with a DeepSpeed engine.

Loads the policy with ``from_pretrained``, wraps it with ``deepspeed.initialize`` (ZeRO stage
from a ``configs/deepspeed/*.yaml`` file; on CPU the CPU accelerator over gloo), runs one
optimizer step over all training sequences of an iteration (micro-batches accumulate, the loss
is the token mean over the whole batch), and saves the new policy with ``save_pretrained`` plus
the optimizer state (ZeRO 0: one file loaded back with ``weights_only=True``; ZeRO 1-3:
DeepSpeed's sharded checkpoint; ZeRO-3 parameters are gathered before saving). On a GPU each
rank trains on its own device. A torch AdamW is passed to DeepSpeed, which avoids compiling
DeepSpeed's own Adam.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ibtpo_core.algo.losses import LossSpec, agg_units, policy_loss
from ibtpo_core.algo.tree import TrainingSequence
from ibtpo_core.training import replay, resident
from ibtpo_core.training.comm_op import prepare_comm_op
from ibtpo_core.training.micro_batches import rank_micro_batches
from ibtpo_core.training.old_logprobs import corrected, mismatch_sums, response_slice
from ibtpo_core.training.policy import collate, response_logprobs, token_logprobs
from ibtpo_core.training.retention import (
    OPTIMIZER_FILE,
    ZERO_STATE_DIR,
    require_optimizer_state,
    require_weights,
)

# Settings of where and how an update's ranks start, not of what they compute: they key no stage.
# The split of the world size into nodes x processes is one of them (two nodes of one rank take
# the step one node of two ranks takes, to 2e-6: tests/test_deepspeed_update.py); the world size
# itself keys the update (it sets the float order of the gradient all-reduce).
# ``resident`` (one process: keep the engine and optimizer in memory between iterations,
# resident.py) takes the same step as a rebuild from disk, bit for bit (tests/test_resident.py).
# ``resident_ranks`` (the ranks of a multi-process update stay alive across iterations,
# server.py) likewise: the held shards take the step a relaunch takes (tests/test_update_server.py).
LAUNCH_SETTINGS = ("launcher", "num_processes", "nodes", "node_hosts", "node_launch", "rdzv_port",
                   "resident", "resident_ranks")
# set in the ranks of server.py's resident launch: each keeps its state across updates
SERVING_ENV = "IBTPO_UPDATE_SERVER"


@dataclass(frozen=True)
class UpdateSpec:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    micro_batch_size: int = 256
    deepspeed_config: str = "configs/deepspeed/zero0_cpu.yaml"
    temperature: float = 1.0
    num_processes: int = 1  # > 1: the update task launches this many ranks
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    # optimizer steps per RL iteration, each on one slice of the batch (verl's PPO mini-batches):
    # from the second on, pi_theta != pi_old, so the clipping (and clip-higher) can bind
    mini_batches: int = 1
    # multi-node: one torchrun agent per node, num_processes ranks each, joined by torchrun's
    # c10d rendezvous at node_hosts[0]:rdzv_port. node_launch is the command that runs a shell
    # string on {host}, the agent's command line appended as one argument ("ssh {host}",
    # "srun --nodes=1 --ntasks=1 --nodelist={host} bash -c"); empty runs every agent on this
    # machine (a loopback check). Nodes need the repository, its .venv and the
    # run folder at the same paths (a shared filesystem).
    nodes: int = 1
    node_hosts: tuple[str, ...] = ()
    node_launch: str = ""
    rdzv_port: int = 29400  # 0: a free port of this machine (node_hosts[0] must be this machine)
    # memory (policy.py): the output layer on response tokens only, this many at a time
    # (0: the whole-vocabulary logits of every position, the old path); activation
    # recomputation in the transformer layers; micro-batches formed by a budget of padded
    # tokens (longest sequence x count, sequences grouped by length; 0: micro_batch_size
    # sequences in their order). The loss and its gradient do not depend on any of them.
    logprob_chunk_tokens: int = 256
    gradient_checkpointing: bool = False
    max_tokens_per_micro_batch: int = 0
    # pi_old (old_logprobs.py): the rollout engine's log-probs as sampled, or the trainer's
    # recomputed before the first step; with recompute, rollout_is_cap > 0 weights each token by
    # min(pi_old / pi_rollout, cap) (truncated importance sampling; 0: off)
    old_logprobs: Literal["rollout", "recompute"] = "rollout"
    rollout_is_cap: float = 0.0
    # one process: the engine, optimizer and reference stay in memory between iterations and
    # the rollout engine gets the new weights in memory (resident.py); the checkpoint is still
    # written every iteration
    resident: bool = True
    # several processes on one node: the ranks start once and stay alive across iterations,
    # each keeping its part of the engine and optimizer (server.py); the checkpoint and the
    # optimizer state are still written every iteration
    resident_ranks: bool = False

    @property
    def world_size(self) -> int:
        """Ranks that take one update together: num_processes on each of the nodes."""
        return self.num_processes * self.nodes

    def stage_key(self) -> dict:
        """What the update computes, as a stage key: not where or how its ranks are launched
        (LAUNCH_SETTINGS), and the DeepSpeed config by its content, not its path."""
        import dataclasses

        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in LAUNCH_SETTINGS}
        out["world_size"] = self.world_size
        out["deepspeed_config"] = load_deepspeed_config(self.deepspeed_config, self.world_size)
        return out

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1 (got {self.num_processes})")
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1 (got {self.nodes})")
        if self.nodes > 1 and len(self.node_hosts) != self.nodes:
            raise ValueError(f"nodes={self.nodes} needs node_hosts with {self.nodes} addresses "
                             f"(the first hosts the rendezvous), got {list(self.node_hosts)}")
        if self.nodes > 1 and self.launcher != "torchrun":
            raise ValueError("multi-node updates join through torchrun's c10d rendezvous: set "
                             "launcher: torchrun (the deepspeed launcher's hostfile is not used)")
        if self.node_launch and "{host}" not in self.node_launch:
            raise ValueError(f"node_launch {self.node_launch!r} must name {{host}}, e.g. "
                             f"'ssh {{host}}' or 'srun --nodes=1 --ntasks=1 --nodelist={{host}}'")
        if self.resident_ranks and self.nodes > 1:
            raise ValueError(f"resident_ranks keeps the ranks of one node alive (training/"
                             f"server.py); with nodes={self.nodes} set resident_ranks: false "
                             f"(each update launches its agents)")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 (got {self.micro_batch_size})")
        if self.logprob_chunk_tokens < 0 or self.max_tokens_per_micro_batch < 0:
            raise ValueError("logprob_chunk_tokens and max_tokens_per_micro_batch must be >= 0 "
                             "(0 turns each off)")
        if self.rollout_is_cap < 0 or (self.rollout_is_cap and self.old_logprobs != "recompute"):
            raise ValueError(f"rollout_is_cap={self.rollout_is_cap}: the truncated importance "
                             f"weight needs the trainer's pi_old; set old_logprobs: recompute, "
                             f"or rollout_is_cap: 0 (off)")
        if self.mini_batches < 1:
            raise ValueError(f"mini_batches must be >= 1 (got {self.mini_batches}); 1 = one "
                             f"optimizer step per iteration")


def load_deepspeed_config(path: str, world_size: int) -> dict:
    """Read a ``configs/deepspeed/*.yaml`` file (relative to the working directory or the
    repository) and check it against the world size; errors name the fix."""
    import yaml

    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(__file__).resolve().parents[2] / path
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist: use one of "
                                f"configs/deepspeed/*.yaml")
    cfg = yaml.safe_load(p.read_text()) or {}
    tbs = cfg.get("train_batch_size")
    if tbs is not None and tbs % world_size:
        raise ValueError(f"DeepSpeed config {path}: train_batch_size={tbs} is not divisible "
                         f"by the world size {world_size} (algo.update.num_processes); remove "
                         f"train_batch_size (the trainer derives it) or change num_processes")
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config {path}: zero_optimization.stage={stage}; "
                         f"valid stages: 0, 1, 2, 3")
    return cfg


def _ds_config(path: str, micro: int, world_size: int) -> dict:
    cfg = load_deepspeed_config(path, world_size)
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = 1
    for sect in ("bf16", "fp16"):
        if cfg.get(sect, {}).get("enabled") == "auto":
            cfg[sect]["enabled"] = torch.cuda.is_available() and sect == "bf16"
    return cfg


def _ensure_dist_env() -> int:
    """Single-process defaults for torch.distributed; a launcher's variables win."""
    from ibtpo_core.runtime import free_port, set_accelerator_default

    set_accelerator_default()
    if "MASTER_PORT" not in os.environ:  # no launcher: a free local port
        os.environ["MASTER_PORT"] = str(free_port())
        os.environ[OWN_PORT_ENV] = os.environ["MASTER_PORT"]
    for k, v in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
    ):
        os.environ.setdefault(k, v)
    return int(os.environ["WORLD_SIZE"])


OWN_PORT_ENV = "IBTPO_OWN_MASTER_PORT"  # the MASTER_PORT this process chose (no launcher)


def init_process_group(attempts: int = 3) -> None:
    """torch.distributed through DeepSpeed. A port chosen by this process (or by the process
    that started it, whose MASTER_PORT it inherits while that parent's process group still holds
    the port) can be in use at the bind, as can one another process took in between: choose
    another and try again. A launcher's port is the launcher's to fix, so its error stands."""
    import deepspeed

    from ibtpo_core.runtime import free_port

    backend = "gloo" if not torch.cuda.is_available() else "nccl"
    for attempt in range(attempts):
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
            return
        except torch.distributed.DistNetworkError as err:
            own = os.environ.get(OWN_PORT_ENV) == os.environ.get("MASTER_PORT")
            if not own or "EADDRINUSE" not in str(err) or attempt == attempts - 1:
                raise
            os.environ["MASTER_PORT"] = os.environ[OWN_PORT_ENV] = str(free_port())


def train_on_sequences(
        model_dir: str, out_dir: str, seqs: list[TrainingSequence], loss: LossSpec,
        spec: UpdateSpec, ref_dir: str | None = None, save_optimizer: bool = True,
        load_sequences=None, save_weights: bool = True) -> dict[str, float]:
    """``spec.mini_batches`` optimizer steps on ``seqs`` (one per slice, in order); saves the new
    policy (and, with ``save_optimizer``, the optimizer state) to ``out_dir``; without
    ``save_weights``, only its config, tokenizer and the weights' checksum (``replay.HELD_FILE``):
    the weights stay in memory. One process with ``spec.resident``: the engine that wrote
    ``model_dir`` is reused if it is still held (resident.py), else built from it; a
    ``model_dir`` saved without its optimizer state (or weights) is rebuilt by replaying the
    updates since the last one saved with it (replay.py), reading each update's sequences with
    ``load_sequences(path)``."""
    if not seqs:
        raise ValueError("no training sequences: every prompt of the iteration failed to sample")
    world, ds_cfg = _setup(spec)
    served = os.environ.get(SERVING_ENV) == "1"  # a rank of server.py's resident launch
    keep = spec.resident and (world == 1 or served)
    if not save_weights and not (keep and world == 1):
        raise ValueError("only a one-process resident update can keep the weights in memory "
                         "(rl.save_every > 1): set algo.update.resident: true, one process")
    key = _resident_key(spec, ds_cfg, ref_dir, loss)
    state = resident.take(model_dir, key) if keep else None
    held = state is not None
    if state is None and replay.optimizer_not_saved(model_dir):
        if not keep or world > 1:
            raise ValueError(f"{model_dir} was saved without its optimizer state "
                             f"(rl.save_optimizer_every), which only a one-process resident "
                             f"update can replay: set algo.update.resident: true")
        state = replay_to(model_dir, spec, loss, ds_cfg, ref_dir, key, load_sequences)
    if state is None:
        state = build_trainer(model_dir, spec, loss, ds_cfg, ref_dir, key)
    t0 = time.perf_counter()
    sums = train_steps(state, seqs, loss, spec, world)
    sums["update/compute_s"] = time.perf_counter() - t0  # the steps alone: no build, no save
    sums["update/held"] = float(held)  # 1: the trainer of the last update, kept in memory
    if save_weights:
        save_policy(state.engine, state.optimizer, state.tok, out_dir,
                    int(os.environ.get("RANK", "0")), state.sharded, save_optimizer)
    else:
        module = state.engine.module
        module.config.save_pretrained(out_dir)
        state.tok.save_pretrained(out_dir)
        replay.write_held(out_dir, module.state_dict())
    if keep:
        if world > 1:  # rank 0 has written the weights file every rank fingerprints
            torch.distributed.barrier()
        resident.hold(state, out_dir)
    return sums


def held_weights(checkpoint: str, spec: UpdateSpec, loss: LossSpec, ref_dir: str | None,
                 load_sequences) -> dict:
    """The weights of ``checkpoint`` in memory: the held trainer's if it wrote it, else rebuilt
    by a replay (a new process resuming a run between durable checkpoints, ``rl.save_every``),
    which then stays held for the next update."""
    weights = resident.weights_for(checkpoint)
    if weights is not None:
        return weights
    _, ds_cfg = _setup(spec)
    key = _resident_key(spec, ds_cfg, ref_dir, loss)
    return replay_to(checkpoint, spec, loss, ds_cfg, ref_dir, key,
                     load_sequences).engine.module.state_dict()


def _setup(spec: UpdateSpec) -> tuple[int, dict]:
    """The process group (one rank builds nothing; a killed build's lock is cleared) and the
    DeepSpeed config; returns the world size and the config."""
    world = _ensure_dist_env()
    if not torch.cuda.is_available():
        prepare_comm_op(world)
    if not torch.distributed.is_initialized():
        init_process_group()
    return world, _ds_config(spec.deepspeed_config, spec.micro_batch_size, world)


def _resident_key(spec: UpdateSpec, ds_cfg: dict, ref_dir: str | None, loss: LossSpec) -> str:
    """The settings a held trainer was built for: another key rebuilds it."""
    return json.dumps([dataclasses.asdict(spec), ds_cfg, ref_dir if loss.beta_kl > 0 else None],
                      sort_keys=True, default=str)


def replay_to(checkpoint: str, spec: UpdateSpec, loss: LossSpec, ds_cfg: dict,
              ref_dir: str | None, key: str, load_sequences) -> resident.TrainerState:
    """The trainer state of ``checkpoint``, saved without its optimizer state (or weights):
    built from the last checkpoint before it saved with one (or the start) and stepped through
    each later update's sequences again. Each replayed step must give that checkpoint's weights
    bit for bit (their file, or the checksum of those kept in memory), else this fails rather
    than train from a state that differs from the run's."""
    from safetensors.torch import load_file

    if load_sequences is None:
        raise ValueError(f"{checkpoint} needs a replay, and no sequence loader was given")
    base, steps = replay.plan(checkpoint)
    print(f"update: replaying {len(steps)} update(s) from {base} to rebuild the state of "
          f"{checkpoint} (rl.save_optimizer_every, rl.save_every)", file=sys.stderr, flush=True)
    state = build_trainer(base, spec, loss, ds_cfg, ref_dir, key)
    for ckpt, seqs_path in steps:
        train_steps(state, load_sequences(seqs_path), loss, spec, 1)
        got = state.engine.module.state_dict()
        weights = Path(ckpt) / resident.WEIGHTS_FILE
        if weights.is_file():
            differ = (name for name, want in load_file(str(weights)).items()
                      if not torch.equal(got[name].detach().cpu(), want))
        elif (Path(ckpt) / replay.HELD_FILE).is_file():
            want, have = replay.read_held(ckpt), replay.checksum(got)
            differ = (name for name in want if have.get(name) != want[name])
        else:  # weights pruned by rl.keep_checkpoints: nothing to check this step against
            differ = iter(())
        name = next(differ, None)
        if name is not None:
            raise RuntimeError(f"replaying the update that wrote {ckpt} did not give its "
                               f"weights ({name} differs): the replay is not deterministic "
                               f"here (threads, device); rerun with rl.save_every: 1 and "
                               f"rl.save_optimizer_every: 1")
    resident.hold(state, checkpoint)
    return state


def train_steps(state: resident.TrainerState, seqs: list[TrainingSequence], loss: LossSpec,
                spec: UpdateSpec, world: int) -> dict[str, float]:
    """``spec.mini_batches`` optimizer steps of ``state``'s engine on ``seqs``; the metrics."""
    for g in state.optimizer.param_groups:
        g["lr"] = spec.lr
    engine, tok, ref, sharded = state.engine, state.tok, state.ref, state.sharded
    model = engine.module
    model.train()
    device = engine.device
    # the batch is cut into mini-batches (one optimizer step each, in order); every rank reads
    # all sequences and trains on its shard of each; the loss is aggregated over the mini-batch
    # (``loss.agg``: a micro-batch weighs its share of the mini-batch's units), and DeepSpeed
    # averages gradients over ranks, hence the world-size factor
    total_tokens = sum(len(s.tokens) for s in seqs)
    rank = int(os.environ.get("RANK", "0"))
    n_mini = spec.mini_batches
    if len(seqs) < n_mini * world:
        raise ValueError(f"{len(seqs)} sequences cannot fill {n_mini} mini-batches x {world} "
                         f"processes; lower algo.update.mini_batches or num_processes")
    sums: dict[str, float] = {}
    norms: list = []  # each optimizer step's gradient norm, before the clip
    top = {"mismatch/ratio_max": 0.0}  # reduced with max over ranks, not summed
    if spec.old_logprobs == "recompute":
        seqs = recompute_old_logprobs(engine, tok.pad_token_id, seqs, spec, loss, rank, world,
                                      total_tokens, sums, top)
    for m, (mini, micro) in enumerate(rank_schedule(seqs, spec, rank, world)):
        mini_units = agg_units([len(s.tokens) for s in mini], loss)
        for k, (chunk, weight) in enumerate(micro):
            batch = collate(chunk, tok.pad_token_id).to(device)
            logp, ent = sequence_logprobs(engine, batch, spec, entropy_grad=loss.entropy_coef != 0)
            if m == 0 and weight and spec.old_logprobs == "rollout":  # pi_theta is pi_old here
                add_mismatch(sums, top, mismatch_sums(logp, batch.old_logprobs,
                                                      batch.response_mask, loss.eps_low,
                                                      loss.eps_high, total_tokens))
            ref_logp = None
            if ref is not None:
                with torch.no_grad():
                    ref_logp, _ = sequence_logprobs(ref, batch, spec)
            value, metrics = policy_loss(
                logp,
                batch.old_logprobs,
                batch.advantages,
                batch.response_mask,
                loss,
                ref_logprobs=ref_logp,
                entropy=ent,
            )
            tokens = float(batch.response_mask.sum()) * weight  # 0: a stand-in (rank_micro_batches)
            share = agg_units([len(s.tokens) for s in chunk], loss) * weight / mini_units
            boundary = k == len(micro) - 1
            engine.set_gradient_accumulation_boundary(boundary)
            engine.backward(value * share * world, scale_wrt_gas=False)
            own = grad_norm_before_step(model) if boundary and not sharded else None
            engine.step()
            if boundary:  # ZeRO's optimizers report the norm; stage 0 with torch's does not
                norms.append(own if own is not None else engine.get_global_grad_norm())
            for key, v in metrics.items():  # token-weighted over the whole batch
                sums[key] = sums.get(key, 0.0) + v * tokens / total_tokens
    if world > 1:  # metric shares are relative to the global token count: sum them
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(vec)
        sums = dict(zip(keys, vec.tolist()))
        peak = torch.tensor([top["mismatch/ratio_max"]], dtype=torch.float64)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        top["mismatch/ratio_max"] = float(peak)
    if "mismatch/ratio_mean" in sums:
        sums.update(top)
    sums["num_tokens"] = float(total_tokens)
    sums["num_sequences"] = float(len(seqs))
    sums["world_size"] = float(world)  # ranks that took the step together
    sums.update(clip_metrics(norms, state.clip))
    return sums


def grad_norm_before_step(model) -> float:
    """The 2-norm of the accumulated gradients (what the clip compares with its threshold);
    unsharded gradients only (ranks hold the same averaged gradients after the reduction)."""
    grads = [p.grad.detach().double().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def clip_metrics(norms: list, clip: float) -> dict[str, float]:
    """``grad_norm`` (the mean over the iteration's optimizer steps, before clipping),
    ``grad_norm_max`` and ``update/clipped_frac`` (the share of steps the clip at ``clip``
    scaled down; 0 when there is no clip): whether the clip binds, i.e. whether the advantages'
    scale is a hidden step size."""
    vals = [float(n) for n in norms if n is not None and not math.isnan(float(n))]
    if not vals:
        return {}
    return {"grad_norm": sum(vals) / len(vals), "grad_norm_max": max(vals),
            "update/clipped_frac": (sum(v > clip for v in vals) / len(vals)) if clip > 0 else 0.0}


def build_trainer(model_dir: str, spec: UpdateSpec, loss: LossSpec, ds_cfg: dict,
                  ref_dir: str | None, key: str) -> resident.TrainerState:
    """The DeepSpeed engine over ``model_dir``'s weights, with its optimizer state (one file for
    ZeRO 0, the sharded checkpoint for ZeRO 1-3) and, with a KL term, the reference model."""
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_optimizer_state(model_dir)
    if replay.optimizer_not_saved(model_dir):  # a fresh optimizer would silently change the run
        raise ValueError(f"cannot build the trainer from {model_dir}: it was saved without its "
                         f"optimizer state (rl.save_optimizer_every); replay_to rebuilds it")
    require_weights(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model, zero3_loading = load_for_training(model_dir, ds_cfg)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    sharded = ds_cfg.get("zero_optimization", {}).get("stage", 0) > 0
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay,
                            betas=spec.betas)
    opt_path = Path(model_dir) / OPTIMIZER_FILE
    if not sharded and opt_path.is_file():
        opt.load_state_dict(torch.load(opt_path, weights_only=True))
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    del zero3_loading  # kept alive until the engine holds the partitioned model
    zero_dir = Path(model_dir) / ZERO_STATE_DIR
    if sharded and zero_dir.is_dir():  # the previous iteration's sharded optimizer state
        engine.load_checkpoint(str(zero_dir), tag="state", load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    ref = None
    if ref_dir is not None and loss.beta_kl > 0:
        ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=model.dtype).to(
            engine.device).eval()
    return resident.TrainerState(engine, optimizer, tok, ref, sharded, key,
                                 clip=float(ds_cfg.get("gradient_clipping", 0.0) or 0.0))


def load_for_training(model_dir: str, ds_cfg: dict):
    """The policy to train: in bf16 where DeepSpeed trains in bf16 (it keeps fp32 master
    weights itself), not an fp32 copy per rank; under ZeRO-3 partitioned while it loads (each
    rank materialises its shard only, through ``deepspeed.zero.Init``). Returns the model and
    what must stay alive until ``deepspeed.initialize``."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = torch.bfloat16 if (ds_cfg.get("bf16") or {}).get("enabled") is True else torch.float32
    stage = (ds_cfg.get("zero_optimization") or {}).get("stage", 0)
    keep = HfDeepSpeedConfig(ds_cfg) if stage == 3 else None  # from_pretrained reads it
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), keep


def add_mismatch(sums: dict, top: dict, part: dict[str, float]) -> None:
    for key, v in part.items():
        if key == "mismatch/ratio_max":
            top[key] = max(top[key], v)
        else:
            sums[key] = sums.get(key, 0.0) + v


def recompute_old_logprobs(engine, pad_id: int, seqs: list[TrainingSequence], spec: UpdateSpec,
                           loss: LossSpec, rank: int, world: int, total_tokens: int,
                           sums: dict, top: dict) -> list[TrainingSequence]:
    """``seqs`` with this rank's sequences' pi_old recomputed by the trainer before the first
    step (old_logprobs.py), the mismatch to the rollout's log-probs added to ``sums`` / ``top``."""
    new: dict[int, TrainingSequence] = {}
    with torch.no_grad():
        for _, micro in rank_schedule(seqs, spec, rank, world):
            for chunk, weight in micro:
                if not weight:
                    continue
                batch = collate(chunk, pad_id).to(engine.device)
                logp, _ = sequence_logprobs(engine, batch, spec)
                add_mismatch(sums, top, mismatch_sums(logp, batch.old_logprobs,
                                                      batch.response_mask, loss.eps_low,
                                                      loss.eps_high, total_tokens))
                for i, seq in enumerate(chunk):
                    fixed, w = corrected(seq, response_slice(logp[i].float().cpu(), seq),
                                         spec.rollout_is_cap)
                    new[id(seq)] = fixed
                    add_mismatch(sums, top, {k: v / total_tokens for k, v in w.items()})
    return [new.get(id(s), s) for s in seqs]


def rank_schedule(seqs: list[TrainingSequence], spec: UpdateSpec, rank: int,
                  world: int) -> list[tuple[list, list[tuple[list, float]]]]:
    """The update's ``spec.mini_batches`` slices of ``seqs``, in order, each with this rank's
    micro-batches of it (``rank_micro_batches``): what the recompute of pi_old and the optimizer
    steps both walk, so they see the same partition."""
    n = spec.mini_batches
    minis = [seqs[m * len(seqs) // n:(m + 1) * len(seqs) // n] for m in range(n)]
    return [(mini, rank_micro_batches(mini, rank, world, spec.micro_batch_size,
                                      spec.max_tokens_per_micro_batch)) for mini in minis]


def sequence_logprobs(model, batch, spec: UpdateSpec, entropy_grad: bool = False):
    """Log-probs and entropies of a micro-batch, (B, L - 1) each: chunked over the response
    positions (``spec.logprob_chunk_tokens``), or from the whole-vocabulary logits (0)."""
    if spec.logprob_chunk_tokens:
        return response_logprobs(model, batch, spec.temperature, spec.logprob_chunk_tokens,
                                 entropy_grad)
    return token_logprobs(model, batch, spec.temperature)


def save_policy(engine, optimizer, tok, out_dir: str, rank: int, sharded: bool,
                save_optimizer: bool = True) -> None:
    """The new policy as a plain HF checkpoint (rank 0), plus (``save_optimizer``) the optimizer
    state: one file for ZeRO 0, DeepSpeed's sharded checkpoint (every rank writes its part) for
    ZeRO 1-3. Under ZeRO-3 the parameters are gathered from all ranks first (a collective
    call)."""
    import contextlib

    import deepspeed

    module = engine.module
    module.eval()
    gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
              if engine.zero_optimization_partition_weights() else contextlib.nullcontext())
    with gather:
        if rank == 0:
            module.save_pretrained(out_dir, safe_serialization=True)
            tok.save_pretrained(out_dir)
    if not save_optimizer:
        return
    if sharded:
        engine.save_checkpoint(str(Path(out_dir) / ZERO_STATE_DIR), tag="state",
                               save_latest=False)
    elif rank == 0:
        torch.save(optimizer.state_dict(), Path(out_dir) / OPTIMIZER_FILE)

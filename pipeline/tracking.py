"""MLflow helpers for the flows: one parent run per training run, one level of child runs per
stage kind, idempotent logging (a rerun that resumes a run logs each iteration exactly once).

The parent run is found again by its ``ibtpo.run_key`` tag (a digest of the config), so a rerun
of the same command continues the same MLflow run instead of starting a new one.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from ibtpo_core.artifacts import exclusive

SECRET = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|auth)", re.I)
PACKAGES = ("torch", "transformers", "deepspeed", "prefect", "mlflow", "lm_eval", "datasets")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# Where the store's write lock lives when the store is not a local file (set by the flows to
# their stage cache, which every worker of a shared store sees); None: this machine's temp folder.
_LOCK_DIR: Path | None = None
_held = threading.local()


def use_lock_dir(folder: str | Path) -> None:
    """Take the write lock of a tracking server in ``folder`` (the stage cache): workers on
    several machines that share it then serialise their writes too."""
    global _LOCK_DIR
    _LOCK_DIR = Path(folder)


def _lock_target(uri: str) -> Path:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])  # the lock sits beside the database
    import hashlib
    import tempfile

    folder = _LOCK_DIR or Path(tempfile.gettempdir())
    return folder / f"mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def store_lock():
    """Hold the tracking store's write lock (re-entrant within a process).

    Every write here is check-then-write (find a run or create it, log a step unless logged, set
    a tag: MLflow selects, then inserts), so two processes that log to one run (two runs of one
    config started together, sweep cells on one store) would both insert, and the slower one
    fails on a unique key or logs a step twice. Under this lock each check-then-write is atomic
    across the processes of one machine, and across machines through a shared lock folder
    (``use_lock_dir``)."""
    depth = getattr(_held, "depth", 0)
    if depth:
        _held.depth = depth + 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    with _process_lock, exclusive(_lock_target(tracking_uri()), quiet=True):
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0


_process_lock = threading.Lock()  # threads of one process: flock alone does not exclude them


def serialised(fn):
    """``fn`` runs under the store's write lock (``store_lock``)."""
    import functools

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with store_lock():
            return fn(*args, **kwargs)

    return locked


def check_tracking_store() -> None:
    """Fail at start, not after an hour of training, when the tracking store is unreachable."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # one quick attempt: MLflow's HTTP client would otherwise retry with backoff for minutes
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        # a new sqlite store is created (its schema migrated) by the first client: two runs that
        # start together on one new store would both migrate it and one would fail, so the first
        # look at a local store is taken under a lock beside the database
        with store_lock():
            MlflowClient().search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        raise RuntimeError(f"MLflow tracking store {uri} is not reachable ({type(err).__name__}: "
                           f"{str(err)[:200]}); start the server or set MLFLOW_TRACKING_URI to a "
                           f"reachable store, e.g. sqlite:///mlflow.db") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def artifact_root(uri: str) -> str | None:
    """For a sqlite store, artefacts live beside the database (not in the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None  # a server decides


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = "***" if SECRET.search(k) else str(v)
    return out


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[f"version.{p}"] = importlib.metadata.version(p.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _find(client: MlflowClient, experiment_id: str, filt: str):
    runs = client.search_runs([experiment_id], filter_string=filt, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@serialised
def reap_orphans(client: MlflowClient, exp_id: str) -> list[str]:
    """Mark KILLED the RUNNING training runs of this host whose process is gone (a run killed
    before its rerun could resume it, e.g. because the code changed in between)."""
    host = socket.gethostname()
    reaped = []
    for run in client.search_runs([exp_id], "attributes.status = 'RUNNING' and "
                                            "tags.`ibtpo.kind` = 'train'"):
        tags = run.data.tags
        pid = tags.get("ibtpo.pid")
        if (
            tags.get("ibtpo.host") == host
            and pid
            and int(pid) != os.getpid()
            and not _alive(int(pid))
        ):
            finish(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    return reaped


# how often a write that lost a race with another process (see lost_race) is tried in all
LOST_RACE_ATTEMPTS = 3
# what a tracking store says when a row another process inserted meanwhile is inserted again:
# SQLite, PostgreSQL, MySQL
_DUPLICATE_ROW = re.compile(r"UNIQUE constraint failed|duplicate key value|Duplicate entry", re.I)


def lost_race(err: Exception) -> bool:
    """Whether ``err`` says a row was inserted twice (two writers checked, then both inserted)."""
    return bool(_DUPLICATE_ROW.search(str(err)))


@serialised
def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing. Two runs that start together on a new
    store may both find it missing: the one whose create loses the race reads the other's."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(tracking_uri()))
    except mlflow.exceptions.MlflowException as err:
        exp = client.get_experiment_by_name(name)
        if exp is None or not (lost_race(err) or err.error_code == "RESOURCE_ALREADY_EXISTS"):
            raise
        return exp.experiment_id


@serialised
def parent_run(experiment: str, run_key: str, name: str, params: dict, tags: dict,
               kind: str = "train") -> str:
    """The id of the top-level run (``kind`` train or sweep) for ``run_key``: found again on a
    rerun, else created."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    exp_id = experiment_id(client, experiment)
    tags = {**tags, "ibtpo.host": socket.gethostname(), "ibtpo.pid": str(os.getpid())}
    found = _find(
        client, exp_id, f"tags.`ibtpo.run_key` = '{run_key}' and tags.`ibtpo.kind` = '{kind}'"
    )
    if found is not None:
        run_id = found.info.run_id
        if found.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(exp_id, run_name=name,
                                tags={"ibtpo.run_key": run_key, "ibtpo.kind": kind, **tags})
        run_id = run.info.run_id
        items = list({**flatten(params), **package_versions()}.items())
        for i in range(0, len(items), 100):
            client.log_batch(
                run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[i : i + 100]]
            )
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    reap_orphans(client, exp_id)
    return run_id


@serialised
def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def find_sweep_run(name_or_id: str, experiment: str = "ibtpo") -> str:
    """A sweep's MLflow run id from its id or its sweep name (the latest run of that sweep)."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    try:
        run = client.get_run(name_or_id)
        if run.data.tags.get("ibtpo.kind") == "sweep":
            return name_or_id
        raise ValueError(f"run {name_or_id} is not a sweep run (tag ibtpo.kind is "
                         f"{run.data.tags.get('ibtpo.kind')!r}); pass a sweep's run id or name")
    except mlflow.exceptions.MlflowException:
        pass
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`ibtpo.kind` = 'sweep' and tags.`ibtpo.sweep` = "
                                    f"'{name_or_id}'", order_by=["attributes.start_time DESC"],
                              max_results=1) if exps else []
    if not runs:
        raise ValueError(f"no sweep run with id or name {name_or_id!r} in {tracking_uri()}; "
                         f"run one with `ibtpo sweep configs/sweeps/<file>.yaml`")
    return runs[0].info.run_id


@serialised
def child_run(parent_id: str, stage: str) -> str:
    """The child run of ``parent_id`` for one stage kind (one level of nesting)."""
    client = MlflowClient()
    parent = client.get_run(parent_id)
    found = _find(client, parent.info.experiment_id,
                  f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`ibtpo.stage` = '{stage}'")
    if found is not None:
        return found.info.run_id
    run = client.create_run(parent.info.experiment_id, run_name=stage,
                            tags={"mlflow.parentRunId": parent_id, "ibtpo.stage": stage})
    return run.info.run_id


@serialised
def log_metrics_once(
    run_id: str, step: int, metrics: dict[str, float], sentinel: str = "iteration"
) -> bool:
    """Log ``metrics`` at ``step`` unless that step was logged before; True if logged now."""
    client = MlflowClient()
    if any(m.step == step for m in client.get_metric_history(run_id, sentinel)):
        return False
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    rows = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    rows.append(Metric(sentinel, float(step), ts, step))
    if len(rows) > 1000:
        raise ValueError(f"{len(rows)} metrics in one step exceed MLflow's batch of 1000")
    from pipeline.stage import inject_fault

    inject_fault("mlflow_log", step)
    client.log_batch(run_id, metrics=rows)  # one batch: one transaction, all or nothing
    return True


@serialised
def log_artifact_once(run_id: str, path: str, artifact_path: str | None = None) -> None:
    client = MlflowClient()
    name = Path(path).name
    existing = {f.path for f in client.list_artifacts(run_id, artifact_path)}
    target = f"{artifact_path}/{name}" if artifact_path else name
    if target not in existing:
        client.log_artifact(run_id, path, artifact_path)


@serialised
def finish(run_id: str, status: str = "FINISHED") -> None:
    """End the parent run and its child runs (none is left RUNNING)."""
    client = MlflowClient()
    parent = client.get_run(run_id)
    for child in client.search_runs([parent.info.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{run_id}'"):
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, status=status)
    client.set_terminated(run_id, status=status)


@serialised
def log_dataset(run_id: str, path: str, name: str, digest: str, context: str) -> None:
    """Lineage: the split as an MLflow dataset input with its content digest and source."""
    import warnings

    import pandas as pd
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.pandas_dataset import from_pandas

    client = MlflowClient()
    run = client.get_run(run_id)
    if any(d.dataset.name == name for d in (run.inputs.dataset_inputs or [])):
        return
    df = pd.read_json(path, lines=True)
    for col in df.columns:  # nested values (lists, dicts) as JSON text, for the schema
        if df[col].map(lambda v: isinstance(v, (list, dict))).any():
            df[col] = df[col].map(json.dumps)
    # the source by its type: a bare path matches two registered local sources, and MLflow
    # warns each time it has to guess between them
    source = get_dataset_source_from_json(json.dumps({"uri": str(Path(path).resolve())}),
                                          source_type="local")
    with warnings.catch_warnings():
        # MLflow's hint about integer columns concerns model signatures served with missing
        # values; this schema is lineage (the split's real column types), never enforced
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        ds = from_pandas(df, source=source, name=name, digest=digest[:16])
        entity = ds._to_mlflow_entity()  # the schema is inferred here
    from mlflow.entities import DatasetInput, InputTag

    entry = DatasetInput(entity, [InputTag("mlflow.data.context", context)])
    for attempt in range(1, LOST_RACE_ATTEMPTS + 1):
        try:
            client.log_inputs(run_id, datasets=[entry])
            return
        except mlflow.exceptions.MlflowException as err:
            # cells of a sweep log the same split at once: MLflow looks the dataset up, then
            # inserts it, so the slower cell fails on the table's unique key; the dataset is
            # there now, and the next try links it to this run
            if attempt == LOST_RACE_ATTEMPTS or not lost_race(err):
                raise
            time.sleep(0.2 * attempt)


@serialised
def log_lineage(run_id: str, run_dir: str, checkpoints: list[str], policy: dict, data: dict,
                reference: dict) -> None:
    """Each of the run's checkpoints (folders, oldest first) with the digests of the data and the
    checkpoint it came from, as ``<run_dir>/lineage.json``."""
    client = MlflowClient()
    client.set_tag(run_id, "ibtpo.checkpoint_digest", policy["digest"])
    client.set_tag(run_id, "ibtpo.checkpoint_path", policy["path"])
    client.set_tag(run_id, "ibtpo.data_digest", data["digest"])
    client.set_tag(run_id, "ibtpo.reference_digest", reference["digest"])
    run_dir = Path(run_dir)
    chain = []
    for folder in map(Path, checkpoints):
        m = (
            json.loads((folder / "manifest.json").read_text())
            if (folder / "manifest.json").is_file()
            else {}
        )
        chain.append({"checkpoint": folder.name, "path": str(folder), "digest": m.get("digest"),
                      "parent_checkpoint_digest": m.get("parent_checkpoint"),
                      "training_data_digest": m.get("data_digest"),
                      "optimizer_state_deleted": bool(m.get("pruned"))})
    out = run_dir / "lineage.json"
    out.write_text(json.dumps({"data_digest": data["digest"], "warmup_digest": reference["digest"],
                               "checkpoints": chain}, indent=1))
    client.log_artifact(run_id, str(out))


@serialised
def log_sample_trees(
    run_id: str, run_dir: str, trees_dir: str | None, count: int, tokenizer_dir: str | None = None
) -> None:
    """A few trees of the run's last iteration (``trees_dir``, its sample stage's folder), in the
    tree-score JSON format, each with its picture (steps coloured by IB-Score, leaves by reward,
    the branching picks of each round marked)."""
    from ibtpo_core.tree_picture import draw_tree

    if count <= 0 or trees_dir is None:
        return
    folder = Path(trees_dir)
    decode = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    trees = json.loads((folder / "trees.json").read_text())[:count]
    out = Path(run_dir) / "sample_trees"
    out.mkdir(exist_ok=True)
    for i, t in enumerate(trees):
        (out / f"tree_{i}.json").write_text(json.dumps(t))
        log_artifact_once(run_id, str(out / f"tree_{i}.json"), "sample_trees")
        prompt = decode(t["nodes"][0]["tokens"]) if decode else None
        title = f"{folder.name[:6]}, tree {i}" + (f": {prompt.strip()[:80]}" if prompt else "")
        draw_tree(t, out / f"tree_{i}.png", decode, title)
        log_artifact_once(run_id, str(out / f"tree_{i}.png"), "sample_trees")


@serialised
def log_plots(run_id: str, run_dir: str) -> None:
    """PNG training curves from the run's own metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = MlflowClient()
    keys = ["reward", "eff_rate", "entropy", "tree/unique_leaves_per_budget", "ib/score_mean",
            "loss/clipfrac"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, key in zip(axes.flat, keys):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist])
        ax.set_title(key)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    path = Path(run_dir) / "training_curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    client.log_artifact(run_id, str(path), "plots")

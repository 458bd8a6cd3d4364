"""What a flow run shows on its Prefect UI page: a training run's result table with a link to
its MLflow run, and a sweep's comparison report. Prefect artifacts, published by the flows at
their end; a rerun publishes a new version under the same key.
"""
from __future__ import annotations

import os
import re

from pipeline import tracking
from pipeline.servers import MLFLOW_UI_PORT


def artifact_key(kind: str, name: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{kind}-{name}".lower())).strip("-")


def mlflow_ui_base() -> str:
    """Where the MLflow UI of this tracking store is: the tracking server itself, else the
    address ``ibtpo ui`` serves it at (IBTPO_MLFLOW_UI_URL overrides)."""
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get("IBTPO_MLFLOW_UI_URL", f"http://127.0.0.1:{MLFLOW_UI_PORT}").rstrip("/")


def mlflow_run_url(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient().get_run(run_id).info.experiment_id
    return f"{mlflow_ui_base()}/#/experiments/{experiment}/runs/{run_id}"


def result_markdown(name: str, method: str, result: dict, url: str) -> str:
    k = next((key[len("pass_at_"):-len("_after")] for key in result
              if key.startswith("pass_at_") and key.endswith("_after")), None)
    rows = [("accuracy", f"{result['accuracy_before']:.3f} ± {result['accuracy_se_before']:.3f}",
             f"{result['accuracy_after']:.3f} ± {result['accuracy_se_after']:.3f}")]
    if k is not None:
        rows.append((f"pass@{k}", f"{result[f'pass_at_{k}_before']:.3f}",
                     f"{result[f'pass_at_{k}_after']:.3f}"))
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return (
        f"# {name} ({method})\n\n"
        f"Held-out {result.get('eval_split', 'test')} problems: {result['n_eval']}\n\n"
        f"| metric | before RL | after RL |\n|---|---|---|\n{table}\n\n"
        f"Decoded tokens {result['decoded_tokens']:,.0f}; RL wall time {result['rl_wall_s']} s; "
        f"run wall time {result['wall_s']} s.\n\n"
        f"Final checkpoint: `{result['checkpoint']}`\n\n"
        f"MLflow run (metrics, lineage, sample trees): [{result['mlflow_run_id']}]({url})\n"
    )


def publish_run_result(name: str, method: str, result: dict) -> None:
    """The result table and the MLflow link of a training run, on its flow run's page."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    url = mlflow_run_url(result["mlflow_run_id"])
    create_markdown_artifact(key=artifact_key("result", name),
                             markdown=result_markdown(name, method, result, url),
                             description=f"Result of training run {name}")
    create_link_artifact(key=artifact_key("mlflow", name), link=url,
                         link_text=f"MLflow run of {name}", description="metrics and lineage")


def publish_sweep_report(name: str, report_md: str, sweep_run_id: str) -> None:
    """A sweep's comparison report (report.md) and its MLflow run, on the sweep's page."""
    from prefect.artifacts import create_markdown_artifact

    url = mlflow_run_url(sweep_run_id)
    create_markdown_artifact(key=artifact_key("report", name),
                             markdown=f"{report_md}\n\nMLflow sweep run: [{sweep_run_id}]({url})\n",
                             description=f"Comparison report of sweep {name}")

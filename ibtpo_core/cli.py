"""The ``ibtpo`` command line: ``run`` an experiment config (the Prefect training flow),
``sweep`` a sweep file, ``report`` on a sweep, ``tree-score`` a tree file, ``ui`` for the MLflow
and Prefect UIs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ibtpo_core.runtime import set_offline_defaults


def _cmd_run(args) -> int:
    from configs.schema import load_config
    from ibtpo_core.preflight import preflight

    preflight(load_config(args.config, args.set or []))  # bad input: fail before Prefect starts
    from flows.train import train

    result = train(args.config, args.set or [])
    print(json.dumps(result))
    return 0


def _cmd_sweep(args) -> int:
    from configs.sweep import check_cells, expand, load_sweep

    spec = load_sweep(args.sweep_file)
    check_cells(spec, expand(spec))  # bad input: fail before Prefect starts
    from flows.sweep import sweep

    try:
        result = sweep(args.sweep_file, args.cell or None)
    except RuntimeError as err:  # some cells failed; the others finished and were reported
        print(f"ibtpo sweep: {err}", file=sys.stderr)
        return 1
    print(Path(result["report"]).read_text() if Path(result["report"]).is_file() else result["report"])
    print(json.dumps(result))
    return 0


def _cmd_report(args) -> int:
    from tasks.report import write_report
    from tasks.tracking import find_sweep_run

    path = write_report(find_sweep_run(args.sweep_run), args.out)
    print(path.read_text())
    print(f"written: {path} (and report.json, report.png beside it; logged to the sweep's MLflow run)")
    return 0


def _cmd_tree_score(args) -> int:
    from ibtpo_core.algo.tree_score import score_tree_file

    print(json.dumps(score_tree_file(args.tree, beta=args.beta,
                                     entropy_estimator=args.entropy_estimator,
                                     local_advantage=args.local_advantage)))
    return 0


def _cmd_ui(args) -> int:
    """MLflow UI (one worker, job execution off) and the Prefect UI, on 127.0.0.1 by default."""
    import os
    import shutil
    import subprocess
    import time
    from pathlib import Path

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    bindir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bindir / "mlflow") if (bindir / "mlflow").exists() else
                               shutil.which("mlflow") or "mlflow", "server",
                               "--backend-store-uri", uri, "--host", args.host,
                               "--port", str(args.mlflow_port), "--workers", "1"], env=env)]
    print(f"MLflow UI:  http://{args.host}:{args.mlflow_port}  (store {uri})")
    if not args.no_prefect:
        procs.append(subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host",
                                       args.host, "--port", str(args.prefect_port)], env=env))
        print(f"Prefect UI: http://{args.host}:{args.prefect_port}")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ibtpo", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run an experiment config (data, warm-up, RL, evaluation)")
    r.add_argument("config")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set warmup.spec.steps=100 (repeatable)")
    r.set_defaults(func=_cmd_run)
    w = sub.add_parser("sweep", help="run every cell of a sweep file, then write its report")
    w.add_argument("sweep_file")
    w.add_argument("--cell", action="append", metavar="LABEL[.sSEED]",
                   help="run only this cell (repeatable), e.g. --cell grpo.s1")
    w.set_defaults(func=_cmd_sweep)
    rp = sub.add_parser("report", help="write the comparison report of a sweep run")
    rp.add_argument("sweep_run", help="the sweep's MLflow run id, or the sweep's name (latest run)")
    rp.add_argument("--out", help="folder for report.md/.json/.png (default: the sweep's folder)")
    rp.set_defaults(func=_cmd_report)
    t = sub.add_parser("tree-score", help="print n, c, V, H, I, IB and advantages of a tree file")
    t.add_argument("tree")
    t.add_argument("--beta", type=float, default=1.0)
    t.add_argument("--entropy-estimator", choices=["token_entropy", "surprisal"],
                   default="token_entropy")
    t.add_argument("--local-advantage", choices=["log_ratio", "diff"], default="log_ratio")
    t.set_defaults(func=_cmd_tree_score)
    u = sub.add_parser("ui", help="start the MLflow UI (and the Prefect UI)")
    u.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    u.add_argument("--mlflow-port", type=int, default=5000)
    u.add_argument("--prefect-port", type=int, default=4200)
    u.add_argument("--no-prefect", action="store_true", help="start only the MLflow UI")
    u.set_defaults(func=_cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    set_offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"ibtpo {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``ibtpo`` command line: ``run`` an experiment config (the Prefect training flow),
``sweep`` a sweep file, ``report`` on a sweep, ``tree-score`` a tree file, ``ui`` for the MLflow
and Prefect UIs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ibtpo_core.runtime import set_offline_defaults
from pipeline.servers import MLFLOW_UI_PORT, PREFECT_UI_PORT, prefect_api, use_local_prefect_home


def _cmd_run(args) -> int:
    from configs.schema import load_config
    from ibtpo_core.preflight import preflight

    preflight(load_config(args.config, args.set or []))  # bad input: fail before Prefect starts
    from flows.train import train

    with prefect_api():
        result = train(args.config, args.set or [])
    print(json.dumps(result))
    return 0


def _cmd_sweep(args) -> int:
    from configs.sweep import check_cells, expand, load_sweep

    spec = load_sweep(args.sweep_file)
    check_cells(spec, expand(spec))  # bad input: fail before Prefect starts
    from flows.sweep import sweep

    try:
        with prefect_api():
            result = sweep(args.sweep_file, args.cell or None)
    except RuntimeError as err:  # some cells failed; the others finished and were reported
        print(f"ibtpo sweep: {err}", file=sys.stderr)
        return 1
    print(
        Path(result["report"]).read_text() if Path(result["report"]).is_file() else result["report"]
    )
    print(json.dumps(result))
    return 0


def _cmd_report(args) -> int:
    from pipeline.report import write_report
    from pipeline.tracking import find_sweep_run

    path = write_report(find_sweep_run(args.sweep_run), args.out)
    print(path.read_text())
    print(
        f"written: {path} (and report.json, report.png beside it; logged to the sweep's MLflow run)"
    )
    return 0


def _cmd_tree_score(args) -> int:
    from ibtpo_core.algo.advantages import AdvantageSpec
    from ibtpo_core.algo.ib_score import ScoreSpec
    from ibtpo_core.algo.tree_score import score_tree_file

    given = {"beta": args.beta, "entropy_estimator": args.entropy_estimator}
    ib = ScoreSpec(**{k: v for k, v in given.items() if v is not None})  # the rest: defaults
    adv = AdvantageSpec() if args.local_advantage is None else AdvantageSpec(
        local_advantage=args.local_advantage)
    print(json.dumps(score_tree_file(args.tree, ib, adv)))
    if args.picture:
        from ibtpo_core.tree_picture import draw_tree

        draw_tree(json.loads(Path(args.tree).read_text()), args.picture, beta=ib.beta,
                  title=Path(args.tree).name)
        print(f"picture: {args.picture}", file=sys.stderr)
    return 0


def _cmd_ui(args) -> int:
    """The MLflow UI (one worker, job execution off) and the Prefect UI over the stores that
    ``ibtpo run`` in this folder writes; both servers stop with this command (Ctrl-C, SIGTERM,
    or even SIGKILL)."""
    import os
    import signal
    import time

    from ibtpo_core import tether
    from pipeline import servers
    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    procs = [tether.spawn(servers.mlflow_ui_command(uri, args.host, args.mlflow_port), env=env)]
    shown = servers.browser_host(args.host)
    print(f"MLflow UI:  http://{shown}:{args.mlflow_port}  (store {uri})", flush=True)
    if args.no_prefect:
        pass
    elif (api := servers.configured_api_url()) and servers.answers(f"{api.rstrip('/')}/health"):
        print(f"Prefect UI: served by the Prefect server at {api}")
    else:
        if api:
            print(f"Prefect: {api} (PREFECT_API_URL) does not answer; starting a Prefect UI here "
                  f"instead", flush=True)
        procs.append(
            tether.spawn(
                servers.prefect_ui_command(args.host, args.prefect_port),
                env={**env, **servers.prefect_ui_env(args.host, args.prefect_port)},
            )
        )
        home = os.environ.get("PREFECT_HOME", "~/.prefect")
        print(f"Prefect UI: http://{shown}:{args.prefect_port}  (state {home})", flush=True)

    def on_term(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    names = ["MLflow", "Prefect"][:len(procs)]
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        ended = next(n for n, p in zip(names, procs) if p.poll() is not None)
        print(f"ibtpo ui: the {ended} server exited (is its port taken? choose another with "
              f"--{ended.lower()}-port); stopping the other", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            tether.stop(p)


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
    # unset: the defaults of ScoreSpec and AdvantageSpec, what a config without them gets;
    # names are checked against their registries when the tree is scored (reading a registry
    # here would import torch for every command)
    t.add_argument("--beta", type=float, help="beta of the IB-Score (default: ScoreSpec's)")
    t.add_argument("--entropy-estimator",
                   help="token_entropy or surprisal (docs/method.md §2; default: ScoreSpec's)")
    t.add_argument("--local-advantage",
                   help="the local advantage variant (docs/method.md §4; default: AdvantageSpec's)")
    t.add_argument("--picture", metavar="PNG", help="also draw the tree: steps coloured by "
                   "IB-Score, leaves by reward, the sampler's branching picks ringed")
    t.set_defaults(func=_cmd_tree_score)
    u = sub.add_parser("ui", help="start the MLflow UI (and the Prefect UI)")
    u.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)",
    )
    u.add_argument("--mlflow-port", type=int, default=MLFLOW_UI_PORT)
    u.add_argument("--prefect-port", type=int, default=PREFECT_UI_PORT)
    u.add_argument("--no-prefect", action="store_true", help="start only the MLflow UI")
    u.set_defaults(func=_cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    set_offline_defaults()
    use_local_prefect_home()  # before Prefect is imported: it reads its home once
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"ibtpo {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

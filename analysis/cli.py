"""``python -m analysis``: export, table, reproduce, plots, best, compare, dashboard.

Every subcommand reads one study of one MLflow experiment, but ``compare S1 S2 ...``, which puts two
or more studies side by side (ranked against each other only when their budgets match):
  --tracking-uri  default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; a server's
                  login from $MLFLOW_TRACKING_USERNAME/$MLFLOW_TRACKING_PASSWORD, checked first
  --experiment    default: coupled-vae-studies
  --study         default: the latest study (parent run tagged cvae.role=study) in the experiment
Errors a user can cause print one line ``analysis: error: ...`` and exit with status 2.

Each subcommand imports what it runs inside its function (pandas, MLflow, torch): ``--help``
and bad flags answer before they load.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from cvae_core.config import check_device
from cvae_core.errors import CvaeError, OneLineArgumentParser, argument_type, check_counts
from cvae_core.guards import check_writable, redact

from studies.record import Tag

from .store import DEFAULT_EXPERIMENT, AnalysisError

CONSOLE_SCRIPT = "cvae-analysis"  # pyproject.toml [project.scripts]


def _quiet() -> None:
    """MLflow and alembic log INFO lines on every store open; keep stdout/stderr for our output."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is ours (e.g. --json)
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*experimental.*")
    # The champion's pyfunc has an explicit signature; MLflow still asks for an input example.
    warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)


def _progress(text: str) -> None:
    print(f"[analysis] {text}", file=sys.stderr, flush=True)


def lineage(tags: dict[str, str]) -> None:
    """Where a study's trials came from besides its own search: --warm-start and --extend."""
    if tags.get(Tag.WARM_START):
        source, _, top = tags[Tag.WARM_START].partition(":")
        _progress(f"seeded from study {source!r} ({top}, --warm-start): its best configurations ran first, "
                  "measured again at this study's budget")
    if tags.get(Tag.EXTENSIONS):
        _progress(f"extended with --extend by {tags[Tag.EXTENSIONS].replace(',', ', ')} configuration(s)")


def _study(args):
    from .runs import fetch_study, stopped_early

    study = fetch_study(args.experiment, args.study, args.tracking_uri, progress=_progress)
    early = stopped_early(study.runs)
    early_finished = int((early & (study.runs["status"] == "FINISHED")).sum())
    _progress(f"study {study.name!r}: {len(study.runs)} trial runs "
              f"({', '.join(f'{n} {s}' for s, n in study.runs['status'].value_counts().items())}"
              + (f"; {early_finished} of the FINISHED stopped before train.steps" if early_finished else "") + ")")
    lineage(study.parent.data.tags)
    if getattr(args, "complete_only", False) and early.any():
        study.runs = study.runs[~early].reset_index(drop=True)
        _progress(f"--complete-only: left out {int(early.sum())} early-stopped runs")
    return study


def _statuses(args):
    return None if args.all_runs else ("FINISHED",)


def _writable(args, *flags: str, folder: bool = False) -> None:
    """Refuse an output flag (``--out``, ``--history``) that cannot be written, before the store is read."""
    for flag in flags:
        if getattr(args, flag):
            check_writable(getattr(args, flag), f"--{flag}", folder=folder)


def _export(args) -> None:
    from studies.record import cost_line

    from .runs import read_parquet, runs_cost, write_parquet

    _writable(args, "out", "history")
    study = _study(args)
    meta = {"experiment": args.experiment, "study": study.name, "parent_run_id": study.parent_run_id,
            "tracking_uri": study.tracking_uri}
    path = write_parquet(study.runs, args.out, meta)
    back = read_parquet(path)
    if not back.equals(study.runs) or list(back.dtypes) != list(study.runs.dtypes):
        raise AnalysisError(f"{path} does not read back identically (please report this)")
    print(f"wrote {path}: {len(study.runs)} runs x {study.runs.shape[1]} columns (read back identically)")
    cost = runs_cost(study.runs)
    if cost["trials"]:
        print(f"{cost_line(cost)}; per run: final.cpu_seconds, final.gpu_seconds")
    if args.history:
        hpath = write_parquet(study.history, args.history, {**meta, "frame": "history"})
        print(f"wrote {hpath}: {len(study.history)} metric values (long format)")


def _table(args) -> None:
    from .render import render
    from .tables import build_table

    study = _study(args)
    options = {}
    if args.layout == "table3":
        options = {"family": args.family, "ref_lambda_m": args.ref_lambda_m, "ref_lambda_r": args.ref_lambda_r}
    elif args.layout == "table4":
        options = {"ref_lambda_m": args.ref_lambda_m}
    table = build_table(study.runs, args.layout, at=args.at, study=study.name, statuses=_statuses(args), **options)
    print(render(table, args.format), end="")


def _reproduce(args) -> None:
    from .reproduce import report

    _writable(args, "out")
    study = _study(args)
    text = report(study.runs, study.name, args.at, statuses=_statuses(args))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
        _progress(f"wrote {args.out}")


def _plots(args) -> None:
    from .plots import make_plots

    _writable(args, "out", folder=True)
    check_counts(args, positive=("top_k",))
    study = _study(args)
    runs = study.runs if args.all_runs else study.runs[study.runs["status"] == "FINISHED"]
    out = Path(args.out or f"analysis-plots/{study.name}")
    with tempfile.TemporaryDirectory(prefix="cvae-plot-checkpoints-") as downloads:
        paths = make_plots(runs, study.history, study.parent.data.tags, out, at=args.at, top_k=args.top_k,
                           note=lambda text: _progress(text), fmt=args.format,
                           checkpoint=_checkpoint_fetcher(study.tracking_uri, Path(downloads)))
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if paths and not args.no_log:
        from .store import connect

        client, _ = connect(study.tracking_uri)
        for path in paths:
            client.log_artifact(study.parent_run_id, str(path), artifact_path="analysis/plots")
        print(f"logged {len(paths)} plots to the study run {study.parent_run_id} under analysis/plots/")


def _checkpoint_fetcher(tracking_uri: str, folder: Path):
    """A run's row -> its ``checkpoint/`` artifact downloaded under ``folder`` (None when it has none)."""
    from .best import download_checkpoint, has_checkpoint
    from .store import connect

    def fetch(row) -> Path | None:
        client, _ = connect(tracking_uri)
        if not has_checkpoint(client, row["run_id"]):
            return None
        _progress(f"downloading the checkpoint of run {row['run_id']} for the posterior-mean plot")
        return download_checkpoint(tracking_uri, row["run_id"], folder / row["run_id"])

    return fetch


def _best(args) -> None:
    from cvae_core.evaluation import NON_NEGATIVE_COUNTS, POSITIVE_COUNTS

    from .best import run_best

    # before the checkpoint is downloaded: a negative --limit would slice the split, not limit it
    check_counts(args, positive=POSITIVE_COUNTS, non_negative=NON_NEGATIVE_COUNTS)
    _writable(args, "out", folder=True)
    run_best(args, progress=_progress)


def _compare(args) -> None:
    from .compare import as_json, check_names, compare_studies, plot_fronts, render_markdown
    from .runs import dumps, fetch_study

    check_names(args.studies)
    _writable(args, "out", folder=True)
    # every study is read and checked before anything is written or said: bad input leaves no files
    studies = [fetch_study(args.experiment, name, args.tracking_uri, progress=_progress) for name in args.studies]
    comparison = compare_studies(studies, args.experiment)
    for study in studies:
        _progress(f"study {study.name!r}: {len(study.runs)} trial runs")
    out = Path(args.out or f"analysis-compare/{'-vs-'.join(s.name for s in studies)}")
    text = render_markdown(comparison)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text)
    plot = plot_fronts(comparison, out / "fronts.png")
    if args.json:
        print(dumps(as_json(comparison)))
    else:
        print(text, end="")
    say = _progress if args.json else print  # stdout holds only the JSON object
    for path in (out / "compare.md", plot):
        say(f"wrote {path} ({path.stat().st_size:,} bytes)")


def _dashboard(args) -> int:
    """Optuna's own dashboard on the study's recorded Optuna storage, on loopback, in the foreground.
    -> the dashboard's exit status."""
    from studies.record import DASHBOARD_INSTALL, dashboard_command, dashboard_script

    from .store import connect, find_study, get_experiment, recorded_optuna_study, study_name

    if not 1 <= args.port <= 65535:
        raise AnalysisError(f"--port must be in 1..65535, got {args.port}")
    if dashboard_script() is None:  # before the store is read: nothing else helps without it
        raise AnalysisError(f"optuna-dashboard is not installed: {DASHBOARD_INSTALL}")
    client, _ = connect(args.tracking_uri)
    parent = find_study(client, get_experiment(client, args.experiment), args.study)
    try:
        storage, name = recorded_optuna_study(parent.data.tags)
    except AnalysisError as exc:
        raise AnalysisError(f"study {study_name(parent)!r}: {exc}") from None
    _progress(f"Optuna study {name!r} in {storage}: open http://127.0.0.1:{args.port}/dashboard/ (Ctrl-C stops it)")
    return subprocess.call(dashboard_command(storage, args.port))


def parser(prog: str = "python -m analysis") -> argparse.ArgumentParser:
    top = OneLineArgumentParser(prog=prog,
                                  description="From the MLflow runs of a Coupled-VAE study to tables, plots and "
                                              "an evaluated best checkpoint.")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default %(default)s)")
    store.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; a "
                        "server's login: $MLFLOW_TRACKING_USERNAME/$MLFLOW_TRACKING_PASSWORD (not in the URI)")
    which = argparse.ArgumentParser(add_help=False, parents=[store])  # which study of which store
    which.add_argument("--study", help="study name (parent run); default: the latest study in the experiment")
    common = argparse.ArgumentParser(add_help=False, parents=[which])
    common.add_argument("--all-runs", action="store_true",
                        help="include FAILED/KILLED/RUNNING trials (default: FINISHED only)")
    common.add_argument("--complete-only", action="store_true",
                        help="leave out trials stopped before config train.steps (ASHA-stopped trials are FINISHED)")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", parents=[common], help="runs -> Parquet (one row per trial)")
    p.add_argument("--out", required=True, help="Parquet file for the runs frame")
    p.add_argument("--history", help="also write the long metric-history frame to this Parquet file")
    p.set_defaults(func=_export)

    at_help = "best: each run's lowest-val_nll evaluation (its checkpoint); final: its last evaluation"
    p = sub.add_parser("table", parents=[common], help="a paper-format table (Markdown or LaTeX)")
    p.add_argument("--layout", default="table3", choices=("table1", "table2", "table3", "table4", "table8"))
    p.add_argument("--format", default="markdown", choices=("markdown", "latex"))
    p.add_argument("--at", default="best", choices=("best", "final"), help=at_help)
    p.add_argument("--family", help="table3: base preset whose coupled twin is analysed (default vae)")
    p.add_argument("--ref-lambda-m", type=float, default=0.1, help="table3: λ_m of the λ_r block (paper 0.1)")
    p.add_argument("--ref-lambda-r", type=float, default=1.0, help="table3: λ_r of the λ_m blocks (paper 1.0)")
    p.set_defaults(func=_table)

    p = sub.add_parser("reproduce", parents=[common], help="our numbers beside the paper's, effect directions")
    p.add_argument("--at", default="best", choices=("best", "final"), help=at_help)
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("plots", parents=[common], help="PNG figures, logged to the study run")
    p.add_argument("--out", help="folder for the PNGs (default analysis-plots/<study>)")
    p.add_argument("--at", default="best", choices=("best", "final"), help=at_help)
    p.add_argument("--top-k", type=int, default=5, help="trials in the validation-curve plot")
    p.add_argument("--format", default="png", choices=("png", "pdf", "svg"), help="figure file format")
    p.add_argument("--no-log", action="store_true", help="do not log the figures to the MLflow study run")
    p.set_defaults(func=_plots)

    p = sub.add_parser("best", parents=[common],
                       help="download the best trial's checkpoint, evaluate it on test, log it, register it")
    p.add_argument("--metric", default="val_nll", help="selection metric at each run's best evaluation")
    p.add_argument("--mode", choices=("min", "max"), help="default: the metric's better direction (cvae_core/metrics/names.py)")
    p.add_argument("--pareto", action="store_true", help="only list the Pareto front (val_nll down, val_mi_loo up)")
    p.add_argument("--run-id", help="evaluate this trial run instead of the best one")
    p.add_argument("--out", help="download folder (default best-checkpoints/<run id>)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--n-samples", type=int, default=100, help="importance samples per sentence (paper: 100)")
    p.add_argument("--mi-samples", type=int, default=100, help="z samples per sentence for MI (paper: 100)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N sentences only (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", type=argument_type(check_device), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data-dir", help="read the split from this folder instead of the recorded path")
    p.add_argument("--bleu", action=argparse.BooleanOptionalAction, default=True,
                   help="reconstruction BLEU-1/2 when the core supports it (default on)")
    p.add_argument("--dist", action=argparse.BooleanOptionalAction, default=True,
                   help="Dist-1/2 of prior samples when the core supports it (default on)")
    p.add_argument("--grad-norms", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient norms (Table 5) when the core supports them for this model (default on)")
    p.add_argument("--bleu-samples", type=int, default=10, help="posterior samples per sentence for BLEU (paper 10)")
    p.add_argument("--dist-samples", type=int, default=3200, help="prior samples for Dist-n (paper 3200)")
    p.add_argument("--max-steps", type=int, default=0, help="greedy decoding length for BLEU/Dist (0 = data.max_len)")
    p.add_argument("--json", action="store_true", help="print the evaluation as one JSON object")
    p.add_argument("--no-log", action="store_true", help="do not log an evaluation run to MLflow")
    p.add_argument("--register", action=argparse.BooleanOptionalAction, default=None,
                   help="register the checkpoint and move the alias (default: only after a full evaluation; "
                        "any of --limit, --n-samples/--mi-samples/--bleu-samples/--dist-samples below the "
                        "paper's, --max-steps make it partial)")
    p.add_argument("--model-name", default="coupled-vae", help="registered model name (default %(default)s)")
    p.add_argument("--alias", default="champion", help="alias set on the registered version (default %(default)s)")
    p.set_defaults(func=_best)

    p = sub.add_parser("compare", parents=[store],
                       help="two or more studies side by side: budgets, best feasible trials, Pareto fronts")
    p.add_argument("studies", nargs="*", metavar="STUDY",
                   help="study names (parent runs) of the experiment, two or more")
    p.add_argument("--out", help="folder for compare.md and fronts.png (default analysis-compare/<S1>-vs-<S2>...)")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.set_defaults(func=_compare)

    p = sub.add_parser("dashboard", parents=[which],
                       help="Optuna's own dashboard on the study's Optuna storage (the dashboard extra), on "
                            "127.0.0.1, until Ctrl-C")
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default %(default)s)")
    p.set_defaults(func=_dashboard)
    return top


def main(argv: list[str] | None = None) -> int:
    # the usage lines name the command the user typed: the console script or python -m analysis
    args = parser(CONSOLE_SCRIPT if Path(sys.argv[0]).name == CONSOLE_SCRIPT else "python -m analysis").parse_args(argv)
    _quiet()
    try:
        code = args.func(args)
    except AnalysisError as exc:
        print(f"analysis: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("analysis: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, CvaeError):
            print(f"analysis: error: {redact(str(exc))}", file=sys.stderr)
            return 2
        if isinstance(exc, MlflowException):
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"analysis: error: MLflow: {redact(message)}", file=sys.stderr)
            return 2
        raise
    return code or 0

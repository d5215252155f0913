"""The study scripts' command line (``studies/*_sweep.py``) and how flags resolve to places and
settings: the tracking URI, the Tune storage, the spec with the flags applied."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from cvae_core.config import build_config, parse_assignments
from cvae_core.errors import CvaeError, OneLineArgumentParser, finite_float
from cvae_core.guards import adopt_tracking_credentials, redact

from .spec import SpecError, StudySpec, parse_constraints, parse_objectives, validate_spec

DEFAULT_EXPERIMENT = "coupled-vae-studies"
# a few checkpoints of a paper-size model, Tune's experiment state and optuna.db fit in this
DEFAULT_MIN_FREE_MB = 512


class StudyError(Exception):
    """A problem the user can fix (bad flag, nothing to resume, no GPU, ...)."""


def build_parser(prog: str, default_spec: str, description: str) -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags without a default here take the spec's value (studies/specs/*.yaml).")
    p.add_argument("--profile", "--spec", dest="profile", default=default_spec,
                   help=f"study spec: a name under studies/specs/ or a YAML path (default: {default_spec})")
    p.add_argument("--search", choices=("tpe", "grid"), default=None,
                   help="tpe: Optuna TPE over the spec's define-by-run space (plus its baselines); "
                        "grid: the spec's fixed grid (lambda_sweep: VAE vs Coupled-VAE cells). Default: the spec's")
    p.add_argument("--objectives", default=None,
                   help="comma-separated, e.g. val_nll or val_nll,val_mi_loo (Pareto front); metric:max|min")
    p.add_argument("--constraint", dest="constraints", action="append", default=None, metavar="'METRIC OP NUMBER'",
                   help="a trial is feasible only if its best evaluation satisfies this, e.g. 'val_au >= 1' (op: >=, "
                        "<=, >, <); repeatable; replaces the spec's constraints ('none': no constraints)")
    p.add_argument("--num-samples", type=int, default=None, help="configurations Optuna proposes (tpe)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per configuration")
    p.add_argument("--seed", type=int, default=None, help="sampler seed and first training seed")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: a local Ray")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db. A "
                        "server's login comes from $MLFLOW_TRACKING_USERNAME/$MLFLOW_TRACKING_PASSWORD (a password in "
                        "the URI works but is visible in the process list)")
    p.add_argument("--storage-path", default=None,
                   help="Tune storage (shared on a cluster, e.g. s3://...); default $CVAE_STORAGE_PATH, "
                        "else <root>/ray_results")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                   help=f"MLflow experiment name (default: {DEFAULT_EXPERIMENT})")
    p.add_argument("--root", default=None, help="study folder root; default <cwd>/studies_out")
    p.add_argument("--study-name", default=None, help="default <spec>-<YYYYmmdd-HHMMSS>-<4 hex digits>")
    p.add_argument("--gpus-per-trial", type=finite_float, default=None, help="fractions such as 0.5 share a GPU")
    p.add_argument("--cpus-per-trial", type=finite_float, default=None, help="CPUs per trial (torch threads)")
    p.add_argument("--max-concurrent", type=int, default=None, help="max concurrent trials")
    p.add_argument("--max-failures", type=int, default=None, help="retries per trial (>= 1)")
    p.add_argument("--pack", type=int, default=None, metavar="K",
                   help="train up to K trials that differ only in loss weights, schedule and seed as one packed "
                        "model in one Ray trial (1 = no packing; the start-up line estimates a pack's memory). "
                        "Default: the spec's")
    p.add_argument("--dataset", default=None,
                   help="replace the spec's dataset (e.g. swda for cvae_sweep; needs --data-dir where the "
                        "dataset has files)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's train/valid/test files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the spec's base config, e.g. --set train.steps=1000 (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STUDY",
                   help="continue an interrupted study (default: the latest one of this spec under --root)")
    p.add_argument("--extend", type=int, default=None, metavar="N",
                   help="with --resume STUDY: add N configurations that Optuna proposes (each over the study's "
                        "seeds) to a finished or interrupted tpe study; its sampler sees every earlier trial")
    p.add_argument("--warm-start", default=None, metavar="STUDY[:top=K]",
                   help="a new tpe study first runs the best K (default 3) feasible configurations of an earlier "
                        "study under --root (Optuna's enqueue_trial), then its own proposals")
    p.add_argument("--min-free-mb", type=float, default=DEFAULT_MIN_FREE_MB,
                   help="stop the study (resumable) when its folders have less free disk space than this "
                        f"(default {DEFAULT_MIN_FREE_MB})")
    p.add_argument("--verbose", action="store_true", help="show Ray's own progress and worker logs")
    return p


@dataclass
class Options:
    profile: str
    search: str | None = None
    objectives: str | None = None
    constraints: list[str] | None = None
    num_samples: int | None = None
    seeds: int | None = None
    seed: int | None = None
    address: str | None = None
    tracking_uri: str | None = None
    storage_path: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    root: str | None = None
    study_name: str | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    max_concurrent: int | None = None
    max_failures: int | None = None
    pack: int | None = None
    overrides: list[str] = field(default_factory=list)
    dataset: str | None = None
    data_dir: str | None = None
    resume: str | None = None
    extend: int | None = None
    warm_start: str | None = None
    min_free_mb: float = DEFAULT_MIN_FREE_MB
    verbose: bool = False
    # Python API only: extra ray.tune.Callback objects for a new study, called before the disk
    # guard (the fault tests act at Tune's events with them). Tune saves them with its run
    # config: a --resume restores them, so their classes must be importable by the resuming driver.
    callbacks: tuple = ()


def _absolute_sqlite(uri: str, cwd: Path) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(cwd / uri[len('sqlite:///'):]).resolve()}"
    return uri


def resolve_tracking_uri(flag: str | None, cwd: Path) -> str:
    """-> the absolute tracking URI, without credentials: ``user:password@`` moves into MLflow's
    client variables (see cvae_core.guards.adopt_tracking_credentials)."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cwd / 'mlflow.db'}"
    if uri.startswith("file:") or "://" not in uri:
        raise StudyError(f"tracking URI {redact(uri)!r}: MLflow 3's file store is in maintenance mode; use "
                         "sqlite:////abs/path/mlflow.db or an http(s):// tracking server")
    return _absolute_sqlite(adopt_tracking_credentials(uri), cwd)


def resolve_storage_path(flag: str | None, root: Path) -> str:
    path = flag or os.environ.get("CVAE_STORAGE_PATH") or str(root / "ray_results")
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def apply_flags(spec: StudySpec, options: Options) -> StudySpec:
    spec = dataclasses.replace(spec, overrides=dict(spec.overrides),
                               resources=dataclasses.replace(spec.resources))
    if options.search:
        spec.search = options.search
    if options.objectives:
        spec.objectives = parse_objectives(options.objectives, "--objectives")
    if options.constraints is not None:
        spec.constraints = [] if options.constraints == ["none"] else parse_constraints(options.constraints,
                                                                                         "--constraint")
    if options.num_samples is not None:
        if options.num_samples < 0:
            raise StudyError(f"--num-samples must be at least 0 (configurations Optuna proposes), got "
                             f"{options.num_samples}")
        spec.num_samples = options.num_samples
    if options.seeds is not None:
        spec.seeds = options.seeds
    if options.seed is not None:
        spec.seed = options.seed
    if options.gpus_per_trial is not None:
        spec.resources.gpus_per_trial = options.gpus_per_trial
    if options.cpus_per_trial is not None:
        spec.resources.cpus_per_trial = options.cpus_per_trial
    if options.max_concurrent is not None:
        spec.resources.max_concurrent_trials = options.max_concurrent
    if options.max_failures is not None:
        spec.resources.max_failures = options.max_failures
    if options.pack is not None:
        spec.resources.pack = options.pack
    if options.dataset:
        spec.dataset = options.dataset
    if options.data_dir:
        spec.overrides["data.data_dir"] = str(Path(options.data_dir).expanduser().resolve())
    _apply_sets(spec, parse_assignments(options.overrides))
    validate_spec(spec)
    return spec


def _apply_sets(spec: StudySpec, sets: dict[str, str]) -> None:
    """Add the ``--set`` overrides to the spec's, one at a time; the first that makes the base
    configuration invalid is named as the flag the user typed (validate_spec would blame the
    spec file for it)."""
    def problem() -> CvaeError | None:
        try:
            build_config(spec.preset, spec.dataset, spec.scale, spec.overrides)
        except CvaeError as exc:
            return exc
        return None

    valid = problem() is None  # else the spec (or another flag) is at fault: validate_spec says so
    for key, value in sets.items():
        spec.overrides[key] = value.strip()
        if valid and (exc := problem()) is not None:
            raise SpecError(f"--set {key}={value}: {exc}")

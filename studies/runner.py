"""The shared study driver behind ``studies/*_sweep.py``.

    spec (+ flags) -> MLflow experiment + parent run -> Ray (local or --address)
      -> Tuner(StudySearcher(OptunaSearch | grid), ASHA) or Tuner.restore -> live progress
      -> ranked summary table + parent-run summary + best checkpoint + `mlflow ui` command

Where things go (all absolute):

* study folder root: ``--root``, default ``<cwd>/studies_out``; one folder per study with
  ``study.json`` (what ``--resume`` needs), ``optuna.db`` (the Optuna study) and ``summary.md/json``;
* Tune results and checkpoints: ``--storage-path`` > ``$CVAE_STORAGE_PATH`` (set on the cluster,
  an S3 URI) > ``<root>/ray_results``; the experiment is ``<storage>/<study name>``;
* MLflow: ``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` (set on the cluster) >
  ``sqlite:///<cwd>/mlflow.db``, artifacts in ``<root>/mlartifacts`` (server default over http).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvae_core.errors import CvaeError, OneLineArgumentParser
from cvae_core.guards import adopt_tracking_credentials, check_name, check_sqlite_uri, check_tracking_server, redact

from .spec import Objective, Resources, Scheduler, StudySpec, load_spec, parse_objectives, validate_spec

DEFAULT_EXPERIMENT = "coupled-vae-studies"
REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------
# Command line

def build_parser(prog: str, default_spec: str, description: str) -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags without a default here take the spec's value (studies/specs/*.yaml).")
    p.add_argument("--profile", "--spec", dest="profile", default=default_spec,
                   help=f"study spec: a name under studies/specs/ or a YAML path (default: {default_spec})")
    p.add_argument("--search", choices=("tpe", "grid"), default=None,
                   help="tpe: Optuna TPE over the spec's define-by-run space (plus its baselines); "
                        "grid: the spec's fixed grid (lambda_sweep: the paper's Table 3). Default: the spec's")
    p.add_argument("--objectives", default=None,
                   help="comma-separated, e.g. val_nll or val_nll,val_mi_loo (Pareto front); metric:max|min")
    p.add_argument("--num-samples", type=int, default=None, help="configurations Optuna proposes (tpe)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per configuration")
    p.add_argument("--seed", type=int, default=None, help="sampler seed and first training seed")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: a local Ray")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    p.add_argument("--storage-path", default=None,
                   help="Tune storage (shared on a cluster, e.g. s3://...); default $CVAE_STORAGE_PATH, "
                        "else <root>/ray_results")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                   help=f"MLflow experiment name (default: {DEFAULT_EXPERIMENT})")
    p.add_argument("--root", default=None, help="study folder root; default <cwd>/studies_out")
    p.add_argument("--study-name", default=None, help="default <spec>-<YYYYmmdd-HHMMSS>-<4 hex digits>")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="fractions such as 0.5 share a GPU")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial (torch threads)")
    p.add_argument("--max-concurrent", type=int, default=None, help="max concurrent trials")
    p.add_argument("--max-failures", type=int, default=None, help="retries per trial (>= 1)")
    p.add_argument("--dataset", default=None,
                   help="replace the spec's dataset (e.g. swda for cvae_sweep; needs --data-dir where the "
                        "dataset has files)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's train/valid/test files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the spec's base config, e.g. --set train.steps=1000 (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STUDY",
                   help="continue an interrupted study (default: the latest one of this spec under --root)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own progress and worker logs")
    return p


@dataclass
class Options:
    profile: str
    search: str | None = None
    objectives: str | None = None
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
    overrides: list[str] = field(default_factory=list)
    dataset: str | None = None
    data_dir: str | None = None
    resume: str | None = None
    verbose: bool = False


def main(default_spec: str, description: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog or f"{default_spec}.py", default_spec, description)
    args = parser.parse_args(argv)
    options = Options(**vars(args))
    try:
        outcome = run_study(options)
    except (CvaeError, StudyError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    return outcome.exit_code


class StudyError(Exception):
    """A problem the user can fix (bad flag, nothing to resume, no GPU, ...)."""


# ---------------------------------------------------------------------------------------------
# Resolution of places and settings

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
    if options.num_samples is not None:
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
    if options.dataset:
        spec.dataset = options.dataset
    if options.data_dir:
        spec.overrides["data.data_dir"] = str(Path(options.data_dir).expanduser().resolve())
    for item in options.overrides:
        if "=" not in item:
            raise StudyError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        spec.overrides[key.strip()] = value.strip()
    validate_spec(spec)
    return spec


def spec_from_dict(raw: dict[str, Any]) -> StudySpec:
    raw = dict(raw)
    raw["objectives"] = parse_objectives(raw["objectives"], "study.json")
    raw["scheduler"] = Scheduler(**raw["scheduler"])
    raw["resources"] = Resources(**raw["resources"])
    spec = StudySpec(**raw)
    validate_spec(spec)
    return spec


@dataclass
class StudyState:
    """``<root>/<study>/study.json``: everything ``--resume`` needs."""

    study_name: str
    spec: dict[str, Any]
    folder: str
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    experiment_path: str
    optuna_storage: str
    code_version: str
    created: str
    status: str = "running"  # running | interrupted | completed | failed

    def save(self) -> None:
        path = Path(self.folder) / "study.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: Path) -> "StudyState":
        path = folder / "study.json"
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise StudyError(f"no study to resume at {folder} (missing study.json)") from None


def find_resumable(root: Path, spec_name: str, name: str) -> StudyState:
    if name != "latest":
        return StudyState.load(root / name)
    candidates = []
    for path in root.glob("*/study.json"):
        try:
            state = StudyState.load(path.parent)
        except (StudyError, TypeError, ValueError):
            continue
        if state.spec.get("name") == spec_name and state.status != "completed":
            candidates.append(state)
    if not candidates:
        raise StudyError(f"no unfinished study of spec {spec_name!r} under {root} to resume "
                         f"(pass --resume STUDY_NAME, or --root)")
    return max(candidates, key=lambda s: s.created)


# ---------------------------------------------------------------------------------------------
# Ray

def init_ray(address: str | None, verbose: bool) -> bool:
    """Start or join Ray unless this process already did. -> whether we own the connection."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Workers must import `studies` even from a checkout that is not pip-installed.
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        # address="local": a bare ray.init() would join the newest `ray start` cluster on this
        # machine (Ray records it under /tmp/ray) instead of the study's own local instance.
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **kwargs)
    return True


def check_resources(spec: StudySpec, address: str | None) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= spec.resources.cpus_per_trial
            and n["Resources"].get("GPU", 0) >= min(1.0, spec.resources.gpus_per_trial)]
    if fits:
        return
    need = f"{spec.resources.cpus_per_trial:g} CPU" + (
        f" + {spec.resources.gpus_per_trial:g} GPU" if spec.resources.gpus_per_trial else "")
    have = "; ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, "
                     f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
    if address:  # a cluster may still autoscale to a node that fits
        print(f"warning: no node can run a trial ({need}) yet ({have}); waiting for the autoscaler", flush=True)
        return
    raise StudyError(f"no node of the local Ray can run a trial needing {need} ({have}); "
                     "lower --gpus-per-trial/--cpus-per-trial or pass --address of a cluster")


def trial_name(trial) -> str:
    """Short, stable trial names/dirs: the trial id (unique within the experiment)."""
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# The study

@dataclass
class TrialRow:
    trial_id: str
    label: str
    config: dict[str, Any]
    seed: int | None
    status: str  # done | stopped | diverged | error | interrupted | pending
    evaluations: int
    best: dict[str, float]  # metrics at the evaluation with the lowest val_nll
    run_id: str = ""
    config_id: str = ""
    checkpoint: str = ""
    error: str = ""


@dataclass
class StudyOutcome:
    state: StudyState
    rows: list[TrialRow]
    interrupted: bool
    exit_code: int
    summary: dict[str, Any]


def run_study(options: Options) -> StudyOutcome:
    """Run (or resume) one study end to end; see the module docstring."""
    try:
        return _run_study(options)
    finally:
        release_study_folders()


def _run_study(options: Options) -> StudyOutcome:
    # A resumed trial re-reports the steps after its checkpoint; Optuna ignores the repeats.
    warnings.filterwarnings("ignore", message="The reported value is ignored because this")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # Ray Tune's own console output is replaced by studies/progress.py (see --verbose).
    if not options.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Forced experiment snapshots (CheckpointConfig.num_to_keep) are cheap next to a trial's
    # evaluation; Tune's warning about them is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    cwd = Path.cwd().resolve()
    root = Path(options.root).expanduser().resolve() if options.root else cwd / "studies_out"

    # 1. settings: the saved ones of the study to resume, or the spec plus flags. Names become
    #    folder names and the tracking server is asked before anything is written or started.
    check_name(options.experiment, "--experiment")
    if options.study_name is not None:
        check_name(options.study_name, "--study-name")
    if options.resume and options.resume != "latest":
        check_name(options.resume, "--resume")
    state: StudyState | None = None
    if options.resume:
        state = find_resumable(root, load_spec_name(options.profile), options.resume)
        spec = spec_from_dict(state.spec)
        if options.tracking_uri and resolve_tracking_uri(options.tracking_uri, cwd) != state.tracking_uri:
            raise StudyError(f"study {state.study_name} tracks to {state.tracking_uri}; --tracking-uri "
                             f"{options.tracking_uri} would split its runs. Drop the flag to resume.")
        ignored = [flag for flag, value in (("--search", options.search), ("--objectives", options.objectives),
                                            ("--num-samples", options.num_samples), ("--seeds", options.seeds),
                                            ("--seed", options.seed), ("--set", options.overrides or None),
                                            ("--dataset", options.dataset), ("--data-dir", options.data_dir),
                                            ("--storage-path", options.storage_path))
                   if value is not None]
        if ignored:
            print(f"note: resuming {state.study_name} with its saved settings; ignoring {', '.join(ignored)}")
        check_tracking_server(state.tracking_uri)
        lock_study_folder(Path(state.folder))
    else:
        spec = apply_flags(load_spec(options.profile), options)
        tracking_uri = resolve_tracking_uri(options.tracking_uri, cwd)
        with sqlite_store_lock(tracking_uri):  # another driver may be creating the store right now
            check_sqlite_uri(tracking_uri)
        check_tracking_server(tracking_uri)
        storage_path = resolve_storage_path(options.storage_path, root)
        if options.address and "://" not in storage_path:
            print(f"note: Tune storage {storage_path} is a local path; on a multi-node cluster it must be "
                  "shared by every node (NFS), else use --storage-path s3://... (or $CVAE_STORAGE_PATH)")
        if options.address and tracking_uri.startswith("sqlite:"):
            print(f"note: MLflow tracks into {tracking_uri}; trials on other nodes cannot reach a local "
                  "SQLite file: use --tracking-uri http://HEAD:5000 (or $MLFLOW_TRACKING_URI)")

    # 2. data and Ray first: a missing dataset or an impossible resource request fails before
    #    anything is written to MLflow
    from cvae_core import build_config
    from cvae_core.data import load_corpus

    base = build_config(spec.preset, spec.dataset, spec.scale, spec.overrides)
    corpus = load_corpus(base.data, ("train", "valid"))
    owns_ray = init_ray(options.address, options.verbose)
    try:
        check_resources(spec, options.address)
        # 3. MLflow: the parent run (created, or reopened on resume) and the study folder
        if state is None:
            state = create_study(spec, options, root, tracking_uri, storage_path)
        else:
            from mlflow import MlflowClient

            from .tracking import reopen

            reopen(MlflowClient(tracking_uri=state.tracking_uri), state.parent_run_id)
            state.status = "running"
            state.save()
            print(f"Resuming study {state.study_name} ({state.experiment_path})", flush=True)
        # 4. the trials
        t0 = time.monotonic()
        try:
            results, trials, statuses, interrupted = _fit(spec, state, corpus, options)
            rows = collect_rows(spec, state, results, trials, statuses)
            summary = finalize(spec, state, rows, interrupted, time.monotonic() - t0)
        except BaseException:
            _close_on_error(state)
            raise
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    print_summary(spec, state, rows, summary, interrupted)
    if interrupted:
        code = EXIT_INTERRUPTED
    elif rows and all(r.status == "error" for r in rows):
        code = 1
    else:
        code = 0
    return StudyOutcome(state, rows, interrupted, code, summary)


def create_study(spec: StudySpec, options: Options, root: Path, tracking_uri: str, storage_path: str) -> StudyState:
    """The study folder, the MLflow experiment (created by the driver, never by trials) and the
    study's parent run."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from .tracking import code_version, ensure_experiment, source_tags

    # a random suffix: two studies started in the same second get distinct names
    study_name = options.study_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    folder = root / study_name
    folder.mkdir(parents=True, exist_ok=True)
    lock_study_folder(folder)
    if (folder / "study.json").exists():
        raise StudyError(f"study {study_name} already exists at {folder}; use --resume {study_name}")
    experiment_path = f"{storage_path.rstrip('/')}/{study_name}"
    optuna_storage = f"sqlite:///{folder / 'optuna.db'}"
    artifact_location = None if tracking_uri.startswith(("http://", "https://")) else (root / "mlartifacts").as_uri()
    version = code_version()
    with sqlite_store_lock(tracking_uri):  # MLflow creates a fresh store's schema on first use
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = ensure_experiment(client, options.experiment, artifact_location)
        parent = client.create_run(experiment_id, run_name=study_name, tags={
            "cvae.role": "study", "cvae.study": study_name, "cvae.spec": spec.name,
            "optuna.storage": optuna_storage, "optuna.study_name": study_name,
            "ray.experiment_path": experiment_path, "cvae.code_version": version,
            "mlflow.note.content": spec.description, **source_tags(f"studies spec {spec.name}"),
        })
    client.log_batch(parent.info.run_id,
                     params=[Param(k, v) for k, v in spec.summary_params(spec.search).items()][:100])
    state = StudyState(
        study_name=study_name, spec=spec.to_dict(), folder=str(folder), tracking_uri=tracking_uri,
        experiment_name=options.experiment, experiment_id=experiment_id,
        parent_run_id=parent.info.run_id, storage_path=storage_path, experiment_path=experiment_path,
        optuna_storage=optuna_storage, code_version=version, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    state.save()
    print(f"Study {study_name}: spec {spec.name}, search {spec.search}, "
          f"{total_trials(spec)} trials x {spec.evaluations} evaluations, "
          f"{spec.resources.max_concurrent_trials} at a time", flush=True)
    print(f"  MLflow {tracking_uri} (experiment {options.experiment!r}, parent run {parent.info.run_id})")
    print(f"  Ray results {experiment_path}", flush=True)
    return state


_held_locks: dict[Path, Any] = {}


def lock_study_folder(folder: Path) -> None:
    """Hold ``<folder>/.lock`` exclusively while this driver runs the study (released by
    :func:`release_study_folders`, or by the OS when the driver dies): a second driver of the
    same study refuses at once instead of sharing its Optuna study and parent run."""
    import fcntl

    if folder in _held_locks:
        return
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise StudyError(f"study {folder.name} is being run by another driver ({owner}); wait for it to end, "
                         "or pick another --study-name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    _held_locks[folder] = handle


def release_study_folders() -> None:
    while _held_locks:
        _, handle = _held_locks.popitem()
        handle.close()


@contextlib.contextmanager
def sqlite_store_lock(tracking_uri: str):
    """Serialise first use of a SQLite MLflow store across drivers (``<db>-lock`` beside it):
    two drivers creating a fresh store's schema at once make one of them crash."""
    import fcntl

    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    path = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    if not path.parent.is_dir():
        yield  # check_sqlite_uri names the missing folder
        return
    with open(f"{path}-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_spec_name(profile: str) -> str:
    return load_spec(profile).name


def total_trials(spec: StudySpec) -> int:
    from .spaces import GRIDS

    configs = len(GRIDS[spec.grid]()) if spec.search == "grid" else len(spec.baselines) + spec.num_samples
    return configs * spec.seeds


def build_searcher(spec: StudySpec, state: StudyState):
    import optuna

    from .searcher import NoSearch, StudyOptunaSearch, StudySearcher
    from .spaces import GRIDS, SPACES

    metrics = [o.metric for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    metric: str | list[str] = metrics if spec.multi_objective else metrics[0]
    mode: str | list[str] = modes if spec.multi_objective else modes[0]
    seeds = [spec.seed + i for i in range(spec.seeds)]
    if spec.search == "grid":
        return StudySearcher(NoSearch(metric, mode), fixed=GRIDS[spec.grid](), n_search=0, seeds=seeds,
                             metric=metric, mode=mode, evaluations=spec.evaluations)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inner = StudyOptunaSearch(space=SPACES[spec.space], metric=metric, mode=mode,
                         sampler=optuna.samplers.TPESampler(seed=spec.seed),
                         study_name=state.study_name,
                         storage=optuna.storages.RDBStorage(state.optuna_storage))
    return StudySearcher(inner, fixed=spec.baselines, n_search=spec.num_samples, seeds=seeds,
                         metric=metric, mode=mode, evaluations=spec.evaluations)


def _trainable(spec: StudySpec, state: StudyState, corpus):
    from ray import tune

    from .tracking import StudyContext
    from .trainable import train_trial

    context = StudyContext(
        study_name=state.study_name, spec_name=spec.name, tracking_uri=state.tracking_uri,
        experiment_name=state.experiment_name, experiment_id=state.experiment_id,
        parent_run_id=state.parent_run_id, preset=spec.preset, dataset=spec.dataset, scale=spec.scale,
        overrides=dict(spec.overrides), code_version=state.code_version,
        cpus_per_trial=spec.resources.cpus_per_trial, gpus_per_trial=spec.resources.gpus_per_trial)
    resources = {"cpu": spec.resources.cpus_per_trial}
    if spec.resources.gpus_per_trial:
        resources["gpu"] = spec.resources.gpus_per_trial
    return tune.with_resources(tune.with_parameters(train_trial, corpus=corpus, study=context), resources)


def _fit(spec: StudySpec, state: StudyState, corpus, options: Options):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .progress import StudyProgress

    trainable = _trainable(spec, state, corpus)
    if tune.Tuner.can_restore(state.experiment_path):
        tuner = tune.Tuner.restore(state.experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        progress = StudyProgress(state.study_name, spec.preset, spec.evaluations, total_trials(spec),
                                 state.tracking_uri, state.experiment_id, state.parent_run_id)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.evaluations,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=spec.scheduler.metric, mode=spec.scheduler.mode, search_alg=build_searcher(spec, state),
                scheduler=scheduler, num_samples=total_trials(spec),
                max_concurrent_trials=spec.resources.max_concurrent_trials, reuse_actors=False,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name=state.study_name, storage_path=state.storage_path,
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=spec.scheduler.metric,
                    checkpoint_score_order=spec.scheduler.mode),
                callbacks=[progress], verbose=2 if options.verbose else 0, log_to_file=True),
        )
    results = tuner.fit()
    trials = list(getattr(results, "_experiment_analysis").trials)  # Trial objects, aligned with results
    # On Ctrl-C Tune saves the experiment state, *then* stops the running trials, which marks
    # them TERMINATED in memory. The saved state keeps what matters (RUNNING/PENDING =
    # unfinished), and it is what Tuner.restore will continue from.
    saved = {t.trial_id: t.status for t in tune.ExperimentAnalysis(state.experiment_path).trials}
    statuses = {t.trial_id: saved.get(t.trial_id, t.status) for t in trials}
    interrupted = (any(s not in ("TERMINATED", "ERROR") for s in statuses.values())
                   or len(trials) < total_trials(spec))
    return results, trials, statuses, interrupted


# ---------------------------------------------------------------------------------------------
# Results

SUMMARY_KEYS = ("val_nll", "val_kl", "val_mi_loo", "val_au", "val_ppl", "val_elbo", "val_rec", "step",
                "val_dist1", "val_dist2")  # the last two: dialogue models (Table 8 diversity)


def collect_rows(spec: StudySpec, state: StudyState, results, trials, statuses: dict[str, str]) -> list[TrialRow]:
    from mlflow import MlflowClient

    from .spaces import describe
    from .tracking import child_runs

    client = MlflowClient(tracking_uri=state.tracking_uri)
    runs = {r.data.tags.get("ray_trial_id"): r for r in child_runs(client, state.experiment_id, state.parent_run_id)}
    rows = []
    for result, trial in zip(results, trials):
        history = result.metrics_dataframe
        records = history.to_dict("records") if history is not None and len(history) else []
        diverged = next((r for r in records if _finite(r.get("diverged")) and r["diverged"]), None)
        records = [r for r in records if r is not diverged]  # the divergence report is no evaluation
        scored = [r for r in records if _finite(r.get("val_nll"))]
        best = min(scored, key=lambda r: r["val_nll"]) if scored else {}
        # A trial resumed from an older checkpoint re-reports the steps after it: count steps once.
        n_evals = len({r.get("step") for r in records})
        ray_status = statuses.get(trial.trial_id, trial.status)
        if diverged is not None:
            status = "diverged"
        elif ray_status == "ERROR":
            status = "error"
        elif ray_status == "TERMINATED":
            status = "done" if n_evals >= spec.evaluations else "stopped"
        elif n_evals:
            status = "interrupted"
        else:
            status = "pending"
        checkpoint = ""
        if scored:
            try:
                best_ckpt = result.get_best_checkpoint(metric="val_nll", mode="min")
                checkpoint = best_ckpt.path if best_ckpt is not None else ""
            except Exception:  # noqa: BLE001 - e.g. every checkpoint pruned
                checkpoint = ""
        run = runs.get(trial.trial_id)
        config = {k: v for k, v in dict(trial.config).items() if not k.startswith("__")}
        rows.append(TrialRow(
            trial_id=trial.trial_id, label=describe(config, spec.preset), config=config,
            seed=config.get("train.seed"), status=status, evaluations=n_evals,
            best={k: float(best[k]) for k in SUMMARY_KEYS if k in best and _finite(best[k])},
            run_id=run.info.run_id if run else "", config_id=run.data.tags.get("cvae.config_id", "") if run else "",
            checkpoint=checkpoint,
            error=(f"diverged at step {int(diverged['step'])}: {diverged.get('diverged_reason', '')}" if diverged
                   else str(result.error).strip().splitlines()[-1][:200] if result.error else "")))
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _objective_value(row: TrialRow, objective: Objective) -> float | None:
    value = row.best.get(objective.metric)
    return value if _finite(value) else None


def rank(spec: StudySpec, rows: list[TrialRow]) -> list[TrialRow]:
    first = spec.objectives[0]
    sign = 1.0 if first.mode == "min" else -1.0

    def key(row: TrialRow):
        value = _objective_value(row, first)
        return (value is None, sign * value if value is not None else 0.0)

    return sorted(rows, key=key)


def pareto_front(spec: StudySpec, points: list[tuple[str, dict[str, float]]]) -> set[str]:
    """Names of the non-dominated points under the spec's objectives."""
    def vector(values):
        return [(1 if o.mode == "min" else -1) * values[o.metric] for o in spec.objectives]

    valid = [(name, vector(v)) for name, v in points if all(_finite(v.get(o.metric)) for o in spec.objectives)]
    front = set()
    for name, a in valid:
        dominated = any(all(y <= x for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b)) for _, b in valid)
        if not dominated:
            front.add(name)
    return front


def group_by_config(rows: list[TrialRow]) -> list[dict[str, Any]]:
    groups: dict[str, list[TrialRow]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    out = []
    for label, members in groups.items():
        entry: dict[str, Any] = {"label": label, "n": len(members), "config_id": members[0].config_id}
        for key in ("val_nll", "val_kl", "val_mi_loo", "val_au"):
            values = [m.best[key] for m in members if _finite(m.best.get(key))]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(entry)
    return out


def finalize(spec: StudySpec, state: StudyState, rows: list[TrialRow], interrupted: bool,
             elapsed_s: float) -> dict[str, Any]:
    """Close every child run, write the parent's summary, end the parent run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from .tracking import child_runs, finish_run, retry

    client = MlflowClient(tracking_uri=state.tracking_uri)
    by_trial = {r.trial_id: r for r in rows}
    for run in retry(lambda: child_runs(client, state.experiment_id, state.parent_run_id)):
        if run.info.status != "RUNNING":
            continue
        row = by_trial.get(run.data.tags.get("ray_trial_id", ""))
        status = {"done": "FINISHED", "stopped": "FINISHED", "diverged": "FINISHED",
                  "error": "FAILED"}.get(row.status if row else "", "KILLED")
        retry(lambda: finish_run(client, run.info.run_id, status))

    ranked = rank(spec, [r for r in rows if r.best])
    counts = {s: sum(1 for r in rows if r.status == s)
              for s in ("done", "stopped", "diverged", "error", "interrupted", "pending")}
    groups = group_by_config(rows) if spec.seeds > 1 else []
    front: set[str] = set()
    if spec.multi_objective:
        points = ([(g["label"], g) for g in groups] if groups else [(r.trial_id, r.best) for r in rows])
        front = pareto_front(spec, points)
    best = ranked[0] if ranked else None
    summary: dict[str, Any] = {
        "study": state.study_name, "spec": spec.name, "search": spec.search,
        "objectives": [str(o) for o in spec.objectives], "status": "interrupted" if interrupted else "completed",
        "elapsed_s": round(elapsed_s, 1), "counts": counts, "experiment_path": state.experiment_path,
        "optuna_storage": state.optuna_storage, "tracking_uri": state.tracking_uri,
        "parent_run_id": state.parent_run_id, "pareto_front": sorted(front),
        "trials": [dataclasses.asdict(r) for r in ranked + [r for r in rows if not r.best]],
        "configurations": groups,
        "best": dataclasses.asdict(best) if best else None,
    }
    if spec.search == "grid":
        record_grid_in_optuna(spec, state, rows)
    folder = Path(state.folder)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (folder / "summary.md").write_text(render_markdown(spec, state, rows, summary))

    parent = state.parent_run_id
    now = int(time.time() * 1000)
    metrics = [Metric(f"n_{k}", float(v), now, 0) for k, v in counts.items()]
    tags = [RunTag("cvae.status", summary["status"])]
    if best:
        metrics += [Metric(f"best_{k}", v, now, 0) for k, v in best.best.items() if k != "step"]
        best_config = {k: v for k, v in best.config.items() if not k.startswith("search.")}
        tags += [RunTag("cvae.best_trial_id", best.trial_id), RunTag("cvae.best_run_id", best.run_id),
                 RunTag("cvae.best_config", json.dumps(best_config, sort_keys=True, default=str)),
                 RunTag("cvae.best_label", best.label), RunTag("cvae.best_checkpoint", best.checkpoint)]
        tags += [RunTag(f"best.{k}", str(v)) for k, v in sorted(best_config.items())]
    retry(lambda: client.log_batch(parent, metrics=metrics, tags=tags))
    retry(lambda: client.log_artifact(parent, str(folder / "summary.md")))
    retry(lambda: client.log_artifact(parent, str(folder / "summary.json")))
    retry(lambda: client.set_terminated(parent, status="KILLED" if interrupted else "FINISHED"))
    state.status = "interrupted" if interrupted else "completed"
    state.save()
    return summary


def record_grid_in_optuna(spec: StudySpec, state: StudyState, rows: list[TrialRow]) -> None:
    """Grid studies have no Optuna sampler; record each finished configuration in the same kind of
    Optuna study a TPE study persists (mean over seeds, like StudySearcher tells Optuna), so
    that optuna-dashboard and importance analysis read both kinds of study alike."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from .searcher import name_objectives

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=state.optuna_storage, study_name=state.study_name, load_if_exists=True,
                                directions=["minimize" if o.mode == "min" else "maximize" for o in spec.objectives])
    name_objectives(study, [o.metric for o in spec.objectives])
    recorded = {t.user_attrs.get("config") for t in study.get_trials(deepcopy=False)}
    groups: dict[str, list[TrialRow]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    cells = [{k: v for k, v in r[0].config.items() if k != "train.seed"} for r in groups.values()]
    choices: dict[str, set] = {}
    for cell in cells:
        for key, value in cell.items():
            choices.setdefault(key, set()).add(value)
    distributions = {k: CategoricalDistribution(sorted(v, key=str)) for k, v in choices.items()}
    for (label, members), cell in zip(groups.items(), cells):
        if label in recorded or any(m.status in ("interrupted", "pending") for m in members):
            continue
        if len(members) < spec.seeds:
            continue
        values = []
        for objective in spec.objectives:
            scored = [m.best[objective.metric] for m in members if _finite(m.best.get(objective.metric))]
            values.append(statistics.fmean(scored) if scored else None)
        complete = all(v is not None for v in values)
        study.add_trial(create_trial(
            state=TrialState.COMPLETE if complete else TrialState.FAIL, values=values if complete else None,
            params=cell, distributions={k: distributions[k] for k in cell},
            user_attrs={"config": label, "ray_trial_ids": [m.trial_id for m in members]}))


def _close_on_error(state: StudyState) -> None:
    """An exception in the driver: end the runs it left open (a later --resume reopens them)."""
    try:
        from mlflow import MlflowClient

        from .tracking import child_runs, finish_run

        client = MlflowClient(tracking_uri=state.tracking_uri)
        for run in child_runs(client, state.experiment_id, state.parent_run_id):
            finish_run(client, run.info.run_id, "KILLED")
        finish_run(client, state.parent_run_id, "KILLED")
        state.status = "interrupted"
        state.save()
    except Exception:  # noqa: BLE001 - never mask the original error
        pass


# ---------------------------------------------------------------------------------------------
# Printing

def _f(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "-"


def _status_text(row: TrialRow, evaluations: int) -> str:
    if row.status == "stopped":
        return f"stopped@{row.evaluations}/{evaluations} (ASHA)"
    if row.status == "error":
        return "error"
    if row.status == "diverged":
        return row.error.split(":", 1)[0]  # "diverged at step N"
    return row.status


def table_lines(spec: StudySpec, rows: list[TrialRow], front: set[str]) -> list[str]:
    ranked = rank(spec, [r for r in rows if r.best]) + [r for r in rows if not r.best]
    width = max([len("config")] + [len(r.label) for r in ranked])
    mo = spec.multi_objective
    header = (f"{'rank':>4}  {'trial':<13} {'config':<{width}} {'seed':>4} {'val NLL':>8} {'KL':>6} "
              f"{'MI':>6} {'AU':>4} {'PPL':>7} {'step':>5}" + ("  front" if mo else "") + "  status")
    lines = [header, "-" * len(header)]
    for i, r in enumerate(ranked, 1):
        b = r.best
        lines.append(
            f"{i if r.best else '':>4}  {r.trial_id:<13} {r.label:<{width}} {r.seed if r.seed is not None else '':>4} "
            f"{_f(b.get('val_nll')):>8} {_f(b.get('val_kl')):>6} {_f(b.get('val_mi_loo')):>6} "
            f"{_f(b.get('val_au'), 0):>4} {_f(b.get('val_ppl'), 1):>7} {int(b['step']) if 'step' in b else '':>5}"
            + (f"  {'*' if r.trial_id in front else '':^5}" if mo else "") + f"  {_status_text(r, spec.evaluations)}")
    return lines


def group_lines(spec: StudySpec, groups: list[dict[str, Any]], front: set[str]) -> list[str]:
    first = spec.objectives[0]
    sign = 1 if first.mode == "min" else -1
    groups = sorted(groups, key=lambda g: (g.get(first.metric) is None, sign * (g.get(first.metric) or 0)))
    width = max([len("config")] + [len(g["label"]) for g in groups])

    def ms(g, key, digits=2):
        mean, sd = g.get(key), g.get(f"{key}_sd")
        return f"{_f(mean, digits)}±{_f(sd, digits)}" if sd is not None else _f(mean, digits)

    header = f"{'rank':>4}  {'config':<{width}} {'n':>2} {'val NLL':>13} {'KL':>11} {'MI':>11} {'AU':>7}"
    lines = [header, "-" * len(header)]
    for i, g in enumerate(groups, 1):
        lines.append(f"{i:>4}  {g['label']:<{width}} {g['n']:>2} {ms(g, 'val_nll'):>13} {ms(g, 'val_kl'):>11} "
                     f"{ms(g, 'val_mi_loo'):>11} {ms(g, 'val_au', 1):>7}"
                     + ("  *" if spec.multi_objective and g["label"] in front else ""))
    return lines


def mlflow_ui_command(tracking_uri: str, experiment_id: str, artifacts: Path) -> str:
    """The line that opens this study's runs: the server's URL, or a command that starts the
    project's server launcher (MLflow's job runner off, one worker: 2 processes) on the local store.
    Absolute paths and this interpreter, so it runs as printed from any folder and shell."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}"
    return shlex.join([sys.executable, str(REPO_ROOT / "mlflow" / "server.py"), "--backend-store-uri", tracking_uri,
                       "--artifacts-destination", str(artifacts), "--workers", "1"]) + "   # then open http://127.0.0.1:5000"


def analysis_command(state: "StudyState") -> str:
    """The documented next step, for this study, runnable as printed from any folder."""
    return shlex.join([sys.executable, "-m", "analysis", "table", "--tracking-uri", state.tracking_uri,
                       "--experiment", state.experiment_name, "--study", state.study_name])


def render_markdown(spec: StudySpec, state: StudyState, rows: list[TrialRow], summary: dict[str, Any]) -> str:
    front = set(summary["pareto_front"])
    out = [f"# Study {state.study_name}", "",
           f"spec `{spec.name}` ({spec.description}), search `{spec.search}`, objectives "
           f"{', '.join(summary['objectives'])}, status **{summary['status']}**, "
           f"{summary['elapsed_s']:.0f} s this session.", "",
           "Metrics are those of each trial's best checkpoint (lowest validation NLL).", "", "```"]
    out += table_lines(spec, rows, front)
    out += ["```", ""]
    if summary["configurations"]:
        out += ["Per configuration (mean ± sd over seeds):", "", "```"]
        out += group_lines(spec, summary["configurations"], front)
        out += ["```", ""]
    out += [f"- Ray experiment: `{state.experiment_path}`", f"- Optuna storage: `{state.optuna_storage}`",
            f"- MLflow: `{state.tracking_uri}`, parent run `{state.parent_run_id}`"]
    return "\n".join(out) + "\n"


def print_summary(spec: StudySpec, state: StudyState, rows: list[TrialRow], summary: dict[str, Any],
                  interrupted: bool) -> None:
    counts = summary["counts"]
    front = set(summary["pareto_front"])
    print()
    print(f"Study {state.study_name} {'INTERRUPTED' if interrupted else 'finished'}: "
          f"{counts['done']} done, {counts['stopped']} stopped early by ASHA, {counts['diverged']} diverged, "
          f"{counts['error']} failed"
          + (f", {counts['interrupted'] + counts['pending']} unfinished" if interrupted else "")
          + f" ({summary['elapsed_s'] / 60:.1f} min this session)")
    print(f"Ranked by {spec.objectives[0]} at each trial's best checkpoint (lowest val NLL):")
    for line in table_lines(spec, rows, front):
        print(line)
    if summary["configurations"]:
        print("\nPer configuration (mean ± sd over seeds):")
        for line in group_lines(spec, summary["configurations"], front):
            print(line)
    if spec.multi_objective:
        print(f"\nPareto front over {', '.join(str(o) for o in spec.objectives)}: marked *")
    best = summary["best"]
    if best:
        print(f"\nBest: {best['trial_id']} ({best['label']}, seed {best['seed']}), val_nll "
              f"{_f(best['best'].get('val_nll'))} at step {int(best['best'].get('step', 0))}")
        if best["checkpoint"]:
            print(f"  checkpoint (Ray):    {best['checkpoint']}")
        if best["run_id"]:
            print(f"  checkpoint (MLflow): runs:/{best['run_id']}/checkpoint")
    print(f"\nSummary:      {Path(state.folder) / 'summary.md'}")
    print(f"Compare runs: {mlflow_ui_command(state.tracking_uri, state.experiment_id, Path(state.folder).parent / 'mlartifacts')}")
    print(f"Analyse:      {analysis_command(state)}")
    if state.optuna_storage != "none":
        print(f"Optuna study: {state.study_name} in {state.optuna_storage}")
    if interrupted:
        resume = [sys.executable, str(REPO_ROOT / "studies" / _script_for(spec)), "--resume", state.study_name,
                  "--root", str(Path(state.folder).parent)]
        print(f"\nInterrupted. Continue with: {shlex.join(resume)}")
    sys.stdout.flush()


def _script_for(spec: StudySpec) -> str:
    if (Path(__file__).resolve().parent / f"{spec.name}.py").exists():  # e.g. cvae_sweep.py for its spec
        return f"{spec.name}.py"
    return {"lambda": "lambda_sweep.py", "posterior": "posterior_sweep.py"}.get(spec.space, "lambda_sweep.py")

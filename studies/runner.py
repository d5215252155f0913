"""The shared study driver behind ``studies/*_sweep.py``.

    spec (+ flags) -> MLflow experiment + parent run -> Ray (local or --address)
      -> Tuner(StudySearcher(StudyOptunaSearch | grid), ASHA) or Tuner.restore -> live progress
      -> ranked summary table + parent-run summary + best checkpoint + `mlflow ui` command

Where things go (all absolute):

* study folder root: ``--root``, default ``<cwd>/studies_out``; one folder per study with
  ``study.json`` (what ``--resume`` needs), ``optuna.db`` (the Optuna study) and ``summary.md/json``;
* Tune results and checkpoints: ``--storage-path`` > ``$CVAE_STORAGE_PATH`` (set on the cluster,
  an S3 URI) > ``<root>/ray_results``; the experiment is ``<storage>/<study name>``;
* MLflow: ``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` (set on the cluster) >
  ``sqlite:///<cwd>/mlflow.db``, artifacts in ``<root>/mlartifacts`` (server default over http).

This module keeps the orchestration; the rooms around it: ``options`` (command line, places),
``state`` (study folder, ``study.json``, locks, the new study's parent run), ``tracking`` (the
MLflow runs: ``StudyRun``, ``TrialRun``), ``outcomes`` (how each trial ended), ``summary`` (rows,
ranking, Pareto front), ``render`` (tables and final lines), ``progress`` (live lines).

Imports inside functions are deliberate: Ray, Optuna, MLflow and torch load only when a study
starts, so ``--help`` and bad input answer in a fraction of a second (``tests/test_house.py``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvae_core.config import build_config
from cvae_core.errors import CvaeError
from cvae_core.guards import check_name, check_sqlite_uri, check_tracking_server, redact
from cvae_core.metrics.names import IS_BEST

from .options import (Options, StudyError, apply_flags, build_parser, resolve_storage_path,
                      resolve_tracking_uri)
from .raysetup import check_local_resources, check_resources, init_ray
from .render import print_summary, render_markdown, resume_command
from .spec import StudySpec, load_spec
from .state import (StudyState, create_study, find_resumable, load_spec_name, lock_study_folder,
                    release_study_folders, sqlite_store_lock, total_trials)
from .record import Outcome, Tag
from .results import count_trials
from .spaces import GRIDS, SPACES
from .summary import ROW_STATUS, TrialRow, best_row, collect_rows, summarize
from .warmstart import WarmStart, enqueue, plan_warm_start

EXIT_INTERRUPTED = 130
EXIT_DISK_FULL = 75  # EX_TEMPFAIL: free space, then --resume


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


def trial_name(trial) -> str:
    """Short, stable trial names/dirs: the trial id (unique within the experiment)."""
    return f"trial_{trial.trial_id}"


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
    from .diskspace import check_free_space, local_folders, release_space

    # before anything is written (a study folder, a lock, an MLflow store)
    check_free_space(local_folders(root, resolve_storage_path(options.storage_path, root)), options.min_free_mb)
    spec, state, new_study, warm_start = _settings(options, cwd, root)
    if not options.address:
        check_local_resources(spec)  # a local Ray gets this machine: a trial that cannot fit fails now
    if state is not None:
        lock_study_folder(Path(state.folder))

    # 2. data and Ray first: a missing dataset or an impossible resource request fails before
    #    anything is written to MLflow
    from cvae_core.data import load_corpus  # torch

    from .tracking import StudyRun

    base = build_config(spec.preset, spec.dataset, spec.scale, spec.overrides)
    corpus = load_corpus(base.data, ("train", "valid"))
    folders = (local_folders(state.folder, state.storage_path) if state is not None
               else local_folders(root, resolve_storage_path(options.storage_path, root)))
    check_free_space(folders, options.min_free_mb)  # a resumed study's own folders
    owns_ray = init_ray(options.address, options.verbose)
    try:
        check_resources(spec, options.address)
        # 3. MLflow: the parent run (created, or reopened on resume) and the study folder
        if state is None:
            state = create_study(spec, options, root, *new_study, warm_start=warm_start.tag if warm_start else "")
            if warm_start is not None:
                _print_warm_start(warm_start)
        else:
            StudyRun(state.tracking_uri, state.experiment_id, state.parent_run_id).reopen()
            state.status = "running"
            state.save()
            print(f"Resuming study {state.study_name} ({state.experiment_paths()[-1]})", flush=True)
        study_run = StudyRun(state.tracking_uri, state.experiment_id, state.parent_run_id)
        if spec.resources.pack > 1:
            from .packing import pack_memory_estimate

            gib, how = pack_memory_estimate(base, len(corpus.vocab), spec.resources.pack)
            print(f"  Packs of up to {spec.resources.pack} trials, one Ray trial each: about {gib:.2f} GiB of memory "
                  f"per pack ({how})", flush=True)
        # 4. the trials
        t0 = time.monotonic()
        try:
            interrupted = _fit(spec, state, corpus, options, study_run, base.train.steps, folders, warm_start)
            if options.extend and not interrupted:  # the study so far is finished: add the new trials
                spec = _extend(spec, state, options.extend)
                interrupted = _fit(spec, state, corpus, options, study_run, base.train.steps, folders)
            results, trials, statuses = _study_trials(state)
            interrupted = interrupted or count_trials(trials) < total_trials(spec)
            rows = collect_rows(spec, results, trials, statuses, study_run.trial_runs())
            summary = finalize(spec, state, study_run, rows, interrupted, time.monotonic() - t0)
        except BaseException:
            _end_after_error(state, study_run)
            raise
    finally:
        release_space(folders)
        if owns_ray:
            import ray

            ray.shutdown()
    from .diskspace import low_space, stopped_for_space

    disk_problem = (stopped_for_space() or low_space(folders, options.min_free_mb)) if interrupted else None
    print_summary(spec, state, rows, summary, interrupted, stopped_because=disk_problem)
    if disk_problem:
        code = EXIT_DISK_FULL
    elif interrupted:
        code = EXIT_INTERRUPTED
    elif rows and all(r.status == "error" for r in rows):
        code = 1
    else:
        code = 0
    return StudyOutcome(state, rows, interrupted, code, summary)


def _settings(options: Options, cwd: Path, root: Path
              ) -> tuple[StudySpec, StudyState | None, tuple[str, str], WarmStart | None]:
    """1. The saved settings of the study to resume, or the spec plus flags.  Names become folder
    names and the tracking server is asked before anything is written or started.
    -> (spec, the state to resume or None, (tracking URI, Tune storage) of a new study,
    what a new study enqueues from --warm-start)."""
    check_name(options.experiment, "--experiment")
    if options.study_name is not None:
        check_name(options.study_name, "--study-name")
    if options.resume and options.resume != "latest":
        check_name(options.resume, "--resume")
    if options.extend is not None:
        if options.extend < 1:
            raise StudyError(f"--extend must be at least 1 (configurations to add), got {options.extend}")
        if not options.resume or options.resume == "latest":
            raise StudyError("--extend N adds trials to an existing study: name it with --resume STUDY")
    if options.warm_start is not None and options.resume:
        raise StudyError("--warm-start seeds a new study; a resumed study keeps what it started with")
    if options.resume:
        state = find_resumable(root, load_spec_name(options.profile), options.resume)
        spec = state.study_spec()
        if options.extend and spec.search != "tpe":
            raise StudyError(f"study {state.study_name} is a {spec.search} study: every cell has run; --extend adds "
                             "Optuna's proposals to a --search tpe study")
        if options.extend and spec.resources.pack > 1:
            raise StudyError(f"study {state.study_name} is packed (--pack {spec.resources.pack}); --extend does not "
                             "extend packed studies")
        if options.tracking_uri and resolve_tracking_uri(options.tracking_uri, cwd) != state.tracking_uri:
            raise StudyError(f"study {state.study_name} tracks to {state.tracking_uri}; --tracking-uri "
                             f"{options.tracking_uri} would split its runs. Drop the flag to resume.")
        ignored = [flag for flag, value in (("--search", options.search), ("--objectives", options.objectives),
                                            ("--constraint", options.constraints),
                                            ("--num-samples", options.num_samples), ("--seeds", options.seeds),
                                            ("--seed", options.seed), ("--set", options.overrides or None),
                                            ("--dataset", options.dataset), ("--data-dir", options.data_dir),
                                            ("--storage-path", options.storage_path), ("--pack", options.pack))
                   if value is not None]
        if ignored:
            print(f"note: resuming {state.study_name} with its saved settings; ignoring {', '.join(ignored)}")
        check_tracking_server(state.tracking_uri)
        return spec, state, ("", ""), None
    spec = apply_flags(load_spec(options.profile), options)
    warm_start = plan_warm_start(options.warm_start, root, spec) if options.warm_start is not None else None
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
    return spec, None, (tracking_uri, storage_path), warm_start


def _print_warm_start(warm_start: WarmStart) -> None:
    print(f"  Warm start from {warm_start.source}: its best {len(warm_start.params)} feasible configuration(s) "
          f"first ({'; '.join(warm_start.labels)})", flush=True)
    if warm_start.skipped:
        print(f"  (not in this study's space, left out: {'; '.join(warm_start.skipped)})", flush=True)


def _extend(spec: StudySpec, state: StudyState, n: int) -> StudySpec:
    """Record an extension of ``n`` configurations before its trials start, so that a killed
    driver's --resume continues it."""
    extension = state.add_extension(n)
    spec = dataclasses.replace(spec, num_samples=spec.num_samples + n)
    state.spec = spec.to_dict()
    state.status = "running"
    state.save()
    print(f"Extending study {state.study_name} by {n} configuration(s) x {spec.seeds} seed(s); Optuna's sampler "
          f"sees its earlier trials ({extension['experiment_path']})", flush=True)
    return spec


def _study_trials(state: StudyState):
    """Tune's results, trials and saved statuses over every experiment of the study (the first
    one and each extension's)."""
    from ray import tune

    results, trials = [], []
    for path in state.experiment_paths():
        if not tune.Tuner.can_restore(path):
            continue  # an extension killed before Tune saved anything
        analysis = tune.ExperimentAnalysis(path)
        results.extend(tune.ResultGrid(analysis))
        trials.extend(analysis.trials)
    return results, trials, {t.trial_id: t.status for t in trials}


def build_searcher(spec: StudySpec, state: StudyState, warm_start: WarmStart | None = None):
    import optuna

    from .searcher import NoSearch, PerTrialSeedSampler, StudyOptunaSearch, StudySearcher
    metrics = [o.metric for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    metric: str | list[str] = metrics if spec.multi_objective else metrics[0]
    mode: str | list[str] = modes if spec.multi_objective else modes[0]
    seeds = [spec.seed + i for i in range(spec.seeds)]
    if spec.search == "grid":
        searcher = StudySearcher(NoSearch(metric, mode), fixed=GRIDS[spec.grid](), n_search=0, seeds=seeds,
                                 metric=metric, mode=mode, evaluations=spec.evaluations)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        inner = StudyOptunaSearch(space=SPACES[spec.space], metric=metric, mode=mode,
                                  sampler=PerTrialSeedSampler(spec.seed),
                                  study_name=state.study_name,
                                  storage=optuna.storages.RDBStorage(state.optuna_storage))
        if warm_start is not None:
            enqueue(inner.study, warm_start)
        # an extension proposes its own configurations only; the baselines ran in the first experiment
        fixed, n_search = (([], state.extensions[-1]["num_samples"]) if state.extensions
                           else (spec.baselines, spec.num_samples))
        searcher = StudySearcher(inner, fixed=fixed, n_search=n_search, seeds=seeds,
                                 metric=metric, mode=mode, evaluations=spec.evaluations,
                                 constraints=tuple(spec.constraints))
        if state.extensions:
            searcher.remember_finished(inner)
    if spec.resources.pack == 1:
        return searcher
    from .packing import PackKey, PackSearcher

    return PackSearcher(searcher, spec.resources.pack, PackKey(spec.preset, spec.dataset, spec.scale,
                                                               dict(spec.overrides)))


def _trainable(spec: StudySpec, state: StudyState, corpus, steps: int):
    from ray import tune

    from .outcomes import stop_points
    from .tracking import StudyContext
    from .trainable import train_pack_trial, train_trial

    context = StudyContext(
        study_name=state.study_name, spec_name=spec.name, tracking_uri=state.tracking_uri,
        experiment_name=state.experiment_name, experiment_id=state.experiment_id,
        parent_run_id=state.parent_run_id, preset=spec.preset, dataset=spec.dataset, scale=spec.scale,
        overrides=dict(spec.overrides), code_version=state.code_version,
        cpus_per_trial=spec.resources.cpus_per_trial, gpus_per_trial=spec.resources.gpus_per_trial,
        stop_points=stop_points(spec.scheduler.grace_period, spec.scheduler.reduction_factor, spec.evaluations),
        objectives=tuple(o.metric for o in spec.objectives), scheduler_metric=spec.scheduler.metric)
    resources = {"cpu": spec.resources.cpus_per_trial}
    if spec.resources.gpus_per_trial:
        resources["gpu"] = spec.resources.gpus_per_trial
    if spec.resources.pack == 1:
        return tune.with_resources(tune.with_parameters(train_trial, corpus=corpus, study=context), resources)
    from .packing import start_member_asha

    # ASHA per member (Tune's ASHA could only stop whole packs); its rungs survive a --resume
    asha = start_member_asha(grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor,
                             max_t=spec.evaluations, mode=spec.scheduler.mode, metric=spec.scheduler.metric,
                             steps=steps, state_path=str(Path(state.folder) / "member_asha.json"),
                             keep=spec.scheduler.keep_modes())
    return tune.with_resources(tune.with_parameters(train_pack_trial, corpus=corpus, study=context, asha=asha),
                               resources)


def _fit(spec: StudySpec, state: StudyState, corpus, options: Options, study_run, steps: int, folders: list[Path],
         warm_start: WarmStart | None = None) -> bool:
    """Run (or continue) the trials of the study's latest Tune experiment (the first one, or its
    latest extension's). -> whether they were interrupted.  ``steps``: train.steps of the base
    config; ``folders``: the study's local folders, whose free space the DiskGuard watches."""
    from ray import tune

    from .diskspace import DiskGuard, low_space, release_space, reserve_space
    from .outcomes import RecordingASHA, TrialOutcomes
    from .progress import StudyProgress
    from .snapshots import KeepLastGoodSnapshot, repair_snapshot

    trainable = _trainable(spec, state, corpus, steps)
    packed = spec.resources.pack > 1
    experiment_path = state.experiment_paths()[-1]
    n_trials = state.extensions[-1]["num_samples"] * spec.seeds if state.extensions else total_trials(spec)
    if tune.Tuner.can_restore(experiment_path):
        repaired = repair_snapshot(experiment_path)
        if repaired:
            print(repaired, flush=True)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        progress = StudyProgress(spec.preset, spec.evaluations, n_trials)
        if packed:  # a pack ends when all its members end; AshaRule stops members (studies/packing.py)
            scheduler, metric, mode = tune.schedulers.FIFOScheduler(), None, None
            # the pack's latest checkpoint (its active members'); each member's best is in MLflow
            checkpoint_config = tune.CheckpointConfig(num_to_keep=1)
        else:
            scheduler = RecordingASHA(steps=steps, metric=spec.scheduler.metric, mode=spec.scheduler.mode,
                                      max_t=spec.evaluations, grace_period=spec.scheduler.grace_period,
                                      reduction_factor=spec.scheduler.reduction_factor,
                                      state_path=str(Path(state.folder) / "asha.json"),
                                      keep=spec.scheduler.keep_modes())
            metric, mode = spec.scheduler.metric, spec.scheduler.mode
            # Keep the core's best checkpoint (the latest report with is_best = 1: Tune keeps
            # the later of equal scores) besides the latest one a retry resumes from.
            checkpoint_config = tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=IS_BEST,
                                                      checkpoint_score_order="max")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, search_alg=build_searcher(spec, state, warm_start),
                scheduler=scheduler, num_samples=n_trials,
                max_concurrent_trials=spec.resources.max_concurrent_trials, reuse_actors=False,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name=experiment_path.rstrip("/").rsplit("/", 1)[-1], storage_path=state.storage_path,
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                checkpoint_config=checkpoint_config,
                callbacks=[progress, TrialOutcomes(study_run), KeepLastGoodSnapshot(experiment_path),
                           *options.callbacks, DiskGuard(folders, options.min_free_mb)],
                verbose=2 if options.verbose else 0,
                log_to_file=True),
        )
    reserve_space(folders)
    _hide_tune_restore_hint()
    try:
        tuner.fit()
    except Exception:
        problem = low_space(folders, options.min_free_mb)
        if problem is None:
            raise
        release_space(folders)
        # e.g. Ray's own result files cut short by the full disk; its experiment state on disk
        # is the last complete one, which --resume continues from
        raise StudyError(f"the study stopped: {problem}; free space, then continue with: "
                         f"{resume_command(spec, state)}") from None
    release_space(folders, "driver")  # the trials have stopped: room for the study's own last writes
    # On Ctrl-C Tune saves the experiment state, *then* stops the running trials, which marks
    # them TERMINATED in memory. The saved state keeps what matters (RUNNING/PENDING =
    # unfinished), and it is what Tuner.restore will continue from.
    trials = tune.ExperimentAnalysis(experiment_path).trials
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials) or count_trials(trials) < n_trials


class _TuneRestoreHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(...)" warning after an interruption:
    a study continues with the resume line the summary prints (``--resume NAME``), which also
    reopens its MLflow runs and Optuna study; Tuner.restore alone would not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with: Tuner.restore(" not in record.getMessage()


def _hide_tune_restore_hint() -> None:
    tune_logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _TuneRestoreHint) for f in tune_logger.filters):
        tune_logger.addFilter(_TuneRestoreHint())


def finalize(spec: StudySpec, state: StudyState, study_run, rows: list[TrialRow], interrupted: bool,
             elapsed_s: float) -> dict[str, Any]:
    """End the trial runs still open, write the summary files, log the summary on the parent
    run and end it."""
    from .searcher import record_grid_in_optuna
    outcome_of = {status: outcome for outcome, status in ROW_STATUS.items()}
    by_trial = {r.trial_id: r for r in rows}
    study_run.end_open_trials(lambda trial_id: (
        outcome_of.get(by_trial[trial_id].status, Outcome.INTERRUPTED) if trial_id in by_trial
        else Outcome.INTERRUPTED, ""))
    summary = summarize(spec, state, rows, interrupted, elapsed_s)
    if spec.search == "grid":
        record_grid_in_optuna(spec, state, rows)
    folder = Path(state.folder)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (folder / "summary.md").write_text(render_markdown(spec, state, rows, summary))

    metrics = {f"n_{k}": v for k, v in summary["counts"].items()}
    metrics.update({k: v for k, v in summary["cost"].items() if k != "trials"})  # the study's cost (studies/cost.py)
    if spec.constraints:
        metrics["n_feasible"] = summary["n_feasible"]
    tags = {Tag.STATUS: summary["status"]}
    if state.extensions:  # configurations added by each --extend, oldest first
        tags[Tag.EXTENSIONS] = ",".join(str(e["num_samples"]) for e in state.extensions)
    best = best_row(spec, rows)  # feasible only: a study where none is has no best tags
    if best:
        metrics.update({f"best_{k}": v for k, v in best.best.items() if k != "step"})
        best_config = {k: v for k, v in best.config.items() if not k.startswith("search.")}
        tags.update({Tag.BEST_TRIAL_ID: best.trial_id, Tag.BEST_RUN_ID: best.run_id,
                     Tag.BEST_CONFIG: json.dumps(best_config, sort_keys=True, default=str),
                     Tag.BEST_LABEL: best.label, Tag.BEST_CHECKPOINT: best.checkpoint})
        tags.update({f"{Tag.BEST_CONFIG_PREFIX}{k}": str(v) for k, v in sorted(best_config.items())})
    study_run.finish(metrics, tags, [folder / "summary.md", folder / "summary.json"], interrupted)
    state.status = "interrupted" if interrupted else "completed"
    state.save()
    return summary


def _end_after_error(state: StudyState, study_run) -> None:
    """An exception in the driver: end the runs it left open (a later --resume reopens them)."""
    try:
        study_run.end_after_error()
        state.status = "interrupted"
        state.save()
    except Exception:  # noqa: BLE001 - never mask the original error
        pass

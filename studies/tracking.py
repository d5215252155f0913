"""The study's MLflow runs: one experiment, one parent run per study (:class:`StudyRun`), one
child run per trial (:class:`TrialRun`).  The tags and roles they write are published in
``studies/record.py`` (the contract with ``analysis/``); artifacts of a trial run are
``checkpoint/`` (the best checkpoint, evaluation-only: weights, config, vocabulary, state; the
full one with optimizer and RNG state, which a retry or ``--resume`` needs, stays in Ray's results
folder), ``config.json`` and the training log.

Everything goes through an explicit ``MlflowClient(tracking_uri)`` with an explicit experiment
id: trial processes run in Ray's per-trial working directories, where MLflow's default
``./mlruns`` store would scatter runs across them.  A retried or restored trial finds its own run
by ``Tag.TRIAL_ID`` instead of creating a second one.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

import cvae_core
from cvae_core.checkpoint import export_for_evaluation
from cvae_core.config import Config

from .cost import trial_cost
from .record import (COST_METRICS, EXPERIMENT_KIND, PARENT_RUN_ID, UNUSED, UNUSED_WITHOUT_COUPLING, Outcome, Role,
                     Tag, child_runs_filter, quote, search_all)

T = TypeVar("T")
OPEN_ATTEMPTS = 10  # retry()'s doubling waits from 0.5 s: about 4 minutes for a server to come back
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StudyContext:
    """What every trial needs to know about its study (small; travels with the trainable)."""

    study_name: str
    spec_name: str
    # never with user:password (this object is pickled by Ray); a trial's MlflowClient takes the
    # server's login from MLFLOW_TRACKING_USERNAME/PASSWORD, inherited (studies/raysetup.py)
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str
    preset: str
    dataset: str
    scale: str
    overrides: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    # evaluations (1-based) at which the scheduler may stop a trial: its rungs and the last one
    stop_points: tuple[int, ...] = ()
    objectives: tuple[str, ...] = ()  # the study's objective metrics, logged first
    scheduler_metric: str = "val_nll"  # what ASHA compares (pack members: studies/packing.py)


def code_version() -> str:
    """``cvae_core.__version__`` plus the git commit (``+dirty`` with local changes), if any."""
    version = cvae_core.__version__
    try:
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return f"{version}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return version


def config_id(config: Config) -> str:
    """Short hash of the resolved config without the seed: the seeds of one configuration share it."""
    flat = config.flat()
    flat.pop("train.seed", None)
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]


def transient(exc: Exception) -> bool:
    """A store error worth retrying (SQLite "database is locked", a busy or unreachable server)."""
    text = str(exc).lower()
    return any(s in text for s in ("locked", "busy", "timed out", "timeout", "connection", "temporarily",
                                   "503", "502", "max retries", "refused"))


def retry(fn: Callable[[], T], attempts: int = 5, delay_s: float = 0.5) -> T:
    """Retry transient store errors (SQLite "database is locked", a busy server)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow wraps store errors in several types
            if not transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay_s * (2**attempt))
    raise AssertionError("unreachable")


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Create the experiment once, on the driver (trials never race to create it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise RuntimeError(f"MLflow experiment {name!r} is deleted; restore it in the UI or pick another "
                               "name with --experiment")
        for key, value in EXPERIMENT_KIND.items():
            if key not in experiment.tags:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)


def source_tags(script: str) -> dict[str, str]:
    """MLflow's source tags (the UI's Source and Version columns): the study script and the commit."""
    tags = {"mlflow.source.name": script, "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.source.git.commit"] = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def unused_settings(config: Config) -> tuple[str, ...]:
    """Coupling settings this model never reads: all of them without coupling, the distance and
    RQ's C when λ_m = 0 (no matching loss), RQ's C with the Euclidean distance."""
    coupling = config.coupling
    if not coupling.enabled:
        return UNUSED_WITHOUT_COUPLING
    if coupling.lambda_m == 0:
        return ("coupling.distance", "coupling.rq_c")
    return ("coupling.rq_c",) if coupling.distance != "rq" else ()


def run_params(config: Config) -> dict[str, str]:
    """``Config.flat()`` as MLflow params, with the settings this model does not use as "none",
    so that a filter on the distance or λ_m never mixes in runs that do not use them."""
    params = {k: str(v) for k, v in config.flat().items()}
    params.update({key: UNUSED for key in unused_settings(config)})
    return params


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """The trial runs of one study (every page), each request retried."""
    return search_all(client, experiment_id, child_runs_filter(parent_run_id), call=retry)


def trial_run_filter(parent_run_id: str, trial_id: str) -> str:
    return f"{child_runs_filter(parent_run_id)} and tags.`{Tag.TRIAL_ID}` = {quote(trial_id)}"


def reopen(client: MlflowClient, run_id: str) -> None:
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


def finish_run(client: MlflowClient, run_id: str, status: str) -> None:
    """Terminate a run unless it already ended (a run is never left RUNNING)."""
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


MAX_PENDING_METRICS = 200_000  # ~ thousands of evaluations: beyond that, fail the trial (retried later)


class TrialRun:
    """The MLflow child run of one Ray trial, reused across retries and restores.

    Metrics are buffered while the tracking server is unreachable: :meth:`log_metrics` tries
    once and returns (training goes on), the next call sends the backlog first, and
    :meth:`flush` waits for it, bounded, where a trial may end."""

    def __init__(self, client: MlflowClient, run_id: str, logged_steps: set[int], first_metrics: tuple[str, ...] = (),
                 carried: dict[str, float] | None = None):
        self.client, self.run_id, self.logged_steps = client, run_id, logged_steps
        self.first_metrics = first_metrics
        self.carried = carried or {}  # the cost earlier attempts logged (studies/cost.py)
        self.pending: list[Metric] = []
        self.checkpoint_due: Path | None = None  # a best checkpoint not uploaded yet

    @classmethod
    def open(cls, study: StudyContext, trial_id: str, trial_name: str, config: Config,
             extra_tags: dict[str, str], run_name: str | None = None) -> "TrialRun":
        client = MlflowClient(tracking_uri=study.tracking_uri)
        # A retry may start while the server is down: wait for it (bounded) rather than fail the
        # attempt, which would use up the trial's retries on an outage.
        existing = search_all(client, study.experiment_id, trial_run_filter(study.parent_run_id, trial_id),
                              call=lambda fn: retry(fn, attempts=OPEN_ATTEMPTS))
        tags = {
            PARENT_RUN_ID: study.parent_run_id, Tag.ROLE: Role.TRIAL, Tag.STUDY: study.study_name,
            Tag.TRIAL_ID: trial_id, Tag.TRIAL_NAME: trial_name, Tag.PRESET: config.preset,
            Tag.DATASET: config.data.dataset, Tag.SEED: str(config.train.seed),
            Tag.CODE_VERSION: study.code_version, Tag.CONFIG_ID: config_id(config),
            **source_tags(f"studies spec {study.spec_name}"), **extra_tags,
        }
        if existing:
            run_id = sorted(existing, key=lambda r: r.info.start_time)[0].info.run_id
            retry(lambda: reopen(client, run_id))
            logged = {int(m.step) for m in retry(lambda: client.get_metric_history(run_id, "val_nll"))}
            retry(lambda: client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in extra_tags.items()]))
            carried = trial_cost({key: m.value} for key in COST_METRICS
                                 for m in retry(lambda: client.get_metric_history(run_id, key)))
            return cls(client, run_id, logged, study.objectives, carried)
        run = retry(lambda: client.create_run(study.experiment_id, run_name=run_name or trial_name,
                                              tags={k: str(v) for k, v in tags.items()}))
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in run_params(config).items()]
        for start in range(0, len(params), 100):  # MLflow's per-batch param limit
            retry(lambda: client.log_batch(run_id, params=params[start:start + 100]))
        retry(lambda: client.log_dict(run_id, config.to_dict(), "config.json"))
        return cls(client, run_id, set(), study.objectives)

    def log_metrics(self, metrics: dict[str, float]) -> bool:
        """Log one evaluation with step = training step; skip a step already logged (a retry
        that re-runs an evaluation). Returns whether anything was logged."""
        step = int(metrics["step"])
        if step in self.logged_steps:
            return False
        now = int(time.time() * 1000)
        # The study's objectives first: MLflow lists a run's metrics in logging order, and its
        # run-comparison charts open on the first one (else on "step").
        ordered = sorted(metrics, key=lambda k: (self.first_metrics + (k,)).index(k))  # stable
        self.pending += [Metric(k, float(metrics[k]), now, step) for k in ordered if isinstance(metrics[k], (int, float))]
        self.logged_steps.add(step)
        if len(self.pending) > MAX_PENDING_METRICS:
            raise RuntimeError(f"{len(self.pending)} metrics could not reach the MLflow server; stopping this "
                               "attempt (Ray retries it from its last checkpoint)")
        self.flush(wait_s=0)
        return True

    def log_cost(self, cost: dict[str, float]) -> None:
        """The trial's cost as an attempt ends (the work after its last evaluation, or a failed
        attempt's lost work), at the run's last logged step: the latest value there."""
        now = int(time.time() * 1000)
        step = max(self.logged_steps, default=0)
        self.pending += [Metric(k, float(v), now, step) for k, v in cost.items()]
        self.flush(wait_s=0)

    def flush(self, wait_s: float = 0.0) -> bool:
        """Send buffered metrics, in order. A transient failure keeps them for later; with
        ``wait_s`` > 0 it keeps trying that long (short, capped waits). -> whether all were sent."""
        deadline = time.monotonic() + wait_s
        delay = 0.5
        while self.pending:
            chunk = self.pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # noqa: BLE001 - MLflow wraps connection errors in several types
                if not transient(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    return False
                time.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            del self.pending[:len(chunk)]
        return True

    def upload(self, log_path: Path, best_checkpoint: Path | None = None, wait_s: float = 0.0) -> bool:
        """Upload the trial's log and, when given or still due, its best checkpoint as
        ``checkpoint/`` (same names each time, so a newer best replaces the older one file by
        file). While the server is unreachable the upload stays due for the next call and
        training goes on; ``wait_s`` > 0 keeps trying that long. -> whether all went out."""
        if best_checkpoint is not None:
            self.checkpoint_due = best_checkpoint
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.checkpoint_due is not None and self.checkpoint_due.is_dir():
                    self._upload_for_evaluation(self.checkpoint_due)
                self.checkpoint_due = None
                if log_path.is_file():
                    self.client.log_artifact(self.run_id, str(log_path))
                return True
            except Exception as exc:  # noqa: BLE001 - MLflow wraps connection errors in several types
                if not transient(exc):
                    raise
                if time.monotonic() >= deadline:
                    return False
                time.sleep(1.0)

    def _upload_for_evaluation(self, checkpoint: Path) -> None:
        """``checkpoint/`` gets the evaluation-only copy (no optimizer or RNG state: a third of the
        bytes): everything that reads it evaluates or serves; a retry resumes from Ray's full copy."""
        with tempfile.TemporaryDirectory(prefix="cvae-upload-") as scratch:
            exported = export_for_evaluation(checkpoint, Path(scratch) / "checkpoint")
            self.client.log_artifacts(self.run_id, str(exported), artifact_path="checkpoint")

    def set_tags(self, tags: dict[str, str]) -> None:
        retry(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))


# One sample every 10 s (MLflow's default): a few milliseconds of psutil/NVML and two requests to
# the store per sample (bench/bench_system_metrics.py measures the overhead). The environment
# variable MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL_S = 10.0


class SystemMetrics:
    """MLflow's own system-metrics monitor (a thread) on a trial's run:
    ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``/``_percentage``,
    disk and network, and with NVML (``nvidia-ml-py``) and a GPU ``system/gpu_<i>_*`` (utilisation,
    memory, power). They describe the machine (every CPU, every GPU of the node), not the
    trial's process alone. A restart continues the run's series (``resume_logging``).

    CPU utilisation is psutil's "since this thread's previous reading": a monitor's first sample
    reads 0 (MLflow's behaviour), the next ones are true.  :meth:`stop` logs one last sample (the
    time since the previous one): call it before Tune ends the process.  Monitoring never fails a
    trial: with the store unreachable, MLflow's thread stops and the samples are lost.  A context:
    leaving it stops the monitor."""

    def __init__(self, tracking_uri: str, interval_s: float = SYSTEM_METRICS_INTERVAL_S):
        import psutil  # only in the processes that monitor

        psutil.cpu_percent()  # this thread's reading for the last sample counts from here
        self.tracking_uri, self.interval_s = tracking_uri, interval_s
        self.monitor = None

    def start(self, run_id: str) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.stop()
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=self.interval_s, samples_before_logging=1,
                                            resume_logging=True, tracking_uri=self.tracking_uri)
        self.monitor.start()

    def stop(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception:  # noqa: BLE001 - a last sample is not worth failing a trial over (server down)
            pass

    def __enter__(self) -> "SystemMetrics":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


# How a trial's MLflow run ends for each outcome: only a crash is FAILED; an interrupted trial
# is KILLED (a --resume reopens it).
RUN_STATUS = {Outcome.DONE: "FINISHED", Outcome.STOPPED_EARLY: "FINISHED", Outcome.DIVERGED: "FINISHED",
              Outcome.ERROR: "FAILED", Outcome.INTERRUPTED: "KILLED"}


class StudyRun:
    """The study's parent run, on the driver, and the one owner that ends trial runs: each gets
    ``Tag.OUTCOME`` (and ``Tag.OUTCOME_REASON``) as it ends.  Workers open, log to and reopen
    their :class:`TrialRun` but never end it."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickled into Tune's tuner.pkl: no live client
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def trial_runs(self) -> dict[str, Any]:
        """Ray trial id -> its MLflow run."""
        return {r.data.tags.get(Tag.TRIAL_ID, ""): r
                for r in child_runs(self.client, self.experiment_id, self.parent_run_id)}

    def end_trial(self, trial_id: str, outcome: str, reason: str = "") -> None:
        """Write the trial's outcome and end its run (with the status its outcome implies)."""
        for run in search_all(self.client, self.experiment_id, trial_run_filter(self.parent_run_id, trial_id),
                              call=retry):
            self._end(run.info.run_id, outcome, reason)

    def end_open_trials(self, outcome_of: Callable[[str], tuple[str, str]]) -> None:
        """End every trial run still RUNNING; ``outcome_of(trial_id)`` -> (outcome, reason)."""
        for trial_id, run in self.trial_runs().items():
            if run.info.status == "RUNNING":
                self._end(run.info.run_id, *outcome_of(trial_id))

    def _end(self, run_id: str, outcome: str, reason: str) -> None:
        tags = [RunTag(Tag.OUTCOME, outcome)] + ([RunTag(Tag.OUTCOME_REASON, reason)] if reason else [])
        retry(lambda: self.client.log_batch(run_id, tags=tags))
        retry(lambda: finish_run(self.client, run_id, RUN_STATUS[outcome]))

    def reopen(self) -> None:
        retry(lambda: reopen(self.client, self.parent_run_id))

    def finish(self, metrics: dict[str, float], tags: dict[str, str], files: list[Path], interrupted: bool) -> None:
        """The study's summary on the parent run, then end it (KILLED when interrupted)."""
        now = int(time.time() * 1000)
        retry(lambda: self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0)
                                                                         for k, v in metrics.items()],
                                            tags=[RunTag(k, str(v)) for k, v in tags.items()]))
        for path in files:
            retry(lambda: self.client.log_artifact(self.parent_run_id, str(path)))
        retry(lambda: self.client.set_terminated(self.parent_run_id, status="KILLED" if interrupted else "FINISHED"))

    def end_after_error(self) -> None:
        """The driver failed: end what it left open (a later --resume reopens the runs)."""
        self.end_open_trials(lambda trial_id: (Outcome.INTERRUPTED, "the study driver failed"))
        finish_run(self.client, self.parent_run_id, "KILLED")

"""The published layout of a study's MLflow record: what the study service writes and
``analysis/`` reads.  No ray or mlflow import, so that ``analysis`` may import it (the one
module of ``studies`` it is allowed to import; see docs/architecture.md).  Also the command that
opens a study's Optuna storage in Optuna's own dashboard (the optional ``dashboard`` extra), which
the study's last lines print and ``python -m analysis dashboard`` runs.

Runs, all in one experiment (tag ``Tag.ROLE``):

* ``study``      one parent run per study: ``Tag.STUDY``, ``Tag.SPEC``, ``Tag.CODE_VERSION``,
                 ``Tag.EXPERIMENT_PATH``, ``Tag.OPTUNA_STORAGE``, ``Tag.OPTUNA_STUDY``,
                 ``Tag.CONSTRAINTS`` (the spec's feasibility constraints); at the end
                 ``Tag.STATUS``, the ``Tag.BEST_*`` tags and ``best.<config key>`` tags (the best
                 feasible trial and its configuration; absent when no trial is feasible) and
                 ``best_*`` / ``n_<outcome count>`` (+ ``n_feasible``) metrics, and the study's cost
                 (the sums of its trials' :data:`COST_METRICS`, and ``cpu_hours``/``gpu_hours``).
* ``trial``      one child run per Ray trial (``mlflow.parentRunId`` = the study run):
                 ``Tag.TRIAL_ID`` (one run per trial, reopened on a retry), ``Tag.PRESET``,
                 ``Tag.DATASET``, ``Tag.SEED``, ``Tag.CONFIG_ID``, ``Tag.CODE_VERSION``, ``Tag.DEVICE``
                 and the Ray placement tags; a diverged trial ``Tag.DIVERGED_AT_STEP``; in a
                 packed study (``--pack K``) each member of a pack is one trial with its own run
                 (``Tag.TRIAL_ID`` = the member's id) and ``Tag.PACK``; params =
                 the flattened core config; metrics per evaluation with ``step`` = training step,
                 the cost so far (:data:`COST_METRICS`) among them; MLflow's ``system/*`` metrics;
                 at the end ``Tag.OUTCOME`` (one of :class:`Outcome`) and ``Tag.OUTCOME_REASON``.
* ``evaluation`` a test evaluation of a trial's checkpoint (``analysis best``), nested under the
                 trial run: ``Tag.SOURCE_RUN_ID``, ``Tag.SPLIT``, ``Tag.EVALUATION``; ``test_*``
                 metrics.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from cvae_core.metrics.constraints import Constraint, parse_constraint

# Tells the MLflow 3 UI that the experiment holds training runs, so it opens on the runs table
# instead of the GenAI traces page.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own nesting tag


class Tag:
    ROLE = "cvae.role"
    STUDY = "cvae.study"
    SPEC = "cvae.spec"
    CODE_VERSION = "cvae.code_version"
    EXPERIMENT_PATH = "ray.experiment_path"
    OPTUNA_STORAGE = "optuna.storage"
    OPTUNA_STUDY = "optuna.study_name"
    CONSTRAINTS = "cvae.constraints"  # JSON list of "<metric> <op> <number>"; absent: none (older stores)
    WARM_START = "cvae.warm_start"  # "STUDY:top=K": the study whose best configurations ran first
    EXTENSIONS = "cvae.extensions"  # "N1,N2": configurations each --extend added, oldest first
    # trial runs
    TRIAL_ID = "ray_trial_id"
    TRIAL_NAME = "ray_trial_name"
    PRESET = "cvae.preset"
    DATASET = "cvae.dataset"
    SEED = "cvae.seed"
    CONFIG_ID = "cvae.config_id"
    DEVICE = "cvae.device"
    GPU_IDS = "ray.gpu_ids"  # the GPUs Ray assigned ("none" on CPU)
    NODE_ID = "ray.node_id"
    PID = "ray.pid"
    RESUMED_FROM_STEP = "ray.resumed_from_step"  # "none", or the checkpoint step a retry resumed from
    OUTCOME = "cvae.outcome"
    OUTCOME_REASON = "cvae.outcome_reason"
    DIVERGED_AT_STEP = "cvae.diverged_at_step"
    PACK = "cvae.pack"  # a packed study's trial: the Ray trial id of the pack it trained in
    # study runs, at the end
    STATUS = "cvae.status"
    BEST_TRIAL_ID = "cvae.best_trial_id"
    BEST_RUN_ID = "cvae.best_run_id"
    BEST_CONFIG = "cvae.best_config"
    BEST_LABEL = "cvae.best_label"
    BEST_CHECKPOINT = "cvae.best_checkpoint"
    BEST_CONFIG_PREFIX = "best."  # + a config key: one tag per setting of the best configuration
    # evaluation runs and registered model versions
    SOURCE_RUN_ID = "cvae.source_run_id"
    SPLIT = "cvae.split"
    DATA_MD5 = "cvae.data_md5"
    EVALUATION = "cvae.evaluation"  # "full" or a description of a partial evaluation
    EVALUATION_RUN_ID = "cvae.evaluation_run_id"


class Role:
    STUDY = "study"
    TRIAL = "trial"
    EVALUATION = "evaluation"


class Outcome:
    """How a trial ended (``Tag.OUTCOME``), written by the study service, never guessed."""
    DONE = "done"  # trained for train.steps
    STOPPED_EARLY = "stopped_early"  # the scheduler (ASHA) stopped it; Tag.OUTCOME_REASON says why
    DIVERGED = "diverged"  # a non-finite loss or metric; an outcome, not retried
    ERROR = "error"  # crashed after its retries
    INTERRUPTED = "interrupted"  # the study was interrupted before the trial ended
    ALL = (DONE, STOPPED_EARLY, DIVERGED, ERROR, INTERRUPTED)


# A trial run's cost metrics, cumulative over its attempts and logged at each evaluation
# (studies/cost.py says how they are measured); the study run gets their sums and, in hours,
# cpu_hours/gpu_hours. gpu_seconds only where a trial ran on CUDA.
CPU_SECONDS, GPU_SECONDS = "cpu_seconds", "gpu_seconds"
COST_METRICS = (CPU_SECONDS, GPU_SECONDS)
# MLflow's system-metrics monitor logs system/<name> (the machine's CPU, memory, disk, network,
# GPUs) with its own step counter (one per sample), not the training step.
SYSTEM_METRICS_PREFIX = "system/"


def study_cost(trials: Iterable[dict[str, float]]) -> dict[str, float]:
    """A study's cost: the sum over its trials' costs (dicts of :data:`COST_METRICS`; those
    without ``cpu_seconds`` logged none) -> {cpu_seconds, gpu_seconds, cpu_hours, gpu_hours,
    trials: how many logged a cost}."""
    trials = [t for t in trials if CPU_SECONDS in t]
    cpu = sum(t[CPU_SECONDS] for t in trials)
    gpu = sum(t.get(GPU_SECONDS, 0.0) for t in trials)
    return {CPU_SECONDS: cpu, GPU_SECONDS: gpu, "cpu_hours": cpu / 3600, "gpu_hours": gpu / 3600,
            "trials": len(trials)}


def hours_text(hours: float) -> str:
    """Two significant digits below 0.1, three up to 100, whole hours above: 0.000123 -> "0.00012",
    0.002 -> "0.0020", 1.2 -> "1.20", 1234.5 -> "1234"; 0 -> "0"."""
    if hours == 0:
        return "0"
    if hours >= 99.95:  # what "#.3g" would print as "100."
        return f"{hours:.0f}"
    return f"{hours:#.2g}" if hours < 0.1 else f"{hours:#.3g}"


def cost_line(total: dict[str, float], wall_s: float | None = None) -> str:
    """``Cost: 0.12 CPU-hours (0 GPU-hours) over 12 trials, 5.4 min wall this session``."""
    n = int(total["trials"])
    wall = f", {wall_s / 60:.1f} min wall this session" if wall_s is not None else ""
    return (f"Cost: {hours_text(total['cpu_hours'])} CPU-hours ({hours_text(total['gpu_hours'])} GPU-hours) over "
            f"{n} trial{'s' if n != 1 else ''}{wall}")


# Settings a plain (uncoupled) model never uses: logged as "none" so that a filter on lambda_m or
# the distance never mixes the baseline into coupled results.
UNUSED_WITHOUT_COUPLING = ("coupling.lambda_r", "coupling.lambda_m", "coupling.distance", "coupling.rq_c")
UNUSED = "none"


def constraints_tag(constraints: list[Constraint]) -> str:
    """The value of ``Tag.CONSTRAINTS``: the constraints' texts as a JSON list."""
    return json.dumps([str(c) for c in constraints])


def read_constraints_tag(tags: dict[str, str]) -> list[Constraint]:
    """The constraints a study run's tags hold (none for a store written before the tag)."""
    return [parse_constraint(text) for text in json.loads(tags.get(Tag.CONSTRAINTS) or "[]")]


def quote(value: str) -> str:
    """A value as a quoted literal of an MLflow search filter."""
    return "'" + str(value).replace("'", "\\'") + "'"


def tag_filter(**tags: str) -> str:
    """``tag_filter(ROLE="trial", STUDY="s")`` -> a search filter on those :class:`Tag` names."""
    return " and ".join(f"tags.`{getattr(Tag, key)}` = {quote(value)}" for key, value in tags.items())


def study_runs_filter() -> str:
    return tag_filter(ROLE=Role.STUDY)


def trial_runs_filter(study: str) -> str:
    return tag_filter(ROLE=Role.TRIAL, STUDY=study)


def child_runs_filter(parent_run_id: str) -> str:
    return f"tags.`{PARENT_RUN_ID}` = {quote(parent_run_id)}"


def search_all(client: Any, experiment_id: str, filter_string: str, order_by: list[str] | None = None,
               call: Callable[[Callable[[], Any]], Any] = lambda fn: fn()) -> list:
    """Every run matching ``filter_string``, following MLflow's page tokens.  ``client`` is an
    ``MlflowClient``; ``call`` wraps each request (e.g. with retries)."""
    runs, token = [], None
    while True:
        page = call(lambda: client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                               order_by=order_by, page_token=token))
        runs.extend(page)
        token = page.token
        if not token:
            return runs


DASHBOARD_INSTALL = 'pip install -e ".[dashboard]"'  # the optional extra that brings optuna-dashboard
DASHBOARD_PORT = 8080  # optuna-dashboard's own default


def dashboard_script() -> str | None:
    """The absolute path of the ``optuna-dashboard`` command (the ``dashboard`` extra) beside this
    interpreter, else on PATH; None when the extra is not installed.  ``find_spec`` looks the
    package up without importing it (it loads Optuna)."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        return None
    beside = Path(sys.executable).parent / "optuna-dashboard"  # the venv's bin/, not resolved through links
    found = str(beside) if beside.is_file() else shutil.which("optuna-dashboard")
    return str(Path(found).absolute()) if found else None


def dashboard_command(optuna_storage: str, port: int = DASHBOARD_PORT) -> list[str] | None:
    """The command that serves a study's Optuna storage (``Tag.OPTUNA_STORAGE``) with Optuna's own
    dashboard on loopback, runnable from any folder; None without the ``dashboard`` extra."""
    script = dashboard_script()
    if script is None:
        return None
    return [script, optuna_storage, "--host", "127.0.0.1", "--port", str(port)]

"""MLflow study runs -> tidy pandas frames -> Parquet with an explicit schema.

The study service writes the record :mod:`studies.record` publishes: one parent run per study
(``Role.STUDY``) and one child run per trial (``Role.TRIAL``, tag ``Tag.STUDY`` = the study name);
params are the flattened config (dotted keys), metrics are logged at every evaluation with
``step`` = training step, and the best checkpoint is the ``checkpoint/`` artifact.  This module
turns that into

* ``runs``: one row per trial run.  Column groups:
    identity      run_id, run_name, study, parent_run_id, status, outcome, preset, dataset, seed,
                  config_id, code_version, ray_trial_id, artifact_uri, start_time, end_time,
                  duration_s, n_evals, steps_done, best_by, best_step
    ``config.*``  the flattened config, typed from ``cvae_core.config.FIELDS`` (unknown keys: str)
    ``final.*``   each metric's last logged value (highest step)
                  (``final.cpu_seconds``, ``final.gpu_seconds``: the trial's cost, cumulative; ``final.system/*``:
                  the last sample of MLflow's system metrics, which have no ``best.*``: their steps count samples)
    ``best.*``    each metric at the core's last reported ``best_step``: the evaluation that
                  produced the ``checkpoint/`` artifact (``best_by``: the metric the core selects
                  by, val_nll; val_rec for a DAE)
* ``history``: long format, one row per logged metric value: run_id, metric, step, value, timestamp.

Every metric of a study run is a *validation* metric (``val_*``) or a training statistic
(``train_*``): no test numbers live here; ``python -m analysis best`` produces those.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cvae_core.config import FIELDS
from cvae_core.metrics.names import BEST_STEP, best_key, selection_metric
from cvae_core.runtime import json_safe
from studies.record import COST_METRICS, PARENT_RUN_ID, SYSTEM_METRICS_PREFIX, UNUSED, Outcome, Role, Tag, study_cost

from .store import DEFAULT_EXPERIMENT, AnalysisError, connect, find_study, get_experiment, study_name, trial_runs

SCHEMA_VERSION = "2"  # of the Parquet files; 2: the ``outcome`` column
CONFIG_PREFIX, FINAL_PREFIX, BEST_PREFIX = "config.", "final.", "best."

# Identity columns: name -> (pandas dtype, arrow type).  Fixed order, always present.
IDENTITY_COLUMNS: dict[str, tuple[str, pa.DataType]] = {
    "run_id": ("str", pa.string()),
    "run_name": ("str", pa.string()),
    "study": ("str", pa.string()),
    "parent_run_id": ("str", pa.string()),
    "status": ("str", pa.string()),
    "outcome": ("str", pa.string()),
    "preset": ("str", pa.string()),
    "dataset": ("str", pa.string()),
    "seed": ("Int64", pa.int64()),
    "config_id": ("str", pa.string()),
    "code_version": ("str", pa.string()),
    "ray_trial_id": ("str", pa.string()),
    "artifact_uri": ("str", pa.string()),
    "start_time": ("datetime64[ms, UTC]", pa.timestamp("ms", tz="UTC")),
    "end_time": ("datetime64[ms, UTC]", pa.timestamp("ms", tz="UTC")),
    "duration_s": ("float64", pa.float64()),
    "n_evals": ("Int64", pa.int64()),
    "steps_done": ("Int64", pa.int64()),
    "best_by": ("str", pa.string()),
    "best_step": ("Int64", pa.int64()),
}
HISTORY_COLUMNS: dict[str, tuple[str, pa.DataType]] = {
    "run_id": ("str", pa.string()),
    "metric": ("str", pa.string()),
    "step": ("int64", pa.int64()),
    "value": ("float64", pa.float64()),
    "timestamp": ("datetime64[ms, UTC]", pa.timestamp("ms", tz="UTC")),
}
_TYPE_MAP = {bool: ("boolean", pa.bool_()), int: ("Int64", pa.int64()), float: ("float64", pa.float64()),
             str: ("str", pa.string())}
# Identity columns read from a trial run's tags.
TAG_COLUMNS = {"study": Tag.STUDY, "parent_run_id": PARENT_RUN_ID, "outcome": Tag.OUTCOME, "preset": Tag.PRESET,
               "dataset": Tag.DATASET, "seed": Tag.SEED, "config_id": Tag.CONFIG_ID,
               "code_version": Tag.CODE_VERSION, "ray_trial_id": Tag.TRIAL_ID}
# Every record tag analysis reads, by the role of the run it reads it from; a test runs a real
# study and checks that the study service writes each of them.
READ_TAGS = {Role.STUDY: (Tag.ROLE, Tag.STUDY, Tag.OPTUNA_STORAGE, Tag.OPTUNA_STUDY, Tag.CONSTRAINTS),
             Role.TRIAL: (Tag.ROLE, *TAG_COLUMNS.values())}


# ---------------------------------------------------------------------------------------------
# Frames

def metric_histories(client, runs: Iterable, progress: Callable[[str], None] | None = None,
                     workers: int = 1) -> pd.DataFrame:
    """Long frame (run_id, metric, step, value, timestamp) of every metric of ``runs``.

    One ``get_metric_history`` call per run and metric; ``workers`` > 1 overlaps them (worth it
    against a remote tracking server, where each call is an HTTP round trip)."""
    from concurrent.futures import ThreadPoolExecutor

    runs = list(runs)

    def one_run(run) -> list[tuple]:
        return [(run.info.run_id, key, int(m.step), float(m.value), int(m.timestamp))
                for key in sorted(run.data.metrics) for m in client.get_metric_history(run.info.run_id, key)]

    rows: list[tuple] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, part in enumerate(pool.map(one_run, runs), 1):
            rows.extend(part)
            if progress and len(runs) > 25 and (index % 25 == 0 or index == len(runs)):
                progress(f"read metric histories of {index}/{len(runs)} runs")
    frame = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="ms", utc=True)
    frame = frame.sort_values(["run_id", "metric", "step", "timestamp"], kind="stable").reset_index(drop=True)
    return _apply_dtypes(frame, {k: v[0] for k, v in HISTORY_COLUMNS.items()})


def _config_type(key: str) -> type:
    return FIELDS[key][2] if key in FIELDS else str


def parse_param(key: str, text: str) -> Any:
    """A logged MLflow param as the typed config value analysis stores: None for a setting the
    model never reads (logged as the unused marker) or a value that does not parse."""
    if text == UNUSED:  # a setting the model never reads (e.g. the distance at lambda_m = 0)
        return None
    kind = _config_type(key)
    try:
        if kind is bool:
            return {"true": True, "false": False}[text.strip().lower()]
        if kind is int:
            return int(float(text))
        if kind is float:
            return float(text)
    except (KeyError, ValueError):
        return None
    return text


def _to_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _apply_dtypes(frame: pd.DataFrame, dtypes: dict[str, str]) -> pd.DataFrame:
    for column, dtype in dtypes.items():
        if column in frame.columns and str(frame[column].dtype) != dtype:
            frame[column] = frame[column].astype(dtype)
    return frame


def tidy_runs(runs: Iterable, history: pd.DataFrame) -> pd.DataFrame:
    """One row per run: identity, ``config.*``, ``final.*``, ``best.*`` (see the module docstring)."""
    by_run = {run_id: group for run_id, group in history.groupby("run_id", sort=False)}
    rows = []
    config_keys: set[str] = set()
    metric_keys: set[str] = set()
    for run in runs:
        info, tags, params = run.info, run.data.tags, run.data.params
        hist = by_run.get(info.run_id, history.iloc[0:0])
        # last value per (metric, step): a metric re-logged at one step (e.g. a resumed trial) counts once
        last_at_step = hist.drop_duplicates(["metric", "step"], keep="last")
        final = last_at_step.drop_duplicates("metric", keep="last").set_index("metric")["value"]
        # MLflow's system metrics count their own steps (one per sample): no training step
        last_at_step = last_at_step[~last_at_step["metric"].str.startswith(SYSTEM_METRICS_PREFIX)]
        best_by, best_step, best = best_evaluation(last_at_step, final, params.get("model.kind", "vae"))
        config = {key: parse_param(key, value) for key, value in params.items()}
        config_keys.update(config)
        metric_keys.update(final.index)
        steps = last_at_step["step"]
        row = {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
               **{column: tags.get(tag) for column, tag in TAG_COLUMNS.items()}}
        row.update({
            "preset": row["preset"] or params.get("preset"),
            "dataset": row["dataset"] or params.get("data.dataset"),
            "seed": _to_int(params.get("train.seed") if row["seed"] is None else row["seed"]),
            "artifact_uri": info.artifact_uri,
            "start_time": info.start_time,
            "end_time": info.end_time,
            "duration_s": (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else np.nan,
            "n_evals": int(last_at_step.loc[last_at_step["metric"] == best_by, "step"].nunique()) if best_by else 0,
            "steps_done": int(steps.max()) if len(steps) else None,
            "best_by": best_by,
            "best_step": best_step,
        })
        row.update({CONFIG_PREFIX + k: v for k, v in config.items()})
        row.update({FINAL_PREFIX + k: float(v) for k, v in final.items()})
        row.update({BEST_PREFIX + k: float(v) for k, v in best.items()})
        rows.append(row)
    columns = (list(IDENTITY_COLUMNS) + [CONFIG_PREFIX + k for k in sorted(config_keys)]
               + [FINAL_PREFIX + k for k in sorted(metric_keys)]
               + [BEST_PREFIX + k for k in sorted(metric_keys) if not k.startswith(SYSTEM_METRICS_PREFIX)])
    frame = pd.DataFrame(rows, columns=columns)
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], unit="ms", utc=True)
    frame = _apply_dtypes(frame, {name: dtype for name, (dtype, _) in column_types(frame).items()})
    return frame.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)


def best_evaluation(last_at_step: pd.DataFrame, final: pd.Series,
                    model_kind: str) -> tuple[str | None, int | None, dict]:
    """-> (best_by, best_step, {metric: value at best_step}): the evaluation the core reported as
    its best (its last ``best_step``, beside ``best_<selection metric>``), whose checkpoint the run
    saved; (None, None, {}) when the run reported none (no evaluation yet, or only NaN values)."""
    best_step = _to_int(final.get(BEST_STEP))
    at_best = last_at_step[last_at_step["step"] == best_step]
    if best_key(model_kind) not in final.index or best_step is None or not len(at_best):
        return None, None, {}
    return selection_metric(model_kind), best_step, dict(zip(at_best["metric"], at_best["value"]))


def column_types(frame: pd.DataFrame) -> dict[str, tuple[str, pa.DataType]]:
    """The explicit (pandas dtype, arrow type) of every column of a runs frame."""
    types = {}
    for column in frame.columns:
        if column in IDENTITY_COLUMNS:
            types[column] = IDENTITY_COLUMNS[column]
        elif column.startswith(CONFIG_PREFIX):
            types[column] = _TYPE_MAP[_config_type(column[len(CONFIG_PREFIX):])]
        elif column.startswith((FINAL_PREFIX, BEST_PREFIX)):
            types[column] = ("float64", pa.float64())
        else:
            raise AnalysisError(f"column {column!r} is not part of the runs schema")
    return types


# ---------------------------------------------------------------------------------------------
# Whole studies

@dataclass
class Study:
    tracking_uri: str
    experiment: Any  # mlflow.entities.Experiment
    parent: Any  # mlflow.entities.Run of the study
    runs: pd.DataFrame
    history: pd.DataFrame

    @property
    def name(self) -> str:
        return study_name(self.parent)

    @property
    def parent_run_id(self) -> str:
        return self.parent.info.run_id


def fetch_study(experiment: str = DEFAULT_EXPERIMENT, study: str | None = None, tracking_uri: str | None = None,
                progress: Callable[[str], None] | None = None) -> Study:
    """Runs and metric histories of one study (default: the latest in the experiment)."""
    client, uri = connect(tracking_uri)
    exp = get_experiment(client, experiment)
    parent = find_study(client, exp, study)
    name = study_name(parent)
    runs = trial_runs(client, exp, name)
    if not runs:
        raise AnalysisError(f"study {name!r} in experiment {experiment!r} has no trial runs yet")
    remote = uri.startswith(("http://", "https://", "databricks"))
    history = metric_histories(client, runs, progress, workers=8 if remote else 1)
    frame = tidy_runs(runs, history)
    frame.attrs.update(experiment=experiment, study=name, parent_run_id=parent.info.run_id, tracking_uri=uri)
    return Study(uri, exp, parent, frame, history)


def load_study(experiment: str = DEFAULT_EXPERIMENT, study: str | None = None,
               tracking_uri: str | None = None) -> pd.DataFrame:
    """Tidy frame, one row per trial run of ``study`` (default: the latest study)."""
    return fetch_study(experiment, study, tracking_uri).runs


def load_history(experiment: str = DEFAULT_EXPERIMENT, study: str | None = None,
                 tracking_uri: str | None = None) -> pd.DataFrame:
    """Long frame of every metric value the study's trials logged (run_id, metric, step, value, timestamp)."""
    return fetch_study(experiment, study, tracking_uri).history


# ---------------------------------------------------------------------------------------------
# Parquet

def arrow_schema(frame: pd.DataFrame, metadata: dict[str, str] | None = None) -> pa.Schema:
    if list(frame.columns) == list(HISTORY_COLUMNS):
        fields = [pa.field(name, arrow) for name, (_, arrow) in HISTORY_COLUMNS.items()]
    else:
        fields = [pa.field(name, arrow) for name, (_, arrow) in column_types(frame).items()]
    meta = {"cvae.analysis.schema_version": SCHEMA_VERSION, **(metadata or {})}
    return pa.schema(fields, metadata={k: str(v) for k, v in meta.items()})


def write_parquet(frame: pd.DataFrame, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a runs or history frame with its explicit schema (plus ``metadata`` in the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = arrow_schema(frame, metadata)
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    # from_pandas adds its own pandas metadata; keep ours beside it
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **schema.metadata})
    pq.write_table(table, path)
    return path


def read_parquet(path: str | Path) -> pd.DataFrame:
    """Read a frame written by :func:`write_parquet`; file metadata lands in ``frame.attrs``."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    if "cvae.analysis.schema_version" not in meta:
        raise AnalysisError(f"{path} was not written by `python -m analysis export`")
    frame = table.to_pandas()
    frame.attrs.update({k: v for k, v in meta.items() if k != "cvae.analysis.schema_version"})
    return frame


def stopped_early(frame: pd.DataFrame) -> pd.Series:
    """Runs the scheduler (ASHA) stopped before ``config.train.steps``: the study service records
    them FINISHED with ``Tag.OUTCOME`` = ``Outcome.STOPPED_EARLY``."""
    outcome = frame["outcome"] if "outcome" in frame.columns else pd.Series(None, index=frame.index, dtype=object)
    tagged = outcome.notna()
    stopped = tagged & (outcome == Outcome.STOPPED_EARLY).fillna(False).astype(bool)
    # Runs without the tag (stores written before it existed): a last evaluation before train.steps.
    planned = frame.get(CONFIG_PREFIX + "train.steps")
    if planned is None:
        return stopped
    short = (frame["steps_done"].astype("Float64") < planned.astype("Float64")).fillna(False).astype(bool)
    return stopped | (~tagged & short)


def runs_cost(frame: pd.DataFrame) -> dict[str, float]:
    """The cost of the runs in ``frame`` (a whole study: every trial run, whatever its status),
    the sum of their ``final.cpu_seconds``/``final.gpu_seconds``: ``studies.record.study_cost``."""
    columns = [FINAL_PREFIX + k for k in COST_METRICS if FINAL_PREFIX + k in frame.columns]
    return study_cost({column[len(FINAL_PREFIX):]: float(value) for column, value in row.items() if pd.notna(value)}
                      for row in frame[columns].to_dict("records"))


def run_label(row: pd.Series | dict) -> str:
    """Short human label of a trial: preset, coupling settings and seed."""
    get = row.get
    parts = [str(get("preset") or "?")]
    if bool(get(CONFIG_PREFIX + "coupling.enabled")):
        distance = get(CONFIG_PREFIX + "coupling.distance")  # missing where λ_m = 0 matches nothing
        if distance is not None and not pd.isna(distance):
            parts.append(str(distance))
        parts.append(f"λm={_num(get(CONFIG_PREFIX + 'coupling.lambda_m'))} λr={_num(get(CONFIG_PREFIX + 'coupling.lambda_r'))}")
    if get("seed") is not None and not pd.isna(get("seed")):
        parts.append(f"seed {int(get('seed'))}")
    return " ".join(parts)


def _num(value: Any) -> str:
    """Three significant digits: searched λ values (0.507343) read as 0.507."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "?"
    return f"{float(value):.3g}"


def dumps(value: Any) -> str:
    return json.dumps(json_safe(value), indent=2)

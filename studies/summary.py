"""A study's results: one row per trial (its outcome and its metrics at the core's best
evaluation), the ranking, the Pareto front, the per-configuration means and the summary that
``summary.json`` holds.  Printing them is ``studies/render.py``.

With constraints in the spec, a row is feasible when the metrics of its best evaluation satisfy
all of them (``cvae_core.metrics.constraints``); the ranking puts feasible rows first, the
study's best is the first feasible row, and the Pareto front is taken over feasible points.
When no row is feasible there is no best: ``summary.json`` names the first-ranked infeasible
row as ``best_infeasible`` instead, and the parent run gets no best tags.

The outcomes (Ray, MLflow) load inside the functions that read them, so the summary's row type
imports light."""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any

from cvae_core.metrics.constraints import violated
from cvae_core.metrics.names import BEST_STEP, pareto_mask

from .cost import trial_cost
from .effects import coupling_effects
from .record import Outcome, Tag, study_cost
from .results import member_results, pack_members
from .spaces import describe
from .spec import Objective, StudySpec
from .state import StudyState


# A row's status for each trial outcome (the words of the summary and its counts).
ROW_STATUS = {Outcome.DONE: "done", Outcome.STOPPED_EARLY: "stopped", Outcome.DIVERGED: "diverged",
              Outcome.ERROR: "error", Outcome.INTERRUPTED: "interrupted"}
COUNTED = ("done", "stopped", "diverged", "error", "interrupted", "pending")


@dataclass
class TrialRow:
    trial_id: str
    label: str
    config: dict[str, Any]
    seed: int | None
    status: str  # done | stopped | diverged | error | interrupted | pending
    evaluations: int
    best: dict[str, float]  # metrics at the core's best evaluation (its best_step)
    run_id: str = ""
    config_id: str = ""
    checkpoint: str = ""
    error: str = ""
    reason: str = ""  # why it ended so (Tag.OUTCOME_REASON): e.g. the scheduler's words
    cost: dict[str, float] = dataclasses.field(default_factory=dict)  # cpu_seconds (gpu_seconds): studies/cost.py


SUMMARY_KEYS = ("val_nll", "val_kl", "val_mi_loo", "val_au", "val_ppl", "val_elbo", "val_rec", "step",
                "val_dist1", "val_dist2")  # the last two: dialogue models (Table 8 diversity)


def collect_rows(spec: StudySpec, results, trials, statuses: dict[str, str], runs: dict[str, Any]) -> list[TrialRow]:
    """One row per study trial (a packed study: per member of each pack).  ``results``: Tune's
    ResultGrid; ``trials``: the saved Ray trials; ``statuses``: their saved Ray statuses; ``runs``:
    trial id -> its MLflow run, whose ``Tag.OUTCOME`` says how a finished trial ended."""
    by_path = {result.path: result for result in results}
    rows = []
    for trial in trials:
        result = by_path.get(trial.path)
        history = result.metrics_dataframe if result is not None else None
        records = history.to_dict("records") if history is not None and len(history) else []
        ray_status = statuses.get(trial.trial_id, trial.status)
        error = str(result.error).strip().splitlines()[-1][:200] if result is not None and result.error else ""
        config = {k: v for k, v in dict(trial.config).items() if not k.startswith("__")}
        members = pack_members(config)
        if members is None:
            rows.append(_row(spec, trial.trial_id, config, records, ray_status, runs.get(trial.trial_id), error,
                             lambda step: _checkpoint_at(result, step)))
            continue
        per_member = [member_results(r) for r in records]
        for member_id, member_config in members:
            evaluations = [values[member_id] for values in per_member if "step" in values.get(member_id, {})]
            # Tune keeps the pack's latest checkpoint only (the members still training then), so a
            # member's best checkpoint is its MLflow artifact, not a Ray path.
            rows.append(_row(spec, member_id, member_config, evaluations, ray_status, runs.get(member_id), error,
                             lambda step: "", member=True))
    return rows


def _row(spec: StudySpec, trial_id: str, config: dict[str, Any], records: list[dict], ray_status: str, run,
         error: str, checkpoint_at, member: bool = False) -> TrialRow:
    from .outcomes import recorded_outcome
    # cumulative, so the largest value is the latest: in Tune's results or on the run (an attempt's last)
    cost = trial_cost([*records, run.data.metrics if run is not None else {}])
    records = [r for r in records if not (finite(r.get("diverged")) and r["diverged"])]  # no evaluation
    # A trial resumed from an older checkpoint re-reports the steps after it: count steps once.
    n_evals = len({r.get("step") for r in records})
    best = _core_best(records)
    tags = run.data.tags if run is not None else {}
    outcome, reason = recorded_outcome(trial_id) or (tags.get(Tag.OUTCOME), tags.get(Tag.OUTCOME_REASON, ""))
    if ray_status in ("TERMINATED", "ERROR") and outcome in ROW_STATUS:
        status = ROW_STATUS[outcome]
    elif ray_status in ("TERMINATED", "ERROR"):  # its outcome never reached MLflow (server down)
        status, reason = ("error" if ray_status == "ERROR" else "done" if n_evals >= spec.evaluations
                          else "stopped"), "outcome not recorded; read from Ray"
    elif member and outcome in ROW_STATUS and outcome != Outcome.INTERRUPTED:  # ended while its pack ran on
        status = ROW_STATUS[outcome]
    else:
        status = "interrupted" if n_evals else "pending"
    if status == "diverged":
        error = reason
    elif member and status != "error":
        error = ""  # a member that ended before its pack failed
    return TrialRow(
        trial_id=trial_id, label=describe(config, spec.preset), config=config,
        seed=config.get("train.seed"), status=status, evaluations=n_evals,
        best={k: float(best[k]) for k in (*SUMMARY_KEYS, *(c.metric for c in spec.constraints))
              if k in best and finite(best[k])},
        run_id=run.info.run_id if run else "", config_id=tags.get(Tag.CONFIG_ID, ""),
        checkpoint=checkpoint_at(best.get("step")) if best else "", error=error,
        reason=reason if status == "stopped" else "", cost=cost)


def _core_best(records: list[dict]) -> dict:
    """The evaluation the core itself calls best: the one at its last reported ``best_step``."""
    steps = [r[BEST_STEP] for r in records if finite(r.get(BEST_STEP))]
    if not steps:
        return {}
    return next((r for r in reversed(records) if r.get("step") == steps[-1]), {})


def _checkpoint_at(result, step: float | None) -> str:
    """Where the checkpoint Tune kept for ``step`` is ("" if none was kept): a local path, or a
    URI on remote storage."""
    for checkpoint, metrics in (result.best_checkpoints or []) if result is not None else []:
        if metrics.get("step") == step:
            return checkpoint_location(checkpoint)
    return ""


REMOTE_SCHEMES = ("s3", "gcs")  # pyarrow filesystem type names whose paths start with the bucket


def checkpoint_location(checkpoint) -> str:
    """A Tune checkpoint's location as the user can open it again. ``Checkpoint.path`` is
    relative to its pyarrow filesystem, which drops the scheme of remote storage: a checkpoint
    in ``s3://bucket/ray_results/...`` has the path ``bucket/ray_results/...``, which reads as a
    local folder that does not exist (in the summary and the parent run's best-checkpoint tag)."""
    scheme = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    return f"{scheme}://{checkpoint.path}" if scheme in REMOTE_SCHEMES else checkpoint.path


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def broken(spec: StudySpec, values: dict[str, float]) -> list[str]:
    """The spec's constraints that ``values`` (a row's best evaluation, or a configuration's
    means) do not satisfy; empty: feasible."""
    return [str(c) for c in violated(spec.constraints, values)]


def rank(spec: StudySpec, rows: list[TrialRow]) -> list[TrialRow]:
    """Rows by the first objective (in its direction): feasible rows, then infeasible ones, then
    rows without a value."""
    first = spec.objectives[0]

    def key(row: TrialRow):
        value = row.best.get(first.metric)
        return (not finite(value), bool(broken(spec, row.best)), oriented(first, value) if finite(value) else 0.0)

    return sorted(rows, key=key)


def best_row(spec: StudySpec, rows: list[TrialRow]) -> TrialRow | None:
    """The study's best trial, its champion candidate: the first-ranked feasible row (None if no
    row with an evaluation is feasible)."""
    return next((r for r in rank(spec, [r for r in rows if r.best]) if not broken(spec, r.best)), None)


def oriented(objective: Objective, value: float) -> float:
    """Smaller is better."""
    return value if objective.mode == "min" else -value


def pareto_front(spec: StudySpec, points: list[tuple[str, dict[str, float]]]) -> set[str]:
    """Names of the non-dominated feasible points under the spec's objectives."""
    points = [(name, values) for name, values in points if not broken(spec, values)]
    mask = pareto_mask([[values.get(o.metric) for o in spec.objectives] for _, values in points],
                       [o.mode for o in spec.objectives])
    return {name for (name, _), on_front in zip(points, mask) if on_front}


def group_by_config(rows: list[TrialRow], extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Per configuration: the mean (and sd) over its seeds of val NLL, KL, MI, AU and ``extra``."""
    groups: dict[str, list[TrialRow]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    out = []
    for label, members in groups.items():
        entry: dict[str, Any] = {"label": label, "n": len(members), "config_id": members[0].config_id}
        for key in dict.fromkeys(("val_nll", "val_kl", "val_mi_loo", "val_au", *extra)):
            values = [m.best[key] for m in members if finite(m.best.get(key))]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(entry)
    return out


def summarize(spec: StudySpec, state: StudyState, rows: list[TrialRow], interrupted: bool,
              elapsed_s: float) -> dict[str, Any]:
    """What ``summary.json`` holds."""
    ranked = rank(spec, [r for r in rows if r.best])
    best = best_row(spec, rows)
    groups = group_by_config(rows, tuple(c.metric for c in spec.constraints)) if spec.seeds > 1 else []
    front: set[str] = set()
    if spec.multi_objective:
        points = ([(g["label"], g) for g in groups] if groups else [(r.trial_id, r.best) for r in rows])
        front = pareto_front(spec, points)
    return {
        "study": state.study_name, "spec": spec.name, "search": spec.search,
        "objectives": [str(o) for o in spec.objectives], "status": "interrupted" if interrupted else "completed",
        "elapsed_s": round(elapsed_s, 1), "counts": {s: sum(1 for r in rows if r.status == s) for s in COUNTED},
        "cost": study_cost(r.cost for r in rows),
        "experiment_path": state.experiment_path, "optuna_storage": state.optuna_storage,
        "tracking_uri": state.tracking_uri, "parent_run_id": state.parent_run_id, "pareto_front": sorted(front),
        "warm_start": state.warm_start or None, "extensions": state.extensions,
        "trials": [_trial_entry(spec, r) for r in ranked + [r for r in rows if not r.best]],
        "configurations": groups,
        "effects": coupling_effects(rows, spec.preset),
        "constraints": [str(c) for c in spec.constraints],
        "n_feasible": sum(1 for r in ranked if not broken(spec, r.best)),
        "best": _trial_entry(spec, best) if best else None,
        # no feasible trial: the one that would have been best, never a champion
        "best_infeasible": _trial_entry(spec, ranked[0]) if ranked and best is None else None,
    }


def _trial_entry(spec: StudySpec, row: TrialRow) -> dict[str, Any]:
    """A row in ``summary.json``, with the constraints its best evaluation breaks (``violated``,
    empty: feasible; None: no evaluation to judge)."""
    return {**dataclasses.asdict(row), "violated": broken(spec, row.best) if row.best else None}

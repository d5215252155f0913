"""How each trial ended, decided on the driver where Tune tells it, and written once.

* :class:`RecordingASHA` is Tune's ASHA scheduler that also says why it stopped a trial (the
  evaluation, the step and the rung's cutoff), so a stopped trial is never guessed back from
  its number of evaluations.
* :class:`TrialOutcomes` is the Tune callback that turns Tune's events into ``Tag.OUTCOME`` on
  the trial's MLflow run and ends the run, through :class:`~studies.tracking.StudyRun` (the one
  owner that ends trial runs).
"""
from __future__ import annotations

import math

from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .packing import OUTCOME, REASON, member_results, pack_members
from .record import Outcome
from .tracking import StudyRun

# Why the scheduler stopped each trial (trial id -> reason).  Both the scheduler and the callback
# run in the driver process, but Tuner.restore unpickles them as separate objects: they meet here
# rather than through a reference.
_stop_reasons: dict[str, str] = {}
_outcomes: dict[str, tuple[str, str]] = {}  # this driver's: trial id -> (outcome, reason)


class RecordingASHA(ASHAScheduler):
    """ASHA (stopping only, never pausing) that records the reason of each early stop."""

    def __init__(self, *, steps: int, **kwargs):
        super().__init__(**kwargs)
        self._steps = steps

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        evaluation = result.get(self._time_attr)
        if action == TrialScheduler.STOP and evaluation is not None and evaluation < self._max_t:
            _stop_reasons[trial.trial_id] = asha_stop_reason(int(result.get("step", 0)), self._steps, int(evaluation),
                                                             self._max_t, self._metric, result.get(self._metric))
        return action


def asha_stop_reason(step: int, steps: int, evaluation: int, max_t: int, metric: str, value) -> str:
    """Why ASHA stopped a trial (``Tag.OUTCOME_REASON``), for trials and pack members alike."""
    shown = f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
    return (f"ASHA stopped at step {step} of {steps} (rung at evaluation {evaluation} of {max_t}: {metric} {shown} "
            "worse than the rung's cutoff)")


def stop_points(grace_period: int, reduction_factor: int, max_t: int) -> tuple[int, ...]:
    """The evaluations (1-based) at which ASHA may stop a trial: its rungs
    (``grace_period * reduction_factor**k``) and ``max_t``."""
    points, rung = {max_t}, grace_period
    while rung < max_t:
        points.add(rung)
        rung *= reduction_factor
    return tuple(sorted(points))


def stop_reason(trial_id: str) -> str | None:
    return _stop_reasons.get(trial_id)


def recorded_outcome(trial_id: str) -> tuple[str, str] | None:
    """(outcome, reason) of a trial this driver saw end, else None (then MLflow's tag says)."""
    return _outcomes.get(trial_id)


def trial_outcome(trial_id: str, last_result: dict | None) -> tuple[str, str]:
    """A trial Tune has completed (not errored) -> (outcome, reason)."""
    last = last_result or {}
    if last.get("diverged"):
        return Outcome.DIVERGED, f"diverged at step {int(last.get('step', 0))}: {last.get('diverged_reason', '')}"
    reason = stop_reason(trial_id)
    if reason:
        return Outcome.STOPPED_EARLY, reason
    return Outcome.DONE, ""


def first_error_line(trial) -> str:
    """The last line of a failed trial's error (Ray's message or its error file)."""
    text = str(getattr(trial, "error_msg", "") or "")
    if not text and getattr(trial, "error_file", None):
        try:
            with open(trial.error_file) as handle:
                text = handle.read()
        except OSError:
            text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "unknown error"


class TrialOutcomes(tune.Callback):
    """Writes each trial's outcome on its MLflow run and ends the run, as Tune reports the end."""

    def __init__(self, study_run: StudyRun):
        self.study_run = study_run

    def _record(self, trial_id: str, outcome: str, reason: str) -> None:
        _outcomes[trial_id] = (outcome, reason)
        try:
            self.study_run.end_trial(trial_id, outcome, reason)
        except Exception as exc:  # noqa: BLE001 - the record must never break the study
            print(f"warning: could not record the outcome of {trial_id} in MLflow: {exc}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        # a pack member's run ends as soon as the pack reports the member's end
        for member_id, values in member_results(result).items():
            if OUTCOME in values and member_id not in _outcomes:
                self._record(member_id, values[OUTCOME], str(values.get(REASON, "")))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        members = pack_members(dict(trial.config))
        if members is None:
            self._record(trial.trial_id, *trial_outcome(trial.trial_id, trial.last_result))
            return
        self.on_trial_result(iteration, trials, trial, trial.last_result or {})
        for member_id, _ in members:
            if member_id not in _outcomes:  # never happens unless a pack trial ends without saying why
                self._record(member_id, Outcome.ERROR, "the pack ended without reporting this member's end")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        members = pack_members(dict(trial.config))
        for member_id in [trial.trial_id] if members is None else [m for m, _ in members if m not in _outcomes]:
            self._record(member_id, Outcome.ERROR, first_error_line(trial))

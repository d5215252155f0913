"""How each trial ended, decided on the driver where Tune tells it, and written once.

* :class:`AshaRule` is ASHA's stopping rule (Ray's ``_Bracket``), decided per trial or pack
  member, with its rungs kept across ``--resume``; :class:`RecordingASHA` is the Tune scheduler
  that applies it to a study's trials and says why it stopped one (the evaluation, the step and
  the rung's cutoff), so a stopped trial is never guessed back from its number of evaluations.
* :class:`TrialOutcomes` is the Tune callback that turns Tune's events into ``Tag.OUTCOME`` on
  the trial's MLflow run and ends the run, through :class:`~studies.tracking.StudyRun` (the one
  owner that ends trial runs).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .results import OUTCOME, REASON, member_results, pack_members
from .record import Outcome
from .tracking import StudyRun

# Why the scheduler stopped each trial (trial id -> reason).  Both the scheduler and the callback
# run in the driver process, but Tuner.restore unpickles them as separate objects: they meet here
# rather than through a reference.
_stop_reasons: dict[str, str] = {}
_outcomes: dict[str, tuple[str, str]] = {}  # this driver's: trial id -> (outcome, reason)


class RecordingASHA(FIFOScheduler):
    """Tune's scheduler for a study's trials: ASHA (stopping only, never pausing) by
    :class:`AshaRule`, which records the reason of each early stop and keeps its rungs in
    ``state_path`` across ``--resume``. Tune's own ASHAScheduler is not saved with the experiment:
    a resumed study started from empty rungs and stopped trials the uninterrupted study kept."""

    def __init__(self, *, steps: int, metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: int,
                 state_path: str | None = None, keep: dict[str, str] | None = None):
        super().__init__()
        super().set_search_properties(metric, mode)  # Tune reads it back as the public `metric`
        self.rule = AshaRule(grace_period, reduction_factor, max_t, mode, metric=metric, steps=steps,
                             state_path=state_path, keep=keep)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return True  # the spec's scheduler metric and mode, given at construction

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        evaluation = result.get("training_iteration")
        if evaluation is None or self.metric not in result:
            return TrialScheduler.CONTINUE
        reason = self.rule.decide(trial.trial_id, int(evaluation), int(result.get("step", 0)), result[self.metric],
                                  result)
        if reason is None:
            return TrialScheduler.CONTINUE
        _stop_reasons[trial.trial_id] = reason
        return TrialScheduler.STOP


class AshaRule:
    """ASHA's rule (as Ray Tune's ``AsyncHyperBandScheduler``, one bracket), decided per trial or
    pack member (``member``: its id).

    Rungs sit at ``grace_period * reduction_factor**k`` evaluations below ``max_t``.  The first
    time a member reaches a rung, it continues iff its value is within the best
    ``1/reduction_factor`` of the values recorded at that rung so far (the cutoff is their
    ``(1 - 1/rf)`` percentile, as Ray's ``_Bracket.cutoff``); then its value is recorded there.
    ``state_path`` (optional) keeps the rungs and the decisions across a driver restart
    (``--resume``), also when Tune unpickles the rule as it was when the study started; a member
    asked again at a rung (a retried or resumed trial re-runs evaluations) gets the same answer.
    """

    def __init__(self, grace_period: int, reduction_factor: int, max_t: int, mode: str,
                 metric: str = "val_nll", steps: int = 0, state_path: str | None = None,
                 keep: dict[str, str] | None = None):
        self.rf, self.max_t, self.sign, self.metric, self.steps = reduction_factor, max_t, (
            1.0 if mode == "max" else -1.0), metric, steps
        self.rungs = [r for r in stop_points(grace_period, reduction_factor, max_t) if r < max_t]
        self.recorded: dict[int, dict[str, float]] = {rung: {} for rung in self.rungs}
        # keep: metric -> mode. A member in the best 1/rf of any of these at a rung continues too,
        # so that a trial the study exists to find (a live latent: high MI at a worse NLL) is not
        # stopped for its NLL alone.
        self.keep = dict(keep or {})
        self.recorded_keep: dict[str, dict[int, dict[str, float]]] = {
            name: {rung: {} for rung in self.rungs} for name in self.keep}
        self.stops: dict[str, str] = {}  # member -> the reason it was stopped
        self.state_path = Path(state_path) if state_path else None
        self._load()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

    def _load(self) -> None:
        if self.state_path is not None and self.state_path.is_file():
            saved = json.loads(self.state_path.read_text())
            self.recorded.update({int(rung): values for rung, values in saved["recorded"].items()})
            for name, rungs in saved.get("recorded_keep", {}).items():
                self.recorded_keep.setdefault(name, {}).update({int(rung): v for rung, v in rungs.items()})
            self.stops = saved["stops"]

    def cutoff(self, recorded: dict[str, float]) -> float | None:
        if not recorded:
            return None
        return float(np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100))

    def decide(self, member: str, evaluation: int, step: int, value: float | None,
               keep_values: dict[str, float] | None = None) -> str | None:
        """-> the reason to stop ``member`` at its ``evaluation`` (at training ``step``, with
        ``value`` of the metric; ``keep_values``: the evaluation's metrics, of which the keep
        metrics are read), or None to let it continue."""
        if member in self.stops:
            return self.stops[member]
        for rung in reversed(self.rungs):
            recorded = self.recorded[rung]
            if evaluation >= rung and member in recorded:
                break  # decided at this rung already: it continued
            if evaluation < rung:
                continue
            if value is None:
                break
            worse = self._worse(recorded, member, self.sign * value)
            for name, mode in self.keep.items():
                kept = (keep_values or {}).get(name)
                if kept is not None and math.isfinite(kept):  # record every keep value, as the primary
                    worse &= self._worse(self.recorded_keep[name][rung], member,
                                         kept if mode == "max" else -kept)
            if worse:
                self.stops[member] = asha_stop_reason(step, self.steps, evaluation, self.max_t, self.metric, value,
                                                      kept=list(self.keep))
            self._save()
            break
        return self.stops.get(member)

    def _worse(self, recorded: dict[str, float], member: str, reward: float) -> bool:
        """Whether ``reward`` is below the cutoff of the values recorded at a rung so far; records it."""
        cutoff = self.cutoff(recorded)
        recorded[member] = reward
        return cutoff is not None and reward < cutoff

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"recorded": self.recorded, "recorded_keep": self.recorded_keep,
                                   "stops": self.stops}))
        os.replace(tmp, self.state_path)


def asha_stop_reason(step: int, steps: int, evaluation: int, max_t: int, metric: str, value,
                     kept: list[str] | None = None) -> str:
    """Why ASHA stopped a trial (``Tag.OUTCOME_REASON``), for trials and pack members alike."""
    shown = f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
    also = f", and not in the best part for {', '.join(kept)} either" if kept else ""
    return (f"ASHA stopped at step {step} of {steps} (rung at evaluation {evaluation} of {max_t}: {metric} {shown} "
            f"worse than the rung's cutoff{also})")


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

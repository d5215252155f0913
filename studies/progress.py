"""Live progress for a study: one compact line per trial event, printed by the driver.

Ray Tune's own reporter prints a large table every few seconds; the study runs it at
verbosity 0 and prints these lines instead.  It only prints: the trial's MLflow run is ended by
``studies/outcomes.py``.
"""
from __future__ import annotations

import math
import sys
import time

from ray import tune

from .outcomes import first_error_line, trial_outcome
from .results import OUTCOME, PACK_CONFIG, REASON, member_results, pack_members
from .record import Outcome
from .spaces import describe


class StudyProgress(tune.Callback):
    def __init__(self, base_preset: str, evaluations: int, total_trials: int):
        self.base_preset, self.evaluations, self.total_trials = base_preset, evaluations, total_trials
        self._t0 = time.monotonic()
        self._ended: set[str] = set()  # pack members seen to finish

    def setup(self, **info) -> None:
        self._t0 = time.monotonic()

    # -- output ------------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        elapsed = int(time.monotonic() - self._t0)
        print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {text}", file=sys.stdout, flush=True)

    def _label(self, trial) -> str:
        config = dict(trial.config)
        seed = config.get("train.seed")
        return f"{describe(config, self.base_preset)}" + (f" seed={seed}" if seed is not None else "")

    @staticmethod
    def _num(result: dict, key: str, digits: int = 2) -> str:
        value = result.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        members = pack_members(dict(trial.config))
        if members is None:
            self._print(f"start  {trial.trial_id}  {self._label(trial)}")
            return
        for member_id, config in members:
            seed = config.get("train.seed")
            self._print(f"start  {member_id}  {describe(config, self.base_preset)}"
                        + (f" seed={seed}" if seed is not None else "") + f"  (pack {trial.trial_id})")

    def _evaluation(self, trial_id: str, result: dict) -> None:
        self._print(
            f"eval   {trial_id}  {result.get('training_iteration', '?')}/{self.evaluations} "
            f"step {int(result.get('step', 0))}  val_nll {self._num(result, 'val_nll')}  "
            f"kl {self._num(result, 'val_kl')}  mi {self._num(result, 'val_mi_loo')}  "
            f"au {self._num(result, 'val_au', 0)}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if PACK_CONFIG in trial.config:
            self._pack_result(trial, result)
            return
        if result.get("diverged"):
            self._print(f"DIVERGED {trial.trial_id}  at step {int(result.get('step', 0))}: "
                        f"{result.get('diverged_reason', '')}  (an outcome: not retried)")
            return
        self._evaluation(trial.trial_id, result)

    def _pack_result(self, trial, result: dict) -> None:
        for member_id, values in member_results(result).items():
            if "step" in values:
                self._evaluation(member_id, values)
            outcome = values.get(OUTCOME)
            if outcome is None or member_id in self._ended:
                continue
            self._ended.add(member_id)
            if outcome == Outcome.DIVERGED:
                self._print(f"DIVERGED {member_id}  {values.get(REASON, '')}  (an outcome: not retried)")
                continue
            how = "stopped by ASHA" if outcome == Outcome.STOPPED_EARLY else "done   "
            self._print(f"{how} {member_id}  ({len(self._ended)}/{self.total_trials} trials finished)")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if PACK_CONFIG in trial.config:
            self._print(f"pack   {trial.trial_id}  finished")
            return
        last = trial.last_result or {}
        n = int(last.get("training_iteration", 0) or 0)
        outcome, _ = trial_outcome(trial.trial_id, last)
        if outcome == Outcome.DIVERGED:
            n -= 1  # the divergence report is not an evaluation
            how = f"diverged after {n}/{self.evaluations} evals,"
        elif outcome == Outcome.STOPPED_EARLY:
            how = f"stopped by ASHA after {n}/{self.evaluations} evals,"
        else:
            how = "done   "
        finished = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR") or t is trial)
        self._print(f"{how} {trial.trial_id}  best val_nll {self._num(last, 'best_val_nll')}  "
                    f"({finished}/{self.total_trials} trials finished)")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(f"retry  {trial.trial_id}  failed, retrying from its last checkpoint: {first_error_line(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(f"FAILED {trial.trial_id}  {first_error_line(trial)}  (logs: {trial.path})")

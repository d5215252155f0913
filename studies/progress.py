"""Live progress for a study: one compact line per trial event, printed by the driver.

Ray Tune's own reporter prints a large table every few seconds; the study runs it at
verbosity 0 and prints these lines instead.  The callback also closes a trial's MLflow run as
soon as Tune is done with it: a trial that ASHA stops is ended inside ``tune.report`` and never
reaches its own ``finish()``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray import tune

from .spaces import describe
from .tracking import find_runs, finish_run, quote, retry


class StudyProgress(tune.Callback):
    def __init__(self, study_name: str, base_preset: str, evaluations: int, total_trials: int,
                 tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.study_name, self.base_preset = study_name, base_preset
        self.evaluations, self.total_trials = evaluations, total_trials
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self._t0 = time.monotonic()
        self._client = None
        self._ended: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl: no live client
        state = self.__dict__.copy()
        state["_client"] = None
        return state

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
        self._print(f"start  {trial.trial_id}  {self._label(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get("diverged"):
            self._print(f"DIVERGED {trial.trial_id}  at step {int(result.get('step', 0))}: "
                        f"{result.get('diverged_reason', '')}  (an outcome: not retried)")
            return
        self._print(
            f"eval   {trial.trial_id}  {result.get('training_iteration', '?')}/{self.evaluations} "
            f"step {int(result.get('step', 0))}  val_nll {self._num(result, 'val_nll')}  "
            f"kl {self._num(result, 'val_kl')}  mi {self._num(result, 'val_mi_loo')}  "
            f"au {self._num(result, 'val_au', 0)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        n = int(last.get("training_iteration", 0) or 0)
        if last.get("diverged"):
            n -= 1  # the divergence report is not an evaluation
            how = f"diverged after {n}/{self.evaluations} evals,"
        else:
            how = "done   " if n >= self.evaluations else f"stopped by ASHA after {n}/{self.evaluations} evals,"
        finished = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR") or t is trial)
        self._print(f"{how} {trial.trial_id}  best val_nll {self._num(last, 'best_val_nll')}  "
                    f"({finished}/{self.total_trials} trials finished)")
        self._end_run(trial.trial_id, "FINISHED")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(f"retry  {trial.trial_id}  failed, retrying from its last checkpoint: {_first_line(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(f"FAILED {trial.trial_id}  {_first_line(trial)}  (logs: {trial.path})")
        self._end_run(trial.trial_id, "FAILED")

    # -- MLflow --------------------------------------------------------------------------------
    def _end_run(self, trial_id: str, status: str) -> None:
        try:
            from mlflow import MlflowClient

            if self._client is None:
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            runs = retry(lambda: find_runs(
                self._client, self.experiment_id,
                f"tags.ray_trial_id = '{quote(trial_id)}' and tags.mlflow.parentRunId = '{quote(self.parent_run_id)}'"))
            for run in runs:
                retry(lambda: finish_run(self._client, run.info.run_id, status))
        except Exception as exc:  # noqa: BLE001 - progress must never break the study
            self._print(f"warning: could not close the MLflow run of {trial_id}: {exc}")


def _first_line(trial) -> str:
    text = str(getattr(trial, "error_msg", "") or "")
    if not text and getattr(trial, "error_file", None):
        try:
            with open(trial.error_file) as handle:
                text = handle.read()
        except OSError:
            text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "unknown error"

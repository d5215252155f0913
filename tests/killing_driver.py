"""A study driver for fault tests: runs one study in this process and SIGKILLs itself and the
local Ray it started (its process group) at a Tune event, the way a crashed or killed driver dies.

    python tests/killing_driver.py SPEC ROOT NAME EVENT N [--sigint] [--resume]

EVENT is ``trials`` (at the end of the step of Tune's loop in which the N-th trial was asked
from the searcher: the proposal is in flight, and only a snapshot that fell due in that step
holds it), or a Tune callback hook (``on_trial_start``, ``on_checkpoint``; ``on_checkpoint@I``
counts only checkpoints of a trial's I-th evaluation) whose N-th call kills. ``--sigint`` sends
this driver SIGINT instead, as Ctrl-C does. A marker
file beside ROOT makes the kill happen once: ``--resume`` restores the callback with Tune's run
config, and the resumed driver must run to its end. MLflow: SQLite beside ROOT."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray import tune  # noqa: E402

from studies.runner import Options, run_study  # noqa: E402


class KillAt(tune.Callback):
    def __init__(self, event: str, n: int, marker: str, sigint: bool = False):
        self.event, self.n, self.marker, self.sigint, self.calls = event, n, marker, sigint, 0

    def _called(self, event: str) -> None:
        if event != self.event:
            return
        self.calls += 1
        if self.calls == self.n:
            self._stop()

    def _stop(self) -> None:
        if os.path.exists(self.marker):
            return
        Path(self.marker).touch()
        if self.sigint:
            os.kill(os.getpid(), signal.SIGINT)
        else:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_step_end(self, iteration, trials, **info):
        if self.event == "trials" and len(trials) >= self.n:
            self._stop()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._called("on_trial_start")

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._called("on_checkpoint")
        evaluation = (trial.last_result or {}).get("training_iteration")
        self._called(f"on_checkpoint@{evaluation}")


def main(argv: list[str]) -> int:
    spec, root, name, event, n = argv[:5]
    resume = "--resume" in argv
    folder = Path(root).parent
    callbacks = () if resume else (KillAt(event, int(n), str(folder / "killed"), "--sigint" in argv),)
    outcome = run_study(Options(profile=spec, root=root, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                                study_name=None if resume else name, resume=name if resume else None,
                                callbacks=callbacks))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

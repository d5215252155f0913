"""Tune's experiment snapshot survives a driver killed while Tune writes it.

Tune writes ``experiment_state-<session>.json`` in place (into its staging folder, then copied
into the experiment folder), so a driver SIGKILLed during the copy leaves a cut file that
``Tuner.restore`` cannot read (a JSONDecodeError, and the study could not be resumed). The
:class:`KeepLastGoodSnapshot` callback copies each snapshot that reads back whole to
``.experiment_state-last-good.json``; before a resume, :func:`repair_snapshot` puts that copy back
in place of a cut newest snapshot. The copy is at most one snapshot older: the resume then
continues as if the driver had died a moment earlier, which ``--resume`` already handles."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ray import tune

LAST_GOOD = ".experiment_state-last-good.json"


def _newest(experiment_path: Path) -> Path | None:
    snapshots = sorted(experiment_path.glob("experiment_state-*.json"))
    return snapshots[-1] if snapshots else None


def _readable(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


class KeepLastGoodSnapshot(tune.Callback):
    """After each step of Tune's loop: a new snapshot that reads back whole is copied aside."""

    def __init__(self, experiment_path: str):
        self.experiment_path = experiment_path
        self._copied: tuple[str, int] | None = None  # (name, mtime_ns) of the snapshot copied last

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        folder = Path(self.experiment_path)
        newest = _newest(folder) if "://" not in self.experiment_path else None
        if newest is None:
            return
        try:
            seen = (newest.name, newest.stat().st_mtime_ns)
        except OSError:
            return
        if seen == self._copied or not _readable(newest):
            return  # unchanged, or being written: look again after the next step
        tmp = folder / f"{LAST_GOOD}.tmp"
        shutil.copyfile(newest, tmp)
        os.replace(tmp, folder / LAST_GOOD)
        self._copied = seen


def repair_snapshot(experiment_path: str) -> str | None:
    """Before ``Tuner.restore``: replace a cut newest snapshot by the last good copy.
    -> a one-line note of what was done, or None when nothing needed it."""
    if "://" in experiment_path:
        return None
    folder = Path(experiment_path)
    newest = _newest(folder)
    if newest is None or _readable(newest) or not (folder / LAST_GOOD).is_file():
        return None
    shutil.copyfile(folder / LAST_GOOD, newest)
    return (f"note: Tune's experiment snapshot {newest.name} was cut short (the driver was killed while writing it); "
            "resuming from the snapshot before it")

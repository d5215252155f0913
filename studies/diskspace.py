"""Stop a study cleanly before a full disk damages it.

When the study root fills up, Ray's writes fail half-way (a truncated pickled trial error, an
experiment state that is never updated again), every trial errors on its next checkpoint and
the study would end in a traceback. Instead the driver watches the free space of the study's
local folders and, below ``--min-free-mb``, stops the study exactly as Ctrl-C does: Tune saves
its experiment state while there is still room, the running trials stay unfinished, and
``--resume`` continues them from their checkpoints once space is freed.

The guard looks at every checkpoint, evaluation and trial error Tune reports, and every
``every_s`` seconds in between. A disk can also fill in one write (another program's), leaving
no room for the state Tune and the study save when they stop; so a study sets a few MB aside
on each filesystem it writes to (:func:`reserve_space`) and the guard gives them back just
before it stops the study.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from ray import tune

from .options import StudyError

# Space set aside on each filesystem a study writes to, in two parts given back one after the
# other: Tune's, when the guard stops the study (Tune then saves its experiment state while the
# trials it stops may still write), and the driver's, once the trials have stopped (study.json,
# the summary files and their MLflow copies).
RESERVE_BYTES = 8 * 1024**2
RESERVES = {"tune": ".disk_reserve-tune", "driver": ".disk_reserve-driver"}
_stop_reasons: list[str] = []  # what the guard saw when it stopped this process's study


def free_mb(path: str | Path) -> float:
    """Free space (MB) of the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 1024**2


def local_folders(study_folder: str | Path, storage_path: str) -> list[Path]:
    """The folders a study writes on this machine (a remote ``storage_path`` such as s3:// is not one)."""
    folders = [Path(study_folder)]
    if "://" not in storage_path:
        folders.append(Path(storage_path))
    return folders


def low_space(folders: list[Path], min_free_mb: float) -> str | None:
    """A one-line description of the first folder below ``min_free_mb``, else None."""
    for folder in folders:
        free = free_mb(folder)
        if free < min_free_mb:
            return f"{folder} has {free:.0f} MB free (a study stops below --min-free-mb {min_free_mb:g})"
    return None


def check_free_space(folders: list[Path], min_free_mb: float) -> None:
    """Refuse to start (or resume) a study on a disk that is already nearly full."""
    if not min_free_mb >= 0:  # also NaN
        raise StudyError(f"--min-free-mb must be a number >= 0, got {min_free_mb}")
    problem = low_space(folders, min_free_mb)
    if problem:
        raise StudyError(f"not enough disk space: {problem}; free space, or pass a smaller --min-free-mb")


def _filesystem_folders(folders: list[Path]) -> list[Path]:
    """The first of ``folders`` on each filesystem among them (each created if missing)."""
    chosen, devices = [], set()
    for folder in folders:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.stat().st_dev not in devices:
            devices.add(folder.stat().st_dev)
            chosen.append(folder)
    return chosen


def reserve_space(folders: list[Path]) -> None:
    """Before a study's trials start: set both parts of the reserve aside on each filesystem the
    study writes to (see RESERVES), and forget why an earlier study of this process stopped."""
    _stop_reasons.clear()
    for folder in _filesystem_folders(folders):
        for name in RESERVES.values():
            path = folder / name
            if path.exists() and path.stat().st_size == RESERVE_BYTES:
                continue
            try:
                with open(path, "wb") as handle:
                    os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise StudyError(f"not enough disk space: cannot set {RESERVE_BYTES // 1024**2} MB aside in "
                                 f"{folder} ({exc.strerror}); free space, or pass a smaller --min-free-mb") from None


def release_space(folders: list[Path], part: str | None = None) -> None:
    """Give one part of the reserve back (``"tune"`` or ``"driver"``), or all of it."""
    names = list(RESERVES.values()) if part is None else [RESERVES[part]]
    for folder in folders:
        for name in names:
            (Path(folder) / name).unlink(missing_ok=True)


def stopped_for_space() -> str | None:
    """Why the guard stopped this process's last study (one line), or None if it did not."""
    return _stop_reasons[-1] if _stop_reasons else None


class DiskGuard(tune.Callback):
    """Checks the free space at every checkpoint, evaluation and trial error Tune reports, and
    every ``every_s`` seconds of Tune's loop; below the limit it gives the reserved space back and
    sends this process SIGUSR1, on which Tune ends the run as it does on Ctrl-C (state saved, the
    running trials left unfinished for ``--resume``)."""

    def __init__(self, folders: list[Path], min_free_mb: float, every_s: float = 2.0):
        self.folders, self.min_free_mb, self.every_s = [str(f) for f in folders], min_free_mb, every_s
        self._checked_at = 0.0
        self._sent = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self._checked_at >= self.every_s:
            self.check()

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        self.check()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.check()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.check()

    def check(self) -> None:
        if self._sent:
            return
        self._checked_at = time.monotonic()
        problem = low_space([Path(f) for f in self.folders], self.min_free_mb)
        if problem is None:
            return
        # Tune installs its SIGUSR1 handler only when it runs in the main thread; elsewhere the
        # signal would kill the process, so the guard then leaves the study to Tune's own errors.
        if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            self._sent = True  # once: Tune's handler restores the default (fatal) one after a signal
            _stop_reasons.append(problem)
            release_space([Path(f) for f in self.folders], "tune")
            os.kill(os.getpid(), signal.SIGUSR1)

"""Stop a study cleanly before a full disk damages it.

When the study root fills up, Ray's writes fail half-way (a truncated pickled trial error, an
experiment state that is never updated again), every trial errors on its next checkpoint and
the study would end in a traceback. Instead the driver watches the free space of the study's
local folders and, below ``--min-free-mb``, stops the study exactly as Ctrl-C does: Tune saves
its experiment state while there is still room, the running trials stay unfinished, and
``--resume`` continues them from their checkpoints once space is freed.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from ray import tune

from .options import StudyError


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


class DiskGuard(tune.Callback):
    """Checks the free space every ``every_s`` seconds of Tune's loop; below the limit it sends
    this process SIGUSR1, on which Tune ends the run as it does on Ctrl-C (state saved, the
    running trials left unfinished for ``--resume``)."""

    def __init__(self, folders: list[Path], min_free_mb: float, every_s: float = 2.0):
        self.folders, self.min_free_mb, self.every_s = [str(f) for f in folders], min_free_mb, every_s
        self._checked_at = 0.0
        self._sent = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if self._sent or now - self._checked_at < self.every_s:
            return
        self._checked_at = now
        if low_space([Path(f) for f in self.folders], self.min_free_mb) is None:
            return
        # Tune installs its SIGUSR1 handler only when it runs in the main thread; elsewhere the
        # signal would kill the process, so the guard then leaves the study to Tune's own errors.
        if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            self._sent = True  # once: Tune's handler restores the default (fatal) one after a signal
            os.kill(os.getpid(), signal.SIGUSR1)

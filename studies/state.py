"""A study's folder and its saved state: ``<root>/<study>/study.json`` (what ``--resume``
needs), the folder lock that keeps a second driver out, and the lock that serialises first use
of a SQLite MLflow store."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import StudyError
from .spec import Resources, Scheduler, StudySpec, load_spec, parse_objectives, validate_spec


def spec_from_dict(raw: dict[str, Any]) -> StudySpec:
    raw = dict(raw)
    raw["objectives"] = parse_objectives(raw["objectives"], "study.json")
    raw["scheduler"] = Scheduler(**raw["scheduler"])
    raw["resources"] = Resources(**raw["resources"])
    spec = StudySpec(**raw)
    validate_spec(spec)
    return spec


@dataclass
class StudyState:
    """``<root>/<study>/study.json``: everything ``--resume`` needs."""

    study_name: str
    spec: dict[str, Any]
    folder: str
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    experiment_path: str
    optuna_storage: str
    code_version: str
    created: str
    status: str = "running"  # running | interrupted | completed | failed

    def save(self) -> None:
        path = Path(self.folder) / "study.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: Path) -> "StudyState":
        path = folder / "study.json"
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise StudyError(f"no study to resume at {folder} (missing study.json)") from None


def find_resumable(root: Path, spec_name: str, name: str) -> StudyState:
    if name != "latest":
        return StudyState.load(root / name)
    candidates = []
    for path in root.glob("*/study.json"):
        try:
            state = StudyState.load(path.parent)
        except (StudyError, TypeError, ValueError):
            continue
        if state.spec.get("name") == spec_name and state.status != "completed":
            candidates.append(state)
    if not candidates:
        raise StudyError(f"no unfinished study of spec {spec_name!r} under {root} to resume "
                         f"(pass --resume STUDY_NAME, or --root)")
    return max(candidates, key=lambda s: s.created)


_held_locks: dict[Path, Any] = {}


def lock_study_folder(folder: Path) -> None:
    """Hold ``<folder>/.lock`` exclusively while this driver runs the study (released by
    :func:`release_study_folders`, or by the OS when the driver dies): a second driver of the
    same study refuses at once instead of sharing its Optuna study and parent run."""
    import fcntl

    if folder in _held_locks:
        return
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise StudyError(f"study {folder.name} is being run by another driver ({owner}); wait for it to end, "
                         "or pick another --study-name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    _held_locks[folder] = handle


def release_study_folders() -> None:
    while _held_locks:
        _, handle = _held_locks.popitem()
        handle.close()


@contextlib.contextmanager
def sqlite_store_lock(tracking_uri: str):
    """Serialise first use of a SQLite MLflow store across drivers (``<db>-lock`` beside it):
    two drivers creating a fresh store's schema at once make one of them crash."""
    import fcntl

    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    path = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    if not path.parent.is_dir():
        yield  # check_sqlite_uri names the missing folder
        return
    with open(f"{path}-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_spec_name(profile: str) -> str:
    return load_spec(profile).name

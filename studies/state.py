"""A study's folder and its saved state: ``<root>/<study>/study.json`` (what ``--resume`` needs),
created here with the study's MLflow parent run; the folder lock that keeps a second driver out,
and the lock that serialises first use of a SQLite MLflow store.

MLflow (``tracking``) loads inside the function that creates the study's parent run, after its
options are checked."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import Options, StudyError
from .record import Role, Tag, constraints_tag
from .spaces import GRIDS
from .spec import Resources, Scheduler, StudySpec, load_spec, parse_constraints, parse_objectives, validate_spec


def spec_from_dict(raw: dict[str, Any]) -> StudySpec:
    raw = dict(raw)
    raw["objectives"] = parse_objectives(raw["objectives"], "study.json")
    raw["constraints"] = parse_constraints(raw.get("constraints"), "study.json: constraints")
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
    # --extend: each extension is a Tune experiment of its own beside the first (Tune cannot add
    # samples to a restored experiment); {"experiment_path": ..., "num_samples": N}, oldest first
    extensions: list = dataclasses.field(default_factory=list)
    warm_start: str = ""  # "STUDY:top=K" when a new study was seeded from an earlier one

    def experiment_paths(self) -> list[str]:
        """Every Tune experiment of the study, the first one and each extension's."""
        return [self.experiment_path, *(e["experiment_path"] for e in self.extensions)]

    def add_extension(self, num_samples: int) -> dict[str, Any]:
        extension = {"experiment_path": f"{self.experiment_path}-extend{len(self.extensions) + 1}",
                     "num_samples": num_samples}
        self.extensions.append(extension)
        return extension

    def save(self) -> None:
        path = Path(self.folder) / "study.json"
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves the previous study.json, never half of one
            raise

    @classmethod
    def load(cls, folder: Path) -> "StudyState":
        """``<folder>/study.json``; a missing, truncated or foreign one is a one-line StudyError."""
        path = folder / "study.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StudyError(f"no study to resume at {folder} (missing study.json)") from None
        except (OSError, ValueError) as exc:  # ValueError: truncated JSON, or bytes that are no text
            raise StudyError(f"{path} is damaged ({type(exc).__name__}: {exc}); the study cannot be "
                             "resumed") from None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {name for name, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(raw, dict):
            raise StudyError(f"{path} is damaged (a JSON {type(raw).__name__}, not a study's saved state); the "
                             "study cannot be resumed")
        missing, unknown = sorted(required - set(raw)), sorted(set(raw) - set(fields))
        kinds = {"spec": dict, "extensions": list}
        wrong = sorted(k for k, v in raw.items() if k in fields and not isinstance(v, kinds.get(k, str)))
        if isinstance(raw.get("extensions"), list) and not all(
                isinstance(e, dict) and isinstance(e.get("experiment_path"), str)
                and isinstance(e.get("num_samples"), int) for e in raw["extensions"]):
            wrong.append("extensions")
        if missing or unknown or wrong:
            problems = [f"{what} {', '.join(keys)}" for what, keys in (
                ("missing keys", missing), ("unknown keys", unknown), ("ill-typed keys", wrong)) if keys]
            raise StudyError(f"{path} is not a study's saved state ({'; '.join(problems)}); the study cannot be "
                             "resumed")
        return cls(**raw)

    def study_spec(self) -> StudySpec:
        """The spec saved in study.json; a damaged one is a one-line StudyError."""
        try:
            return spec_from_dict(self.spec)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StudyError(f"{Path(self.folder) / 'study.json'}: its saved spec is damaged ({type(exc).__name__}: "
                             f"{exc}); the study cannot be resumed") from None


def find_resumable(root: Path, spec_name: str, name: str) -> StudyState:
    if name != "latest":
        return StudyState.load(root / name)
    candidates, damaged = [], []
    for path in root.glob("*/study.json"):
        try:
            state = StudyState.load(path.parent)
        except StudyError:
            damaged.append(path.parent.name)
            continue
        if state.spec.get("name") == spec_name and state.status != "completed":
            candidates.append(state)
    if not candidates:
        unreadable = f"; skipped {len(damaged)} unreadable study.json ({', '.join(sorted(damaged))})" if damaged else ""
        raise StudyError(f"no unfinished study of spec {spec_name!r} under {root} to resume "
                         f"(pass --resume STUDY_NAME, or --root){unreadable}")
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
    # The lock file exists only while held: its holder removes it before unlocking (a study that
    # stops with an error leaves nothing beside the store). A driver that was waiting on the
    # removed file finds, once it holds it, that the path names another file or none, and locks
    # again whatever file is there now.
    lock = Path(f"{path}-lock")
    while True:
        handle = open(lock, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            held, there = os.fstat(handle.fileno()), os.stat(lock)
            if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def load_spec_name(profile: str) -> str:
    return load_spec(profile).name


def create_study(spec: StudySpec, options: Options, root: Path, tracking_uri: str, storage_path: str,
                 warm_start: str = "") -> StudyState:
    """The study folder, the MLflow experiment (created by the driver, never by trials) and the
    study's parent run.  ``warm_start``: ``STUDY:top=K`` when seeded from an earlier study."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from .tracking import code_version, ensure_experiment, source_tags

    # a random suffix: two studies started in the same second get distinct names
    study_name = options.study_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    folder = root / study_name
    folder.mkdir(parents=True, exist_ok=True)
    lock_study_folder(folder)
    if (folder / "study.json").exists():
        raise StudyError(f"study {study_name} already exists at {folder}; use --resume {study_name}")
    experiment_path = f"{storage_path.rstrip('/')}/{study_name}"
    optuna_storage = f"sqlite:///{folder / 'optuna.db'}"
    artifact_location = None if tracking_uri.startswith(("http://", "https://")) else (root / "mlartifacts").as_uri()
    version = code_version()
    with sqlite_store_lock(tracking_uri):  # MLflow creates a fresh store's schema on first use
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = ensure_experiment(client, options.experiment, artifact_location)
        parent = client.create_run(experiment_id, run_name=study_name, tags={
            Tag.ROLE: Role.STUDY, Tag.STUDY: study_name, Tag.SPEC: spec.name,
            Tag.OPTUNA_STORAGE: optuna_storage, Tag.OPTUNA_STUDY: study_name,
            Tag.EXPERIMENT_PATH: experiment_path, Tag.CODE_VERSION: version,
            Tag.CONSTRAINTS: constraints_tag(spec.constraints),
            "mlflow.note.content": spec.description, **source_tags(f"studies spec {spec.name}"),
            **({Tag.WARM_START: warm_start} if warm_start else {}),
        })
    client.log_batch(parent.info.run_id,
                     params=[Param(k, v) for k, v in spec.summary_params(spec.search).items()][:100])
    state = StudyState(
        study_name=study_name, spec=spec.to_dict(), folder=str(folder), tracking_uri=tracking_uri,
        experiment_name=options.experiment, experiment_id=experiment_id,
        parent_run_id=parent.info.run_id, storage_path=storage_path, experiment_path=experiment_path,
        optuna_storage=optuna_storage, code_version=version, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        warm_start=warm_start)
    state.save()
    print(f"Study {study_name}: spec {spec.name}, search {spec.search}, "
          f"{total_trials(spec)} trials x {spec.evaluations} evaluations, "
          f"{spec.resources.max_concurrent_trials} at a time", flush=True)
    print(f"  MLflow {tracking_uri} (experiment {options.experiment!r}, parent run {parent.info.run_id})")
    print(f"  Ray results {experiment_path}", flush=True)
    return state


def total_trials(spec: StudySpec) -> int:
    configs = len(GRIDS[spec.grid]()) if spec.search == "grid" else len(spec.baselines) + spec.num_samples
    return configs * spec.seeds

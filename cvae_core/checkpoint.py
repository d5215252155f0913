"""Checkpoints: one directory with everything needed to evaluate or resume a run.

    weights.pt     model state_dict            optimizer.pt  optimizer state_dict
    rng.pt         torch (and CUDA) RNG states  state.json    step, data position, best metric
    config.json    the resolved Config          vocab.json    the vocabulary
    manifest.json  sha256 of every file above (checked on load)

Two kinds, told apart by what the manifest lists.  A *full* checkpoint (what training writes)
holds all of the above.  An *evaluation-only* checkpoint (:func:`export_for_evaluation`, what a
study uploads to MLflow) leaves out optimizer.pt and rng.pt, two thirds of the bytes with Adam:
it loads and evaluates like a full one, but training cannot resume from it.  The one rule: a
checkpoint holds the evaluation files (weights, state, config, vocab) and the manifest, plus
the resume files (optimizer, RNG) when its manifest lists them; every listed file must match.

Written atomically: into a temporary sibling directory, then renamed into place; ``best`` and
``latest`` are symlinks replaced atomically.  Loaded with ``torch.load(weights_only=True)``, so
a checkpoint can never execute pickled code.

A run keeps its checkpoints in a private tree, ``<output_dir>/checkpoints/``: ``step-NNNNNNN``
directories plus the ``latest`` and ``best`` links.  Code outside the core never names these
files: it asks :func:`is_checkpoint`, :func:`read_config`, :func:`checkpoint_step`, and resumes
from any full checkpoint directory with ``train(..., resume_from=path)`` (:func:`install_checkpoint`).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import __version__
from .config import Config, config_from_dict
from .data.vocab import Vocab
from .errors import CvaeError
from .models import build_model

TENSOR_FILES = ("weights.pt", "optimizer.pt", "rng.pt")
JSON_FILES = ("state.json", "config.json", "vocab.json")
MANIFEST = "manifest.json"
CHECKPOINT_FILES = (*TENSOR_FILES, *JSON_FILES, MANIFEST)  # a full checkpoint
RESUME_FILES = ("optimizer.pt", "rng.pt")  # only a full checkpoint has them
EVALUATION_FILES = tuple(name for name in TENSOR_FILES + JSON_FILES if name not in RESUME_FILES)
LATEST, BEST = "latest", "best"  # links in a run's checkpoint tree


@dataclass
class TrainState:
    """Where a run stands; written as ``state.json`` in every checkpoint and read back to resume.

    ``best_value`` is the lowest selection metric so far (``val_nll``, ``val_rec`` for a DAE),
    reached at ``best_step``; ``history`` holds the metrics of every evaluation.  ``aggressive``
    and ``previous_mi`` are the Lagging-VAE phase (None in other runs: not written then)."""
    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # position in the epoch's batch order
    best_value: float = math.inf
    best_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    aggressive: bool | None = None
    previous_mi: float | None = None

    def to_json(self) -> dict[str, Any]:
        raw = {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
               "best_value": self.best_value, "best_step": self.best_step,
               "metrics": self.history[-1] if self.history else {}, "history": self.history, "version": __version__}
        if self.aggressive is not None:
            raw.update(aggressive=self.aggressive, previous_mi=self.previous_mi)
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TrainState":
        """Every state.json this package has written, old ones included (no history, no Lagging keys)."""
        return cls(step=int(raw["step"]), epoch=int(raw["epoch"]), batch_index=int(raw["batch_index"]),
                   best_value=float(raw["best_value"]), best_step=int(raw["best_step"]),
                   history=list(raw.get("history", [])), aggressive=raw.get("aggressive"),
                   previous_mi=raw.get("previous_mi"))


@dataclass
class CheckpointData:
    path: Path
    config: Config
    vocab: Vocab
    weights: dict[str, Any]
    optimizer: dict[str, Any] | None
    rng: dict[str, Any] | None  # None in an evaluation-only checkpoint
    state: dict[str, Any]  # the raw state.json; TrainState.from_json(state) reads it
    resumable: bool = True  # False for an evaluation-only checkpoint

    @property
    def train_state(self) -> TrainState:
        return TrainState.from_json(self.state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_tensors(obj: Any, path: Path) -> None:
    """torch.save through memory, then one plain write: a full disk raises OSError (ENOSPC)
    naming the problem, where torch's own writer raises an opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def _write_manifest(directory: Path, names: Iterable[str]) -> None:
    manifest = {name: _sha256(directory / name) for name in names}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def save_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainState | dict[str, Any], config: Config, vocab: Vocab) -> Path:
    """Write a full checkpoint directory atomically; ``directory`` must not exist yet."""
    def fill(tmp: Path) -> None:
        _save_tensors(model.state_dict(), tmp / "weights.pt")
        _save_tensors(optimizer.state_dict() if optimizer is not None else {}, tmp / "optimizer.pt")
        _save_tensors(rng_state(), tmp / "rng.pt")
        raw_state = state.to_json() if isinstance(state, TrainState) else state
        (tmp / "state.json").write_text(json.dumps(raw_state, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(config.to_json())
        vocab.save(tmp / "vocab.json")
        _write_manifest(tmp, TENSOR_FILES + JSON_FILES)

    return _write_atomically(Path(directory), fill)


def export_for_evaluation(source: str | Path, directory: str | Path) -> Path:
    """Write the evaluation-only copy of checkpoint ``source`` (either kind) at ``directory``
    (which must not exist yet), atomically: the evaluation files, each checked against the
    source's manifest as it is copied, and a manifest of exactly those.  -> ``directory``."""
    source = Path(source)
    manifest = _read_manifest(source)

    def fill(tmp: Path) -> None:
        for name in EVALUATION_FILES:
            if not (source / name).is_file():
                raise CvaeError(f"checkpoint {source} is incomplete: {name} is missing")
            shutil.copyfile(source / name, tmp / name)
            if _sha256(tmp / name) != manifest.get(name):
                raise CvaeError(f"checkpoint {source} is corrupted: {name} does not match its checksum")
        _write_manifest(tmp, EVALUATION_FILES)

    return _write_atomically(Path(directory), fill)


def _write_atomically(directory: Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write into a temporary sibling of ``directory``, then rename it into place."""
    if directory.exists():
        raise CvaeError(f"checkpoint directory already exists: {directory}")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    except OSError as exc:
        raise CvaeError(f"cannot write checkpoint {directory}: {exc.strerror or exc}") from None
    try:
        fill(tmp)
        os.rename(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay as they were
        if isinstance(exc, OSError):  # a full disk, a read-only or unwritable folder
            raise CvaeError(f"cannot write checkpoint {directory}: {exc.strerror or exc}; the previous "
                            "checkpoint is intact (free space, then resume)") from None
        raise
    return directory


def point_link(link: str | Path, target: str | Path) -> None:
    """Make ``link`` a symlink to ``target`` (relative), replacing any old link atomically."""
    link, target = Path(link), Path(target)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def _lists_resume_files(manifest: dict[str, Any]) -> bool:
    """Whether a manifest is a full checkpoint's (then it must hold the resume files too)."""
    return any(name in manifest for name in RESUME_FILES)


def _required_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    return EVALUATION_FILES + (RESUME_FILES if _lists_resume_files(manifest) else ())


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CvaeError(f"checkpoint not found (expected a directory): {path}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CvaeError(f"checkpoint {path} is incomplete: {MANIFEST} is missing") from None
    except ValueError:
        raise CvaeError(f"checkpoint {path} is corrupted: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise CvaeError(f"checkpoint {path} is corrupted: {MANIFEST} is not a mapping of file names")
    return manifest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> CheckpointData:
    """Verify the manifest and load a checkpoint directory (either kind) without unpickling
    arbitrary objects.  An evaluation-only checkpoint has ``optimizer`` and ``rng`` None."""
    path = Path(path)
    manifest = _read_manifest(path)
    names = _required_files(manifest)
    for name in names:
        file = path / name
        if not file.is_file():
            raise CvaeError(f"checkpoint {path} is incomplete: {name} is missing")
        if _sha256(file) != manifest.get(name):
            raise CvaeError(f"checkpoint {path} is corrupted: {name} does not match its checksum")
    tensors: dict[str, Any] = {}
    for name in (n for n in TENSOR_FILES if n in names):
        # A file whose manifest was rewritten to match passes the checksum: weights_only still
        # refuses anything but tensors and plain containers, before any of its code could run.
        try:
            tensors[name] = torch.load(path / name, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types, with multi-line text
            raise CvaeError(f"checkpoint file {path / name} cannot be read: refused as not a plain tensor file "
                            f"({type(exc).__name__}; nothing in it was run)") from None
    try:
        config = config_from_dict(json.loads((path / "config.json").read_text()))
        state = json.loads((path / "state.json").read_text())
        vocab = Vocab.load(path / "vocab.json")
    except CvaeError as exc:
        raise CvaeError(f"checkpoint {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a foreign file that slipped past the checksum
        raise CvaeError(f"checkpoint {path} cannot be read: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    return CheckpointData(path, config, vocab, tensors["weights.pt"], tensors.get("optimizer.pt") or None,
                          tensors.get("rng.pt"), state, resumable=_lists_resume_files(manifest))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, Vocab]:
    """Load a trained model for evaluation: -> (model in eval mode, config, vocab)."""
    data = load_checkpoint(path, map_location=device)
    # The weights are fitted to a shape-only ("meta") build first: a config.json that does not match
    # them (tampered sizes such as model.hidden_dim=10**8) is refused before any memory is allocated.
    with torch.device("meta"):
        skeleton = build_model(data.config, len(data.vocab))
    try:
        skeleton.load_state_dict(data.weights, assign=True)  # shapes checked, nothing copied
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()
        raise CvaeError(f"checkpoint {path}: weights.pt does not fit its config.json/vocab.json "
                        f"({len(data.vocab)} words; {first[-1].strip() if first else type(exc).__name__})") from None
    model = build_model(data.config, len(data.vocab)).to(device)
    model.load_state_dict(data.weights)
    return model.eval(), data.config, data.vocab


# ---------------------------------------------------------------------------------------------
# Questions about a checkpoint directory, answered without loading its tensors.

def has_checkpoint_files(names: Iterable[str]) -> bool:
    """True when a listing of file names (e.g. an MLflow artifact folder) holds a checkpoint of
    either kind: the evaluation files and the manifest (which says, on load, what else it needs)."""
    return {*EVALUATION_FILES, MANIFEST} <= {Path(name).name for name in names}


def is_checkpoint(path: str | Path) -> bool:
    """True for a directory :func:`load_checkpoint` can read: a readable manifest and every file
    it requires present (checksums are verified on load, not here). Never raises."""
    path = Path(path)
    try:
        if not path.is_dir():
            return False
        manifest = json.loads((path / MANIFEST).read_text())
        return isinstance(manifest, dict) and all((path / name).is_file() for name in _required_files(manifest))
    except (OSError, ValueError):
        return False


def is_resumable(path: str | Path) -> bool:
    """True for a full checkpoint (training can resume from it), False for an evaluation-only one."""
    return _lists_resume_files(_read_manifest(Path(path)))


def _read_json(path: Path, name: str) -> Any:
    if not is_checkpoint(path):
        raise CvaeError(f"not a checkpoint directory (expected {', '.join((*EVALUATION_FILES, MANIFEST))}, "
                        f"and {' and '.join(RESUME_FILES)} where the manifest lists them): {path}")
    try:
        return json.loads((path / name).read_text())
    except ValueError:
        raise CvaeError(f"checkpoint {path} is corrupted: {name} is not valid JSON") from None


def read_config(path: str | Path) -> Config:
    """The resolved :class:`Config` a checkpoint was trained with, without loading its tensors."""
    path = Path(path)
    raw = _read_json(path, "config.json")
    try:
        return config_from_dict(raw)
    except CvaeError as exc:
        raise CvaeError(f"checkpoint {path}: {exc}") from None


def read_state(path: str | Path) -> TrainState:
    """Where the run stood when the checkpoint was written (step, best so far, history)."""
    return TrainState.from_json(_read_json(Path(path), "state.json"))


def checkpoint_step(path: str | Path) -> int:
    """The training step at which a checkpoint was written."""
    return read_state(path).step


# ---------------------------------------------------------------------------------------------
# A run's checkpoint tree: <output_dir>/checkpoints/{step-NNNNNNN, latest, best}.

def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:07d}"


def install_checkpoint(source: str | Path, ckpt_root: str | Path) -> int:
    """Copy the checkpoint ``source`` (from anywhere, e.g. the directory Ray hands back on a
    retry) into the tree ``ckpt_root`` as its step directory and point ``latest`` at it (and
    ``best`` when it was the run's best).  Step directories of later steps are removed: they
    belong to a future that resuming from ``source`` replaces.  -> the checkpoint's step."""
    source, ckpt_root = Path(source), Path(ckpt_root)
    state = read_state(source)
    if not is_resumable(source):
        raise CvaeError(f"checkpoint {source} is evaluation-only (no optimizer or RNG state): it evaluates "
                        "but cannot resume training; resume from the run's full checkpoint (a study keeps "
                        "it in Ray's results folder, <storage path>/<study>/<trial>/checkpoint_*)")
    step = state.step
    target = step_dir(ckpt_root, step)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    if not (target.exists() and target.resolve() == source.resolve()):
        for path in ckpt_root.glob("step-*"):
            if path.is_dir() and path.name >= target.name:
                shutil.rmtree(path)
        shutil.copytree(source, target)
    point_link(ckpt_root / LATEST, target)
    if state.best_step == step:
        point_link(ckpt_root / BEST, target)
    return step

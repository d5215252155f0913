"""Process-level helpers shared by the loop, the evaluation and the CLI: the torch device,
seeded RNG streams, human-readable durations and strict JSON."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch

from .config import check_device
from .errors import CvaeError


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> the first CUDA device if there is one (e.g. the GPU Ray assigned), else CPU.
    A name that is no device, or a GPU this machine does not have: a one-line CvaeError."""
    if check_device(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CvaeError(f"train.device={name!r} but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CvaeError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block on its own seeded RNG stream and restore the caller's RNG state afterwards
    (the CPU stream, and ``device``'s when it is a GPU)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 125 -> "2m05s"."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively: strict JSON for `cvae evaluate --json` and everything built on it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

"""Process-level helpers shared by the loop, the evaluation and the CLI: the torch device,
bf16 autocast where the hardware has it, seeded RNG streams, human-readable durations and strict JSON."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
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


# CPU flags of bf16 matrix units (x86: AVX512-BF16, AMX-BF16); without them bf16 matmuls are
# emulated: 6.7 GFLOP/s against 94 in fp32 on a 2-core AVX2 EPYC (bench/bench_bf16.py).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def bf16_matmul_units(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with bf16 support, or
    a CPU whose /proc/cpuinfo flags name one of BF16_CPU_FLAGS (elsewhere: False)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    if device.type != "cpu" or not cpuinfo.exists():
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def bf16_autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (``train.amp``), or no change when not ``enabled``.  A device
    without bf16 matrix units is a one-line CvaeError: there bf16 is many times slower than fp32."""
    if not enabled:
        return contextlib.nullcontext()
    if not bf16_matmul_units(device):
        what = "this GPU" if device.type == "cuda" else f"this CPU (no {' or '.join(BF16_CPU_FLAGS)} flag)"
        raise CvaeError(f"train.amp=true needs bf16 matrix units, which {what} lacks: bf16 would run "
                        "emulated, many times slower than fp32; set train.amp=false")
    return torch.autocast(device.type, dtype=torch.bfloat16)


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

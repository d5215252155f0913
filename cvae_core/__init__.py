"""cvae_core: a lean PyTorch Coupled-VAE (Wu, Wang & Wang, ACL 2020) with the paper's metrics.

The names below load on first use (PEP 562), so ``import cvae_core.guards`` or
``cvae_core.errors`` does not import torch: the MLflow server launcher uses them."""
import sys
import types
from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "checkpoint_step": "checkpoint", "is_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "load_model": "checkpoint", "read_config": "checkpoint", "read_state": "checkpoint",
    "PRESETS": "config", "Config": "config", "build_config": "config", "preset_coupling": "config",
    "CvaeError": "errors",
    "evaluate_checkpoint": "evaluation",
    "StopTraining": "train", "TrainResult": "train", "train": "train",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cvae_core' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # once loaded, an ordinary module attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule cvae_core.train binds the package attribute `train` to that
        # module; the package's `train` stays the function, as it was before names loaded lazily.
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

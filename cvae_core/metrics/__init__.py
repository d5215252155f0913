"""The paper's metrics, callable on any model or checkpoint (never inside the training loop).

The names below load on first use (PEP 562): ``metrics.names`` and ``metrics.constraints``, which
the study record and ``analysis`` read, import without torch."""
from importlib import import_module

_PUBLIC = {"active_units": "latent", "mi_estimates": "latent",
           "evaluate": "likelihood", "importance_sampled_nll": "likelihood", "perplexity": "likelihood"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cvae_core.metrics' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])

"""The paper's metrics, callable on any model or checkpoint (never inside the training loop)."""
from .latent import active_units, mi_estimates
from .likelihood import evaluate, importance_sampled_nll, perplexity

__all__ = ["active_units", "evaluate", "importance_sampled_nll", "mi_estimates", "perplexity"]

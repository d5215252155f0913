"""Latent-space metrics from a LatentDistribution: two named MI estimators and active units."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..modules.posteriors import LatentDistribution

# Elements of the [chunk, B, B, d] cross-density tensor evaluated at once (bounds memory).
CROSS_BUDGET = 2**25


@torch.no_grad()
def mi_estimates(posterior: LatentDistribution, n_samples: int) -> tuple[Tensor, Tensor]:
    """Per-sentence MI estimates for one batch of B sentences -> (mi_loo [B], mi_batch [B]), nats.

    For each x_i draw N samples z_ik ~ q(z|x_i) and estimate log q(z_ik) from the batch:
      mi_loo   (the paper's): log q(z) ~ logsumexp_{j != i} log q(z|x_j) - log(B-1)  (self excluded)
      mi_batch (He et al.):   log q(z) ~ logsumexp_j log q(z|x_j) - log B             (self included,
               so it is at most log B)
    MI_i = mean_k [log q(z_ik|x_i) - log q(z_ik)].  Densities are evaluated in the family's
    x-independent frame (``base``), which is exact for global flows: their Jacobian cancels.
    mi_loo is NaN when B = 1 (no other sentence).
    """
    sample = posterior.rsample_with_log_prob((n_samples,))
    base = sample.base  # [N, B, d]
    size, dim = base.shape[1], base.shape[2]
    chunk = max(1, CROSS_BUDGET // max(1, size * size * dim))
    loo_terms, batch_terms = [], []
    eye = torch.eye(size, dtype=torch.bool, device=base.device)
    for start in range(0, n_samples, chunk):
        cross = posterior.base_log_prob(base[start : start + chunk].unsqueeze(-2))  # [c, B(i), B(j)]
        own = cross.diagonal(dim1=-2, dim2=-1)  # [c, B]
        log_q_all = torch.logsumexp(cross, dim=-1) - math.log(size)
        batch_terms.append(own - log_q_all)
        if size > 1:
            log_q_others = torch.logsumexp(cross.masked_fill(eye, float("-inf")), dim=-1) - math.log(size - 1)
            loo_terms.append(own - log_q_others)
    mi_batch = torch.cat(batch_terms).mean(0)
    mi_loo = torch.cat(loo_terms).mean(0) if loo_terms else torch.full_like(mi_batch, float("nan"))
    return mi_loo, mi_batch


def active_units(means: Tensor, threshold: float = 0.01) -> int:
    """Number of dimensions whose posterior mean varies across sentences: Var_x E_q[z_d] > threshold.

    means: [N_sentences, d] (the posterior ``mean`` of each sentence).
    """
    if means.shape[0] < 2:
        return 0
    return int((means.var(dim=0, unbiased=True) > threshold).sum().item())

"""Metrics against a known answer (the synthetic dataset, :mod:`cvae_core.data.synthetic`).

* ``true_nll``: the mean exact -log p(x) of the split under the generator (quadrature over z,
  computed once with the data); ``nll_gap`` = ``nll`` − ``true_nll``, the model's excess
  cross-entropy (≥ 0 in expectation, up to the IS estimate's noise and the split's sampling error).
* Latent recovery: how much of the generator's z [N, 2] and mixture component [N] the model's
  latent code carries.  The probes read one code z ~ q(z|x) per sentence [N, d] (any d), what the
  decoder reads: the posterior means of a collapsed encoder still differ by thousandths, which a
  probe that standardises its inputs would read as information.  Linear probes are fitted on one
  half of the split and scored on the other (even/odd rows, both ways round), so a probe never
  scores the sentences it was fitted on.
  ``z_probe_r2``: R² of a least-squares map [code, 1] -> true z (1 − SSE/SST pooled over z's
  coordinates; ~0 for a collapsed encoder, ~1 when z is read back up to an affine map);
  ``cluster_probe_acc``: accuracy of a multinomial logistic regression code -> component (chance
  0.25; the true z itself reaches ~0.95: the components overlap); ``cluster_probe_mi``: the
  held-out bound mean[log q(c|code) − log p̂(c)] ≤ I(code; c) in nats (~0 for a collapsed encoder,
  at most log 4 ≈ 1.39, the true z ~1.22; it can dip just below 0 by chance).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

TRUTH_KEYS = ("true_nll", "nll_gap", "z_probe_r2", "cluster_probe_acc", "cluster_probe_mi")
RIDGE = 1e-6  # keeps the probes' normal equations solvable when the codes do not vary
LOGISTIC_L2 = 1e-3  # per-sentence weight decay of the cluster probe: finite weights on separable data


def _halves(n: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    even, odd = torch.arange(0, n, 2), torch.arange(1, n, 2)
    return (even, odd), (odd, even)


def _standardized(features: Tensor, fit: Tensor) -> Tensor:
    """Features centred and scaled by the fitting half's statistics, plus a constant column."""
    mean, sd = features[fit].mean(0), features[fit].std(0)
    scaled = (features - mean) / torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    return torch.cat([scaled, torch.ones(len(features), 1, dtype=features.dtype)], 1)


def z_probe_r2(means: Tensor, z: Tensor) -> float:
    """R² of the held-out linear map code [N, d] -> true z, pooled over both halves and z's coordinates."""
    means, z = means.double(), z.double()
    sse = sst = 0.0
    for fit, score in _halves(len(means)):
        x = _standardized(means, fit)
        gram = x[fit].T @ x[fit] + RIDGE * torch.eye(x.shape[1], dtype=x.dtype)
        weights = torch.linalg.solve(gram, x[fit].T @ z[fit])
        sse += ((x[score] @ weights - z[score]) ** 2).sum().item()
        sst += ((z[score] - z[fit].mean(0)) ** 2).sum().item()
    return 1.0 - sse / sst


def _fit_logistic(x: Tensor, labels: Tensor, classes: int) -> Tensor:
    """Weights [p, classes] of an L2-penalised multinomial logistic regression (L-BFGS, deterministic).
    Runs with autograd on even when called under inference mode (the evaluation's)."""
    with torch.inference_mode(False), torch.enable_grad():
        x, labels = x.clone(), labels.clone()
        weights = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
        optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                                      line_search_fn="strong_wolfe")

        def loss() -> Tensor:
            optimizer.zero_grad()
            value = torch.nn.functional.cross_entropy(x @ weights, labels) + LOGISTIC_L2 * weights[:-1].pow(2).sum()
            value.backward()
            return value

        optimizer.step(loss)
        return weights.detach().clone()


def cluster_probe(means: Tensor, component: Tensor, classes: int = 4) -> dict[str, float]:
    """Held-out accuracy and MI bound (nats) of a logistic probe code [N, d] -> mixture component."""
    means, component = means.double(), component.long()
    correct, bound = 0, 0.0
    for fit, score in _halves(len(means)):
        x = _standardized(means, fit)
        weights = _fit_logistic(x[fit], component[fit], classes)
        log_q = torch.log_softmax(x[score] @ weights, 1)
        counts = torch.bincount(component[fit], minlength=classes).double() + 0.5  # no -inf for an unseen class
        log_prior = torch.log(counts / counts.sum())
        labels = component[score]
        correct += int((log_q.argmax(1) == labels).sum())
        bound += (log_q.gather(1, labels[:, None])[:, 0] - log_prior[labels]).sum().item()
    return {"cluster_probe_acc": correct / len(means), "cluster_probe_mi": bound / len(means)}


def latent_recovery(means: Tensor, z: Tensor, component: Tensor) -> dict[str, float]:
    """z_probe_r2, cluster_probe_acc, cluster_probe_mi of codes [N, d] (one per sentence) against
    the truth; NaN for fewer than 4 sentences (two per half)."""
    if len(means) < 4:
        return {"z_probe_r2": math.nan, "cluster_probe_acc": math.nan, "cluster_probe_mi": math.nan}
    return {"z_probe_r2": z_probe_r2(means, z), **cluster_probe(means, component)}

"""Posterior families as ``torch.distributions`` objects, and the heads that build them.

Every family returns a :class:`LatentDistribution` over ``z`` of shape ``[B, d]`` with:

* ``rsample_with_log_prob(shape)`` -> :class:`LatentSample` (``z``, ``log q(z|x)`` and the point
  ``base`` in the x-independent frame used for cross-sentence densities);
* ``base_log_prob(base)``: log-density of ``base`` under every sentence's distribution, so that
  the MI estimators can evaluate ``log q(z_i | x_j)`` for all pairs.  For families without a
  global bijection (Gaussian, vMF) ``base`` is ``z`` itself; for global planar flows it is ``z_0``
  and the Jacobian term, identical for every ``x_j``, cancels in MI;
* ``regularizer(prior, sample)``: the per-sentence training term (analytic KL when available,
  otherwise the single-sample Monte-Carlo ``log q - log p``), shape ``[B]``;
* ``coupled_code()``: the deterministic code of the coupled twin (Gaussian: the mean), ``[B, d]``;
* ``mean``: used by the active-units metric.

Metrics and the trainer only talk to this interface, so adding a family is adding a head here.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence, register_kl

from .stacked import make_linear


class LatentSample(NamedTuple):
    z: Tensor  # [*S, B, d] code fed to the decoder
    log_q: Tensor  # [*S, B] log q(z | x), nats
    base: Tensor  # [*S, B, d] point in the x-independent frame (z for most families)


class LatentDistribution(Distribution):
    """Interface every posterior family implements (see module docstring)."""

    arg_constraints: dict = {}
    has_rsample = True

    def rsample_with_log_prob(self, sample_shape: torch.Size = torch.Size()) -> LatentSample:
        """Default for families without a global bijection: ``base`` is ``z`` itself."""
        z = self.rsample(sample_shape)
        return LatentSample(z, self.log_prob(z), z)

    def base_log_prob(self, base: Tensor) -> Tensor:
        """``[*S, B, d] -> [*S, B]``; by default the family's own density."""
        return self.log_prob(base)

    def regularizer(self, prior: Distribution, sample: LatentSample) -> Tensor:
        """Per-sentence KL-like training term, ``[B]``: the analytic KL when one is registered
        for (family, prior) with ``register_kl``, else the Monte-Carlo estimate from ``sample``."""
        try:
            return kl_divergence(self, prior)
        except NotImplementedError:
            return sample.log_q - prior.log_prob(sample.z)

    def coupled_code(self) -> Tensor:
        raise NotImplementedError


class DiagonalGaussian(LatentDistribution):
    """N(loc, diag(scale^2)) over ``[B, d]``; the paper's default posterior."""

    def __init__(self, loc: Tensor, scale: Tensor):
        self.loc, self.scale = loc, scale
        # No argument validation: it is a host sync per call on a GPU; a NaN here becomes a NaN
        # loss, which the training loop reports as divergence.
        self._normal = Independent(Normal(loc, scale, validate_args=False), 1)
        super().__init__(batch_shape=loc.shape[:-1], event_shape=loc.shape[-1:], validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self.loc

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self._normal.rsample(sample_shape)

    def sample_from_noise(self, noise: Tensor) -> LatentSample:
        """The reparameterised sample loc + noise * scale of a given standard normal draw ``noise``
        (shaped as ``loc``): what ``rsample_with_log_prob()`` computes from its own draw."""
        z = self.loc + noise * self.scale
        return LatentSample(z, self.log_prob(z), z)

    def log_prob(self, value: Tensor) -> Tensor:
        return self._normal.log_prob(value)

    def kl_per_dim(self) -> Tensor:
        """Analytic KL(q || N(0, I)) per dimension, ``[B, d]`` (free bits clamp this)."""
        return 0.5 * (self.loc.pow(2) + self.scale.pow(2) - 1.0) - self.scale.log()

    def coupled_code(self) -> Tensor:
        return self.loc


class GaussianHead(nn.Module):
    """e ``[B, in_dim]`` -> DiagonalGaussian: one Linear for the mean, one for the log-std.

    ``batch_norm=True`` adds BatchNorm1d after both Linears (the authors' NF/WAE-NF models).
    With ``members`` K (no batch norm): K such heads stacked (``modules.stacked``),
    e [K, B, in_dim] -> a DiagonalGaussian over [K, B, d], under the same parameter names.
    """

    family = "gaussian"

    def __init__(self, in_dim: int, latent_dim: int, batch_norm: bool = False, members: int | None = None):
        super().__init__()
        if batch_norm and members is not None:
            raise ValueError("a member-stacked Gaussian head has no batch norm")
        self.latent_dim = latent_dim
        self.mean = make_linear(in_dim, latent_dim, members)
        self.log_std = make_linear(in_dim, latent_dim, members)
        self.mean_norm = nn.BatchNorm1d(latent_dim) if batch_norm else nn.Identity()
        self.log_std_norm = nn.BatchNorm1d(latent_dim) if batch_norm else nn.Identity()

    def forward(self, e: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.mean_norm(self.mean(e)), self.log_std_norm(self.log_std(e)).exp())

    def prior(self, device: torch.device | str) -> Distribution:
        zeros = torch.zeros(self.latent_dim, device=device)
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1)


@register_kl(DiagonalGaussian, Independent)
def _kl_gaussian_normal(q: DiagonalGaussian, p: Independent) -> Tensor:
    """Analytic KL to a diagonal Normal prior, summed over dimensions, ``[B]``."""
    if not isinstance(p.base_dist, Normal):
        raise NotImplementedError
    return kl_divergence(q._normal, p)


@register_kl(DiagonalGaussian, DiagonalGaussian)
def _kl_gaussian_gaussian(q: DiagonalGaussian, p: DiagonalGaussian) -> Tensor:
    """Analytic KL to a per-sentence Gaussian (a conditional prior p(z|y)), summed over dims, ``[B]``."""
    return kl_divergence(q._normal, p._normal)


def log_sphere_area(d: int) -> float:
    """log |S^{d-1}| = log 2 + (d/2) log pi - lgamma(d/2)."""
    return math.log(2.0) + 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d)

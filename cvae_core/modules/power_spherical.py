"""Power Spherical posterior on S^{d-1} (De Cao & Aziz 2020): a vMF stand-in without Bessel
functions or rejection sampling, hence without the vMF's NaN failure modes.

Density p(z) = C(kappa, d) (1 + mu.z)^kappa with alpha = (d-1)/2 + kappa, beta = (d-1)/2 and
C^{-1} = 2^{alpha+beta} pi^beta Gamma(alpha) / Gamma(alpha+beta). The marginal of
t = (1 + mu.z)/2 is Beta(alpha, beta), so a draw is a Beta variate plus a uniform tangent
direction, reflected onto mu. All log-densities are in nats w.r.t. the surface measure.

Public names: :class:`PowerSpherical`, :class:`PowerSphericalHead` (family ``"power_spherical"``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Beta, constraints, register_kl

from cvae_core.modules.posteriors import LatentDistribution, log_sphere_area
from cvae_core.modules.sphere import HypersphericalUniform, SphericalHead, householder_from_e1, uniform_on_sphere


class PowerSpherical(LatentDistribution):
    """PowerSpherical(mu, kappa): ``loc`` mu ``[B, d]`` unit norm, ``concentration`` kappa ``[B, 1]`` (> 0).

    Computations run in float64 inside; outputs have ``loc``'s dtype.
    """

    support = constraints.real_vector

    def __init__(self, loc: Tensor, concentration: Tensor):
        if concentration.dim() == loc.dim() - 1:
            concentration = concentration.unsqueeze(-1)
        self.loc, self.concentration = loc, concentration
        self.d = loc.shape[-1]
        super().__init__(batch_shape=loc.shape[:-1], event_shape=loc.shape[-1:], validate_args=False)

    @property
    def scale(self) -> Tensor:
        return self.concentration

    def _alpha_beta64(self) -> tuple[Tensor, float]:
        kappa = self.concentration.to(torch.float64).squeeze(-1)  # [B]
        beta = (self.d - 1) / 2.0
        return beta + kappa, beta

    def _log_normalizer64(self) -> Tensor:
        """log C(kappa, d), ``[B]`` float64."""
        alpha, beta = self._alpha_beta64()
        return -(
            (alpha + beta) * math.log(2.0)
            + beta * math.log(math.pi)
            + torch.lgamma(alpha)
            - torch.lgamma(alpha + beta)
        )

    def mean_resultant_length(self) -> Tensor:
        """E[mu.z] = 2 alpha/(alpha+beta) - 1 = kappa / (d - 1 + kappa), ``[B]``."""
        kappa = self.concentration.squeeze(-1)
        return kappa / (self.d - 1 + kappa)

    @property
    def mean(self) -> Tensor:
        """E[z] = kappa/(d-1+kappa) mu, ``[B, d]``."""
        return self.mean_resultant_length().unsqueeze(-1) * self.loc

    def log_prob(self, value: Tensor) -> Tensor:
        """``value [*S, B, d]`` on the sphere -> ``[*S, B]`` nats (-inf at z = -mu)."""
        dot = (value.to(torch.float64) * self.loc.to(torch.float64)).sum(-1)
        kappa = self.concentration.to(torch.float64).squeeze(-1)
        return (self._log_normalizer64() + kappa * torch.log1p(dot)).to(value.dtype)

    def _entropy64(self) -> Tensor:
        # E[log(1 + mu.z)] = log 2 + E[log t] = log 2 + psi(alpha) - psi(alpha + beta)
        alpha, beta = self._alpha_beta64()
        kappa = alpha - beta
        expected_log1p_dot = math.log(2.0) + torch.digamma(alpha) - torch.digamma(alpha + beta)
        return -(self._log_normalizer64() + kappa * expected_log1p_dot)

    def entropy(self) -> Tensor:
        """``[B]`` nats."""
        return self._entropy64().to(self.loc.dtype)

    def kl_to_uniform(self) -> Tensor:
        """KL(q || U(S^{d-1})) = -H + log|S^{d-1}|, ``[B]`` nats."""
        return (log_sphere_area(self.d) - self._entropy64()).to(self.loc.dtype)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        """Reparameterised draw ``[*sample_shape, B, d]``: Beta marginal (implicit-gradient rsample)
        + uniform tangent direction + Householder e1 -> mu. No rejection loop."""
        shape = torch.Size(sample_shape)
        alpha, beta = self._alpha_beta64()
        t = Beta(alpha, torch.full_like(alpha, beta)).rsample(shape).unsqueeze(-1)  # [*S, B, 1]
        w = 2.0 * t - 1.0
        # 1 - w^2 = 4 t (1 - t) avoids the cancellation of 1 - w*w when w -> 1
        tangent = 2.0 * torch.sqrt((t * (1.0 - t)).clamp_min(1e-30))
        v = uniform_on_sphere((*shape, *self.batch_shape), self.d - 1, torch.float64, self.loc.device)
        x = torch.cat([w, tangent * v], dim=-1)
        return householder_from_e1(x, self.loc.to(torch.float64)).to(self.loc.dtype)

    def coupled_code(self) -> Tensor:
        """Mean direction mu, ``[B, d]``."""
        return self.loc


@register_kl(PowerSpherical, HypersphericalUniform)
def _kl_power_spherical_uniform(q: PowerSpherical, p: HypersphericalUniform) -> Tensor:
    if q.d != p.d:
        raise ValueError(
            f"KL between PowerSpherical on S^{q.d - 1} and uniform on S^{p.d - 1}: dimensions differ"
        )
    return q.kl_to_uniform()


class PowerSphericalHead(SphericalHead):
    """The spherical head (mu, kappa >= 1, uniform prior) with a PowerSpherical posterior."""

    family, label = "power_spherical", "Power Spherical"

    def distribution(self, mu: Tensor, kappa: Tensor) -> PowerSpherical:
        return PowerSpherical(mu, kappa)

"""Planar normalising-flow posterior (Rezende & Mohamed 2015), as in the authors' VAE-NF.

q0 = diagonal Gaussian from a Linear+BatchNorm head; K planar maps with GLOBAL parameters
(shared by every sentence, not amortised) push z0 to zK. log q(zK|x) = log q0(z0|x) - sum log|det|.

Public names: :class:`PlanarFlow`, :class:`PlanarFlowPosterior`, :class:`PlanarFlowHead`
(family ``"nf"``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, constraints

from cvae_core.modules.posteriors import DiagonalGaussian, GaussianHead, LatentDistribution, LatentSample


class PlanarFlow(nn.Module):
    """f(z) = z + u_hat tanh(w.z + b) with global u, w in R^{1 x d}, b in R (init U(-0.01, 0.01))."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.u = nn.Parameter(torch.empty(1, latent_dim).uniform_(-0.01, 0.01))
        self.w = nn.Parameter(torch.empty(1, latent_dim).uniform_(-0.01, 0.01))
        self.b = nn.Parameter(torch.empty(1).uniform_(-0.01, 0.01))

    def u_hat(self) -> Tensor:
        """u + (m(w.u) - w.u) w/||w||^2 with m(a) = -1 + softplus(a), so that w.u_hat > -1
        and f is invertible. ``[d]``."""
        u, w = self.u.view(-1), self.w.view(-1)
        wu = w @ u
        return u + (-1.0 + F.softplus(wu) - wu) * w / (w @ w)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z [..., d]`` -> (f(z) ``[..., d]``, log|det df/dz| ``[...]``).

        log|det| = ln(|1 + u_hat.psi| + 1e-8), psi = (1 - tanh^2(w.z + b)) w; the 1e-8 is the
        authors' guard against log(0).
        """
        w, u_hat = self.w.view(-1), self.u_hat()
        h = torch.tanh(z @ w + self.b[0]).unsqueeze(-1)  # [..., 1]
        f = z + u_hat * h
        psi_dot_u = (1.0 - h.squeeze(-1) ** 2) * (w @ u_hat)  # u_hat.psi, [...]
        log_det = torch.log((1.0 + psi_dot_u).abs() + 1e-8)
        return f, log_det


class PlanarFlowPosterior(LatentDistribution):
    """zK = f_K o ... o f_1(z0), z0 ~ q0 = DiagonalGaussian ``[B, d]``.

    MI and importance sampling need log q(z_i|x_j) for every pair. Because the flows are global
    (identical for every sentence), the point in the x-independent frame is z0 and
    log q(zK|x_j) = log q0(z0|x_j) - sum log|det|(z0), where the Jacobian term does not depend on j
    and cancels in MI's log q(z|x_i) - log q(z) = log q0(z0|x_i) - log mean_j q0(z0|x_j);
    so ``base_log_prob(z0)`` returns only log q0(z0|x_j).
    """

    support = constraints.real_vector

    def __init__(self, base: DiagonalGaussian, flows: Sequence[PlanarFlow]):
        self.base, self.flows = base, flows
        super().__init__(batch_shape=base.batch_shape, event_shape=base.event_shape, validate_args=False)

    def _push(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Apply all flows: ``[..., d]`` -> (zK ``[..., d]``, sum log|det| ``[...]``)."""
        total = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for flow in self.flows:
            z, log_det = flow(z)
            total = total + log_det
        return z, total

    def rsample_with_log_prob(self, sample_shape=torch.Size()) -> LatentSample:
        """z0 ~ q0, zK = flows(z0); log_q = log q0(z0) - sum log|det| ``[*S, B]``; base = z0."""
        z0 = self.base.rsample(sample_shape)
        z_k, sum_log_det = self._push(z0)
        return LatentSample(z_k, self.base.log_prob(z0) - sum_log_det, z0)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.rsample_with_log_prob(sample_shape).z

    def base_log_prob(self, base: Tensor) -> Tensor:
        """log q0(z0|x) for z0 ``[*S, B, d]`` -> ``[*S, B]`` (Jacobian omitted: see class docstring)."""
        return self.base.log_prob(base)

    def log_prob(self, value: Tensor) -> Tensor:
        raise NotImplementedError(
            "PlanarFlowPosterior.log_prob(zK) needs the inverse of the planar flows, which has no "
            "closed form; use rsample_with_log_prob() (log q of its own samples) or base_log_prob(z0)."
        )

    def coupled_code(self) -> Tensor:
        """Flows applied to the base mean, ``[B, d]`` (deterministic)."""
        return self._push(self.base.loc)[0]

    @property
    def mean(self) -> Tensor:
        """Approximate E[zK], ``[B, d]``: the flows applied to q0's mean (same as ``coupled_code``).

        Exact only for affine flows; planar maps start near the identity (|u|, |w| <= 0.01) and
        are smooth, so this is the deterministic choice used by the active-units metric instead of
        a noisy Monte-Carlo average.
        """
        return self.coupled_code()


class PlanarFlowHead(nn.Module):
    """e ``[B, in_dim]`` -> PlanarFlowPosterior: Gaussian base (Linear + BatchNorm1d for mean and
    log-std) followed by ``n_flows`` global planar flows."""

    family = "nf"

    def __init__(self, in_dim: int, latent_dim: int, n_flows: int = 3):
        super().__init__()
        self.latent_dim = latent_dim
        self.base = GaussianHead(in_dim, latent_dim, batch_norm=True)
        self.flows = nn.ModuleList(PlanarFlow(latent_dim) for _ in range(n_flows))

    def forward(self, e: Tensor) -> PlanarFlowPosterior:
        return PlanarFlowPosterior(self.base(e), self.flows)

    def prior(self, device: torch.device | str) -> Distribution:
        zeros = torch.zeros(self.latent_dim, device=device)
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1)

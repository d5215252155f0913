"""von Mises-Fisher posterior on the unit sphere S^{d-1} (Davidson et al. 2018; the authors' s-vae port).

Public names: :class:`VonMisesFisher`, the posterior, a :class:`LatentDistribution`, and
:class:`VonMisesFisherHead`, the spherical head (``modules/sphere.py``) with it (family ``"vmf"``).
Its Bessel functions are in ``modules/bessel.py``. All log-densities are in nats with respect to
the surface measure of S^{d-1}.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Beta, constraints, register_kl

from cvae_core.modules.bessel import log_iv_and_ratio
from cvae_core.modules.posteriors import LatentDistribution, log_sphere_area
from cvae_core.modules.sphere import HypersphericalUniform, SphericalHead, householder_from_e1, uniform_on_sphere


class VonMisesFisher(LatentDistribution):
    """vMF(mu, kappa) on S^{d-1}: density C_d(kappa) exp(kappa mu.z).

    ``loc`` mu ``[B, d]`` unit norm, ``scale``/``concentration`` kappa ``[B, 1]`` (> 0).
    Heavy lifting (Bessel, sampler, KL) runs in float64; outputs have ``loc``'s dtype.

    ``wood_b``: ``"exact"`` (default) uses Wood's envelope parameter b in a cancellation-free form,
    so the sampler is exact for every kappa. ``"authors"`` reproduces the s-vae / Coupled-VAE blend
    towards b_app = (d-1)/(4 kappa) for kappa > 10; b_app is accurate only for kappa >> d, so with
    d = 32 the rejection envelope is invalid and samples are too diffuse for 10 < kappa < ~100
    (E[mu.z] about 0.13 below A_d(kappa) at kappa = 11; see tests/test_spherical.py).
    """

    support = constraints.real_vector
    _PROPOSALS_PER_ROUND = 4  # candidates drawn per pending element per rejection round

    def __init__(self, loc: Tensor, concentration: Tensor, wood_b: str = "exact"):
        if concentration.dim() == loc.dim() - 1:
            concentration = concentration.unsqueeze(-1)
        if wood_b not in ("exact", "authors"):
            raise ValueError(f"wood_b must be 'exact' or 'authors', got {wood_b!r}")
        self.loc, self.concentration, self.wood_b = loc, concentration, wood_b
        self.d = loc.shape[-1]
        super().__init__(batch_shape=loc.shape[:-1], event_shape=loc.shape[-1:], validate_args=False)

    @property
    def scale(self) -> Tensor:
        """Alias of ``concentration`` (the s-vae naming)."""
        return self.concentration

    # --- normaliser and moments (float64) -------------------------------------------------
    def _kappa64(self) -> Tensor:
        return self.concentration.to(torch.float64).squeeze(-1)  # [B]

    def _bessel64(self) -> tuple[Tensor, Tensor]:
        """(log I_{d/2-1}(kappa), A_d(kappa) = I_{d/2}/I_{d/2-1}) from one Bessel pass, ``[B]`` float64."""
        return log_iv_and_ratio(self.d / 2 - 1, self._kappa64())

    def _log_normalizer64(self, log_iv: Tensor | None = None) -> Tensor:
        """log C_d(kappa) = (d/2-1) ln k - (d/2) ln 2pi - ln I_{d/2-1}(k), ``[B]`` float64."""
        k, d = self._kappa64(), self.d
        if log_iv is None:
            log_iv = log_iv_and_ratio(d / 2 - 1, k)[0]
        return (d / 2 - 1) * torch.log(k) - (d / 2) * math.log(2 * math.pi) - log_iv

    def _mean_resultant64(self) -> Tensor:
        """A_d(kappa) = I_{d/2}(k) / I_{d/2-1}(k) = E[mu.z], ``[B]`` float64."""
        return self._bessel64()[1]

    def mean_resultant_length(self) -> Tensor:
        """E[mu.z] = A_d(kappa), ``[B]``."""
        return self._mean_resultant64().to(self.loc.dtype)

    @property
    def mean(self) -> Tensor:
        """E[z] = A_d(kappa) mu, ``[B, d]``."""
        return self.mean_resultant_length().unsqueeze(-1) * self.loc

    def log_prob(self, value: Tensor) -> Tensor:
        """``value [*S, B, d]`` on the sphere -> log q ``[*S, B]`` nats."""
        dot = (value.to(torch.float64) * self.loc.to(torch.float64)).sum(-1)
        return (self._kappa64() * dot + self._log_normalizer64()).to(value.dtype)

    def entropy(self) -> Tensor:
        """H = -kappa A_d(kappa) - log C_d(kappa), ``[B]`` nats."""
        log_iv, a_d = self._bessel64()
        return (-self._kappa64() * a_d - self._log_normalizer64(log_iv)).to(self.loc.dtype)

    def kl_to_uniform(self) -> Tensor:
        """KL(q || U(S^{d-1})) = -H + log|S^{d-1}|, ``[B]`` nats (computed in float64)."""
        log_iv, a_d = self._bessel64()
        kl = self._kappa64() * a_d + self._log_normalizer64(log_iv) + log_sphere_area(self.d)
        return kl.to(self.loc.dtype)

    # --- sampling ---------------------------------------------------------------------------
    def _sample_w(self, shape: torch.Size) -> Tensor:
        """w = mu.z ``[*shape, B, 1]`` float64, reparameterised through kappa.

        d == 3 uses the exact inverse CDF; otherwise Wood's (1994) rejection sampler (with the
        authors' b blend if ``wood_b == "authors"``), vectorised: every pending element draws a
        few proposals per round until all are accepted. Acceptance uses detached (a, b, dd); the
        accepted Beta draw eps is then pushed through w(eps; b) with the live b, so the gradient
        is the s-vae "g_rep" term (the rejection-correction term is dropped, as in the authors'
        code; it biases d E[mu.z]/d kappa by about 1-3 % for d = 32).
        """
        k = self.concentration.to(torch.float64).expand(*shape, *self.concentration.shape)
        if self.d == 3:
            u = torch.rand_like(k).clamp(1e-12, 1.0 - 1e-12)
            # w = 1 + log(u + (1-u) e^{-2k}) / k, in log-space so e^{-2k} cannot underflow into log(0)
            return 1.0 + torch.logaddexp(torch.log(u), torch.log1p(-u) - 2.0 * k) / k

        m1 = self.d - 1.0
        c = torch.sqrt(4.0 * k * k + m1 * m1)
        if self.wood_b == "exact":
            # Wood's b = (c - 2k)/(d-1), rewritten as (d-1)/(c + 2k): identical, but free of the
            # cancellation for large k that the blend below was invented to avoid
            b = m1 / (c + 2.0 * k)
        else:
            # authors' (s-vae) blend to the Taylor form b_app between k = 10 and 11; b_app is only
            # accurate for k >> d, so for d = 32 the envelope is wrong and samples are biased
            b_true = (c - 2.0 * k) / m1
            b_app = m1 / (4.0 * k)
            s = (k - 10.0).clamp(0.0, 1.0)
            b = s * b_app + (1.0 - s) * b_true
        a = (m1 + 2.0 * k + c) / 4.0
        dd = 4.0 * a * b / (1.0 + b) - m1 * math.log(m1)

        flat_b, flat_a, flat_dd = (t.detach().reshape(-1) for t in (b, a, dd))
        n = flat_b.numel()
        eps = torch.zeros(n, dtype=torch.float64, device=k.device)
        pending = torch.ones(n, dtype=torch.bool, device=k.device)
        beta = Beta(
            torch.tensor(m1 / 2, dtype=torch.float64, device=k.device),
            torch.tensor(m1 / 2, dtype=torch.float64, device=k.device),
        )
        n_prop = self._PROPOSALS_PER_ROUND
        while bool(pending.any()):
            idx = pending.nonzero().squeeze(1)
            bb, aa, ddd = flat_b[idx, None], flat_a[idx, None], flat_dd[idx, None]
            e_ = beta.sample((idx.numel(), n_prop))
            u = torch.rand(idx.numel(), n_prop, dtype=torch.float64, device=k.device).clamp_min(1e-300)
            t = 2.0 * aa * bb / (1.0 - (1.0 - bb) * e_)
            accept = (m1 * torch.log(t) - t + ddd) > torch.log(u)  # [n_pending, n_prop]
            any_accept = accept.any(dim=1)
            first = accept.to(torch.uint8).argmax(dim=1)  # first accepted candidate
            chosen = e_.gather(1, first[:, None]).squeeze(1)
            done = idx[any_accept]
            eps[done] = chosen[any_accept]
            pending[done] = False
        eps = eps.reshape(b.shape)
        return (1.0 - (1.0 + b) * eps) / (1.0 - (1.0 - b) * eps)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        """Reparameterised draw ``[*sample_shape, B, d]`` (Wood + Householder)."""
        shape = torch.Size(sample_shape)
        w = self._sample_w(shape)  # [*S, B, 1] float64
        v = uniform_on_sphere((*shape, *self.batch_shape), self.d - 1, torch.float64, self.loc.device)
        # sqrt(max(1 - w^2, 1e-10)): the clamp keeps the sqrt gradient finite when w -> 1
        tangent = torch.sqrt((1.0 - w * w).clamp_min(1e-10))
        x = torch.cat([w, tangent * v], dim=-1)
        z = householder_from_e1(x, self.loc.to(torch.float64))
        return z.to(self.loc.dtype)

    # --- LatentDistribution interface ---------------------------------------------------------
    def coupled_code(self) -> Tensor:
        """Deterministic code of the coupled twin: the mean direction mu, ``[B, d]``."""
        return self.loc


@register_kl(VonMisesFisher, HypersphericalUniform)
def _kl_vmf_uniform(q: VonMisesFisher, p: HypersphericalUniform) -> Tensor:
    if q.d != p.d:
        raise ValueError(f"KL between vMF on S^{q.d - 1} and uniform on S^{p.d - 1}: dimensions differ")
    return q.kl_to_uniform()


class VonMisesFisherHead(SphericalHead):
    """The spherical head with a VonMisesFisher posterior; ``wood_b`` selects the sampler's
    envelope parameter (see :class:`VonMisesFisher`)."""

    family, label = "vmf", "vMF"

    def __init__(self, in_dim: int, latent_dim: int, wood_b: str = "exact"):
        super().__init__(in_dim, latent_dim)
        self.wood_b = wood_b

    def distribution(self, mu: Tensor, kappa: Tensor) -> VonMisesFisher:
        return VonMisesFisher(mu, kappa, wood_b=self.wood_b)

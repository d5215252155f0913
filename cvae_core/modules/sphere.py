"""What every posterior family on the unit sphere S^{d-1} shares (vMF, Power Spherical): uniform
points, the Householder map from e1 to the mean direction, the uniform prior and the amortised
(mu, kappa) head. Log-densities are in nats w.r.t. the surface measure of S^{d-1}."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from cvae_core.modules.posteriors import LatentDistribution, log_sphere_area




def uniform_on_sphere(shape: tuple[int, ...], d: int, dtype: torch.dtype, device) -> Tensor:
    """Uniform points on S^{d-1}, ``[*shape, d]`` (normalised standard Gaussians)."""
    g = torch.randn(*shape, d, dtype=dtype, device=device)
    return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def householder_from_e1(x: Tensor, loc: Tensor) -> Tensor:
    """Reflect ``x [*S, B, d]`` (built around e1) so that e1 maps to ``loc [B, d]`` (unit norm).

    Exact reflection with u = e1 - loc (the authors divide by ||u|| + 1e-5, which makes the map
    slightly non-orthogonal); when loc == e1 the identity is used, which is equally valid because
    the proposal is invariant under orthogonal maps that fix e1.
    """
    e1 = torch.zeros_like(loc)
    e1[..., 0] = 1.0
    u = e1 - loc
    norm_sq = (u * u).sum(-1, keepdim=True)
    tiny = 1e-20 if x.dtype == torch.float64 else 1e-12
    reflected = x - 2.0 * (x * u).sum(-1, keepdim=True) * u / norm_sq.clamp_min(tiny)
    return torch.where(norm_sq > tiny, reflected, x)




class HypersphericalUniform(Distribution):
    """Uniform distribution on S^{d-1} (event ``[d]``); log density -log|S^{d-1}| nats."""

    arg_constraints: dict = {}
    support = constraints.real_vector  # the sphere; not expressible as a torch constraint
    has_rsample = True

    def __init__(self, d: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.d = int(d)
        self.device = torch.device(device)
        self.dtype = dtype
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([self.d]), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        """``value [..., d]`` -> ``[...]``, constant -log|S^{d-1}|."""
        return torch.full(value.shape[:-1], -log_sphere_area(self.d), dtype=value.dtype, device=value.device)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        """``[*sample_shape, d]`` unit vectors (no parameters, so sample == rsample)."""
        return uniform_on_sphere(tuple(sample_shape), self.d, self.dtype, self.device)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        return self.rsample(sample_shape)

    def entropy(self) -> Tensor:
        return torch.tensor(log_sphere_area(self.d), dtype=self.dtype, device=self.device)


class SphericalHead(nn.Module):
    """e ``[B, in_dim]`` -> a distribution on S^{d-1}: mu = normalize(Linear(e)),
    kappa = softplus(Linear(e)) + 1, one amortised concentration per example (the authors' s-vae
    head), with the uniform prior.  A family subclasses it with its ``family`` name and
    :meth:`distribution`."""

    family = ""
    label = ""  # the family's name in messages

    def __init__(self, in_dim: int, latent_dim: int):
        super().__init__()
        if latent_dim < 2:
            raise ValueError(f"{self.label} needs latent_dim >= 2 (sphere S^{{d-1}}), got {latent_dim}")
        self.latent_dim = latent_dim
        self.loc = nn.Linear(in_dim, latent_dim)
        self.concentration = nn.Linear(in_dim, 1)

    def distribution(self, mu: Tensor, kappa: Tensor) -> LatentDistribution:
        raise NotImplementedError

    def forward(self, e: Tensor) -> LatentDistribution:
        mu = F.normalize(self.loc(e), dim=-1)
        kappa = F.softplus(self.concentration(e)) + 1.0
        return self.distribution(mu, kappa)

    def prior(self, device: torch.device | str) -> Distribution:
        return HypersphericalUniform(self.latent_dim, device)

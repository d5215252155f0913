"""Helpers shared by the tests of the distributions on the unit sphere (vMF, Power Spherical)."""
import math

import torch
import torch.nn.functional as F


def unit_vectors(b: int, d: int, seed: int = 0) -> torch.Tensor:
    """b seeded random unit vectors in R^d (float64)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)


def integral_over_s2(distribution, n_theta: int = 800, n_phi: int = 1600) -> float:
    """Midpoint quadrature of exp(log_prob) over the sphere S^2 in (theta, phi) coordinates."""
    theta = (torch.arange(n_theta, dtype=torch.float64) + 0.5) * math.pi / n_theta
    phi = (torch.arange(n_phi, dtype=torch.float64) + 0.5) * 2 * math.pi / n_phi
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    z = torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], -1).reshape(-1, 1, 3)
    density = distribution.log_prob(z).exp().reshape(n_theta, n_phi)
    return ((density * th.sin()).sum() * (math.pi / n_theta) * (2 * math.pi / n_phi)).item()

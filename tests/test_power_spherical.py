"""Power Spherical posterior: moments, KL, normalisation, gradients, head interface."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvae_core.modules.posteriors import log_sphere_area
from cvae_core.modules.power_spherical import PowerSpherical, PowerSphericalHead
from cvae_core.modules.vmf import HypersphericalUniform
from sphere import integral_over_s2, unit_vectors

torch.set_num_threads(1)


@pytest.mark.parametrize("d", [3, 32])
def test_sample_mean_resultant_length(d):
    torch.manual_seed(0)
    kappas = [1.0, 10.0, 100.0, 1000.0]
    n = 20000
    mu = unit_vectors(len(kappas), d, seed=d)
    q = PowerSpherical(mu, torch.tensor(kappas, dtype=torch.float64)[:, None])
    z = q.rsample((n,))
    assert z.shape == (n, len(kappas), d)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(n, len(kappas), dtype=torch.float64))
    dot = (z * mu).sum(-1)
    expected = np.array([k / (d - 1 + k) for k in kappas])  # 2 alpha/(alpha+beta) - 1
    se = dot.std(0).numpy() / math.sqrt(n)
    assert np.all(np.abs(dot.mean(0).numpy() - expected) < 4 * se)
    np.testing.assert_allclose(q.mean_resultant_length().numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(q.mean, q.mean_resultant_length()[:, None] * mu)


@pytest.mark.parametrize("d", [3, 32])
def test_analytic_kl_matches_monte_carlo(d):
    torch.manual_seed(1)
    kappas = torch.tensor([[1.0], [10.0], [100.0], [1000.0]], dtype=torch.float64)
    q = PowerSpherical(unit_vectors(4, d, seed=2), kappas)
    prior = HypersphericalUniform(d, "cpu", dtype=torch.float64)
    s = q.rsample_with_log_prob((20000,))
    mc = s.log_q - prior.log_prob(s.z)
    analytic = torch.distributions.kl_divergence(q, prior)
    assert analytic.shape == (4,)
    se = mc.std(0) / math.sqrt(mc.shape[0])
    assert torch.all((mc.mean(0) - analytic).abs() < 4 * se)
    torch.testing.assert_close(q.regularizer(prior, s), analytic)
    torch.testing.assert_close(q.entropy(), log_sphere_area(d) - analytic)
    assert torch.all(analytic > 0) and torch.all(analytic[1:] > analytic[:-1])


@pytest.mark.parametrize("kappa", [0.5, 5.0, 50.0])
def test_density_integrates_to_one_on_s2(kappa):
    mu = F.normalize(torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64), dim=-1)  # off the grid axes
    q = PowerSpherical(mu, torch.tensor([[kappa]], dtype=torch.float64))
    assert integral_over_s2(q) == pytest.approx(1.0, abs=1e-4)


def test_gradients_finite_over_kappa_range():
    torch.manual_seed(3)
    d = 32
    kappas = torch.logspace(0, 4, 13)[:, None].requires_grad_(True)
    raw = torch.randn(13, d, requires_grad=True)
    target = F.normalize(torch.randn(13, d), dim=-1)
    q = PowerSpherical(F.normalize(raw, dim=-1), kappas)
    z = q.rsample((4,))
    loss = (z * target).sum() + q.kl_to_uniform().sum() + q.log_prob(z.detach()).sum()
    g_raw, g_kappa = torch.autograd.grad(loss, (raw, kappas))
    assert torch.isfinite(g_raw).all() and torch.isfinite(g_kappa).all()
    assert (g_raw.abs().sum(-1) > 0).all() and (g_kappa != 0).all()


def test_reparameterised_gradient_of_mean_resultant_is_unbiased():
    # d/dk E[mu.z] = (d-1)/(d-1+k)^2; the Beta rsample has implicit (unbiased) gradients
    torch.manual_seed(4)
    d, k0 = 32, 20.0
    n = 20000
    # one batch row per draw, so a single backward gives every per-draw gradient
    kappa = torch.full((n, 1), k0, dtype=torch.float64, requires_grad=True)
    mu = unit_vectors(1, d).expand(n, d)
    dot = (PowerSpherical(mu, kappa).rsample() * mu).sum(-1)  # [N]
    (per_sample,) = torch.autograd.grad(dot.sum(), kappa)
    expected = (d - 1) / (d - 1 + k0) ** 2
    se = per_sample.std() / math.sqrt(per_sample.numel())
    assert abs(per_sample.mean().item() - expected) < 4 * se.item()


def test_head_shapes_and_interface():
    head = PowerSphericalHead(16, 32)
    assert head.family == "power_spherical" and head.latent_dim == 32
    q = head(torch.randn(5, 16))
    assert (q.concentration >= 1).all() and q.concentration.shape == (5, 1)
    s = q.rsample_with_log_prob((3,))
    assert s.z.shape == (3, 5, 32) and s.log_q.shape == (3, 5) and s.z.dtype == torch.float32
    torch.testing.assert_close(q.base_log_prob(s.base), s.log_q)
    assert torch.isfinite(s.log_q).all()
    assert q.regularizer(head.prior("cpu"), s).shape == (5,)
    assert q.coupled_code() is q.loc

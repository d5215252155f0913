"""The posterior families on the unit sphere, von Mises-Fisher and Power Spherical: the properties
both must have (sampler moments, KL, normalisation, gradients, the shared head), checked for each
family with its own settings, then what only one of them has (vMF's Bessel functions and Wood
sampler, Power Spherical's Beta reparameterisation)."""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import ive

from cvae_core.modules.posteriors import LatentSample, log_sphere_area
from cvae_core.modules.power_spherical import PowerSpherical, PowerSphericalHead
from cvae_core.modules.bessel import bessel_iv_ratio, log_bessel_iv
from cvae_core.modules.sphere import HypersphericalUniform, SphericalHead
from cvae_core.modules.vmf import VonMisesFisher, VonMisesFisherHead
from sphere import integral_over_s2, unit_vectors

torch.set_num_threads(1)


@dataclass(frozen=True)
class Family:
    name: str
    distribution: type
    head: type
    mean_resultant_length: Callable[[int, np.ndarray], np.ndarray]  # E[mu.z] for (d, kappas)
    closed_form_rtol: float  # the module's E[mu.z] against the reference above
    kl_slack: float  # nats allowed beyond 4 standard errors in the KL check
    seeds: dict  # each test's seeds, as the family's own test module had them

    def __repr__(self) -> str:
        return self.name


VMF = Family("vmf", VonMisesFisher, VonMisesFisherHead,
             lambda d, k: ive(d / 2, k) / ive(d / 2 - 1, k), 1e-10, 1e-9,
             {"mean": 1, "kl": (3, 4), "gradients": 4})
POWER_SPHERICAL = Family("power_spherical", PowerSpherical, PowerSphericalHead,
                         lambda d, k: k / (d - 1 + k), 1e-12, 0.0,  # 2 alpha/(alpha+beta) - 1
                         {"mean": 0, "kl": (1, 2), "gradients": 3})
FAMILIES = [VMF, POWER_SPHERICAL]

MEAN_CASES = [
    (VMF, 32, [1.0, 10.0, 12.0, 30.0, 100.0, 1000.0]), (VMF, 3, [0.5, 1.0, 10.0, 100.0]),
    (VMF, 5, [1.0, 10.5, 30.0]),
    (POWER_SPHERICAL, 3, [1.0, 10.0, 100.0, 1000.0]), (POWER_SPHERICAL, 32, [1.0, 10.0, 100.0, 1000.0]),
]


# ---------------------------------------------------------------------------------------------
# Both families

@pytest.mark.parametrize("family,d,kappas", MEAN_CASES)
def test_sample_mean_resultant_length(family, d, kappas):
    torch.manual_seed(family.seeds["mean"])
    n = 20000
    mu = unit_vectors(len(kappas), d, seed=d)
    q = family.distribution(mu, torch.tensor(kappas, dtype=torch.float64)[:, None])
    z = q.rsample((n,))
    assert z.shape == (n, len(kappas), d)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(n, len(kappas), dtype=torch.float64))
    dot = (z * mu).sum(-1)
    expected = family.mean_resultant_length(d, np.array(kappas))
    se = dot.std(0).numpy() / math.sqrt(n)
    err = np.abs(dot.mean(0).numpy() - expected)
    assert np.all(err < 4 * se), (err, se)
    # the closed form the module uses for the mean agrees with the reference too
    np.testing.assert_allclose(q.mean_resultant_length().numpy(), expected, rtol=family.closed_form_rtol)
    torch.testing.assert_close(q.mean, q.mean_resultant_length()[:, None] * mu)


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_tangent_direction_is_uniform(family):
    # the component orthogonal to mu must average to zero (no preferred direction)
    torch.manual_seed(2)
    mu = unit_vectors(1, 8, seed=3)
    z = family.distribution(mu, torch.tensor([[5.0]], dtype=torch.float64)).rsample((20000,))[:, 0]
    perp = z - (z @ mu[0])[:, None] * mu[0]
    se = perp.std(0) / math.sqrt(z.shape[0])
    assert torch.all(perp.mean(0).abs() < 4.5 * se)


@pytest.mark.parametrize("d", [3, 32])
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_analytic_kl_matches_monte_carlo(family, d):
    seed, mu_seed = family.seeds["kl"]
    torch.manual_seed(seed)
    kappas = torch.tensor([[1.0], [10.0], [100.0], [1000.0]], dtype=torch.float64)
    q = family.distribution(unit_vectors(4, d, seed=mu_seed), kappas)
    prior = HypersphericalUniform(d, "cpu", dtype=torch.float64)
    sample = q.rsample_with_log_prob((20000,))
    mc = sample.log_q - prior.log_prob(sample.z)  # [N, B]
    analytic = torch.distributions.kl_divergence(q, prior)
    assert analytic.shape == (4,)
    se = mc.std(0) / math.sqrt(mc.shape[0])
    assert torch.all((mc.mean(0) - analytic).abs() < 4 * se + family.kl_slack), (mc.mean(0), analytic, se)
    torch.testing.assert_close(q.regularizer(prior, sample), analytic)
    torch.testing.assert_close(q.entropy(), log_sphere_area(d) - analytic)
    assert torch.all(analytic > 0) and torch.all(analytic[1:] > analytic[:-1])  # rises with kappa


@pytest.mark.parametrize("kappa", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_density_integrates_to_one_on_s2(family, kappa):
    mu = F.normalize(torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64), dim=-1)  # off the grid axes
    q = family.distribution(mu, torch.tensor([[kappa]], dtype=torch.float64))
    assert integral_over_s2(q) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_gradients_finite_over_kappa_range(family):
    torch.manual_seed(family.seeds["gradients"])
    d = 32
    kappas = torch.logspace(0, 4, 13, dtype=torch.float32)[:, None].requires_grad_(True)
    raw = torch.randn(13, d, requires_grad=True)
    target = F.normalize(torch.randn(13, d), dim=-1)

    def dist():
        return family.distribution(F.normalize(raw, dim=-1), kappas)

    z = dist().rsample((4,))
    g_raw, g_kappa = torch.autograd.grad((z * target).sum(), (raw, kappas))
    assert torch.isfinite(g_raw).all() and torch.isfinite(g_kappa).all()
    assert (g_raw.abs().sum(-1) > 0).all()
    assert (g_kappa != 0).all()  # reparameterised through the concentration

    z, q = z.detach(), dist()
    kl = q.regularizer(HypersphericalUniform(d), LatentSample(z, q.log_prob(z), z))
    (g_kl,) = torch.autograd.grad(kl.sum(), kappas)
    assert torch.isfinite(kl).all() and torch.isfinite(g_kl).all()
    assert (g_kl > 0).all()  # KL to uniform increases with concentration

    lp = dist().log_prob(z)
    g_raw, g_kappa = torch.autograd.grad(lp.sum(), (raw, kappas))
    assert torch.isfinite(g_raw).all() and torch.isfinite(g_kappa).all()

    # all three terms in one loss, as a training step sees them
    q = dist()
    z = q.rsample((4,))
    loss = (z * target).sum() + q.kl_to_uniform().sum() + q.log_prob(z.detach()).sum()
    g_raw, g_kappa = torch.autograd.grad(loss, (raw, kappas))
    assert torch.isfinite(g_raw).all() and torch.isfinite(g_kappa).all()
    assert (g_raw.abs().sum(-1) > 0).all() and (g_kappa != 0).all()


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_head_shapes_and_interface(family):
    head = family.head(16, 32)
    assert isinstance(head, SphericalHead)  # one head for both families
    assert head.family == family.name and head.latent_dim == 32
    q = head(torch.randn(5, 16))
    assert isinstance(q, family.distribution)
    assert q.loc.shape == (5, 32) and q.concentration.shape == (5, 1)
    assert (q.concentration >= 1).all()
    torch.testing.assert_close(q.loc.norm(dim=-1), torch.ones(5))
    s = q.rsample_with_log_prob((3,))
    assert s.z.shape == (3, 5, 32) and s.log_q.shape == (3, 5)
    assert s.base is s.z
    torch.testing.assert_close(q.base_log_prob(s.base), s.log_q)
    assert torch.isfinite(s.log_q).all()
    assert q.regularizer(head.prior("cpu"), s).shape == (5,)
    assert q.regularizer(head.prior("cpu"), q.rsample_with_log_prob()).shape == (5,)
    assert q.coupled_code() is q.loc
    assert s.z.dtype == torch.float32 and s.log_q.dtype == torch.float32
    with pytest.raises(ValueError, match=r"needs latent_dim >= 2 .*got 1"):
        family.head(16, 1)


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_short_training_run_has_no_nan(family):
    # a tiny encoder + spherical head fitting 64 unit targets: rsample + analytic KL, 300 Adam steps
    torch.manual_seed(5)
    x = F.normalize(torch.randn(64, 32), dim=-1)
    head = family.head(32, 32)
    opt = torch.optim.Adam(head.parameters(), lr=5e-2)
    prior = head.prior("cpu")
    losses, max_kappa = [], 0.0
    for _ in range(300):
        q = head(x)
        s = q.rsample_with_log_prob()
        loss = 1000 * (s.z - x).pow(2).sum(-1).mean() + q.regularizer(prior, s).mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in head.parameters())
        opt.step()
        losses.append(loss.item())
        max_kappa = max(max_kappa, q.concentration.max().item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    assert max_kappa > 20  # left the kappa < 10 regime


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_concentration_sweep_to_thousands_has_no_nan(family):
    # free mu and log-kappa with a heavy reconstruction weight drive kappa from 2 past 1e3
    torch.manual_seed(5)
    d = 32
    x = F.normalize(torch.randn(8, d), dim=-1)
    raw = torch.nn.Parameter(torch.randn(8, d))
    log_kappa = torch.nn.Parameter(torch.zeros(8, 1))
    opt = torch.optim.Adam([raw, log_kappa], lr=5e-2)
    prior = HypersphericalUniform(d)
    for _ in range(300):
        q = family.distribution(F.normalize(raw, dim=-1), log_kappa.exp() + 1)
        s = q.rsample_with_log_prob()
        loss = 1e5 * (s.z - x).pow(2).sum(-1).mean() + q.regularizer(prior, s).mean()
        opt.zero_grad()
        loss.backward()
        assert math.isfinite(loss.item())
        assert torch.isfinite(raw.grad).all() and torch.isfinite(log_kappa.grad).all()
        opt.step()
    assert log_kappa.exp().max().item() > 1000


def test_uniform_prior():
    prior = HypersphericalUniform(32, "cpu")
    z = prior.sample((1000,))
    assert z.shape == (1000, 32)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(1000))
    lp = prior.log_prob(torch.randn(7, 5, 32))
    assert lp.shape == (7, 5)
    assert torch.allclose(lp, torch.full((7, 5), -log_sphere_area(32)))
    # |S^2| = 4 pi
    assert HypersphericalUniform(3).log_prob(torch.zeros(3)).item() == pytest.approx(-math.log(4 * math.pi))


# ---------------------------------------------------------------------------------------------
# von Mises-Fisher only: Bessel functions in torch, the circle, the Wood sampler

KAPPAS = [1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 1000.0, 1e4]
ORDERS = [0.5, 1.0, 15.0, 16.0, 31.0]


def _scipy_log_iv(v, x):
    return np.log(ive(v, x)) + x


@pytest.mark.parametrize("v", ORDERS)
def test_log_bessel_matches_scipy(v):
    x = np.array(KAPPAS)
    ours = log_bessel_iv(v, torch.tensor(x, dtype=torch.float64)).numpy()
    rel = np.abs(ours - _scipy_log_iv(v, x)) / np.abs(_scipy_log_iv(v, x))
    assert rel.max() < 1e-10, rel


@pytest.mark.parametrize("v", ORDERS)
def test_log_bessel_gradient_is_ratio_plus_v_over_x(v):
    x = torch.tensor(KAPPAS, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_bessel_iv(v, x).sum(), x)
    xs = np.array(KAPPAS)
    expected = ive(v + 1, xs) / ive(v, xs) + v / xs
    assert np.all(np.isfinite(grad.numpy()))
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("v", ORDERS)
def test_bessel_ratio_matches_scipy(v):
    x = np.array(KAPPAS)
    ours = bessel_iv_ratio(v, torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, ive(v + 1, x) / ive(v, x), rtol=1e-10)


def test_log_bessel_float32_and_small_order_closed_form():
    # I_{1/2}(x) = sqrt(2/(pi x)) sinh(x): an independent check that needs no scipy
    x = torch.tensor([1.0, 3.0, 20.0], dtype=torch.float32)
    out = log_bessel_iv(0.5, x)
    assert out.dtype == torch.float32
    x64 = x.double()
    exact = 0.5 * torch.log(2 / (math.pi * x64)) + torch.log(torch.sinh(x64))
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=0)


def test_density_integrates_to_one_on_circle():
    # d = 2 exercises the order-0 Bessel function
    mu = F.normalize(torch.tensor([[0.6, -0.2]], dtype=torch.float64), dim=-1)
    q = VonMisesFisher(mu, torch.tensor([[7.0]], dtype=torch.float64))
    n = 4000
    ang = (torch.arange(n, dtype=torch.float64) + 0.5) * 2 * math.pi / n
    z = torch.stack([ang.cos(), ang.sin()], -1)[:, None]
    total = q.log_prob(z).exp().sum() * 2 * math.pi / n
    assert total.item() == pytest.approx(1.0, abs=1e-10)


def test_kl_gradient_matches_finite_difference():
    d = 32
    k = torch.tensor([[3.0], [40.0], [2000.0]], dtype=torch.float64, requires_grad=True)
    mu = unit_vectors(3, d)
    (g,) = torch.autograd.grad(VonMisesFisher(mu, k).kl_to_uniform().sum(), k)
    h = 1e-5 * k.detach()
    kl_plus = VonMisesFisher(mu, k.detach() + h).kl_to_uniform()
    kl_minus = VonMisesFisher(mu, k.detach() - h).kl_to_uniform()
    fd = (kl_plus - kl_minus) / (2 * h.squeeze(-1))
    torch.testing.assert_close(g.squeeze(-1), fd, rtol=1e-5, atol=0)


def test_authors_b_blend_is_biased_for_d32_so_exact_b_is_default():
    # Documents why wood_b="exact" is the default: with the s-vae blend towards
    # b_app = (d-1)/(4 kappa) the rejection envelope is invalid for d = 32 at kappa = 12.
    torch.manual_seed(6)
    d, kappa, n = 32, 12.0, 20000
    mu = unit_vectors(1, d, seed=7)
    expected = ive(d / 2, kappa) / ive(d / 2 - 1, kappa)
    for wood_b in ("exact", "authors"):
        q = VonMisesFisher(mu, torch.tensor([[kappa]], dtype=torch.float64), wood_b=wood_b)
        dot = (q.rsample((n,)) * mu).sum(-1)[:, 0]
        z_score = (dot.mean().item() - expected) / (dot.std().item() / math.sqrt(n))
        if wood_b == "exact":
            assert abs(z_score) < 4
        else:
            assert z_score < -20


# ---------------------------------------------------------------------------------------------
# Power Spherical only: the Beta reparameterisation

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

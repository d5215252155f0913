"""Planar flows: log|det| vs autograd Jacobian, invertibility constraint, posterior bookkeeping."""
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from cvae_core.modules.flows import PlanarFlow, PlanarFlowHead, PlanarFlowPosterior
from cvae_core.modules.posteriors import DiagonalGaussian

torch.set_num_threads(1)
D = 6


def _perturbed_flows(k, seed, scale=1.5):
    # move far from the +-0.01 init so tanh is non-linear and the u_hat correction is active
    torch.manual_seed(seed)
    flows = torch.nn.ModuleList(PlanarFlow(D) for _ in range(k))
    with torch.no_grad():
        for f in flows:
            f.u.normal_(0, scale)
            f.w.normal_(0, scale)
            f.b.normal_(0, 1)
    return flows.double()


def _log_abs_det_autograd(fn, z):
    return torch.linalg.slogdet(jacobian(fn, z))[1]


def test_single_flow_log_det_matches_autograd_jacobian():
    for seed in range(5):
        (flow,) = _perturbed_flows(1, seed)
        for z in torch.randn(4, D, dtype=torch.float64):
            f, log_det = flow(z)
            assert f.shape == (D,) and log_det.shape == ()
            expected = _log_abs_det_autograd(lambda x: flow(x)[0], z)
            torch.testing.assert_close(log_det, expected, rtol=1e-6, atol=1e-6)


def test_composition_log_det_matches_autograd_jacobian():
    flows = _perturbed_flows(3, seed=11)
    base = DiagonalGaussian(torch.zeros(1, D, dtype=torch.float64), torch.ones(1, D, dtype=torch.float64))
    post = PlanarFlowPosterior(base, flows)
    for z in torch.randn(5, D, dtype=torch.float64):
        z_k, total = post._push(z)
        expected = _log_abs_det_autograd(lambda x: post._push(x)[0], z)
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
        assert abs(total.item()) > 1e-3  # the flows are far from the identity here


def test_batched_forward_matches_per_row():
    (flow,) = _perturbed_flows(1, seed=3)
    z = torch.randn(2, 4, D, dtype=torch.float64)
    f, log_det = flow(z)
    assert f.shape == (2, 4, D) and log_det.shape == (2, 4)
    f0, ld0 = flow(z[1, 2])
    torch.testing.assert_close(f[1, 2], f0)
    torch.testing.assert_close(log_det[1, 2], ld0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_invertibility_constraint_holds_after_perturbation(dtype, tol):
    # w.u_hat = m(w.u) = -1 + softplus(w.u) > -1 exactly; tol only absorbs rounding
    torch.manual_seed(0)
    flow = PlanarFlow(D).to(dtype)
    worst = float("inf")
    for _ in range(200):
        with torch.no_grad():
            flow.u.normal_(0, 5)
            # w anti-aligned with u makes w.u strongly negative, the case the fix exists for
            flow.w.copy_(-flow.u * torch.rand(1, dtype=dtype) + 0.1 * torch.randn(1, D, dtype=dtype))
        raw = (flow.w @ flow.u.T).item()
        constrained = (flow.w.view(-1) @ flow.u_hat()).item()
        assert constrained >= -1.0 - tol
        m_raw = -1.0 + math.log1p(math.exp(raw)) if raw < 30 else raw - 1.0
        assert constrained == pytest.approx(m_raw, abs=tol * 100)
        worst = min(worst, constrained)
    assert worst < -0.99  # the bound was actually approached


def test_posterior_log_q_bookkeeping_and_interface():
    torch.manual_seed(1)
    flows = _perturbed_flows(3, seed=5)
    loc, scale = torch.randn(4, D, dtype=torch.float64), torch.rand(4, D, dtype=torch.float64) + 0.5
    base = DiagonalGaussian(loc, scale)
    post = PlanarFlowPosterior(base, flows)
    s = post.rsample_with_log_prob((7,))
    assert s.z.shape == (7, 4, D) and s.log_q.shape == (7, 4) and s.base.shape == (7, 4, D)
    z, sum_log_det = s.base, torch.zeros(7, 4, dtype=torch.float64)
    for f in flows:
        z, ld = f(z)
        sum_log_det = sum_log_det + ld
    torch.testing.assert_close(s.z, z)
    torch.testing.assert_close(s.log_q, base.log_prob(s.base) - sum_log_det)
    torch.testing.assert_close(post.base_log_prob(s.base), base.log_prob(s.base))
    assert sum_log_det.abs().min() > 1e-4  # the Jacobian term is non-trivial

    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)), 1
    )
    single = post.rsample_with_log_prob()
    torch.testing.assert_close(post.regularizer(prior, single), single.log_q - prior.log_prob(single.z))

    code1, code2 = post.coupled_code(), post.coupled_code()
    assert torch.equal(code1, code2)
    torch.testing.assert_close(code1, post._push(base.loc)[0])
    torch.testing.assert_close(post.mean, code1)
    try:
        post.log_prob(s.z)
    except NotImplementedError as err:
        assert "inverse" in str(err)
    else:
        raise AssertionError("log_prob(zK) should raise NotImplementedError")


def test_head_builds_batchnorm_base_and_global_flows():
    torch.manual_seed(2)
    head = PlanarFlowHead(10, D, n_flows=3)
    assert head.family == "nf" and head.latent_dim == D and len(head.flows) == 3
    assert isinstance(head.base.mean_norm, torch.nn.BatchNorm1d)
    for f in head.flows:  # non-amortised parameters, initialised in [-0.01, 0.01]
        for p in (f.u, f.w, f.b):
            assert p.abs().max() <= 0.01
    post = head(torch.randn(8, 10))
    s = post.rsample_with_log_prob()
    assert s.z.shape == (8, D) and s.log_q.shape == (8,)
    loss = post.regularizer(head.prior("cpu"), s).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.flows.parameters())
    prior_at_zero = head.prior("cpu").log_prob(torch.zeros(D)).item()
    assert prior_at_zero == pytest.approx(-0.5 * D * math.log(2 * math.pi))

"""The WAE's unbiased multi-scale IMQ MMD against a direct double loop, and its expectations."""
import pytest
import torch

from cvae_core.objectives import RQ_SCALES, imq_mmd


def double_loop_mmd(q, p, latent_dim):
    """The estimator of notes section 3 written out term by term, O(B^2) Python loops."""
    n = q.shape[0]
    total = 0.0
    for s in RQ_SCALES:
        c = 2.0 * latent_dim * s

        def k(x, y):
            return c / (c + float(((x - y) ** 2).sum()))

        same = sum(k(q[i], q[j]) + k(p[i], p[j]) for i in range(n) for j in range(n) if i != j)
        cross = sum(k(q[i], p[j]) for i in range(n) for j in range(n))
        total += same / (n * (n - 1)) - 2.0 * cross / n**2
    return total


def test_matches_the_double_loop():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    p = torch.randn(9, 5, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    assert imq_mmd(q, p, 5).item() == pytest.approx(double_loop_mmd(q, p, 5), rel=1e-12)
    # C is tied to the latent size d, not to the vectors' width
    assert imq_mmd(q, p, 32).item() == pytest.approx(double_loop_mmd(q, p, 32), rel=1e-12)


def test_zero_in_expectation_for_identical_distributions():
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([
        imq_mmd(torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator), 8)
        for _ in range(400)
    ])
    standard_error = draws.std() / len(draws) ** 0.5
    assert abs(draws.mean().item()) < 4 * standard_error.item()
    assert (draws < 0).any()  # unbiased, so single estimates fall on both sides of zero


def test_positive_for_shifted_distributions_and_growing_with_the_shift():
    generator = torch.Generator().manual_seed(0)
    values = []
    for shift in (0.5, 1.0, 2.0):
        draws = [imq_mmd(torch.randn(32, 8, generator=generator) + shift, torch.randn(32, 8, generator=generator), 8)
                 for _ in range(20)]
        values.append(torch.stack(draws).mean().item())
    assert 0 < values[0] < values[1] < values[2]


def test_gradient_is_finite_with_repeated_points_and_zero_for_one_sample():
    q = torch.zeros(4, 3, requires_grad=True)  # identical points: distance 0 on and off the diagonal
    imq_mmd(q, torch.randn(4, 3), 3).backward()
    assert torch.isfinite(q.grad).all()
    single = torch.randn(1, 3, requires_grad=True)
    value = imq_mmd(single, torch.randn(1, 3), 3)
    assert value.item() == 0.0  # no pairs: a last partial batch of one must not give NaN
    value.backward()
    assert torch.isfinite(single.grad).all()

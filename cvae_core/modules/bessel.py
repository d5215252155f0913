"""Modified Bessel functions of the first kind for the vMF posterior, in pure torch (float64
inside, differentiable in ``x``, any device), replacing the authors' scipy op:
:func:`log_bessel_iv` is ``log I_v(x)`` and :func:`bessel_iv_ratio` is ``I_{v+1}(x) / I_v(x)``.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch
from torch import Tensor

# Strategy (no scipy, no per-element loop): evaluate the Debye uniform asymptotic expansion
# (DLMF 10.41.3) at a shifted order v + n >= _DEBYE_MIN_ORDER, where ten correction terms are
# accurate to ~1e-14 relative for every x > 0, then walk down to v with the backward recurrence
# I_{m-1}/I_m = 2m/x + I_{m+1}/I_m, which is numerically stable because I_v is the minimal
# solution of the three-term recurrence in the increasing-order direction. Every step is a
# smooth torch op, so autograd gives d/dx log I_v(x) = I_{v+1}/I_v + v/x to the same accuracy.

_DEBYE_MIN_ORDER = 20.0
_DEBYE_TERMS = 10


def _debye_polynomials(n_terms: int) -> list[list[float]]:
    """Coefficients (lowest degree first) of Debye's u_k(t), k = 0..n_terms (DLMF 10.41.10).

    u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds, exact rationals.
    """
    polys = [[Fraction(1)]]
    for _ in range(n_terms):
        p = polys[-1]
        out = [Fraction(0)] * (len(p) + 3)
        for i, c in enumerate(p[1:], start=1):  # t^2 (1 - t^2) / 2 * i c t^{i-1}
            out[i + 1] += Fraction(i) * c / 2
            out[i + 3] -= Fraction(i) * c / 2
        for i, c in enumerate(p):  # (1/8) int_0^t (c s^i - 5 c s^{i+2}) ds
            out[i + 1] += c / (8 * (i + 1))
            out[i + 3] -= 5 * c / (8 * (i + 3))
        while out and out[-1] == 0:
            out.pop()
        polys.append(out)
    return [[float(c) for c in p] for p in polys]


_DEBYE_U = _debye_polynomials(_DEBYE_TERMS)
_DEBYE_DEGREE = 3 * _DEBYE_TERMS  # u_k has degree 3k


@functools.lru_cache(maxsize=64)
def _debye_series_coefficients(orders: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """For each order v: a_n with sum_k u_k(t) / v^k = sum_n a_n t^n (one polynomial in t, so the
    series costs a handful of tensor ops instead of one Horner chain per term)."""
    out = []
    for v in orders:
        a = [0.0] * (_DEBYE_DEGREE + 1)
        for k, coeffs in enumerate(_DEBYE_U):
            for n, c in enumerate(coeffs):
                a[n] += c / v**k
        out.append(tuple(a))
    return tuple(out)


def _debye_log_iv(orders: tuple[float, ...], x: Tensor) -> Tensor:
    """Debye expansion of log I_v(x) for large scalar orders v: x float64 > 0 ``[...]`` ->
    ``[..., len(orders)]``."""
    v = torch.tensor(orders, dtype=x.dtype, device=x.device)
    coeffs = torch.tensor(_debye_series_coefficients(orders), dtype=x.dtype, device=x.device)
    powers = torch.arange(_DEBYE_DEGREE + 1, dtype=x.dtype, device=x.device)
    z = x.unsqueeze(-1) / v
    s = torch.sqrt(1.0 + z * z)
    t = 1.0 / s
    eta = s + torch.log(z / (1.0 + s))
    series = (t.unsqueeze(-1) ** powers * coeffs).sum(-1)
    return v * eta - 0.5 * torch.log(2.0 * math.pi * v) - 0.5 * torch.log(s) + torch.log(series)


def log_iv_and_ratio(v: float, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log I_v(x), I_{v+1}(x)/I_v(x)) in float64 for a scalar order v >= 0 and x > 0."""
    if v < 0:
        raise ValueError(f"Bessel order v must be >= 0, got {v}")
    x = x.to(torch.float64)
    n_up = max(0, math.ceil(_DEBYE_MIN_ORDER - v))
    top = v + n_up
    log_i = _debye_log_iv((top, top + 1.0), x)
    log_i_top = log_i[..., 0]
    ratio = torch.exp(log_i[..., 1] - log_i_top)  # I_{top+1} / I_top
    log_ratio_sum = torch.zeros_like(x)
    for m in range(n_up, 0, -1):
        ratio = 1.0 / (2.0 * (v + m) / x + ratio)  # now I_{v+m} / I_{v+m-1}
        log_ratio_sum = log_ratio_sum + torch.log(ratio)
    return log_i_top - log_ratio_sum, ratio


def log_bessel_iv(v: float, x: Tensor) -> Tensor:
    """log I_v(x), modified Bessel function of the first kind; x > 0 any shape, same dtype out.

    Float64 inside; relative error ~1e-13 for v in [0, 40] and x in [1e-3, 1e5] (tested against
    scipy). Differentiable w.r.t. x (not v).
    """
    return log_iv_and_ratio(float(v), x)[0].to(x.dtype)


def bessel_iv_ratio(v: float, x: Tensor) -> Tensor:
    """I_{v+1}(x) / I_v(x) for x > 0 any shape, same dtype out; differentiable w.r.t. x."""
    return log_iv_and_ratio(float(v), x)[1].to(x.dtype)

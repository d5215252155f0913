"""Small statistics for reporting spread across seeds: mean ± std, and a mean (of one
configuration's seeds, or of paired differences) with a Student-t confidence interval, for the
study summary (coupling's effect) and for analysis.
Exact t quantiles without scipy (scipy is only a dev dependency)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


def t_two_sided_coverage(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` >= 1 (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = term = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            total *= s * math.cos(theta)
        return 2.0 / math.pi * (theta + total)
    total = term = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T| < t) = ``confidence`` (e.g. 0.95, df=4 -> 2.776), by bisection."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_two_sided_coverage(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_coverage(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return (low + high) / 2


def _finite(values: Iterable[float]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof=1) of n values; std is NaN for n < 2."""
    n: int
    mean: float
    std: float


def summarize(values: Iterable[float]) -> Summary:
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return Summary(n, mean, std)


@dataclass(frozen=True)
class PairedDifference:
    """A mean with a two-sided t confidence interval (bounds NaN for n < 2): of per-seed
    differences a − b (:func:`paired_difference`), or of values over seeds (:func:`mean_interval`)."""
    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Differences a[i] − b[i] of paired observations (same seed), mean ± t_{n-1} · std / sqrt(n)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None
             and math.isfinite(float(x)) and math.isfinite(float(y))]
    return mean_interval(diffs, confidence)


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of the finite ``values`` ± t_{n-1} · std / sqrt(n), e.g. one configuration's val NLL
    over its seeds."""
    s = summarize(values)
    if s.n < 2:
        return PairedDifference(s.n, s.mean, s.std, math.nan, math.nan, confidence)
    half = t_quantile(confidence, s.n - 1) * s.std / math.sqrt(s.n)
    return PairedDifference(s.n, s.mean, s.std, s.mean - half, s.mean + half, confidence)



def decimals_needed(value: float, decimals: int, most: int = 4) -> int:
    """``decimals``, or more (up to ``most``) while ``value`` is under ten units of the last
    digit: an effect of 0.007 nats must not print as +0.01 [+0.00, +0.01], nor as +0.0."""
    value = abs(value)
    while decimals < most and 0 < value < 10 ** -decimals * 10:
        decimals += 1
    return decimals

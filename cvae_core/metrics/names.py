"""The metric registry: every metric the project reports, with its direction, unit and estimator.

Spec validation, ranking, the Pareto front, tables, plots and ``analysis best`` consult this
module; none of them keeps its own list.  Metrics are logged with a split prefix
(``val_nll``, ``test_bleu1``, ``train_grad_total``); the registry is keyed by the bare name and
:func:`metric` accepts either form (and ``best_val_nll``, the core's best-so-far copy).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CvaeError

SPLIT_PREFIXES = ("val_", "test_", "train_")


@dataclass(frozen=True)
class Metric:
    name: str  # bare name, e.g. "nll"
    direction: str  # "min" | "max" | "" (reported, never ranked: KL follows NLL in a table cell)
    unit: str
    label: str  # column header in tables and plots
    decimals: int  # digits printed in tables (the paper's)
    estimator: str

    @property
    def ranked(self) -> bool:
        return bool(self.direction)


_NATS = "nats per sentence"
_SQ = "squared L2 norm, mean over sentences"
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("nll", "min", _NATS, "NLL", 1,
           "importance-sampled -log p(x) with q(z|x) as proposal (exact for a language model)"),
    Metric("kl", "", _NATS, "KL", 1, "KL(q(z|x) || p(z)), closed form or Monte Carlo"),
    Metric("ppl", "min", "per token", "PPL", 1, "exp(NLL summed over the split / tokens incl. <eos>)"),
    Metric("elbo", "max", _NATS, "ELBO", 1, "-(reconstruction + KL), one sample of z"),
    Metric("rec", "min", _NATS, "Rec", 1, "reconstruction -log p(x|z), one sample of z"),
    Metric("mi_loo", "max", "nats", "MI", 2, "I_q(x; z), leave-one-out aggregate posterior over the split"),
    Metric("mi_batch", "max", "nats", "MI (batch)", 2, "I_q(x; z), aggregate posterior within a batch"),
    Metric("au", "max", "units", "AU", 0, "active units: Cov_x(E_q[z]) > 0.01 per dimension"),
    Metric("bleu1", "max", "BLEU x100", "BLEU-1", 1, "multi-bleu unigram precision x brevity penalty"),
    Metric("bleu2", "max", "BLEU x100", "BLEU-2", 1, "multi-bleu bigram precision x brevity penalty"),
    Metric("dist1", "max", "ratio", "D-1", 2, "distinct unigrams / all unigrams over the samples"),
    Metric("dist2", "max", "ratio", "D-2", 2, "distinct bigrams / all bigrams over the samples"),
    Metric("grad_rec", "", _SQ, "||∂rec/∂e||²", 3, "gradient of reconstruction w.r.t. the encoder output"),
    Metric("grad_rec_coupled", "", _SQ, "||∂rec^c/∂e||²", 3, "the same for the coupled (deterministic) decoder"),
    Metric("grad_total", "", _SQ, "||∂L/∂e||²", 3, "gradient of the whole training loss w.r.t. the encoder output"),
    Metric("grad_reg", "", _SQ, "||∂reg/∂e||²", 3, "gradient of the regulariser (KL/MMD) w.r.t. the encoder output"),
    Metric("dh_de", "", "squared Frobenius / ||h||²", "||∂h/∂e||²/||h||²", 3,
           "sensitivity of the decoding signal to the encoder output"),
    # Against a known answer: the synthetic dataset only (cvae_core/metrics/recovery.py)
    Metric("true_nll", "", _NATS, "true NLL", 2,
           "exact -log p(x) under the generator: lattice quadrature over z, within 0.01 nats (step-doubling check)"),
    Metric("nll_gap", "min", _NATS, "NLL − true", 2, "IS-NLL minus the exact true NLL of the same sentences"),
    Metric("z_probe_r2", "max", "R²", "z R²", 2,
           "held-out least-squares probe z ~ q(z|x) -> true z (halves of the split, both ways), pooled R²"),
    Metric("cluster_probe_acc", "max", "fraction", "cluster acc", 2,
           "held-out logistic probe z ~ q(z|x) -> true mixture component, accuracy (chance 0.25)"),
    Metric("cluster_probe_mi", "max", "nats", "cluster MI", 2,
           "held-out logistic probe's bound E[log q(c|z) - log p(c)] <= I(z; c), z ~ q(z|x)"),
)}
GRAD_KEYS = ("grad_rec", "grad_rec_coupled", "grad_total", "grad_reg", "dh_de")


def bare_name(name: str) -> str:
    """``val_nll`` / ``best_val_nll`` / ``best.val_nll`` / ``nll`` -> ``nll``."""
    for prefix in ("best.", "final.", "best_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    for prefix in SPLIT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def metric(name: str) -> Metric:
    """The registry entry of ``name`` (bare or prefixed); a one-line error naming the known ones."""
    try:
        return METRICS[bare_name(name)]
    except KeyError:
        raise CvaeError(f"unknown metric {name!r}; known: {', '.join(METRICS)} "
                        f"(with a prefix {'/'.join(SPLIT_PREFIXES)})") from None


def direction(name: str) -> str:
    """"min" or "max" for a ranked metric; a one-line error for an unknown or unranked one."""
    entry = metric(name)
    if not entry.ranked:
        ranked = ", ".join(m.name for m in METRICS.values() if m.ranked)
        raise CvaeError(f"metric {name!r} has no better direction; rank by one of: {ranked}")
    return entry.direction


def sort_key(name: str, value: float) -> float:
    """Smaller is better: ``value`` for a "min" metric, ``-value`` for a "max" one."""
    return value if direction(name) == "min" else -value


def pareto_mask(points: Sequence[Sequence[float | None]], directions: Sequence[str]) -> list[bool]:
    """True for the points no other point dominates (better or equal in every objective and
    strictly better in one).  ``directions``: "min" or "max" per objective; NaN points never win."""
    signs = [1.0 if d == "min" else -1.0 for d in directions]
    scored = [None if any(v is None or not math.isfinite(float(v)) for v in p)
              else [s * float(v) for s, v in zip(signs, p)] for p in points]
    mask = []
    for i, p in enumerate(scored):
        if p is None:
            mask.append(False)
            continue
        dominated = any(q is not None and j != i and all(a <= b for a, b in zip(q, p))
                        and any(a < b for a, b in zip(q, p)) for j, q in enumerate(scored))
        mask.append(not dominated)
    return mask


# "The best evaluation" has one definition: the core's training loop keeps the evaluation with the
# lowest selection metric as the run's best checkpoint and reports, with every evaluation,
# IS_BEST (1.0 when this evaluation became the best), BEST_STEP (the best evaluation's step so far)
# and best_key(kind) (the selection metric's best value so far).  Consumers read these.
IS_BEST = "is_best"
BEST_STEP = "best_step"


def selection_metric(model_kind: str) -> str:
    """The validation metric whose lowest value picks a run's best evaluation (its kept
    checkpoint): ``val_nll``, or ``val_rec`` for a DAE, which has no likelihood."""
    return "val_rec" if model_kind == "dae" else "val_nll"


def best_key(model_kind: str) -> str:
    """The metric key holding the best value so far: ``best_val_nll`` (``best_val_rec`` for a DAE)."""
    return f"best_{selection_metric(model_kind)}"

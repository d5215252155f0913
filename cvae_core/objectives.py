"""Loss terms and schedules: KL annealing (linear, cyclic), matching distances, MMD, free bits."""
from __future__ import annotations

import torch
from torch import Tensor

RQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def linear_kl_weight(step: int, start: int, steps: int, cap: float) -> float:
    """min(max((t - s0) / S, 0), cap) with t the 1-based step, as the authors anneal."""
    return min(max((step - start) / steps, 0.0), cap)


def cyclic_kl_weight(step: int, start: int, steps: int, cycles: int, ratio: float, cap: float = 1.0) -> float:
    """Fu et al.: M cycles over [s0, s0+S], each ramping 0->1 over a fraction R, then holding 1.

    Step s0+S itself is still the start of a cycle (weight 0), as in the authors' schedule, which
    holds the cap only for steps strictly after s0+S."""
    if step < start:
        return 0.0
    if step > start + steps:
        return cap
    period = steps / cycles
    tau = ((step - start) % period) / period
    return cap * min(tau / ratio, 1.0)


def squared_distance(h: Tensor, target: Tensor) -> Tensor:
    """||h - target||^2 summed over the last dim, [B]."""
    return (h - target).pow(2).sum(-1)


def matching_loss(h: Tensor, h_coupled: Tensor, distance: str | Tensor, c: float | Tensor) -> Tensor:
    """Signal matching per example, [B]. ``h_coupled`` is detached here: no gradient reaches the
    deterministic path through this loss (h^c guides h, not the opposite).

    eucl: D = ||h - sg(h^c)||^2.   rq: -sum_s sC / (sC + D), s in RQ_SCALES (range [-7, 0)).

    One run passes ``distance`` "eucl" or "rq" and a float ``c``.  A pack (K members, h [K, B, E])
    passes per-member values broadcastable to D [K, B]: ``c`` [K, 1] and, where its members mix the
    two distances, ``distance`` a bool [K, 1], True for the members that match with rq.
    """
    d2 = squared_distance(h, h_coupled.detach())
    if isinstance(distance, Tensor):
        return torch.where(distance, _rq_matching(d2, c), d2)
    if distance == "eucl":
        return d2
    if distance == "rq":
        return _rq_matching(d2, c)
    raise ValueError(f"unknown matching distance {distance!r}")


def _rq_matching(d2: Tensor, c: float | Tensor) -> Tensor:
    return -sum(s * c / (s * c + d2) for s in RQ_SCALES)


def pairwise_squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """||x_i - y_j||^2 for x [B, d], y [M, d] -> [B, M], from the differences (exact zeros on the
    diagonal and finite gradients there, unlike ``cdist(...)**2``)."""
    return (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1)


def imq_mmd(q: Tensor, p: Tensor, latent_dim: int) -> Tensor:
    """Unbiased MMD^2 between posterior samples q [B, d] and prior samples p [B, d] -> scalar.

    Kernel: the WAE multi-scale inverse multiquadric sum_s C_s / (C_s + ||x - y||^2) with
    C_s = 2 d s, s in RQ_SCALES (the WAE authors' scales). Per scale:
    [sum_{i!=j} k(q_i, q_j) + sum_{i!=j} k(p_i, p_j)] / (B(B-1)) - 2/B^2 sum_{i,j} k(q_i, p_j).
    Zero in expectation when q and p come from the same distribution; 0 for B < 2 (no pairs).
    """
    n = q.shape[0]
    if n < 2:
        return q.sum() * 0.0
    off_diagonal = 1.0 - torch.eye(n, device=q.device, dtype=q.dtype)
    dqq, dpp, dqp = (pairwise_squared_distances(a, b) for a, b in ((q, q), (p, p), (q, p)))
    total = q.new_zeros(())
    for s in RQ_SCALES:
        c = 2.0 * latent_dim * s
        kqq, kpp, kqp = c / (c + dqq), c / (c + dpp), c / (c + dqp)
        total = total + ((kqq + kpp) * off_diagonal).sum() / (n * (n - 1)) - 2.0 * kqp.mean()
    return total


def free_bits_kl(kl_per_dim: Tensor, nats_total: float) -> Tensor:
    """Per-example, per-dimension clamp at nats_total / d, summed over dims: [B, d] -> [B]."""
    return kl_per_dim.clamp(min=nats_total / kl_per_dim.shape[-1]).sum(-1)


def weighted_loss(rec: Tensor, regularizer: Tensor | None = None, kl_weight: float | Tensor = 0.0, *,
                  mmd: Tensor | None = None, mmd_weight: float = 0.0, rec_coupled: Tensor | None = None,
                  lambda_r: float | Tensor = 0.0, match: Tensor | None = None,
                  lambda_m: float | Tensor = 0.0) -> Tensor:
    """Eq. (4) from its batch-mean terms: rec + w_KL(t)·Reg [+ mmd_weight·MMD] [+ λ_r·rec^c + λ_m·match].

    A term left None is left out (no posterior: no Reg; uncoupled: no rec^c, match).  One run
    passes scalar terms and float weights; a pack passes [K] terms and [K] weights (each member's
    own), and gets each member's loss [K]."""
    loss = rec
    if regularizer is not None:
        loss = loss + kl_weight * regularizer
    if mmd is not None:
        loss = loss + mmd_weight * mmd
    if rec_coupled is not None:
        loss = loss + lambda_r * rec_coupled + lambda_m * match
    return loss


class Objective:
    """Eq. (4): L = rec + w_KL(t)·Reg + [mmd_weight·MMD] + λ_r·rec^c + λ_m·match (batch means),
    weighted by :func:`weighted_loss`.

    Only the KL-like term is annealed; rec^c, matching and MMD are constant from step 1.
    """

    def __init__(self, config):
        self.config = config

    def kl_weight(self, step: int) -> float:
        reg = self.config.regularizer
        if reg.schedule == "cyclic":
            return cyclic_kl_weight(step, reg.anneal_start, reg.anneal_steps, reg.cycles, reg.cycle_ratio, reg.kl_cap)
        return linear_kl_weight(step, reg.anneal_start, reg.anneal_steps, reg.kl_cap)

    def __call__(self, model, output, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """-> (scalar loss, named parts for logging; each part is a batch mean)."""
        config, reg = self.config, self.config.regularizer
        parts: dict[str, Tensor] = {"rec": output.rec.mean()}
        reg_term = weight = None
        if output.posterior is not None:
            weight = self.kl_weight(step)
            prior = output.prior
            if reg.kind == "free_bits":
                kl_per_dim = output.posterior.kl_per_dim()
                parts["kl"] = kl_per_dim.sum(-1).mean()
                reg_term = free_bits_kl(kl_per_dim, reg.free_bits).mean()
            else:
                parts["kl"] = reg_term = output.posterior.regularizer(prior, output.sample).mean()
            if reg.kind == "mmd":
                z = output.sample.z
                parts["mmd"] = imq_mmd(z, prior.sample((z.shape[0],)).to(z), z.shape[-1])
        if output.rec_coupled is not None:
            coupling = config.coupling
            parts["rec_coupled"] = output.rec_coupled.mean()
            parts["match"] = matching_loss(output.h, output.h_coupled, coupling.distance, config.rq_c).mean()
        parts["loss"] = loss = weighted_loss(
            parts["rec"], reg_term, weight, mmd=parts.get("mmd"), mmd_weight=reg.mmd_weight,
            rec_coupled=parts.get("rec_coupled"), lambda_r=config.coupling.lambda_r, match=parts.get("match"),
            lambda_m=config.coupling.lambda_m)
        return loss, parts

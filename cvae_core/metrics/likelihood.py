"""Likelihood metrics: IS-NLL, Monte-Carlo KL, ELBO, PPL, plus MI and AU, for any latent model.

Everything is computed from the model contract ``prior(batch)``, ``posterior(batch)`` and
``log_px_given_z(batch, z)``; the GRU-LM reports its exact NLL.  All values are in nats per
sentence; PPL = exp(sum NLL / sum(words + 1)).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..data.batching import eval_batches, length_sorted_batches
from ..data.corpus import Split
from ..errors import CvaeError
from ..runtime import seeded
from .latent import active_units, mi_estimates
from .recovery import latent_recovery

# Memory for one chunk of importance samples: the decoder's activations for every position of
# every sample in the chunk (the output layer is tiled, so the vocabulary size does not enter).
DECODE_BUDGET_BYTES = 512 * 2**20
# Upper estimate of activation bytes per decoded position for the paper-size GRU decoder
# (inputs [emb; h], GRU gates and states, projection, fp32); peak memory follows the chunk.
BYTES_PER_POSITION = 8 * 2**10
MI_BATCH = 513  # the paper's MI batches: each sentence against M = 512 others


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(sum of per-sentence NLL / (words + one <eos> per sentence))."""
    return math.exp(total_nll / n_tokens)


def sentence_seeds(seed: int, indices: list[int]) -> list[int]:
    """One sample-stream seed per sentence, from the evaluation seed and its index in the split.
    32-bit values: the CPU generator keeps only the low 32 bits of a seed."""
    return [(seed * 2654435761 + i) % 2**32 for i in indices]


def _posterior_samples(model: nn.Module, batch, n_samples: int, seeds: list[int] | None):
    """-> (z [N, B, d], log q(z|x) [N, B]).  With ``seeds`` each sentence draws its N samples
    from its own stream (its posterior computed alone), so they do not depend on which other
    sentences share the batch; without, all are drawn at once from the global stream."""
    if seeds is None:
        sample = model.posterior(batch).rsample_with_log_prob((n_samples,))
        return sample.z, sample.log_q
    zs, log_qs = [], []
    for i, seed in enumerate(seeds):
        with seeded(seed, batch.inputs.device):
            sample = model.posterior(batch.select([i])).rsample_with_log_prob((n_samples,))
        zs.append(sample.z)
        log_qs.append(sample.log_q)
    return torch.cat(zs, dim=1), torch.cat(log_qs, dim=1)


@torch.no_grad()
def importance_sampled_nll(model: nn.Module, batch, n_samples: int,
                           seeds: list[int] | None = None) -> dict[str, Tensor]:
    """Per-sentence IS estimates with q(z|x) as proposal, each [B] in nats:

    nll  = -(logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log N)
    kl   = mean_k [log q(z_k|x) - log p(z_k)]        (Monte Carlo, over the same samples)
    elbo = mean_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)]
    rec  = -mean_k log p(x|z_k)
    ``seeds`` (one per sentence, e.g. from :func:`sentence_seeds`) gives each sentence its own
    sample stream: the result is then the same whatever the batch or chunk composition.  All N
    samples are drawn first (z is small); they are decoded in chunks of as many samples as fit
    DECODE_BUDGET_BYTES, so memory is bounded by the chunk, not by N.
    """
    z, log_q = _posterior_samples(model, batch, n_samples, seeds)
    log_pz = model.prior(batch).log_prob(z)
    positions = max(1, batch.inputs.numel())
    chunk = max(1, min(n_samples, DECODE_BUDGET_BYTES // (positions * BYTES_PER_POSITION)))
    log_px = torch.cat([model.log_px_given_z(batch, z[start : start + chunk])
                        for start in range(0, n_samples, chunk)])
    weights = log_px + log_pz - log_q
    return {
        "nll": -(torch.logsumexp(weights, 0) - math.log(n_samples)),
        "kl": (log_q - log_pz).mean(0),
        "elbo": weights.mean(0),
        "rec": -log_px.mean(0),
    }


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, n_samples: int = 100, mi_samples: int = 100,
             batch_size: int = 32, seed: int = 0, with_mi: bool = True,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Full likelihood + latent evaluation of ``model`` on a split, in eval mode.

    Returns nll, kl, ppl, elbo, rec, mi_loo, mi_batch, au, n_sentences, n_tokens (floats/ints;
    None where the model has no such quantity, e.g. KL of the GRU-LM).  On a split with a known
    answer (``split.truth``: the synthetic data) also true_nll and nll_gap, and with the MI pass
    z_probe_r2, cluster_probe_acc and cluster_probe_mi (:mod:`.recovery`).  Sentences are evaluated
    in length-sorted batches, each with its own seeded sample stream (:func:`sentence_seeds`), so
    the result does not depend on ``batch_size``; MI has its own seeded stream.  Evaluating never
    perturbs training randomness.  ``progress(done, total)`` is called after each batch of the
    likelihood pass (sentences done out of the split's).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with seeded(seed, device):
            totals = {"nll": 0.0, "kl": 0.0, "elbo": 0.0, "rec": 0.0}
            done = 0
            for indices, batch in length_sorted_batches(split.examples, batch_size):
                batch = batch.to(device)
                if model.kind == "lm":
                    totals["nll"] -= model.log_px(batch).sum().item()
                elif model.kind == "dae":
                    totals["rec"] += model(batch).rec.sum().item()
                else:
                    seeds = sentence_seeds(seed, indices)
                    for key, values in importance_sampled_nll(model, batch, n_samples, seeds).items():
                        totals[key] += values.sum().item()
                done += len(batch.lengths)
                if progress is not None:
                    progress(done, len(split.examples))
            n = len(split.examples)
            result: dict[str, Any] = {key: value / n for key, value in totals.items()}
            result.update(n_sentences=n, n_tokens=split.n_tokens)
            if model.kind == "vae":
                result["ppl"] = perplexity(totals["nll"], split.n_tokens)
                if with_mi:
                    torch.manual_seed(seed)  # MI's own stream: independent of the likelihood pass
                    result.update(latent_metrics(model, split, mi_samples))
            elif model.kind == "lm":
                result.update(ppl=perplexity(totals["nll"], split.n_tokens), kl=None, elbo=-result["nll"],
                              rec=result["nll"])
            else:  # a DAE has no likelihood; model selection uses reconstruction cross-entropy
                result.update(nll=None, kl=None, elbo=None, ppl=None)
            for key in ("mi_loo", "mi_batch", "au"):
                result.setdefault(key, None)
            if split.truth is not None and split.truth.nll is not None:
                result["true_nll"] = split.truth.nll.mean().item()
                result["nll_gap"] = None if result["nll"] is None else result["nll"] - result["true_nll"]
            return result
    finally:
        model.train(was_training)


@torch.inference_mode()
def latent_metrics(model: nn.Module, split: Split, mi_samples: int) -> dict[str, float]:
    """mi_loo and mi_batch over consecutive batches of 513 sentences, and active units; on a split
    with a known answer, the latent recovery of one code z ~ q(z|x) per sentence too."""
    if split.truth is not None and len(split.truth.z) != len(split.examples):
        raise CvaeError(f"{split.name}: {len(split.examples)} sentences but the truth of {len(split.truth.z)}; "
                        "cut a split with Split.head, which cuts both")
    device = next(model.parameters()).device
    loo_sum, batch_sum, loo_count, means, codes = 0.0, 0.0, 0, [], []
    for batch in eval_batches(split.examples, MI_BATCH):
        posterior = model.posterior(batch.to(device))
        mi_loo, mi_batch = mi_estimates(posterior, mi_samples)
        batch_sum += mi_batch.sum().item()
        if not torch.isnan(mi_loo).any():
            loo_sum, loo_count = loo_sum + mi_loo.sum().item(), loo_count + mi_loo.numel()
        means.append(posterior.mean.float().cpu())
        if split.truth is not None:
            codes.append(posterior.rsample_with_log_prob((1,)).z[0].float().cpu())
    n = len(split.examples)
    return {
        "mi_loo": loo_sum / loo_count if loo_count else float("nan"),
        "mi_batch": batch_sum / n,
        "au": active_units(torch.cat(means)),
        **({} if split.truth is None else latent_recovery(torch.cat(codes), split.truth.z, split.truth.component)),
    }


@torch.inference_mode()
def posterior_means(model: nn.Module, split: Split, batch_size: int = MI_BATCH) -> Tensor:
    """E_q[z|x] of every sentence of the split, in its order -> [N, d] (CPU), the model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return torch.cat([model.posterior(batch.to(device)).mean.float().cpu()
                          for batch in eval_batches(split.examples, batch_size)])
    finally:
        model.train(was_training)

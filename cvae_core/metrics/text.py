"""Text metrics of the paper: reconstruction BLEU-1/2 and prior-sample Dist-1/2.

Both are PERCENTAGES (x100), as in the paper's tables (PTB VAE: BLEU-1/2 23.2 / 4.4).

* ``bleu1``, ``bleu2`` (Table 2; the authors score BP x p_n, not cumulative BLEU): corpus-level
  ``100 * BP * p_n``, with p_n the modified (clipped) n-gram precision and BP the brevity penalty
  over summed lengths, as Moses ``multi-bleu.perl`` computes them.  This is NOT the cumulative
  BLEU-2 (the geometric mean of p1 and p2).  The authors multiply numbers multi-bleu has
  already rounded (p_n to 0.1, BP to 0.001); we do not round, so results can differ by < 0.1.
  The n-gram counts and lengths come from ``sacrebleu`` (tokenisation off); ``sacrebleu`` is its
  own standard cumulative 4-gram BLEU, reported beside them under that name.
* ``dist1``, ``dist2``: distinct n-grams / all n-grams, pooled over every sample; n-grams are
  taken within each sentence (never across two sentences).  For a conditional (dialogue) model
  the samples are one greedy response per post of the split (Table 8), z ~ p(z|post).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import nn

from ..data.batching import make_batch
from ..data.corpus import Split
from ..errors import CvaeError
from ..generate import DEFAULT_MAX_STEPS, generator, model_device, reconstruct, respond, sample_prior
from ..runtime import seeded

Tokens = Sequence[Hashable]


def ngrams(tokens: Tokens, n: int) -> list[tuple]:
    """The n-grams of one sentence, in order (none if it is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@dataclass
class BleuStatistics:
    """Corpus-level sufficient statistics (as multi-bleu.perl and sacrebleu accumulate them)."""

    hypothesis_length: int  # c: total hypothesis tokens
    reference_length: int  # r: total reference tokens (one reference per hypothesis)
    matches: list[int]  # [n-1]: clipped n-gram matches
    totals: list[int]  # [n-1]: hypothesis n-grams

    @property
    def brevity_penalty(self) -> float:
        """1 if c > r, else exp(1 - r/c); 0 when every hypothesis is empty (multi-bleu divides by 0)."""
        c, r = self.hypothesis_length, self.reference_length
        if c > r:
            return 1.0
        return math.exp(1.0 - r / c) if c > 0 else 0.0

    def precision(self, n: int) -> float:
        """Modified n-gram precision p_n in [0, 1] (0 when there is no hypothesis n-gram)."""
        total = self.totals[n - 1]
        return self.matches[n - 1] / total if total else 0.0


def bleu_statistics(hypotheses: Sequence[Tokens], references: Sequence[Tokens], max_n: int = 2) -> BleuStatistics:
    """Lengths and clipped n-gram matches over (hypothesis, reference) pairs, counted by
    sacrebleu with its tokenisation off (tokens are compared exactly, so case-sensitively)."""
    if len(hypotheses) != len(references):
        raise CvaeError(f"BLEU needs one reference per hypothesis, got {len(hypotheses)} hypotheses "
                        f"and {len(references)} references")
    if max_n < 1:
        raise CvaeError(f"max_n must be >= 1, got {max_n}")
    score = _sacrebleu_corpus_score(hypotheses, references, max_n)
    return BleuStatistics(score.sys_len, score.ref_len, list(score.counts), list(score.totals))


def _sacrebleu_corpus_score(hypotheses: Sequence[Tokens], references: Sequence[Tokens], max_n: int):
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize="none", max_ngram_order=max_n, force=True)
    join = lambda tokens: " ".join(str(t) for t in tokens)  # noqa: E731  (tokenize="none" splits on spaces)
    return bleu.corpus_score([join(h) for h in hypotheses], [[join(r) for r in references]])


def sacrebleu_score(hypotheses: Sequence[Tokens], references: Sequence[Tokens]) -> float:
    """sacrebleu's standard corpus BLEU (cumulative, 4-grams, exponential smoothing), tokenisation
    off, in percent: a familiar reference number, NOT the paper's BLEU-1/2 (module docstring)."""
    if len(hypotheses) != len(references):
        raise CvaeError(f"BLEU needs one reference per hypothesis, got {len(hypotheses)} hypotheses "
                        f"and {len(references)} references")
    return float(_sacrebleu_corpus_score(hypotheses, references, 4).score)


def bleu_precisions(hypotheses: Sequence[Tokens], references: Sequence[Tokens], max_n: int = 2) -> dict[str, float]:
    """Corpus-level BLEU-n as the paper reports it: ``{"bleu1": 100·BP·p1, "bleu2": 100·BP·p2, ...}``.

    hypotheses[i] is scored against references[i] (token lists, compared exactly, so
    case-sensitive).  Percentages in [0, 100].  Not cumulative BLEU: see the module docstring.
    """
    stats = bleu_statistics(hypotheses, references, max_n)
    bp = stats.brevity_penalty
    return {f"bleu{n}": 100.0 * bp * stats.precision(n) for n in range(1, max_n + 1)}


def distinct_n(sentences: Sequence[Tokens], n: int) -> float:
    """Dist-n in percent: 100 · #distinct n-grams / #n-grams, pooled over all sentences.

    n-grams never span two sentences.  0.0 when there is no n-gram at all.
    """
    if n < 1:
        raise CvaeError(f"n must be >= 1, got {n}")
    grams = [gram for sentence in sentences for gram in ngrams(sentence, n)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def reconstruction_bleu(model: nn.Module, split: Split, n_samples: int = 10, batch_size: int = 32,
                        seed: int = 0, max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, Any]:
    """Reconstruction BLEU-1/2 (Table 2): every sentence decoded greedily from ``n_samples``
    codes z ~ q(z|x); the n_samples·N (prediction, original) pairs are scored at corpus level.

    References are the split's token ids (words outside the vocabulary are <unk> there;
    predictions never contain <unk>, it is masked).  -> bleu1, bleu2 (percent), sacrebleu
    (sacrebleu's cumulative BLEU, percent), bleu_pairs.
    """
    generator(model)  # a clear error for models without a latent code
    if n_samples < 1:
        raise CvaeError(f"BLEU needs n_samples >= 1, got {n_samples}")
    hypotheses: list[list[int]] = []
    references: list[list[int]] = []
    with seeded(seed, model_device(model)):
        for start in range(0, len(split.examples), batch_size):
            sentences = split.examples[start : start + batch_size]
            for sentence, decodes in zip(sentences, reconstruct(model, make_batch(sentences), n_samples, max_steps)):
                hypotheses.extend(decodes)
                references.extend([sentence] * n_samples)
    return {**bleu_precisions(hypotheses, references, 2), "sacrebleu": sacrebleu_score(hypotheses, references),
            "bleu_pairs": len(hypotheses)}


@torch.no_grad()
def prior_diversity(model: nn.Module, n: int = 3200, batch_size: int = 32, seed: int = 0,
                    max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, float]:
    """Dist-1/2 (percent) of ``n`` greedy decodes of z ~ p(z) (paper: 100 batches of 32)."""
    sentences = prior_samples(model, n, batch_size, seed, max_steps)
    return {"dist1": distinct_n(sentences, 1), "dist2": distinct_n(sentences, 2)}


def prior_samples(model: nn.Module, n: int, batch_size: int = 32, seed: int = 0,
                  max_steps: int = DEFAULT_MAX_STEPS) -> list[list[int]]:
    """The seeded prior samples :func:`prior_diversity` scores (token ids)."""
    with seeded(seed, model_device(model)):
        return sample_prior(model, n, batch_size, max_steps)


@torch.no_grad()
def response_diversity(model: nn.Module, split: Split, batch_size: int = 32, seed: int = 0,
                       max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, float]:
    """Dist-1/2 (percent) of one greedy response per post of a pair split (Table 8)."""
    responses: list[list[int]] = []
    with seeded(seed, model_device(model)):
        for start in range(0, len(split.examples), batch_size):
            batch = make_batch(split.examples[start : start + batch_size])
            responses.extend(samples[0] for samples in respond(model, batch, 1, max_steps))
    return {"dist1": distinct_n(responses, 1), "dist2": distinct_n(responses, 2)}

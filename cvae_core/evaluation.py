"""Evaluate a checkpoint on a split and attach the result's fingerprint."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from . import __version__
from .checkpoint import load_model
from .config import Config
from .data import load_corpus
from .data.corpus import Split, known_checksum
from .data.synthetic import QUADRATURE_NOTE
from .errors import CvaeError
from .metrics.dynamics import GRAD_BATCH, encoding_module, gradient_norms
from .metrics.likelihood import MI_BATCH, evaluate
from .metrics.recovery import TRUTH_KEYS
from .metrics.text import prior_diversity, reconstruction_bleu, response_diversity
from .runtime import format_duration, resolve_device

RESULT_KEYS = ("nll", "kl", "ppl", "elbo", "mi_loo", "mi_batch", "au", "n_sentences", "n_tokens")


def load_for_evaluation(checkpoint: str | Path, split: str = "test", device: str = "auto",
                        data_overrides: dict[str, str] | None = None, limit: int = 0):
    """-> (model in eval mode, config, vocab, Split) for a checkpoint and one of its splits: the
    model loaded once, for a caller that inspects it before :func:`evaluate_model`.

    ``data_overrides`` replaces data paths recorded in the checkpoint (e.g. another data_dir).
    ``limit`` keeps the first N sentences only (0 = the whole split).
    """
    if split not in ("train", "valid", "test"):
        raise CvaeError(f"unknown split {split!r}; choose train, valid or test")
    torch_device = resolve_device(device)
    model, config, vocab = load_model(checkpoint, torch_device)
    data_config = dataclasses.replace(config.data, train_limit=0, valid_limit=0, **(data_overrides or {}))
    corpus = load_corpus(data_config, (split,), vocab=vocab)
    data = corpus[split]
    if limit:
        data = data.head(limit)
    return model, config, vocab, data


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", n_samples: int = 100, mi_samples: int = 100,
                        seed: int = 0, device: str = "auto", data_overrides: dict[str, str] | None = None,
                        limit: int = 0, bleu: bool = False, dist: bool = False, grad_norms: bool = False,
                        bleu_samples: int = 10, dist_samples: int = 3200, max_steps: int = 0,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Full evaluation of a checkpoint: the RESULT_KEYS plus ``rec`` and a ``fingerprint``; on the
    synthetic data also the TRUTH_KEYS (true NLL, the gap to it, latent recovery).

    ``data_overrides`` replaces data paths recorded in the checkpoint (e.g. another data_dir).
    ``limit`` evaluates the first N sentences only (0 = the whole split).
    Optional metrics (keys added only when asked for; their settings go in the fingerprint):
      bleu=True        bleu1, bleu2: reconstruction BLEU (percent, 100·BP·p_n) of ``bleu_samples``
                       greedy decodes of z ~ q(z|x) per sentence of the split;
      dist=True        dist1, dist2: Dist-n (percent) of ``dist_samples`` greedy prior decodes;
      grad_norms=True  grad_rec, grad_rec_coupled, grad_total, grad_reg, dh_de: mean SQUARED
                       gradient norms w.r.t. the encoding (Table 5), train mode, batches of 16.
    ``max_steps`` bounds greedy decoding (0 = the checkpoint's data.max_len, the authors' 200).
    ``progress(done, total)`` follows the likelihood pass (e.g. a ``ProgressPrinter``).
    This is :func:`load_for_evaluation` then :func:`evaluate_model`; a caller that inspects the
    model before evaluating it calls the two itself, so the model is loaded once.
    """
    _check_settings(n_samples, mi_samples, bleu, bleu_samples, dist, dist_samples, max_steps)
    model, config, _, data = load_for_evaluation(checkpoint, split, device, data_overrides, limit)
    return evaluate_model(model, config, data, checkpoint, n_samples=n_samples, mi_samples=mi_samples, seed=seed,
                          bleu=bleu, dist=dist, grad_norms=grad_norms, bleu_samples=bleu_samples,
                          dist_samples=dist_samples, max_steps=max_steps, progress=progress)


# The count flags of an evaluation (`cvae evaluate`, `python -m analysis best`): at least 1, and at
# least 0 where 0 means the default (--limit 0: the whole split; --max-steps 0: data.max_len).
POSITIVE_COUNTS = ("n_samples", "mi_samples", "bleu_samples", "dist_samples")
NON_NEGATIVE_COUNTS = ("limit", "max_steps")


def _check_settings(n_samples: int, mi_samples: int, bleu: bool, bleu_samples: int, dist: bool, dist_samples: int,
                    max_steps: int) -> None:
    if n_samples < 1 or mi_samples < 1:
        raise CvaeError("--n-samples and --mi-samples must be >= 1")
    if bleu and bleu_samples < 1:
        raise CvaeError(f"--bleu-samples must be >= 1, got {bleu_samples}")
    if max_steps < 0:
        raise CvaeError(f"--max-steps must be >= 0 (0 = data.max_len), got {max_steps}")
    if dist and dist_samples < 1:
        raise CvaeError(f"--dist-samples must be >= 1, got {dist_samples}")


def evaluate_model(model: torch.nn.Module, config: Config, data: Split, checkpoint: str | Path, *,
                   n_samples: int = 100, mi_samples: int = 100, seed: int = 0, bleu: bool = False,
                   dist: bool = False, grad_norms: bool = False, bleu_samples: int = 10, dist_samples: int = 3200,
                   max_steps: int = 0, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """:func:`evaluate_checkpoint` for a model already loaded with :func:`load_for_evaluation`
    (``checkpoint`` is where it came from, for the fingerprint); the same keywords and result."""
    _check_settings(n_samples, mi_samples, bleu, bleu_samples, dist, dist_samples, max_steps)
    split = data.name
    conditional = getattr(model, "conditional", False)
    if (bleu or dist) and model.kind != "vae" and not conditional:
        raise CvaeError(f"--bleu and --dist need a latent-variable model (model.kind=vae), got {model.kind!r}")
    if bleu and conditional:
        raise CvaeError(f"--bleu scores reconstructions of sentence models; {config.preset!r} is a dialogue "
                        "model (--dist scores its responses)")
    if grad_norms:
        encoding_module(model)  # fail before the long likelihood evaluation
    steps = max_steps or config.data.max_len
    scores = evaluate(model, data, n_samples=n_samples, mi_samples=mi_samples, seed=seed, progress=progress)
    result: dict[str, Any] = {key: scores[key] for key in RESULT_KEYS}
    result["rec"] = scores["rec"]
    optional: dict[str, Any] = {}
    if data.truth is not None:
        result.update({key: scores.get(key) for key in TRUTH_KEYS})
        optional.update(synthetic_seed=config.data.synthetic_seed, true_nll_estimator=QUADRATURE_NOTE,
                        true_nll_check_max=None if data.truth.nll_check is None else data.truth.nll_check.max().item(),
                        probes="linear/logistic on one z ~ q(z|x) per sentence (the MI pass's seeded stream), fitted on "
                               "even rows and scored on odd rows, and back")
    if bleu:
        scored = reconstruction_bleu(model, data, n_samples=bleu_samples, seed=seed, max_steps=steps)
        result.update(bleu1=scored["bleu1"], bleu2=scored["bleu2"], sacrebleu=scored["sacrebleu"])
        optional.update(bleu_samples=bleu_samples, bleu_pairs=scored["bleu_pairs"],
                        bleu_definition="corpus 100*BP*p_n, multi-bleu style, not cumulative; counts from "
                                        "sacrebleu, tokenize=none",
                        sacrebleu_definition="sacrebleu corpus BLEU, 4-gram cumulative, exp smoothing, "
                                             "tokenize=none")
    if dist and conditional:
        result.update(response_diversity(model, data, seed=seed, max_steps=steps))
        optional.update(dist_samples=len(data.examples), dist_definition="100*distinct/total n-grams, pooled "
                        "over one response per post, z ~ p(z|post)")
    elif dist:
        result.update(prior_diversity(model, n=dist_samples, seed=seed, max_steps=steps))
        optional.update(dist_samples=dist_samples, dist_definition="100*distinct/total n-grams, pooled")
    if bleu or dist:
        optional.update(decoding="greedy, <unk> masked, cut at first <eos>, empty if <eos> first",
                        max_steps=steps)
    if grad_norms:
        result.update(gradient_norms(model, data, batch_size=GRAD_BATCH, seed=seed))
        optional.update(grad_batch_size=GRAD_BATCH, grad_mode="train (dropout on, z sampled)",
                        grad_definition="mean squared L2 norms w.r.t. the encoding e")
    expected = known_checksum(config.data, split)
    result["fingerprint"] = {
        "dataset": config.data.dataset,
        "split": split,
        "source": data.source,
        "md5": data.md5,
        "md5_matches_reference": None if expected is None else expected == data.md5,
        "n_sentences": len(data.examples),
        "nll_estimator": "exact" if model.kind == "lm" else "importance_sampling_q_proposal",
        **({"conditional": "response given post; KL to p(z|post); PPL over response tokens + <eos>"}
           if conditional else {}),
        "n_samples": n_samples,
        "sample_streams": "one seeded stream per sentence (independent of batching)",
        "mi_samples": mi_samples,
        "mi_batch_size": MI_BATCH,
        "au_threshold": 0.01,
        "seed": seed,
        "preset": config.preset,
        "checkpoint": str(Path(checkpoint).resolve()),
        "version": __version__,
        "torch": torch.__version__,
        **optional,
    }
    return result


class ProgressPrinter:
    """``progress(done, total)`` for long evaluations: one line at most every ``every_s`` seconds
    (and at the end) with sentences done and an ETA, on stderr so that ``--json`` stays clean."""

    def __init__(self, label: str, every_s: float = 10.0, stream: TextIO | None = None):
        self.label, self.every_s, self.stream = label, every_s, stream or sys.stderr
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        eta = (now - self.started) / done * (total - done) if done else 0.0
        print(f"[evaluate] {self.label}: {done:,}/{total:,} sentences ({done / total:.0%}) | "
              f"{format_duration(now - self.started)} elapsed, ETA {format_duration(eta)}",
              file=self.stream, flush=True)

"""Evaluate a checkpoint on a split and attach the result's fingerprint."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import load_model
from .data import load_corpus
from .data.corpus import KNOWN_CHECKSUMS
from .errors import CvaeError
from .metrics.likelihood import MI_BATCH, evaluate
from .train import resolve_device

RESULT_KEYS = ("nll", "kl", "ppl", "elbo", "mi_loo", "mi_batch", "au", "n_sentences", "n_tokens")


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", n_samples: int = 100, mi_samples: int = 100,
                        seed: int = 0, device: str = "auto", data_overrides: dict[str, str] | None = None,
                        limit: int = 0) -> dict[str, Any]:
    """Full evaluation of a checkpoint: the RESULT_KEYS plus ``rec`` and a ``fingerprint``.

    ``data_overrides`` replaces data paths recorded in the checkpoint (e.g. another data_dir).
    ``limit`` evaluates the first N sentences only (0 = the whole split).
    """
    if split not in ("train", "valid", "test"):
        raise CvaeError(f"unknown split {split!r}; choose train, valid or test")
    if n_samples < 1 or mi_samples < 1:
        raise CvaeError("--n-samples and --mi-samples must be >= 1")
    torch_device = resolve_device(device)
    model, config, vocab = load_model(checkpoint, torch_device)
    data_config = dataclasses.replace(config.data, train_limit=0, valid_limit=0, **(data_overrides or {}))
    corpus = load_corpus(data_config, (split,), vocab=vocab)
    data = corpus[split]
    if limit:
        data = dataclasses.replace(data, examples=data.examples[:limit])
    scores = evaluate(model, data, n_samples=n_samples, mi_samples=mi_samples, seed=seed)
    result: dict[str, Any] = {key: scores[key] for key in RESULT_KEYS}
    result["rec"] = scores["rec"]
    expected = KNOWN_CHECKSUMS.get((config.data.dataset, split))
    result["fingerprint"] = {
        "dataset": config.data.dataset,
        "split": split,
        "source": data.source,
        "md5": data.md5,
        "md5_matches_reference": None if expected is None else expected == data.md5,
        "n_sentences": len(data.examples),
        "nll_estimator": "exact" if model.kind == "lm" else "importance_sampling_q_proposal",
        "n_samples": n_samples,
        "mi_samples": mi_samples,
        "mi_batch_size": MI_BATCH,
        "au_threshold": 0.01,
        "seed": seed,
        "preset": config.preset,
        "checkpoint": str(Path(checkpoint).resolve()),
        "version": __version__,
        "torch": torch.__version__,
    }
    return result

"""PreFB (Li et al. 2019): a DAE whose embedding, encoder and code layer initialise the VAE.

``train.pretrain_steps`` trains (resumes, or reuses when finished) a DAE stage in
``<output_dir>/pretrain``; ``train.init_from`` names a DAE checkpoint to start from instead.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

from torch import nn

from .checkpoint import load_checkpoint
from .config import Config, validate
from .data import Corpus
from .errors import CvaeError
from .models.text_vae import latent_model


def pretraining_config(config: Config) -> Config:
    """The DAE stage of a PreFB run: the same data, sizes and schedule, ``train.pretrain_steps`` long."""
    dae = copy.deepcopy(config)
    dae.preset = "dae"
    dae.model.kind = "dae"
    dae.coupling.enabled = False
    dae.train.steps, dae.train.pretrain_steps, dae.train.init_from = config.train.pretrain_steps, 0, ""
    dae.train.aggressive = False
    validate(dae)
    return dae


def pretrained_dae(config: Config, output_dir: Path, corpus: Corpus, log: Callable[[str], None],
                   train: Callable) -> Path | None:
    """The DAE checkpoint that initialises this run: ``train.init_from``, or the best checkpoint of
    a DAE trained (or resumed, or reused when finished) in ``output_dir/pretrain``; None if neither.
    The stage is a training run of its own: ``train`` is :func:`cvae_core.train.train`, which calls
    this function."""
    if config.train.init_from:
        return Path(config.train.init_from)
    if not config.train.pretrain_steps:
        return None
    stage = output_dir / "pretrain"
    log(f"PreFB stage 1: DAE for {config.train.pretrain_steps} steps in {stage} (resumed or reused if there)")
    result = train(pretraining_config(config), stage, resume=True, corpus=corpus,
                   log=lambda text: log(f"[pretrain] {text}"))
    if result.best_checkpoint is None:
        raise CvaeError(f"the PreFB pretraining stage in {stage} left no best checkpoint")
    return result.best_checkpoint


def init_from_dae(model: nn.Module, path: Path, vocab, log: Callable[[str], None]) -> None:
    """Copy the DAE checkpoint's embedding, encoder GRU and code layer into ``model``'s posterior
    mean head; one-line errors when the checkpoint is no DAE or does not fit."""
    data = load_checkpoint(path)
    if data.config.model.kind != "dae":
        raise CvaeError(f"train.init_from={path} is a {data.config.model.kind!r} checkpoint; PreFB needs a DAE")
    if data.vocab.itos != vocab.itos:
        raise CvaeError(f"train.init_from={path}: its vocabulary differs from this run's (another dataset?)")
    try:
        latent_model(model).init_encoder_from_dae(data.weights)
    except ValueError as exc:
        raise CvaeError(f"train.init_from={path}: {exc} (same model.embed_dim/hidden_dim/latent_dim?)") from None
    log(f"PreFB stage 2: embedding, encoder and posterior mean head initialised from {path}")

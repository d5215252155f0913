"""The model a config names: ``build_model`` picks the class for ``model.kind`` (LM, DAE, text
VAE, or a conditional model) and wraps it with its coupled twin when coupling is on."""
from __future__ import annotations

from torch import nn

from ..config import Config
from .conditional import ConditionalVAE, Seq2Seq
from .text_vae import CoupledVAE, DenoisingAutoencoder, LanguageModel, TextVAE


def build_model(config: Config, vocab_size: int) -> nn.Module:
    kind = config.model.kind
    if kind == "lm":
        return LanguageModel(config.model, vocab_size)
    if kind == "dae":
        return DenoisingAutoencoder(config.model, vocab_size)
    if kind == "seq2seq":
        return Seq2Seq(config.model, vocab_size)
    model = ConditionalVAE(config.model, vocab_size) if kind == "cvae" else TextVAE(config.model, vocab_size)
    return CoupledVAE(model, config.model) if config.coupling.enabled else model

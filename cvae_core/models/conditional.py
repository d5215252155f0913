"""Conditional models for dialogue (the paper's Table 8): post y -> response x.

Built from the same parts as the text VAE (bi-GRU encoders sharing one embedding, Gaussian heads,
the z -> h signal network, the GRU decoder) and coupled by the same ``CoupledVAE`` wrapper.

* :class:`Seq2Seq`: GRU encoder-decoder.  The post encoding e_y gives the decoding signal
  c = Linear(e_y); the NLL of the response is exact.
* :class:`ConditionalVAE`: a response encoder (e_x) and a post encoder (e_y); prior network
  p(z|y) = Gaussian head on e_y; posterior q(z|x,y) = Gaussian head on [e_x; e_y]; decoding
  signal h = signal(z) + Linear(e_y), a SUM as in the authors' code (not a concatenation).

Batches are response batches with the post attached (``Batch.post_words``/``post_lengths``).
Shapes: B pairs, S samples, d latent size, E signal size, H encoder size per direction.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ..config import ModelConfig
from ..data import Batch
from ..errors import CvaeError
from ..modules.networks import BiGRUEncoder, GRUDecoder
from ..modules.posteriors import GaussianHead
from ..modules.stacked import make_embedding
from .text_vae import ModelOutput, TextVAE, with_condition


def _post(batch: Batch) -> tuple[Tensor, Tensor]:
    if batch.post_words is None:
        raise CvaeError("a conditional model needs post/response pairs (a pair dataset: ptb-pairs, swda, pairs)")
    return batch.post_words, batch.post_lengths


class Seq2Seq(nn.Module):
    """GRU encoder-decoder baseline: post encoder -> c = Linear(e_y) [B, E] -> GRU decoder.

    Its NLL is exact, so the metrics treat it like the GRU-LM (``kind = "lm"``: ``log_px``)."""

    kind = "lm"
    conditional = True

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = make_embedding(vocab_size, config.embed_dim)
        self.post_encoder = BiGRUEncoder(self.embedding, config.hidden_dim, config.dropout)
        self.post_signal = nn.Linear(self.post_encoder.out_dim, config.embed_dim)
        self.decoder = GRUDecoder(self.embedding, 2 * config.hidden_dim, config.dropout)

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    def condition(self, batch: Batch) -> Tensor:
        """c [B, E], the decoding signal."""
        return self.post_signal(self.post_encoder(*_post(batch)))

    def log_px(self, batch: Batch) -> Tensor:
        """Exact log p(response | post) per pair, [B] (nats, incl. <eos>)."""
        return self.decoder.log_likelihood(batch.inputs, batch.targets, self.condition(batch))

    def forward(self, batch: Batch) -> ModelOutput:
        h = self.condition(batch)
        return ModelOutput(rec=-self.decoder.log_likelihood(batch.inputs, batch.targets, h), h=h)

    def response_signals(self, batch: Batch, n_samples: int) -> Tensor:
        """Decoding signals for ``n_samples`` responses per post, [S, B, E] (all equal: no latent)."""
        c = self.condition(batch)
        return c.expand(n_samples, *c.shape)


class ConditionalVAE(TextVAE):
    """The CVAE of Zhao et al. (2017) as the authors build it (module docstring).

    ``encode(batch)`` = [e_x; e_y] [B, 4H] is what the posterior (and a coupled twin's posterior)
    reads; the prior, the post signal and the twin take e_y from its second half.
    """

    conditional = True

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__(config, vocab_size)  # embedding, response encoder, q(z|x,y), signal, decoder
        self.post_encoder = BiGRUEncoder(self.embedding, config.hidden_dim, config.dropout)
        self.prior_head = GaussianHead(self.post_encoder.out_dim, config.latent_dim)
        self.post_signal = nn.Linear(self.post_encoder.out_dim, config.embed_dim)

    @property
    def head_input_dim(self) -> int:
        return 2 * self.encoder.out_dim  # [e_x; e_y], the post encoder has the response encoder's size

    def encode_post(self, batch: Batch) -> Tensor:
        """e_y [B, 2H]."""
        return self.post_encoder(*_post(batch))

    def _post_part(self, e: Tensor) -> Tensor:
        return e[:, self.encoder.out_dim :]

    def encode(self, batch: Batch) -> Tensor:
        """[e_x; e_y], [B, 4H]."""
        return torch.cat([self.encoder(batch.words, batch.lengths), self.encode_post(batch)], dim=-1)

    def prior(self, batch: Batch | None = None) -> Distribution:
        """p(z | post), batch shape [B]."""
        if batch is None:
            raise CvaeError("a conditional model's prior p(z|post) needs the posts (use `cvae respond`)")
        return self.prior_head(self.encode_post(batch))

    def prior_from_encoding(self, e: Tensor) -> Distribution:
        return self.prior_head(self._post_part(e))

    def condition(self, batch: Batch) -> Tensor:
        return self.post_signal(self.encode_post(batch))

    def condition_from_encoding(self, e: Tensor) -> Tensor:
        return self.post_signal(self._post_part(e))

    def response_signals(self, batch: Batch, n_samples: int) -> Tensor:
        """h for ``n_samples`` responses per post with z ~ p(z|post), [S, B, E]."""
        e_y = self.encode_post(batch)
        z = self.prior_head(e_y).sample((n_samples,))
        return with_condition(self.signal(z), self.post_signal(e_y))

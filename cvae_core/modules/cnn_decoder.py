"""Dilated causal CNN decoder of the authors' CNN-VAE, as their code builds it.

Same interface as :class:`~cvae_core.modules.networks.GRUDecoder` (``logits``,
``log_likelihood``, ``greedy``), so it works under every posterior family and inside the
coupling wrapper.  Shapes: B sentences, T decoder positions, E embedding/signal size, F filters.

Input of length T+1: position 0 is [h; h], position t >= 1 is [Dropout(Emb(y_{t-1})); h]
(dropout on the embedding half only).  A 1x1 convolution maps 2E -> F channels, then one
residual block per dilation r:  x <- x + block(x), block = conv1x1+BN+ReLU -> causal conv
(kernel 3, dilation r) + BN + ReLU -> conv1x1+BN+ReLU.  Position 0's output is dropped and
logits = Linear(F -> V) (no tanh).

Difference from the authors: the causal convolution left-pads by 2r, so BatchNorm sees exactly
the T+1 causal outputs; the authors pad both sides and drop the last 2r outputs after BatchNorm,
which lets a little batch statistic from the future leak in during training.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.vocab import UNK
from .networks import sequence_log_likelihood

DILATIONS = {
    "small": (1, 2, 4),
    "medium": (1, 2, 4, 8, 16),
    "large": (1, 2, 4, 8, 16, 1, 2, 4, 8, 16),
}


def _pointwise(filters: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(filters, filters, 1), nn.BatchNorm1d(filters), nn.ReLU())


class ResidualBlock(nn.Module):
    """x [B, F, L] -> x + block(x), causal: output t sees inputs <= t only."""

    def __init__(self, filters: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.reduce = _pointwise(filters)
        self.causal = nn.Conv1d(filters, filters, kernel_size=3, dilation=dilation)
        self.causal_norm = nn.BatchNorm1d(filters)
        self.expand = _pointwise(filters)

    def forward(self, x: Tensor) -> Tensor:
        y = self.reduce(x)
        y = F.relu(self.causal_norm(self.causal(F.pad(y, (2 * self.dilation, 0)))))
        return x + self.expand(y)


class CNNDecoder(nn.Module):
    """Teacher-forced dilated CNN decoder conditioned on the decoding signal h [B, E].

    ``dilations``: a name in :data:`DILATIONS` (``small``, ``medium``, ``large``) or a sequence of
    ints; ``filters``: F, the channel count of every block.
    """

    def __init__(self, embedding: nn.Embedding, filters: int, dilations: str | Sequence[int], dropout: float):
        super().__init__()
        if isinstance(dilations, str):
            if dilations not in DILATIONS:
                raise ValueError(f"unknown CNN dilation set {dilations!r}; choose from {', '.join(DILATIONS)}")
            dilations = DILATIONS[dilations]
        self.embedding = embedding
        embed_dim, vocab_size = embedding.embedding_dim, embedding.num_embeddings
        self.dropout = nn.Dropout(dropout)
        self.input = nn.Conv1d(2 * embed_dim, filters, 1)
        self.blocks = nn.ModuleList(ResidualBlock(filters, r) for r in dilations)
        self.output = nn.Linear(filters, vocab_size)

    @property
    def receptive_field(self) -> int:
        """Number of input positions an output position can see (itself included)."""
        return 1 + sum(2 * block.dilation for block in self.blocks)

    def _logits(self, inputs: Tensor, h: Tensor, dropout: bool) -> Tensor:
        if h is None:
            raise ValueError("the CNN decoder needs a decoding signal h (there is no CNN language model)")
        embedded = self.embedding(inputs)  # [B, T, E]
        if dropout:
            embedded = self.dropout(embedded)
        steps = torch.cat([embedded, h.unsqueeze(1).expand(-1, inputs.shape[1], -1)], dim=-1)  # [B, T, 2E]
        first = torch.cat([h, h], dim=-1).unsqueeze(1)  # [B, 1, 2E]
        x = self.input(torch.cat([first, steps], dim=1).transpose(1, 2))  # [B, F, T+1]
        for block in self.blocks:
            x = block(x)
        return self.output(x[:, :, 1:].transpose(1, 2))  # drop position 0: [B, T, V]

    def logits(self, inputs: Tensor, h: Tensor) -> Tensor:
        """inputs [B, T] (starting with <bos>), h [B, E] -> logits [B, T, V]."""
        return self._logits(inputs, h, dropout=True)

    def log_likelihood(self, inputs: Tensor, targets: Tensor, h: Tensor) -> Tensor:
        """Per-sentence log p(targets | h), [B], summed over targets incl. <eos>."""
        return sequence_log_likelihood(self.logits(inputs, h), targets)

    @torch.no_grad()
    def greedy(self, h: Tensor, bos: int, max_steps: int, eos: int | None = None) -> Tensor:
        """h [B, E] -> greedy ids [B, T] (<unk> masked), T = max_steps or fewer once every row
        has produced ``eos`` (when given). Recomputes the whole prefix at every step, as the
        authors do; no dropout (BatchNorm follows the module's mode: call it in eval mode)."""
        tokens = torch.full((h.shape[0], 1), bos, dtype=torch.long, device=h.device)
        finished = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        for _ in range(max_steps):
            logits = self._logits(tokens, h, dropout=False)[:, -1]
            logits[:, UNK] = float("-inf")
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
            if eos is not None:
                finished |= tokens[:, -1] == eos
                if bool(finished.all()):
                    break
        return tokens[:, 1:]

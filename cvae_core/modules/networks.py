"""Encoder, decoding-signal network and GRU decoder of the paper, as the authors' code builds them.

Each takes ``members``: None builds one network, K builds K of them stacked (a pack's,
``cvae_core.packed``) from the layers of :mod:`.stacked`, under the same parameter names, with a
leading member dimension on every parameter and on every activation (x [B, ...] -> [K, B, ...];
the batch's token ids are shared).  The wiring is written once, here; only the GRU has two
implementations: ``nn.GRU`` (cuDNN, fused CPU kernels) for one network, a stacked scan for K.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..data.vocab import PAD, UNK
from .output_layer import output_token_log_likelihood
from .stacked import PackedGRU, make_gru, make_linear


class BiGRUEncoder(nn.Module):
    """words [B, T], lengths [B] -> e [B, 2H] ([K, B, 2H] with members): the final forward and
    backward states, forward first."""

    def __init__(self, embedding: nn.Module, hidden_dim: int, dropout: float, members: int | None = None):
        super().__init__()
        self.embedding = embedding
        self.dropout = nn.Dropout(dropout)
        self.gru = make_gru(embedding.embedding_dim, hidden_dim, members, bidirectional=True)
        self.out_dim = 2 * hidden_dim

    def forward(self, words: Tensor, lengths: Tensor) -> Tensor:
        embedded = self.dropout(self.embedding(words))
        # An empty sentence is read as one <pad>: its code then depends on the model, not on NaNs.
        lengths = lengths.clamp(min=1)
        if isinstance(self.gru, PackedGRU):
            return self.gru.final_states(embedded, lengths.to(words.device))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, last = self.gru(packed)  # [2, B, H]
        return last.transpose(0, 1).reshape(words.shape[0], self.out_dim)


class SignalNetwork(nn.Module):
    """z [..., d] -> decoding signal h [..., E]: Linear -> ReLU -> Linear ("toInit")."""

    def __init__(self, latent_dim: int, signal_dim: int, members: int | None = None):
        super().__init__()
        self.net = nn.Sequential(make_linear(latent_dim, signal_dim, members), nn.ReLU(),
                                 make_linear(signal_dim, signal_dim, members))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def sequence_log_likelihood(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [B, T, V], targets [B, T] -> sum over non-pad targets of log p, [B] (nats)."""
    token_nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=PAD, reduction="none"
    )
    return -token_nll.view(targets.shape).sum(-1)


def output_log_likelihood(features: Tensor, targets: Tensor, output: nn.Module) -> Tensor:
    """features [B, T, F] (the output layer's input; [K, B, T, F] with members), targets [B, T]
    -> [B] ([K, B]): the sum over non-pad targets of log softmax(output(features))[target], nats.

    The output layer is computed only at real (non-pad) positions, fused with its log-softmax
    (:mod:`.output_layer`: one full-vocabulary buffer per call, tiled without autograd).
    """
    real = targets != PAD
    rows, gold = features[..., real, :], targets[real]  # [(K,) R, F], [R], sentence-major
    sentence = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[real]
    token_log_p = output_token_log_likelihood(rows, output.weight, output.bias, gold)  # [(K,) R]
    total = token_log_p.new_zeros(*token_log_p.shape[:-1], targets.shape[0])
    return total.index_add(-1, sentence, token_log_p)


class GRUDecoder(nn.Module):
    """Teacher-forced GRU decoder conditioned on the decoding signal h [B, E].

    With a signal: the state starts from zeros and takes ONE step on [h; h]; every step's input
    is Dropout([Emb(y_{t-1}); h]).  Without a signal (GRU-LM) the input is the embedding alone.
    Output: Linear_{200->V}(tanh(Linear_{2H->200}(Dropout(GRU output)))), untied from the embedding.
    With members: h [K, B, E] -> features and log-likelihoods with a leading K (``greedy`` is for
    one network: a pack's members are decoded as the ordinary models they unpack into).
    """

    def __init__(self, embedding: nn.Module, hidden_dim: int, dropout: float, conditioned: bool = True,
                 members: int | None = None):
        super().__init__()
        self.embedding = embedding
        embed_dim, vocab_size = embedding.embedding_dim, embedding.num_embeddings
        self.gru = make_gru(embed_dim * (2 if conditioned else 1), hidden_dim, members)
        self.dropout = nn.Dropout(dropout)
        self.project = make_linear(hidden_dim, embed_dim, members)
        self.output = make_linear(embed_dim, vocab_size, members)

    def _initial_state(self, h: Tensor | None) -> Tensor | None:
        if h is None:
            return None
        _, state = self.gru(torch.cat([h, h], dim=-1).unsqueeze(-2))  # one step from zeros
        return state

    def features(self, inputs: Tensor, h: Tensor | None) -> Tensor:
        """inputs [B, T] (starting with <bos>), h [B, E] or None -> output-layer inputs [B, T, embed]."""
        embedded = self.embedding(inputs)
        if h is not None:
            embedded = torch.cat([embedded, h.unsqueeze(-2).expand(*embedded.shape[:-1], -1)], dim=-1)
        states, _ = self.gru(self.dropout(embedded), self._initial_state(h))
        return torch.tanh(self.project(self.dropout(states)))

    def logits(self, inputs: Tensor, h: Tensor | None) -> Tensor:
        """inputs [B, T] (starting with <bos>), h [B, E] or None -> logits [B, T, V]."""
        return self.output(self.features(inputs, h))

    def log_likelihood(self, inputs: Tensor, targets: Tensor, h: Tensor | None) -> Tensor:
        """Per-sentence log p(targets | h), [B], summed over targets incl. <eos>."""
        return output_log_likelihood(self.features(inputs, h), targets, self.output)

    @torch.no_grad()
    def greedy(self, h: Tensor, bos: int, max_steps: int, eos: int | None = None) -> Tensor:
        """h [B, E] -> greedy ids [B, T] with <unk> masked, as in the authors' code.

        T = max_steps, or fewer when ``eos`` is given and every row has produced it (the
        tokens up to each row's first <eos> are the same either way: decoding is causal)."""
        state = self._initial_state(h)
        token = torch.full((h.shape[0], 1), bos, dtype=torch.long, device=h.device)
        finished = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        out = []
        for _ in range(max_steps):
            step_in = torch.cat([self.embedding(token), h.unsqueeze(1)], dim=-1)
            output, state = self.gru(step_in, state)
            logits = self.output(torch.tanh(self.project(output[:, -1])))
            logits[:, UNK] = float("-inf")
            token = logits.argmax(-1, keepdim=True)
            out.append(token)
            if eos is not None:
                finished |= token.squeeze(1) == eos
                if bool(finished.all()):
                    break
        return torch.cat(out, dim=1)

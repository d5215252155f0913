"""Member-stacked layers: K layers of one kind as one module, every parameter with a leading member
dimension K, and one batched matmul for all members.  Parameter names and per-member layouts are
those of the ordinary layers (``nn.Linear``, ``nn.Embedding``, ``nn.GRU``), so ``weight[k]`` is
member k's ordinary tensor and a K-member model's state_dict unstacks into ordinary ones.

``make_linear`` / ``make_embedding`` / ``make_gru`` build the ordinary layer for one model
(``members`` None: ``nn.GRU`` keeps cuDNN and its fused CPU kernels) or the stacked one for K
members (``cvae_core.packed``), so the modules built from them (``networks``, ``posteriors``)
serve both.  ``torch.func.vmap`` has no batching rule for ``nn.GRU``, hence the explicit scan.

Shapes: K members, B sentences, T steps, M = K (or 2K when two stacks run as one, e.g. the
encoder's two directions).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class PackedLinear(nn.Module):
    """K Linear layers: weight [K, out, in], bias [K, out]; x [K, ..., in] -> [K, ..., out]."""

    def __init__(self, members: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(members, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [M, ..., in], weight [M, out, in], bias [M, out] -> [M, ..., out] in one baddbmm."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.view(*x.shape[:-1], weight.shape[1])


def make_linear(in_dim: int, out_dim: int, members: int | None = None) -> nn.Linear | PackedLinear:
    """``nn.Linear(in_dim, out_dim)`` (initialised as usual), or with ``members`` K such layers
    stacked (``PackedLinear``, left uninitialised: a pack copies its members' weights in)."""
    return nn.Linear(in_dim, out_dim) if members is None else PackedLinear(members, in_dim, out_dim)


class PackedEmbedding(nn.Module):
    """K embedding tables, weight [K, V, E]; ids [B, T] (shared by all members) -> [K, B, T, E]."""

    def __init__(self, members: int, vocab_size: int, embed_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, vocab_size, embed_dim))

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[-1]

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[-2]

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight[:, ids]


def make_embedding(vocab_size: int, embed_dim: int, members: int | None = None) -> nn.Embedding | PackedEmbedding:
    """The authors' N(0, 1)-initialised embedding, or K stacked tables (uninitialised, as ``make_linear``)."""
    if members is not None:
        return PackedEmbedding(members, vocab_size, embed_dim)
    embedding = nn.Embedding(vocab_size, embed_dim)
    nn.init.normal_(embedding.weight, 0.0, 1.0)
    return embedding


class PackedGRU(nn.Module):
    """K one-layer GRUs with ``nn.GRU``'s parameters: weight_ih_l0 [K, 3H, I], weight_hh_l0
    [K, 3H, H], bias_ih_l0 / bias_hh_l0 [K, 3H], gates in nn.GRU's order (r, z, n); with
    ``bidirectional`` also the ``*_reverse`` tensors of the backward direction."""

    def __init__(self, members: int, input_dim: int, hidden_dim: int, bidirectional: bool = False):
        super().__init__()
        self.hidden_size = hidden_dim
        self.directions = ("_l0", "_l0_reverse") if bidirectional else ("_l0",)
        shapes = {"weight_ih": (3 * hidden_dim, input_dim), "weight_hh": (3 * hidden_dim, hidden_dim),
                  "bias_ih": (3 * hidden_dim,), "bias_hh": (3 * hidden_dim,)}
        for suffix in self.directions:
            for name, shape in shapes.items():
                self.register_parameter(name + suffix, nn.Parameter(torch.empty(members, *shape)))

    def stacked(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight_ih, weight_hh, bias_ih, bias_hh), directions concatenated along the members:
        [D*K, ...], forward direction first."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return tuple(torch.cat([getattr(self, name + suffix) for suffix in self.directions])  # type: ignore
                     for name in names)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """As a one-directional ``nn.GRU(batch_first=True)`` per member: x [K, B, T, I], h0
        [K, B, H] (zeros if None) -> (outputs [K, B, T, H], last state [K, B, H])."""
        return gru_scan(x, self.stacked(), h0)

    def final_states(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Bidirectional: x [K, B, T, I], lengths [B] (>= 1) -> [K, B, 2H], each sentence's final
        forward and backward states (forward first), as ``nn.GRU`` gives them for a packed sequence."""
        members, batch, steps, _ = x.shape
        positions = torch.arange(steps, device=x.device)
        mask = positions < lengths.unsqueeze(1)  # [B, T]
        # The backward direction reads each sentence's own tokens last-to-first: reversing every
        # sentence in place (padding stays behind it) lets both directions run as one 2K scan.
        reverse = torch.where(mask, lengths.unsqueeze(1) - 1 - positions, positions)
        backward_input = x[:, torch.arange(batch, device=x.device).unsqueeze(1), reverse]
        _, last = gru_scan(torch.cat([x, backward_input]), self.stacked(), None, mask)
        return torch.cat([last[:members], last[members:]], dim=-1)


def make_gru(input_dim: int, hidden_dim: int, members: int | None = None,
             bidirectional: bool = False) -> nn.GRU | PackedGRU:
    """``nn.GRU(batch_first=True)`` for one model, or K of them stacked (``PackedGRU``, uninitialised)."""
    if members is None:
        return nn.GRU(input_dim, hidden_dim, batch_first=True, bidirectional=bidirectional)
    return PackedGRU(members, input_dim, hidden_dim, bidirectional)


def gru_step(gi: Tensor, h: Tensor, weight_hh: Tensor, bias_hh: Tensor) -> Tensor:
    """One GRU step exactly as ``nn.GRU`` computes it, for M stacked cells at once.

    gi [M, B, 3H] = W_ih x + b_ih (precomputed), h [M, B, H] -> h' [M, B, H]:
    r = sigma(gi_r + W_hr h + b_hr), z = sigma(gi_z + W_hz h + b_hz),
    n = tanh(gi_n + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
    """
    gh = torch.baddbmm(bias_hh.unsqueeze(1), h, weight_hh.transpose(1, 2))
    hidden = h.shape[-1]
    # split, not slicing: a slice's backward fills a full-size zero tensor, a split's is one cat.
    gi_rz, gi_n = gi.split([2 * hidden, hidden], dim=-1)
    gh_rz, gh_n = gh.split([2 * hidden, hidden], dim=-1)
    r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, dim=-1)
    n = torch.tanh(gi_n + r * gh_n)
    return n + z * (h - n)


def gru_scan(x: Tensor, weights: tuple[Tensor, Tensor, Tensor, Tensor], h0: Tensor | None,
             mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run M stacked GRUs over x [M, B, T, I] from h0 [M, B, H] (zeros if None).

    The input projection of all steps is one batched matmul; each step is one more.  ``mask``
    [B, T] (True = a real token) keeps the state unchanged at padded steps, so the last state is
    each sentence's state after its own last token, as with a packed sequence in ``nn.GRU``.
    -> (outputs [M, B, T, H], last state [M, B, H]).
    """
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    members, batch, steps, _ = x.shape
    gi = linear(x, weight_ih, bias_ih).permute(2, 0, 1, 3)  # [T, M, B, 3H]
    h = x.new_zeros(members, batch, weight_hh.shape[-1]) if h0 is None else h0
    outputs = []
    # unbind, not gi[t]: the backward of T selections would fill T full-size zero tensors.
    for t, gi_t in enumerate(gi.unbind(0)):
        new = gru_step(gi_t, h, weight_hh, bias_hh)
        h = new if mask is None else torch.where(mask[:, t, None], new, h)
        outputs.append(h)
    return torch.stack(outputs, dim=2), h

"""The member-stacked Linear: K Linear layers as one module, every parameter with a leading member
dimension K, and one batched matmul for all members.  ``make_linear`` builds an ``nn.Linear`` for
one model or a ``PackedLinear`` for K members (``cvae_core.packed``), under the same parameter
names (weight, bias; ``weight[k]`` is member k's ordinary tensor), so the modules built from it
(``SignalNetwork``, ``GaussianHead``) serve both.  The packed GRU and embedding are in
``cvae_core.packed.layers``.
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

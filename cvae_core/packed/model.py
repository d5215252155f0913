"""K Gaussian GRU text VAEs (optionally each with its coupled twin) trained as one model.

A pack is the ordinary model built with ``members`` K (``TextVAE(config, vocab_size, members=K)``,
wrapped in ``CoupledVAE`` when coupled): the same wiring, module and parameter names, every
parameter with a leading member dimension.  ``pack`` builds it from K ordinary models of identical
shapes, ``unpack`` turns it back into K ordinary state_dicts: member k's slice of every packed
tensor is its ordinary tensor under the same name.  Each member computes exactly what its ordinary
model computes; all members read the same batch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import CvaeError
from ..models.text_vae import CoupledVAE, TextVAE
from ..modules.networks import GRUDecoder
from ..modules.posteriors import GaussianHead

Packed = TextVAE | CoupledVAE  # built with members K


def _check_packable(models: list[nn.Module]) -> TextVAE:
    if not models:
        raise CvaeError("pack needs at least one model")
    coupled = isinstance(models[0], CoupledVAE)
    rates = set()
    for model in models:
        base = model.base if isinstance(model, CoupledVAE) else model
        if isinstance(model, CoupledVAE) != coupled:
            raise CvaeError("pack needs all members coupled or all uncoupled")
        if type(base) is not TextVAE:
            raise CvaeError(f"pack supports the (coupled) text VAE only, got {type(base).__name__}")
        rates.add(base.encoder.dropout.p)
        heads = [base.head, model.twin_head] if coupled else [base.head]
        if not all(type(h) is GaussianHead and isinstance(h.mean_norm, nn.Identity) for h in heads):
            raise CvaeError("pack supports the Gaussian posterior without batch norm only")
        if not isinstance(base.decoder, GRUDecoder):
            raise CvaeError(f"pack supports the GRU decoder only, got {type(base.decoder).__name__}")
    if len(rates) > 1:
        raise CvaeError(f"pack needs one dropout rate for all members, got {sorted(rates)}")
    return models[0].base if coupled else models[0]


def pack(models: list[nn.Module]) -> Packed:
    """K ordinary (coupled) Gaussian GRU text VAEs of identical shapes -> one packed model whose
    member k holds a copy of models[k]'s weights (on models[0]'s device)."""
    first = _check_packable(models)
    vocab_size, embed_dim = first.embedding.weight.shape
    shapes = ModelConfig(embed_dim=embed_dim, hidden_dim=first.encoder.out_dim // 2, latent_dim=first.head.latent_dim,
                         dropout=first.encoder.dropout.p)
    packed: Packed = TextVAE(shapes, vocab_size, members=len(models))
    if isinstance(models[0], CoupledVAE):
        packed = CoupledVAE(packed, shapes)
    names = dict(packed.named_parameters())
    for model in models:
        ordinary = dict(model.named_parameters())
        if set(ordinary) != set(names) or any(ordinary[n].shape != p.shape[1:] for n, p in names.items()):
            raise CvaeError("pack needs members of identical shapes (embedding, hidden, latent sizes, vocabulary)")
    with torch.no_grad():
        for name, parameter in names.items():
            parameter.copy_(torch.stack([model.get_parameter(name).detach() for model in models]))
    return packed.to(first.embedding.weight.device)


def unpack(packed: Packed) -> list[dict[str, Tensor]]:
    """-> K ordinary state_dicts (same keys, shared-embedding aliases included), one per member;
    each loads with ``load_state_dict(strict=True)`` into ``build_model`` of the member's config."""
    return [member_state_dict(packed, k) for k in range(packed.members)]


def member_state_dict(packed: Packed, member: int) -> dict[str, Tensor]:
    """Member ``member``'s ordinary state_dict (a copy), as ``unpack(packed)[member]``."""
    if not 0 <= member < packed.members:
        raise CvaeError(f"member {member} is not in this pack (members 0 to {packed.members - 1})")
    return {name: tensor[member].clone() for name, tensor in packed.state_dict().items()}

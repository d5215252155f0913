"""K Gaussian GRU text VAEs (optionally each with its coupled twin) trained as one model.

Built from K ordinary models of identical shapes (``pack``) and turned back into K ordinary
state_dicts (``unpack``): module and parameter names mirror ``models.text_vae``, so member k's
slice of every packed tensor is its ordinary tensor under the same name.  Each member computes
exactly what its ordinary model computes (same gates, same output layer over real tokens, the
twin sharing the member's encoder); all members read the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import kl_divergence

from ..data import Batch
from ..data.vocab import PAD
from ..errors import CvaeError
from ..models.text_vae import CoupledVAE, TextVAE
from ..modules.networks import GRUDecoder, SignalNetwork
from ..modules.output_layer import output_token_log_likelihood
from ..modules.posteriors import GaussianHead
from ..modules.stacked import PackedLinear, linear
from .layers import PackedEmbedding, PackedGRU, dropout, gru_scan, gru_step


@dataclass
class PackedOutput:
    """Per-member results of one training forward pass (K members, B sentences)."""

    rec: Tensor  # [K, B] reconstruction NLL per sentence (nats), stochastic path
    kl: Tensor  # [K, B] KL(q(z|x) || N(0, I)) per sentence (nats)
    h: Tensor  # [K, B, E] decoding signal
    rec_coupled: Tensor | None = None  # [K, B] the twin's (deterministic) reconstruction NLL
    h_coupled: Tensor | None = None  # [K, B, E] the twin's decoding signal (not detached here)


class PackedBiGRUEncoder(nn.Module):
    """words [B, T], lengths [B] -> e [K, B, 2H]: each member's final forward and backward states."""

    def __init__(self, embedding: PackedEmbedding, hidden_dim: int, dropout_rate: float):
        super().__init__()
        self.embedding = embedding
        self.dropout_rate = dropout_rate
        members, _, embed_dim = embedding.weight.shape
        self.gru = PackedGRU(members, embed_dim, hidden_dim, bidirectional=True)

    def forward(self, words: Tensor, lengths: Tensor) -> Tensor:
        embedded = dropout(self.embedding(words), self.dropout_rate, self.training)  # [K, B, T, E]
        members, batch, steps, _ = embedded.shape
        lengths = lengths.to(words.device).clamp(min=1)  # an empty sentence is read as one <pad>, as unpacked
        positions = torch.arange(steps, device=words.device)
        mask = positions < lengths.unsqueeze(1)  # [B, T]
        # The backward direction reads each sentence's own tokens last-to-first: reversing every
        # sentence in place (padding stays behind it) lets both directions run as one 2K scan.
        reverse = torch.where(mask, lengths.unsqueeze(1) - 1 - positions, positions)
        backward_input = embedded[:, torch.arange(batch, device=words.device).unsqueeze(1), reverse]
        _, last = gru_scan(torch.cat([embedded, backward_input]), self.gru.stacked(), None, mask)
        return torch.cat([last[:members], last[members:]], dim=-1)


class PackedGRUDecoder(nn.Module):
    """K teacher-forced GRU decoders conditioned on h [K, B, E], as ``GRUDecoder``."""

    def __init__(self, embedding: PackedEmbedding, hidden_dim: int, dropout_rate: float):
        super().__init__()
        self.embedding = embedding
        self.dropout_rate = dropout_rate
        members, vocab_size, embed_dim = embedding.weight.shape
        self.gru = PackedGRU(members, 2 * embed_dim, hidden_dim)
        self.project = PackedLinear(members, hidden_dim, embed_dim)
        self.output = PackedLinear(members, embed_dim, vocab_size)


def decode(decoders: list[PackedGRUDecoder], batch: Batch, signals: list[Tensor]) -> list[Tensor]:
    """Per-sentence log p(targets | h) [K, B] for each (decoder, h [K, B, E]) pair; all the
    pairs run as one stack of len(decoders) * K GRUs (a base decoder beside its twin's)."""
    first = decoders[0]
    rate, steps = first.dropout_rate, batch.inputs.shape[1]
    embedded = first.embedding(batch.inputs)  # [K, B, T, E]; every decoder here shares it
    inputs = torch.cat([torch.cat([embedded, h.unsqueeze(2).expand(-1, -1, steps, -1)], dim=-1) for h in signals])
    h = torch.cat(signals)  # [M, B, E]
    weights = [torch.cat(parts) for parts in zip(*(d.gru.stacked() for d in decoders))]
    # The initial state: ONE step from zeros on [h; h], as GRUDecoder does.
    initial_input = linear(torch.cat([h, h], dim=-1), weights[0], weights[2])
    initial = gru_step_from_zeros(initial_input, weights[1], weights[3])
    states, _ = gru_scan(dropout(inputs, rate, first.training), weights, initial)
    project = [torch.cat(parts) for parts in zip(*((d.project.weight, d.project.bias) for d in decoders))]
    output = [torch.cat(parts) for parts in zip(*((d.output.weight, d.output.bias) for d in decoders))]
    features = torch.tanh(linear(dropout(states, rate, first.training), *project))
    log_likelihood = output_log_likelihood(features, batch.targets, *output)
    return list(log_likelihood.chunk(len(decoders)))


def gru_step_from_zeros(gi: Tensor, weight_hh: Tensor, bias_hh: Tensor) -> Tensor:
    """gi [M, B, 3H] -> the state after one step from a zero state."""
    return gru_step(gi, gi.new_zeros(*gi.shape[:-1], weight_hh.shape[-1]), weight_hh, bias_hh)


def output_log_likelihood(features: Tensor, targets: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """features [M, B, T, F], targets [B, T] -> [M, B]: each member's sum over non-pad targets of
    log softmax(W features + b)[target], computed only at real positions (as unpacked)."""
    real = targets != PAD
    rows, gold = features[:, real], targets[real]  # [M, R, F], [R]
    token_log_p = output_token_log_likelihood(rows, weight, bias, gold)  # [M, R]
    sentence = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[real]
    total = torch.zeros(rows.shape[0], targets.shape[0], dtype=token_log_p.dtype, device=targets.device)
    return total.index_add(1, sentence, token_log_p)


class PackedTextVAE(nn.Module):
    """K Gaussian GRU text VAEs: embedding -> bi-GRU -> Gaussian head -> signal -> GRU decoder."""

    def __init__(self, members: int, vocab_size: int, embed_dim: int, hidden_dim: int, latent_dim: int,
                 dropout_rate: float):
        super().__init__()
        self.embedding = PackedEmbedding(members, vocab_size, embed_dim)
        self.encoder = PackedBiGRUEncoder(self.embedding, hidden_dim, dropout_rate)
        self.head = GaussianHead(2 * hidden_dim, latent_dim, members=members)
        self.signal = SignalNetwork(latent_dim, embed_dim, members=members)
        self.decoder = PackedGRUDecoder(self.embedding, 2 * hidden_dim, dropout_rate)

    @property
    def members(self) -> int:
        return self.embedding.weight.shape[0]

    def encode(self, batch: Batch) -> Tensor:
        return self.encoder(batch.words, batch.lengths)

    def sample(self, e: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """e [K, B, 2H], noise [K, B, d] (standard normal; drawn if None) -> (z, KL per sentence [K, B])."""
        posterior = self.head(e)  # a DiagonalGaussian over [K, B, d]
        noise = torch.randn_like(posterior.loc) if noise is None else noise
        # The KL to N(0, I) is the ordinary model's: the analytic KL registered for the posterior.
        kl = kl_divergence(posterior, self.head.prior(e.device))
        return posterior.loc + noise * posterior.scale, kl

    def forward(self, batch: Batch, noise: Tensor | None = None) -> PackedOutput:
        z, kl = self.sample(self.encode(batch), noise)
        h = self.signal(z)
        (log_px,) = decode([self.decoder], batch, [h])
        return PackedOutput(rec=-log_px, kl=kl, h=h)


class PackedCoupledVAE(nn.Module):
    """K Coupled VAEs: each member's twin (head, signal network, decoder) shares its encoder and
    embedding and decodes from the posterior mean, as ``CoupledVAE``."""

    def __init__(self, base: PackedTextVAE):
        super().__init__()
        members, embed_dim, latent_dim = base.members, base.embedding.embedding_dim, base.head.latent_dim
        self.base = base
        self.twin_head = GaussianHead(base.head.mean.weight.shape[2], latent_dim, members=members)
        self.twin_signal = SignalNetwork(latent_dim, embed_dim, members=members)
        self.twin_decoder = PackedGRUDecoder(base.embedding, base.decoder.gru.hidden_dim, base.decoder.dropout_rate)

    @property
    def members(self) -> int:
        return self.base.members

    def forward(self, batch: Batch, noise: Tensor | None = None) -> PackedOutput:
        e = self.base.encode(batch)
        z, kl = self.base.sample(e, noise)
        h = self.base.signal(z)
        # The twin's code is its posterior mean; its log-std layer is unused (no gradient), as unpacked.
        h_coupled = self.twin_signal(self.twin_head.mean(e))
        log_px, log_px_coupled = decode([self.base.decoder, self.twin_decoder], batch, [h, h_coupled])
        return PackedOutput(rec=-log_px, kl=kl, h=h, rec_coupled=-log_px_coupled, h_coupled=h_coupled)


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


def pack(models: list[nn.Module]) -> PackedTextVAE | PackedCoupledVAE:
    """K ordinary (coupled) Gaussian GRU text VAEs of identical shapes -> one packed model whose
    member k holds a copy of models[k]'s weights (on models[0]'s device)."""
    first = _check_packable(models)
    vocab_size, embed_dim = first.embedding.weight.shape
    packed: nn.Module = PackedTextVAE(len(models), vocab_size, embed_dim, first.encoder.out_dim // 2,
                                      first.head.latent_dim, first.encoder.dropout.p)
    if isinstance(models[0], CoupledVAE):
        packed = PackedCoupledVAE(packed)
    names = dict(packed.named_parameters())
    for model in models:
        ordinary = dict(model.named_parameters())
        if set(ordinary) != set(names) or any(ordinary[n].shape != p.shape[1:] for n, p in names.items()):
            raise CvaeError("pack needs members of identical shapes (embedding, hidden, latent sizes, vocabulary)")
    with torch.no_grad():
        for name, parameter in names.items():
            parameter.copy_(torch.stack([model.get_parameter(name).detach() for model in models]))
    return packed.to(first.embedding.weight.device)


def unpack(packed: PackedTextVAE | PackedCoupledVAE) -> list[dict[str, Tensor]]:
    """-> K ordinary state_dicts (same keys, shared-embedding aliases included), one per member;
    each loads with ``load_state_dict(strict=True)`` into ``build_model`` of the member's config."""
    return [member_state_dict(packed, k) for k in range(packed.members)]


def member_state_dict(packed: PackedTextVAE | PackedCoupledVAE, member: int) -> dict[str, Tensor]:
    """Member ``member``'s ordinary state_dict (a copy), as ``unpack(packed)[member]``."""
    if not 0 <= member < packed.members:
        raise CvaeError(f"member {member} is not in this pack (members 0 to {packed.members - 1})")
    return {name: tensor[member].clone() for name, tensor in packed.state_dict().items()}

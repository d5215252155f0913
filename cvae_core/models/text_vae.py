"""The text VAE (encoder -> posterior -> signal network -> decoder), its baselines and the
Coupled wrapper.  Shapes: B sentences, T tokens, S latent samples, d latent size, E signal size.

Contract used by every likelihood metric: a latent model exposes ``prior(batch)`` (p(z), or
p(z|post) for a conditional model; a distribution over z with batch shape [] or [B]),
``posterior(batch)`` (a LatentDistribution over z [B, d]) and ``log_px_given_z(batch, z)``
(per-sentence log-likelihood summed over targets incl. <eos>, [S, B] for z [S, B, d]).

Conditional models (``conditional.py``) subclass TextVAE through four seams: ``encode`` (what the
posterior reads), ``prior_from_encoding``, ``condition`` / ``condition_from_encoding`` (a signal
added to h = signal(z)); the Coupled wrapper uses the same seams, so it couples both kinds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ..config import ModelConfig
from ..data import Batch
from ..errors import CvaeError
from ..modules.cnn_decoder import CNNDecoder
from ..modules.flows import PlanarFlowHead
from ..modules.networks import BiGRUEncoder, GRUDecoder, SignalNetwork
from ..modules.posteriors import GaussianHead, LatentDistribution, LatentSample
from ..modules.power_spherical import PowerSphericalHead
from ..modules.stacked import make_embedding
from ..modules.vmf import VonMisesFisherHead


@dataclass
class ModelOutput:
    """What one training forward pass returns; the objective turns it into a loss."""

    rec: Tensor  # [B] reconstruction NLL per sentence (nats), stochastic path
    posterior: LatentDistribution | None = None
    sample: LatentSample | None = None
    h: Tensor | None = None  # [B, E] decoding signal
    rec_coupled: Tensor | None = None  # [B] coupled (deterministic) reconstruction NLL
    h_coupled: Tensor | None = None  # [B, E] coupled decoding signal (not detached here)
    prior: Distribution | None = None  # p(z) or p(z|post), what the KL term regularises towards


def make_posterior_head(config: ModelConfig, in_dim: int, members: int | None = None) -> nn.Module:
    """A fresh posterior head of the configured family (each call has its own weights); with
    ``members``, K stacked heads (the Gaussian family only)."""
    family = config.posterior
    if members is not None and family != "gaussian":
        raise CvaeError(f"a member-stacked model supports the Gaussian posterior only, got {family!r}")
    if family == "gaussian":
        return GaussianHead(in_dim, config.latent_dim, members=members)
    if family == "vmf":
        return VonMisesFisherHead(in_dim, config.latent_dim, wood_b=config.vmf_sampler)
    if family == "power_spherical":
        return PowerSphericalHead(in_dim, config.latent_dim)
    if family == "nf":
        return PlanarFlowHead(in_dim, config.latent_dim, n_flows=config.n_flows)
    raise ValueError(f"unknown posterior family {family!r}")


def make_decoder(config: ModelConfig, embedding: nn.Module, members: int | None = None) -> nn.Module:
    """A fresh decoder sharing ``embedding`` (decoders expose logits/log_likelihood/greedy); with
    ``members``, K stacked decoders (the GRU decoder only)."""
    if config.decoder == "gru":
        return GRUDecoder(embedding, 2 * config.hidden_dim, config.dropout, members=members)
    if members is not None:
        raise CvaeError(f"a member-stacked model supports the GRU decoder only, got {config.decoder!r}")
    if config.decoder == "cnn":
        return CNNDecoder(embedding, config.cnn_filters, config.cnn_dilations, config.dropout)
    raise ValueError(f"unknown decoder {config.decoder!r}")


def with_condition(h: Tensor, condition: Tensor | None) -> Tensor:
    """h [..., B, E] plus a per-sentence condition signal [B, E] (broadcast over samples)."""
    return h if condition is None else h + condition


def repeat_for_samples(batch: Batch, n_samples: int) -> tuple[Tensor, Tensor]:
    """Decoder inputs/targets repeated sample-major: [S*B, T+1] matching z.reshape(S*B, d)."""
    return batch.inputs.repeat(n_samples, 1), batch.targets.repeat(n_samples, 1)


class LanguageModel(nn.Module):
    """GRU-LM baseline: the decoder with no latent signal; its NLL is exact."""

    kind = "lm"

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = make_embedding(vocab_size, config.embed_dim)
        self.decoder = GRUDecoder(self.embedding, 2 * config.hidden_dim, config.dropout, conditioned=False)

    def log_px(self, batch: Batch) -> Tensor:
        """Exact per-sentence log-likelihood, [B]."""
        return self.decoder.log_likelihood(batch.inputs, batch.targets, None)

    def forward(self, batch: Batch) -> ModelOutput:
        return ModelOutput(rec=-self.log_px(batch))


class DenoisingAutoencoder(nn.Module):
    """DAE baseline (no noise): encoder -> Linear(2H -> d) -> signal network -> decoder."""

    kind = "dae"

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = make_embedding(vocab_size, config.embed_dim)
        self.encoder = BiGRUEncoder(self.embedding, config.hidden_dim, config.dropout)
        self.code = nn.Linear(self.encoder.out_dim, config.latent_dim)
        self.signal = SignalNetwork(config.latent_dim, config.embed_dim)
        self.decoder = make_decoder(config, self.embedding)

    def forward(self, batch: Batch) -> ModelOutput:
        h = self.signal(self.code(self.encoder(batch.words, batch.lengths)))
        return ModelOutput(rec=-self.decoder.log_likelihood(batch.inputs, batch.targets, h), h=h)


class TextVAE(nn.Module):
    """encoder -> posterior head -> signal network -> decoder, for any posterior family.

    ``members`` K: K such models of one config stacked as one (a pack, ``cvae_core.packed``; the
    Gaussian GRU model only): the same wiring and parameter names, every parameter and every
    tensor of ``forward`` with a leading member dimension (rec [K, B], z [K, B, d], h [K, B, E]).
    """

    kind = "vae"
    conditional = False  # reads post/response pairs

    def __init__(self, config: ModelConfig, vocab_size: int, members: int | None = None):
        super().__init__()
        self.members = members
        self.embedding = make_embedding(vocab_size, config.embed_dim, members)
        self.encoder = BiGRUEncoder(self.embedding, config.hidden_dim, config.dropout, members)
        self.head = make_posterior_head(config, self.head_input_dim, members)
        self.signal = SignalNetwork(config.latent_dim, config.embed_dim, members)
        self.decoder = make_decoder(config, self.embedding, members)

    @property
    def head_input_dim(self) -> int:
        """Width of ``encode(batch)``, which posterior heads (the twin's too) read."""
        return self.encoder.out_dim

    def prior(self, batch: Batch | None = None) -> Distribution:
        """p(z), the same for every sentence (``batch`` is for conditional models)."""
        return self.head.prior(self.embedding.weight.device)

    def prior_from_encoding(self, e: Tensor) -> Distribution:
        return self.prior()

    def condition(self, batch: Batch) -> Tensor | None:
        """Signal [B, E] a conditional model adds to h = signal(z); None here."""
        return None

    def condition_from_encoding(self, e: Tensor) -> Tensor | None:
        return None

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    def encode(self, batch: Batch) -> Tensor:
        """[B, 2H] encoding e."""
        return self.encoder(batch.words, batch.lengths)

    def posterior(self, batch: Batch) -> LatentDistribution:
        return self.head(self.encode(batch))

    def log_px_given_z(self, batch: Batch, z: Tensor) -> Tensor:
        """z [S, B, d] (or [B, d]) -> log p(x | z) per sentence, [S, B] (or [B])."""
        if z.dim() == 2:
            return self.log_px_given_z(batch, z.unsqueeze(0)).squeeze(0)
        n_samples = z.shape[0]
        inputs, targets = repeat_for_samples(batch, n_samples)
        h = with_condition(self.signal(z), self.condition(batch))  # [S, B, E]
        return self.decoder.log_likelihood(inputs, targets, h.reshape(-1, h.shape[-1])).view(n_samples, -1)

    def inference_parameters(self) -> list[nn.Parameter]:
        """The inference network q(z|x): encoder GRU and posterior head. Not the embedding, which
        the decoder shares (Lagging-VAE's inner loop must leave the decoder untouched)."""
        return [*self.encoder.gru.parameters(), *self.head.parameters()]

    @torch.no_grad()
    def init_encoder_from_dae(self, dae_weights: dict[str, Tensor]) -> list[str]:
        """PreFB: copy a DAE's embedding, encoder GRU (both directions) and code layer
        Linear(2H -> d) into this model's embedding, encoder and posterior MEAN head. The log-std
        head, signal network and decoder keep their fresh initialisation. -> the names copied.
        Raises ValueError on a missing or mis-shaped tensor."""
        if not isinstance(self.head, GaussianHead):
            raise ValueError(f"DAE initialisation needs a Gaussian posterior head, got {type(self.head).__name__}")
        targets = {"embedding.weight": self.embedding.weight, "code.weight": self.head.mean.weight,
                   "code.bias": self.head.mean.bias,
                   **{f"encoder.gru.{name}": p for name, p in self.encoder.gru.named_parameters()}}
        for name, target in targets.items():
            if name not in dae_weights:
                raise ValueError(f"the DAE weights have no {name!r}")
            source = dae_weights[name]
            if source.shape != target.shape:
                raise ValueError(f"DAE {name} has shape {tuple(source.shape)}, this model needs {tuple(target.shape)}")
            target.copy_(source.to(target.device, target.dtype))
        return list(targets)

    def forward_from_encoding(self, batch: Batch, e: Tensor, noise: Tensor | None = None) -> ModelOutput:
        """``noise``: the standard normal draw of a Gaussian posterior's sample (drawn if None;
        a pack passes each member's draw from its own stream)."""
        posterior = self.head(e)
        sample = posterior.rsample_with_log_prob() if noise is None else posterior.sample_from_noise(noise)
        h = with_condition(self.signal(sample.z), self.condition_from_encoding(e))
        rec = -self.decoder.log_likelihood(batch.inputs, batch.targets, h)
        return ModelOutput(rec=rec, posterior=posterior, sample=sample, h=h, prior=self.prior_from_encoding(e))

    def forward(self, batch: Batch, noise: Tensor | None = None) -> ModelOutput:
        return self.forward_from_encoding(batch, self.encode(batch), noise)


class CoupledVAE(nn.Module):
    """Coupling as one wrapper over any TextVAE, conditional or not (paper sections 4 and 5.10).

    Shared with the base: the embedding and the whole encoder (e is computed once; for a CVAE
    also the post encoder and the post signal, which enters h^c as it enters h).  Owned by
    the twin, same structure, separate weights: posterior head, signal network, decoder.  The
    twin's code is ``posterior.coupled_code()`` (Gaussian: the mean), so it is deterministic.
    Evaluation uses the stochastic path only: prior/posterior/log_px_given_z delegate to base.
    """

    kind = "vae"

    def __init__(self, base: TextVAE, config: ModelConfig):
        super().__init__()
        self.base = base
        self.twin_head = make_posterior_head(config, base.head_input_dim, base.members)
        self.twin_signal = SignalNetwork(config.latent_dim, config.embed_dim, base.members)
        self.twin_decoder = make_decoder(config, base.embedding, base.members)

    @property
    def members(self) -> int | None:
        return self.base.members

    @property
    def conditional(self) -> bool:
        return self.base.conditional

    def prior(self, batch: Batch | None = None) -> Distribution:
        return self.base.prior(batch)

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    def encode(self, batch: Batch) -> Tensor:
        return self.base.encode(batch)

    def posterior(self, batch: Batch) -> LatentDistribution:
        return self.base.posterior(batch)

    def log_px_given_z(self, batch: Batch, z: Tensor) -> Tensor:
        return self.base.log_px_given_z(batch, z)

    def inference_parameters(self) -> list[nn.Parameter]:
        """The base's inference network plus the twin's posterior head (both read e = enc(x))."""
        return [*self.base.inference_parameters(), *self.twin_head.parameters()]

    def forward(self, batch: Batch, noise: Tensor | None = None) -> ModelOutput:
        e = self.base.encode(batch)
        out = self.base.forward_from_encoding(batch, e, noise)
        code = self.twin_head(e).coupled_code()
        out.h_coupled = with_condition(self.twin_signal(code), self.base.condition_from_encoding(e))
        out.rec_coupled = -self.twin_decoder.log_likelihood(batch.inputs, batch.targets, out.h_coupled)
        return out


def latent_model(model: nn.Module) -> TextVAE:
    """The stochastic TextVAE inside a (possibly coupled) model."""
    return model.base if isinstance(model, CoupledVAE) else model

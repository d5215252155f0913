"""Greedy decoding from latent codes: prior samples, reconstructions and interpolations.

Decoding follows the authors' code: start from <bos>, mask <unk> at every step,
take the argmax, and cut the output at the first <eos>.  Beam size 1 everywhere.

* Steps: the authors always run 200 steps and cut afterwards.  We stop as soon as every row of
  the batch has produced <eos>.  Greedy decoding is causal and deterministic, so the tokens
  before each row's first <eos> are the same either way, only faster.
* An output that starts with <eos>: the authors' ``strip_eos`` keeps that <eos>, so
  the output is the one-token sentence "<eos>".  We return an EMPTY sentence instead
  (``strip_eos(..., empty_as_eos=True)`` restores their behaviour).  This changes BLEU and
  Dist a little, and only when a model generates empty sentences.

Works for any latent model that has ``prior``, ``posterior(batch)``, ``signal`` (z -> h) and
``decoder.greedy(h, bos, max_steps)``.  A coupled model decodes through its stochastic
``base``, like every evaluation.  Shapes: B sentences, S samples, d latent size, E signal size.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .data import Batch
from .data.vocab import BOS, EOS
from .errors import CvaeError
from .models.text_vae import latent_model

DEFAULT_MAX_STEPS = 200  # the authors' fixed number of decoding steps (= max_len)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() (dropout off, BatchNorm running statistics) for the block, then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generator(model: nn.Module) -> nn.Module:
    """The latent model that generates: a TextVAE (a coupled model's stochastic ``base``)."""
    kind = getattr(model, "kind", None)
    if getattr(model, "conditional", False):
        raise CvaeError("this is a dialogue model: its sentences depend on a post (use `cvae respond`)")
    if kind != "vae":
        raise CvaeError(f"generation needs a latent-variable model (model.kind=vae), got model.kind={kind!r}")
    return latent_model(model)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def strip_eos(ids: Sequence[int], eos: int = EOS, empty_as_eos: bool = False) -> list[int]:
    """Token ids cut before the first <eos> (all of them if there is none).

    empty_as_eos=True mimics the authors' ``strip_eos``: an output that starts with <eos> becomes
    ``[eos]`` instead of ``[]``.
    """
    ids = list(ids)
    if eos in ids:
        ids = ids[: ids.index(eos)]
        if not ids and empty_as_eos:
            return [eos]
    return ids


@torch.no_grad()
def greedy_ids(decoder: nn.Module, h: Tensor, max_steps: int = DEFAULT_MAX_STEPS,
               stop_early: bool = True) -> Tensor:
    """h [B, E] -> greedy token ids [B, T], T <= max_steps (<unk> masked).

    With stop_early (default) decoding ends once every row has an <eos>; the ids up to each
    row's first <eos> equal those of ``decoder.greedy(h, BOS, max_steps)``.
    """
    if h.shape[0] == 0:
        return torch.zeros((0, 0), dtype=torch.long, device=h.device)
    return decoder.greedy(h, BOS, max_steps, eos=EOS if stop_early else None)


@torch.no_grad()
def decode_signals(decoder: nn.Module, h: Tensor, max_steps: int = DEFAULT_MAX_STEPS,
                   empty_as_eos: bool = False) -> list[list[int]]:
    """h [N, E] -> N sentences as token-id lists, cut at the first <eos>."""
    ids = greedy_ids(decoder, h, max_steps).tolist()
    return [strip_eos(row, EOS, empty_as_eos) for row in ids]


@torch.no_grad()
def decode_codes(model: nn.Module, z: Tensor, max_steps: int = DEFAULT_MAX_STEPS) -> list[list[int]]:
    """z [N, d] -> N sentences (token ids): h = signal(z), greedy decode, cut at <eos>.

    The model is put in eval mode for the call.
    """
    vae = generator(model)
    with eval_mode(model):
        return decode_signals(vae.decoder, vae.signal(z), max_steps)


@torch.no_grad()
def reconstruct(model: nn.Module, batch: Batch, n_samples: int = 1,
                max_steps: int = DEFAULT_MAX_STEPS) -> list[list[list[int]]]:
    """Decode each sentence of ``batch`` from ``n_samples`` codes z ~ q(z|x).

    -> [B][n_samples] token-id lists (sample k of sentence i at ``[i][k]``).  Uses the global
    torch RNG; wrap in :func:`cvae_core.runtime.seeded` for reproducible samples.
    """
    if n_samples < 1:
        raise CvaeError(f"n_samples must be >= 1, got {n_samples}")
    vae = generator(model)
    batch = batch.to(model_device(model))
    with eval_mode(model):
        z = vae.posterior(batch).rsample_with_log_prob((n_samples,)).z  # [S, B, d]
        sentences = decode_signals(vae.decoder, vae.signal(z.reshape(-1, z.shape[-1])), max_steps)
    size = batch.size
    return [[sentences[k * size + i] for k in range(n_samples)] for i in range(size)]


@torch.no_grad()
def sample_prior(model: nn.Module, n: int, batch_size: int = 32,
                 max_steps: int = DEFAULT_MAX_STEPS) -> list[list[int]]:
    """n sentences (token ids) decoded from z ~ p(z), ``batch_size`` codes at a time."""
    if n < 1 or batch_size < 1:
        raise CvaeError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    vae = generator(model)
    out: list[list[int]] = []
    with eval_mode(model):
        prior = vae.prior()
        for start in range(0, n, batch_size):
            z = prior.sample((min(batch_size, n - start),))
            out.extend(decode_signals(vae.decoder, vae.signal(z), max_steps))
    return out


@torch.no_grad()
def respond(model: nn.Module, batch: Batch, n_samples: int = 1,
            max_steps: int = DEFAULT_MAX_STEPS) -> list[list[list[int]]]:
    """Greedy responses to the posts of a pair batch (its responses are not read): for a CVAE
    each from its own z ~ p(z|post), for seq2seq the one deterministic response repeated.

    -> [B][n_samples] token-id lists.  Uses the global torch RNG; wrap in :func:`cvae_core.runtime.seeded`.
    """
    if n_samples < 1:
        raise CvaeError(f"n_samples must be >= 1, got {n_samples}")
    net = latent_model(model)  # a coupled CVAE answers through its stochastic base
    if not getattr(net, "conditional", False):
        raise CvaeError("responding needs a conditional (dialogue) model: seq2seq, cvae or coupled-cvae")
    batch = batch.to(model_device(model))
    with eval_mode(model):
        h = net.response_signals(batch, n_samples)  # [S, B, E]
        sentences = decode_signals(net.decoder, h.reshape(-1, h.shape[-1]), max_steps)
    size = batch.size
    return [[sentences[k * size + i] for k in range(n_samples)] for i in range(size)]


@torch.no_grad()
def interpolate(model: nn.Module, batch_a: Batch, batch_b: Batch, steps: int = 5,
                max_steps: int = DEFAULT_MAX_STEPS) -> list[list[list[int]]]:
    """Decode the straight line between the codes of sentence pairs (a_i, b_i).

    The codes are the posterior's deterministic point code ``coupled_code()``: the posterior
    mean for the Gaussian (as the authors), the flowed mean for planar flows, mu for vMF.
    z_k = (1 - k/(steps+1)) z_a + k/(steps+1) z_b for k = 0..steps+1, so the endpoints are
    included: steps=5 gives 7 decodes.  -> [B][steps + 2] token-id lists.  Deterministic.
    """
    if steps < 0:
        raise CvaeError(f"steps must be >= 0, got {steps}")
    if batch_a.size != batch_b.size:
        raise CvaeError(f"interpolate needs batches of equal size, got {batch_a.size} and {batch_b.size}")
    vae = generator(model)
    device = model_device(model)
    with eval_mode(model):
        z_a = vae.posterior(batch_a.to(device)).coupled_code()  # [B, d]
        z_b = vae.posterior(batch_b.to(device)).coupled_code()
        weights = (torch.arange(steps + 2, device=device) / (steps + 1)).view(-1, 1, 1)  # k/(steps+1), [K, 1, 1]
        z = (1.0 - weights) * z_a + weights * z_b  # [K, B, d]
        sentences = decode_signals(vae.decoder, vae.signal(z.reshape(-1, z.shape[-1])), max_steps)
    size, n_points = batch_a.size, steps + 2
    return [[sentences[k * size + i] for k in range(n_points)] for i in range(size)]

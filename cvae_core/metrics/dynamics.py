"""Gradient norms with respect to the encoding e (paper Table 5 / Figure 2).

As in the authors' ``analyze_saliency``: the model is in TRAIN mode (dropout on, z sampled),
batches of 16 sentences, and with e = the encoder output [B, 2H] of each sentence:

* ``grad_rec``         = ||∂rec/∂e_i||²       rec   = Σ_batch per-sentence NLL, stochastic decoder
* ``grad_rec_coupled`` = ||∂rec^c/∂e_i||²     rec^c = the same for the coupled (deterministic) decoder
* ``grad_total``       = ||∂(rec + rec^c)/∂e_i||²
* ``grad_reg``         = ||∂reg/∂e_i||²       reg   = Σ_batch Σ_dims analytic KL(q(z|x) || N(0, I)),
                                              unweighted (no annealing, whatever the training term)
* ``dh_de``            = ||∂h_i/∂e_i||_F² / ||h_i||²   with h = signal(z) the decoding signal

All are SQUARED norms (the authors' code squares them), averaged over the sentences of the
split.  ``grad_rec_coupled`` is None for models without a coupled twin (then grad_total = grad_rec); ``grad_reg`` is None
for the DAE.  Supported: Gaussian VAEs (VAE, beta-VAE and other Gaussian-posterior variants),
their coupled forms, and the DAE (for which h = signal(Linear(e))).  Any decoder works; with the
CNN decoder, BatchNorm in train mode mixes the sentences of a batch, so ∂rec/∂e_i then also
carries the other sentences' losses (it is still the gradient of the batch sum, as defined).
For Figure 2, ``train.dynamics_every=K`` measures the curves during training: every K steps
:func:`held_out_gradient_norms` on a fixed batch of 16 validation sentences (the trainer logs
``train_grad_total``, ``train_grad_reg`` and ``train_dh_de``); or run :func:`gradient_norms` on
saved checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..data.batching import eval_batches, make_batch
from ..data.corpus import Split
from ..errors import CvaeError
from ..models.text_vae import latent_model
from ..modules.posteriors import DiagonalGaussian
from ..runtime import seeded

GRAD_KEYS = ("grad_rec", "grad_rec_coupled", "grad_total", "grad_reg", "dh_de")
GRAD_BATCH = 16  # the authors' batch size for this analysis
# Figure 2's three curves: ||d(rec [+ rec^c])/de||^2, ||d reg/de||^2, ||dh/de||_F^2 / ||h||^2
DYNAMICS_KEYS = ("grad_total", "grad_reg", "dh_de")


def encoding_module(model: nn.Module) -> nn.Module:
    """The module whose output is e; a clear error for the models the analysis does not cover."""
    kind = getattr(model, "kind", None)
    if kind == "dae":
        return model.encoder
    if getattr(model, "conditional", False):
        raise CvaeError("gradient norms are defined for the unconditional models (VAE, coupled VAE, DAE); "
                        "this is a conditional (dialogue) model")
    if kind == "vae":
        vae = latent_model(model)
        family = getattr(vae.head, "family", None)
        if family == "gaussian":
            return vae.encoder
        raise CvaeError(f"gradient norms are defined for Gaussian posteriors (the reg term is the analytic "
                        f"Gaussian KL); this model has model.posterior={family!r}")
    raise CvaeError(f"gradient norms need a VAE, coupled VAE or DAE; got model.kind={kind!r}")


def _squared_row_norms(grad: Tensor) -> Tensor:
    """[B, D] -> [B]."""
    return grad.pow(2).sum(-1)


def _jacobian_frobenius_sq(h: Tensor, e: Tensor) -> Tensor:
    """||∂h_i/∂e_i||_F² per example, [B], for h [B, E] whose row i depends on e [B, D] row i only.

    One backward pass per coordinate k of h (of Σ_i h_ik), vectorised with is_grads_batched;
    falls back to a loop of E backward passes where vmap cannot run the graph.
    """
    signal_dim = h.shape[1]
    basis = torch.eye(signal_dim, dtype=h.dtype, device=h.device)  # [E, E]
    grad_outputs = basis.unsqueeze(1).expand(signal_dim, h.shape[0], signal_dim)  # [E(k), B, E]
    try:
        (jac,) = torch.autograd.grad(h, e, grad_outputs, retain_graph=True, is_grads_batched=True)  # [E, B, D]
        return jac.pow(2).sum(dim=(0, 2))
    except RuntimeError:
        total = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        for k in range(signal_dim):
            (grad,) = torch.autograd.grad(h[:, k].sum(), e, retain_graph=True)
            total += _squared_row_norms(grad)
        return total


def batch_gradient_norms(model: nn.Module, batch) -> dict[str, Tensor | None]:
    """The five quantities for every sentence of one batch, each [B] (None where undefined).

    Runs ``model(batch)`` in the model's CURRENT mode (gradient_norms sets train mode) and
    takes gradients with respect to the encoder output, captured with a forward hook, so the
    model's own forward pass (shared encoding, coupled twin) is what is differentiated.
    """
    encoder = encoding_module(model)
    captured: list[Tensor] = []
    handle = encoder.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            output = model(batch)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise CvaeError(f"expected one encoder call per forward pass, saw {len(captured)}")
    e = captured[0]

    def grad(quantity: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(quantity, e, retain_graph=True)
        return g

    g_rec = grad(output.rec.sum())
    result: dict[str, Tensor | None] = {"grad_rec": _squared_row_norms(g_rec), "grad_rec_coupled": None,
                                        "grad_reg": None}
    if output.rec_coupled is not None:
        g_coupled = grad(output.rec_coupled.sum())
        result["grad_rec_coupled"] = _squared_row_norms(g_coupled)
        result["grad_total"] = _squared_row_norms(g_rec + g_coupled)  # ∂(rec + rec^c)/∂e, by linearity
    else:
        result["grad_total"] = result["grad_rec"]
    if isinstance(output.posterior, DiagonalGaussian):
        result["grad_reg"] = _squared_row_norms(grad(output.posterior.kl_per_dim().sum()))
    elif model.kind == "vae":
        raise CvaeError("gradient norms need a Gaussian posterior (DiagonalGaussian) in the model output")
    h = output.h
    result["dh_de"] = _jacobian_frobenius_sq(h, e) / h.pow(2).sum(-1)
    return {key: None if value is None else value.detach() for key, value in result.items()}


def gradient_norms(model: nn.Module, split: Split, batch_size: int = GRAD_BATCH, seed: int = 0) -> dict[str, Any]:
    """Mean over the split's sentences of the squared gradient norms (module docstring).

    -> grad_rec, grad_rec_coupled, grad_total, grad_reg, dh_de (floats, None where undefined).
    Dropout masks and z samples come from a seeded RNG stream; the caller's RNG state and the
    model's train/eval mode are restored afterwards.  Parameter gradients are not touched.
    """
    encoding_module(model)
    if batch_size < 1:
        raise CvaeError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    sums: dict[str, float | None] = {key: 0.0 for key in GRAD_KEYS}
    model.train()
    try:
        with seeded(seed, device):
            for batch in eval_batches(split.examples, batch_size):
                for key, values in batch_gradient_norms(model, batch.to(device)).items():
                    if values is None:
                        sums[key] = None
                    elif sums[key] is not None:
                        sums[key] += values.double().sum().item()
    finally:
        model.train(was_training)
    n = len(split.examples)
    return {key: None if total is None else total / n for key, total in sums.items()}


def held_out_gradient_norms(model: nn.Module, batch, seed: int) -> dict[str, float]:
    """Figure 2's quantities (DYNAMICS_KEYS, means over the batch's sentences) for one fixed batch,
    measured in train mode with dropout masks and z from their own ``seed``ed RNG stream.

    Leaves training exactly as it was: the caller's RNG state, BatchNorm running statistics and
    the parameters' gradients are untouched (only gradients w.r.t. e are taken).
    """
    device = next(model.parameters()).device
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        with seeded(seed, device):
            norms = batch_gradient_norms(model, batch)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(buffers[name])
    return {key: norms[key].double().mean().item() for key in DYNAMICS_KEYS if norms[key] is not None}


class HeldOutDynamics:
    """train.dynamics_every: Figure 2's gradient norms on a fixed held-out batch, averaged between
    evaluations and reported as train_grad_total, train_grad_reg, train_dh_de."""

    def __init__(self, model: nn.Module, examples: list[list[int]], device: torch.device, seed: int):
        encoding_module(model)  # a clear error for models the analysis does not cover
        self.model, self.seed = model, seed
        self.batch = make_batch(examples).to(device)
        self.sums: dict[str, float] = {}
        self.count = 0

    def measure(self) -> None:
        for key, value in held_out_gradient_norms(self.model, self.batch, self.seed).items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        out = {f"train_{key}": total / self.count for key, total in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return out

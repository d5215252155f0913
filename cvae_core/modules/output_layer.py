"""The output layer and its log-softmax as one operation: log softmax(W x + b)[gold] per row.

The decoder's 10,002-word output layer is most of a step, and computed the plain way
(``cross_entropy(linear(x), gold)``) it writes three full-vocabulary tensors per call: the
logits, their log-softmax and, in backward, a zero-filled gradient of the log-softmax before the
gradient of the logits.  Here one [rows, V] buffer holds the logits, then (in place) the
softmax that backward needs, then (in place) the gradient of the logits; no zero fill, no
second or third tensor.  Without autograd the rows run in tiles through one reused buffer, so
memory does not grow with the number of positions.

Rows may carry a leading member dimension (packed training): rows [M, R, F], weight [M, V, F],
bias [M, V], one batched matmul for all members; gold [R] is shared by the members.

Numbers: log p = x_gold - max - log sum exp(x - max), the formula of ``log_softmax``, in fp32;
the same values as ``cross_entropy`` to float rounding (tests/test_output_layer.py).  Under
autocast (``train.amp``) the matmuls (forward, and the two of backward) run in the autocast dtype,
as they would as ``linear``, and the softmax stays fp32.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

# Rows of logits per tile without autograd: a [256, V] fp32 tile is 10 MB for the 10K-word PTB
# vocabulary (cache- and allocator-friendly); the matmul runs at its full rate from ~256 rows.
OUTPUT_TILE_ROWS = 256


def _matmul_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype if autocast is on for this device type, else None (run as given)."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class _BufferPool:
    """Logits buffers kept from one call to the next on the CPU.  A fresh 20-80 MB tensor costs a
    page fault per 4 KB page on first touch (more time than its softmax: bench/bench_output_layer.py);
    a reused one does not.  CUDA's caching allocator does this by itself.  At most ``keep``
    buffers wait here (a Coupled-VAE step has two in flight, one per decoder)."""

    def __init__(self, keep: int = 2):
        self.keep, self.free, self.lock = keep, [], threading.Lock()

    def take(self, rows: Tensor, low: torch.dtype | None) -> Tensor:
        """An empty logits buffer: fp32 (fp64 for fp64 rows), whatever the matmul's dtype."""
        dtype = torch.float32 if low is not None else torch.promote_types(rows.dtype, torch.float32)
        if rows.device.type == "cpu":
            with self.lock:
                for i, buffer in enumerate(self.free):
                    if buffer.dtype == dtype:
                        return self.free.pop(i)
        # a normal tensor even under inference_mode (evaluation), so that training may reuse it
        with torch.inference_mode(False):
            return torch.empty(0, dtype=dtype, device=rows.device)

    def give(self, buffer: Tensor) -> None:
        if buffer.device.type == "cpu":
            with self.lock:
                if len(self.free) < self.keep:
                    self.free.append(buffer)


_POOL = _BufferPool()


def release_kept_buffers() -> None:
    """Free the logits buffers kept between calls (e.g. when a process is done training)."""
    with _POOL.lock:
        _POOL.free.clear()


def _logits(rows: Tensor, weight: Tensor, bias: Tensor, out: Tensor, low: torch.dtype | None) -> Tensor:
    """W rows + b into ``out`` (fp32): [R, V] from rows [R, F], or [M, R, V] from [M, R, F]."""
    if low is not None:  # autocast: the matmul in its dtype, the result widened into the buffer
        rows, weight, bias = rows.to(low), weight.to(low), bias.to(low)
        with torch.autocast(rows.device.type, enabled=False):
            narrow = _logits(rows, weight, bias, torch.empty(0, dtype=low, device=rows.device), None)
            return out.resize_(narrow.shape).copy_(narrow)
    if rows.dim() == 2:
        return torch.addmm(bias, rows, weight.t(), out=out.resize_(rows.shape[0], weight.shape[0]))
    shape = (rows.shape[0], rows.shape[1], weight.shape[1])
    return torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2), out=out.resize_(shape))


def _log_softmax_at_gold(logits: Tensor, gold: Tensor, keep_softmax: bool = True) -> Tensor:
    """log softmax(logits)[gold] per row; leaves softmax(logits) in ``logits`` (in place), or
    with ``keep_softmax=False`` its unnormalised exp(logits - max)."""
    target = logits.gather(-1, gold.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    peak = logits.amax(-1, keepdim=True)
    total = logits.sub_(peak).exp_().sum(-1, keepdim=True)
    if keep_softmax:
        logits.div_(total)
    return target - peak.squeeze(-1) - total.log().squeeze(-1)


class _OutputLogLikelihood(torch.autograd.Function):
    """Forward: the logits buffer becomes the softmax; backward turns it, in place, into the
    gradient of the logits (softmax - onehot(gold)) * -grad, then the three matmul gradients.
    The buffer is consumed by the first backward and goes back to the pool; a later backward
    through the same graph (``retain_graph``, e.g. the gradient norms of Figure 2, one quantity
    after another) computes the softmax again from the saved inputs."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor, gold: Tensor) -> Tensor:
        low = _matmul_dtype(rows.device)
        probabilities = _logits(rows, weight, bias, _POOL.take(rows, low), low)
        log_p = _log_softmax_at_gold(probabilities, gold)
        ctx.save_for_backward(rows, weight, bias, gold)
        # an attribute, not a saved tensor: once consumed it returns to the pool and may be
        # rewritten by another forward, which autograd's version check on saved tensors would refuse
        ctx.probabilities, ctx.low = probabilities, low
        return log_p.to(rows.dtype) if low is None else log_p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        rows, weight, bias, gold = ctx.saved_tensors
        low = ctx.low
        gradient, ctx.probabilities = ctx.probabilities, None
        if gradient is None:  # a second backward: the softmax again, into a buffer of its own
            gradient = _logits(rows, weight, bias, _POOL.take(rows, low), low)
            _log_softmax_at_gold(gradient, gold)
        buffer = gradient
        gradient.mul_(-grad.unsqueeze(-1))  # d log_p / d logits = onehot(gold) - softmax
        index = gold.expand(*gradient.shape[:-1]).unsqueeze(-1)
        gradient.scatter_add_(-1, index, grad.unsqueeze(-1).to(gradient.dtype))
        if low is not None:
            gradient, rows_low, weight_low = gradient.to(low), rows.to(low), weight.to(low)
        else:
            rows_low, weight_low = rows, weight
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = (gradient @ weight_low).to(rows.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (gradient.transpose(-1, -2) @ rows_low).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = gradient.sum(-2).to(weight.dtype)
        _POOL.give(buffer)
        return grad_rows, grad_weight, grad_bias, None


def output_token_log_likelihood(rows: Tensor, weight: Tensor, bias: Tensor, gold: Tensor) -> Tensor:
    """log softmax(weight rows + bias)[gold] for each row: rows [R, F] (or [M, R, F]), weight
    [V, F] ([M, V, F]), bias [V] ([M, V]), gold [R] -> [R] ([M, R]), fp32 (nats)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, weight, bias)):
        return _OutputLogLikelihood.apply(rows, weight, bias, gold)
    low = _matmul_dtype(rows.device)
    buffer = _POOL.take(rows, low)
    count = rows.shape[-2]
    token_log_p = torch.cat([
        _log_softmax_at_gold(_logits(rows[..., start: start + OUTPUT_TILE_ROWS, :], weight, bias, buffer, low),
                             gold[start: start + OUTPUT_TILE_ROWS], keep_softmax=False)
        for start in range(0, max(1, count), OUTPUT_TILE_ROWS)], dim=-1)
    _POOL.give(buffer)
    return token_log_p

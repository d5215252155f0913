"""The training loop: step-based schedule, clipping, periodic validation, best checkpoint, callbacks.

``train(config, output_dir, callbacks=...)`` calls every callback at each evaluation with a flat
``dict[str, float]`` of metrics and the path of the checkpoint just written; the study service
plugs in there.  A callback may raise :class:`StopTraining` to end the run cleanly.  Every
evaluation's metrics say which evaluation is the run's best so far: ``is_best`` (1.0 when this
one is), ``best_step`` and ``best_<selection metric>``, the metric being
:func:`cvae_core.metrics.names.selection_metric` (``val_nll``; ``val_rec`` for a DAE).
Consumers read these instead of re-picking the best evaluation.

Two Table 1 baselines change the loop, each behind a config field:

* Lagging-VAE (``train.aggressive``, :mod:`cvae_core.lagging`): before each step, encoder-only
  updates on fresh batches, then a decoder-side-only step, until ``val_mi_batch`` stops rising.
* PreFB (``train.pretrain_steps`` or ``train.init_from``, :mod:`cvae_core.prefb`): a DAE stage
  trained (resumed, or reused when finished) in ``<output_dir>/pretrain`` initialises the
  embedding, the encoder GRU and the posterior mean head; then the VAE trains from step 1.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .checkpoint import (BEST, LATEST, TrainState, install_checkpoint, load_checkpoint, point_link, restore_rng,
                         save_checkpoint, step_dir)
from .config import Config, validate
from .data import BucketBatcher, Corpus, load_corpus
from .data.batching import POOL_BATCHES, BatchStream
from .errors import CvaeError, Diverged, divergence_as_outcome
from .lagging import LaggingPhase, parameter_groups
from .metrics import evaluate
from .metrics.dynamics import GRAD_BATCH, HeldOutDynamics
from .metrics.names import BEST_STEP, IS_BEST, best_key, selection_metric
from .metrics.text import response_diversity
from .models import build_model
from .objectives import Objective
from .prefb import init_from_dae, pretrained_dae
from .runtime import bf16_autocast, format_duration, resolve_device

Callback = Callable[[dict[str, float], Path], None]
Log = Callable[[str], None]


class StopTraining(Exception):
    """Raised by a callback to end training after the current evaluation."""


@dataclass
class TrainResult:
    output_dir: Path
    best_checkpoint: Path | None
    best_metrics: dict[str, float]  # the metrics of the best evaluation ({} if none)
    last_metrics: dict[str, float]
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0  # 0: no evaluation yet
    selection_metric: str = "val_nll"  # the metric whose lowest value picked the best evaluation


def learning_rate(config: Config, step: int) -> float:
    """LR for step t (1-based): halved after every step m < t with m % every == 0 and m > start."""
    t = config.train
    halvings = max(0, (step - 1) // t.lr_decay_every - t.lr_decay_start // t.lr_decay_every)
    return t.lr * 0.5**halvings


def _format_metrics(metrics: dict[str, float], keys: Iterable[str]) -> str:
    return " ".join(f"{k} {metrics[k]:.2f}" for k in keys if metrics.get(k) is not None)


class Progress:
    """Running means of the loss parts between log lines, tokens/s and ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start_step = total_steps, start_step
        self.t0 = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.count = self.tokens = 0
        self.window_t0 = self.t0
        self.window_tokens = 0
        self.eval_seconds = 0.0  # excluded from throughput, included in the ETA

    def add(self, parts: dict[str, torch.Tensor], tokens: int, extra: dict[str, float | torch.Tensor]) -> None:
        # Summed as float64 tensors where they are (no host sync per step on a GPU); read at log lines.
        for key, value in {**parts, **extra}.items():
            value = value.detach().double() if isinstance(value, torch.Tensor) else value
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.tokens += tokens
        self.window_tokens += tokens

    def means(self, member: int | None = None) -> dict[str, float]:
        """The means since the last reset; of run ``member`` where the sums are a pack's [K] tensors."""
        return {f"train_{k}": float(v if member is None else v[member]) / max(1, self.count)
                for k, v in self.sums.items()}

    def keep(self, members: list[int]) -> None:
        """Keep only these runs' sums (of a pack whose other members were dropped)."""
        index = torch.tensor(members)
        self.sums = {k: v[index.to(v.device)] for k, v in self.sums.items()}

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (spent evaluating) out of the throughput; the ETA still counts them."""
        self.eval_seconds += seconds
        self.window_t0 += seconds

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def tokens_per_second(self) -> float:
        """Training throughput since this process started, evaluation time excluded."""
        return self.tokens / max(1e-9, time.perf_counter() - self.t0 - self.eval_seconds)

    def rate_and_eta(self, step: int) -> tuple[float, float]:
        """-> (tokens/s since the last call, the estimated seconds left); starts a new window."""
        now = time.perf_counter()
        rate = self.window_tokens / max(1e-9, now - self.window_t0)
        self.window_t0, self.window_tokens = now, 0
        done = step - self.start_step
        return rate, (now - self.t0) / max(1, done) * (self.total - step)

    def line(self, step: int, kl_weight: float, lr: float) -> str:
        rate, eta = self.rate_and_eta(step)
        means = self.means()
        parts = " ".join(f"{k[6:]} {v:.2f}" for k, v in means.items() if k not in ("train_grad_norm",))
        return (f"step {step}/{self.total} | {parts} | kl_w {kl_weight:.3f} lr {lr:.2e} | "
                f"{rate:,.0f} tok/s | ETA {format_duration(eta)}")


def train(config: Config, output_dir: str | Path, callbacks: Iterable[Callback] = (), resume: bool = False,
          corpus: Corpus | None = None, log: Log | None = None,
          resume_from: str | Path | None = None) -> TrainResult:
    """Train ``config`` into ``output_dir`` (checkpoints under ``output_dir/checkpoints``).

    resume=True continues from ``checkpoints/latest`` if present (same config required, except
    that ``train.steps`` may be raised).  ``resume_from`` continues from any checkpoint directory
    (e.g. the one Ray hands back on a retry): it is installed into this run's checkpoint tree
    first, then training resumes exactly as with resume=True.  ``corpus`` lets a caller share
    data already loaded (the study service passes it through Ray's object store).
    """
    log = log or (lambda text: print(text, file=sys.stdout, flush=True))
    validate(config)
    output_dir = Path(output_dir).absolute()
    ckpt_root = output_dir / "checkpoints"
    device = resolve_device(config.train.device)
    autocast = bf16_autocast(device, config.train.amp)  # a device without bf16 units stops here, before the data loads
    if corpus is None:
        log(f"loading {config.data.dataset} ...")
        corpus = load_corpus(config.data, ("train", "valid"))
    latest = latest_checkpoint(output_dir)
    if resume_from is not None:
        install_checkpoint(resume_from, ckpt_root)
        resume = True
    resuming = resume and latest.exists()
    dae_checkpoint = None if resuming else pretrained_dae(config, output_dir, corpus, log, train)
    torch.manual_seed(config.train.seed)  # after any pretraining stage, so the run is the same either way
    model = build_model(config, len(corpus.vocab)).to(device)
    if dae_checkpoint is not None:
        init_from_dae(model, dae_checkpoint, corpus.vocab, log)
    optimizer = make_optimizer(model, config)
    objective = Objective(config)
    state = TrainState(aggressive=True if config.train.aggressive else None)
    if resuming:
        state = _resume(latest, model, optimizer, config, device, log)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(config.to_json())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{config.preset} on {config.data.dataset} ({config.scale} scale): {n_params:,} parameters, "
        f"{len(corpus['train'].examples):,} training sentences, device {device}, {config.train.steps} steps")
    loop = _Loop(config, model, optimizer, objective, training_batches(config, corpus, state), corpus, device,
                 ckpt_root, state, log, autocast)
    loop.run(callbacks)
    return train_result(config, output_dir, state, loop.last_metrics)


def training_batches(config: Config, corpus: Corpus, state: TrainState) -> BatchStream:
    """The run's training batches (``config``'s batch size, seed and batching) from where ``state``
    stands; shared by ``train`` and the packed loop, whose members all read configs[0]'s."""
    batcher = BucketBatcher(corpus["train"].examples, config.train.batch_size, config.train.seed,
                            pool_batches=POOL_BATCHES[config.data.batching])
    return BatchStream(batcher, state.epoch, state.batch_index)


def latest_checkpoint(output_dir: str | Path) -> Path:
    """Where a run in ``output_dir`` keeps the checkpoint ``resume=True`` continues from (a link
    that exists once the run has evaluated)."""
    return Path(output_dir).absolute() / "checkpoints" / LATEST


def train_result(config: Config, output_dir: Path, state: TrainState, last_metrics: dict[str, float]) -> TrainResult:
    """The TrainResult of the run in ``output_dir`` that ended in ``state``."""
    best = output_dir / "checkpoints" / BEST
    best_metrics = next((m for m in state.history if m["step"] == state.best_step), {})
    return TrainResult(output_dir, best.resolve() if best.exists() else None, best_metrics,
                       last_metrics or (state.history[-1] if state.history else {}), state.step, state.history,
                       state.best_step, selection_metric(config.model.kind))


def _resume(latest: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: Config,
            device: torch.device, log: Log) -> TrainState:
    """Weights, optimizer, RNG and loop state from ``checkpoints/latest``."""
    data = load_checkpoint(latest, map_location=device)
    check_resumable(data.config, config, latest)
    model.load_state_dict(data.weights)
    optimizer.load_state_dict(data.optimizer)
    restore_rng(data.rng)
    state = data.train_state
    if config.train.aggressive and state.aggressive is None:
        state.aggressive = True
    log(f"resumed from {latest.resolve().name} at step {state.step} (best {selection_metric(config.model.kind)} "
        f"{state.best_value:.3f} at step {state.best_step})")
    return state


class DivergenceWatch:
    """A non-finite loss or gradient norm ends the run as ``Diverged``, naming the first step it
    happened at.  The test runs on the device every step; the host reads its result only at log
    lines and before evaluations, so a GPU never waits on the CPU between them.  A diverged run
    goes on for at most ``log_every`` steps before it stops: no evaluation or checkpoint sees them."""

    def __init__(self, device: torch.device, members: int | None = None):
        # members=K watches K runs at once (a pack's [K] losses and norms), each on its own.
        shape = () if members is None else (members,)
        self.first_step = torch.zeros(shape, dtype=torch.long, device=device)  # 0: all finite so far
        self.loss = torch.zeros(shape, device=device)  # at first_step, for the message
        self.grad_norm = torch.zeros(shape, device=device)

    def watch(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float()
        first = (self.first_step == 0) & ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first_step = torch.where(first, step, self.first_step)
        self.loss = torch.where(first, loss, self.loss)
        self.grad_norm = torch.where(first, grad_norm, self.grad_norm)

    def outcomes(self, presets: list[str]) -> list[Diverged | None]:
        """Per watched run (presets[k] names run k in the message): its Diverged, or None."""
        steps = self.first_step.reshape(-1).tolist()
        if not any(steps):
            return [None] * len(steps)
        losses, norms = self.loss.reshape(-1).tolist(), self.grad_norm.reshape(-1).tolist()
        return [_diverged(step, loss, norm, preset) if step else None
                for step, loss, norm, preset in zip(steps, losses, norms, presets)]

    def check(self, preset: str) -> None:
        (outcome,) = self.outcomes([preset])
        if outcome is not None:
            raise outcome

    def keep(self, members: list[int]) -> None:
        """Go on watching only these runs (of a pack whose other members were dropped)."""
        index = torch.tensor(members, device=self.first_step.device)
        self.first_step, self.loss, self.grad_norm = (t[index] for t in (self.first_step, self.loss, self.grad_norm))


def _diverged(step: int, loss: float, grad_norm: float, preset: str) -> Diverged:
    if not math.isfinite(loss):
        return Diverged(step, f"loss is {loss} ({preset}); lower train.lr or check the posterior's numerics")
    return Diverged(step, f"gradient norm is {grad_norm} ({preset}); lower train.lr")


class StepLoop:
    """The phases of a training loop, written once for one run (``_Loop``) and for a pack
    (``cvae_core.packed.loop``): a training step; at a log or evaluation step the divergence check;
    at a log step the progress line; at an evaluation step (every ``train.eval_every`` and the
    last) the evaluations, checkpoints and callbacks.  A subclass says what each phase does."""

    config: Config
    log: Log
    step: int
    callbacks: list

    def run(self, callbacks: Iterable) -> None:
        """Train to ``train.steps``, or until nothing is left training or a callback stops it."""
        self.callbacks = list(callbacks)
        train = self.config.train
        while self.training() and self.step < train.steps:
            self.train_step()
            evaluating = self.step % train.eval_every == 0 or self.step == train.steps
            if self.step % train.log_every == 0 or evaluating:
                self.check_divergence()
            if self.training() and self.step % train.log_every == 0:
                self.log(self.line())
            if self.training() and evaluating and self.evaluate():
                return

    def training(self) -> bool:
        """Whether anything is left to train (a pack's members can all leave before the last step)."""
        return True

    def train_step(self) -> None:
        raise NotImplementedError

    def check_divergence(self) -> None:
        raise NotImplementedError

    def line(self) -> str:
        raise NotImplementedError

    def evaluate(self) -> bool:
        """Evaluate, checkpoint, call the callbacks. -> whether training stops here."""
        raise NotImplementedError


def set_learning_rate(optimizer: torch.optim.Optimizer, config: Config, step: int) -> float:
    """Give every parameter group step ``step``'s learning rate. -> that rate."""
    lr = learning_rate(config, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class _Loop(StepLoop):
    """One run's step loop over a TrainState: training steps, evaluations, checkpoints."""

    def __init__(self, config: Config, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
                 batches: BatchStream, corpus: Corpus, device: torch.device, ckpt_root: Path, state: TrainState,
                 log: Log, autocast: contextlib.AbstractContextManager):
        self.config, self.model, self.optimizer, self.objective = config, model, optimizer, objective
        self.batches, self.corpus, self.device, self.ckpt_root = batches, corpus, device, ckpt_root
        self.state, self.log = state, log
        self.autocast = autocast  # train.amp's, from bf16_autocast
        self.progress = Progress(config.train.steps, state.step)
        self.divergence = DivergenceWatch(device)
        self.dynamics = (HeldOutDynamics(model, corpus["valid"].examples[:GRAD_BATCH], device, config.train.seed)
                         if config.train.dynamics_every else None)
        self.lagging = (LaggingPhase(model, objective, optimizer, config, state, self.autocast, log)
                        if config.train.aggressive else None)
        self.kl_weight = self.lr = 0.0  # the last step's
        self.last_metrics: dict[str, float] = {}  # the last evaluation's

    @property
    def step(self) -> int:
        return self.state.step

    def next_batch(self):
        batch = self.batches.next(self.device)
        self.state.epoch, self.state.batch_index = self.batches.epoch, self.batches.batch_index
        return batch

    def fresh_batch(self):
        """Lagging-VAE's inner loop: a random batch of the current epoch."""
        return self.batches.random(self.device)

    def train_step(self) -> None:
        """One optimizer step (after the Lagging-VAE inner loop, if on), then Figure 2's gradient
        norms when due."""
        config, model, optimizer, state = self.config, self.model, self.optimizer, self.state
        batch = self.next_batch()
        state.step += 1
        step = state.step
        self.lr = set_learning_rate(optimizer, config, step)
        model.train()
        extra = {}
        scope = contextlib.nullcontext()
        if self.lagging is not None:
            extra = self.lagging.encoder_updates(batch, self.fresh_batch, step)
            scope = self.lagging.step_scope()
        with scope:
            try:
                with divergence_as_outcome(step, config.preset), self.autocast:
                    output = model(batch)
                    loss, parts = self.objective(model, output, step)
            except Diverged:
                self.divergence.check(config.preset)  # an earlier step's non-finite loss is the first cause
                raise
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_norm)
        self.divergence.watch(step, loss, grad_norm)
        optimizer.step()
        self.kl_weight = self.objective.kl_weight(step)
        self.progress.add(parts, batch.n_tokens, {"grad_norm": grad_norm, **extra})
        if self.dynamics is not None and step % config.train.dynamics_every == 0:
            self.dynamics.measure()

    def check_divergence(self) -> None:
        self.divergence.check(self.config.preset)

    def line(self) -> str:
        return self.progress.line(self.step, self.kl_weight, self.lr)

    def evaluate(self) -> bool:
        """Validation metrics, the best-so-far bookkeeping, a checkpoint (and the links), then the
        callbacks. -> whether one of them stopped training."""
        def save(directory: Path) -> Path:
            return save_checkpoint(directory, model=self.model, optimizer=self.optimizer, state=self.state,
                                   config=self.config, vocab=self.corpus.vocab)

        progress = self.progress
        training = {"kl_weight": self.kl_weight, "lr": self.lr, "tokens_per_s": progress.tokens_per_second(),
                    **progress.means(), **(self.dynamics.means() if self.dynamics is not None else {})}
        progress.reset()
        metrics, ckpt, eval_seconds = evaluate_and_checkpoint(
            self.config, self.model, self.state, training, self.corpus, self.ckpt_root, save, self.log,
            lagging=self.lagging)
        progress.exclude(eval_seconds)
        self.last_metrics = metrics
        try:
            for callback in self.callbacks:
                callback(metrics, ckpt)
        except StopTraining:
            self.log(f"stopped by a callback at step {self.step}")
            return True
        return False


def evaluate_and_checkpoint(config: Config, model: nn.Module, state: TrainState, training: dict[str, float],
                            corpus: Corpus, ckpt_root: Path, save: Callable[[Path], Path], log: Log, *,
                            lagging: LaggingPhase | None = None, label: str = "") -> tuple[dict[str, float], Path, float]:
    """One evaluation of the run ``config`` at ``state.step``: the validation metrics of ``model``
    beside ``training`` (kl_weight, lr, tokens_per_s and the training means since the last
    evaluation), the best-so-far bookkeeping in ``state``, the checkpoint written by
    ``save(directory)`` under ``ckpt_root``, the latest/best links, pruning and the eval log line
    (prefixed by ``label``).  Shared by ``train`` and the packed loop, whose members are ordinary runs.
    -> (the evaluation's metrics, the checkpoint written, the seconds spent validating)."""
    step = state.step
    metrics = {"step": float(step), "epoch": float(state.epoch), **training}
    eval_start = time.perf_counter()
    with divergence_as_outcome(step, config.preset):
        scores = evaluate(model, corpus["valid"], n_samples=config.train.val_samples,
                          mi_samples=config.train.mi_samples, seed=config.train.seed)
        if getattr(model, "conditional", False):  # Table 8's diversity: one response per validation post
            scores.update(response_diversity(model, corpus["valid"], seed=config.train.seed,
                                             max_steps=config.data.max_len))
    metrics.update({f"val_{k}": float(v) for k, v in scores.items() if v is not None})
    if lagging is not None:
        lagging.after_evaluation(metrics, step)
    eval_seconds = time.perf_counter() - eval_start
    key = selection_metric(config.model.kind)
    improved = metrics[key] < state.best_value
    if improved:
        state.best_value, state.best_step = metrics[key], step
    metrics.update({IS_BEST: float(improved), best_key(config.model.kind): state.best_value,
                    BEST_STEP: float(state.best_step)})
    state.history.append(metrics)
    ckpt = save(step_dir(ckpt_root, step))
    point_link(ckpt_root / LATEST, ckpt)
    if improved:
        point_link(ckpt_root / BEST, ckpt)
    _prune(ckpt_root, config.train.keep_last)
    log(f"{label}eval step {step} | " + _format_metrics(
        metrics, ("val_nll", "val_kl", "val_ppl", "val_rec", "val_mi_loo", "val_au", "val_nll_gap", "val_z_probe_r2"))
        + (" | new best" if improved else f" | best {state.best_value:.2f} @ {state.best_step}"))
    return metrics, ckpt, eval_seconds


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Adam:
    """The authors' Adam (betas 0.9, 0.999), with fused kernels: one pass over all parameters
    instead of a chain of per-tensor ops, which halves the optimizer's share of a CPU step."""
    return torch.optim.Adam(parameter_groups(model, config), lr=config.train.lr, betas=(0.9, 0.999), fused=True)


def check_resumable(saved: Config, requested: Config, path: Path) -> None:
    a, b = saved.flat(), requested.flat()
    a.pop("train.steps"), b.pop("train.steps")
    diff = sorted(k for k in a if a[k] != b.get(k))
    if diff:
        raise CvaeError(f"cannot resume from {path}: its config differs in {', '.join(diff)}")


def _prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete step checkpoints that are neither best, latest, nor among the last ``keep_last``."""
    keep = {(ckpt_root / name).resolve() for name in (BEST, LATEST) if (ckpt_root / name).exists()}
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    keep.update(p.resolve() for p in steps[-keep_last:] if keep_last)
    for path in steps:
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)

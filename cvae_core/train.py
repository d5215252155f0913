"""The training loop: step-based schedule, clipping, periodic validation, best checkpoint, callbacks.

``train(config, output_dir, callbacks=...)`` calls every callback at each evaluation with a flat
``dict[str, float]`` of metrics and the path of the checkpoint just written; the study service
plugs in there.  A callback may raise :class:`StopTraining` to end the run cleanly.

Two Table 1 baselines change the loop, each behind a config field:

* Lagging-VAE (``train.aggressive``): before each step, encoder-only updates on fresh batches
  (:func:`aggressive_encoder_updates`), then a decoder-side-only step; the phase ends at the first
  evaluation where ``val_mi_batch`` does not rise.  One Adam with two parameter groups
  (inference network, the rest), so the checkpoint format is unchanged.
* PreFB (``train.pretrain_steps`` or ``train.init_from``): a DAE stage trained (resumed, or
  reused when finished) in ``<output_dir>/pretrain`` initialises the embedding, the encoder GRU
  and the posterior mean head; then the VAE trains from step 1.
"""
from __future__ import annotations

import contextlib
import copy
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from . import __version__
from .checkpoint import (BEST, LATEST, install_checkpoint, load_checkpoint, point_link, restore_rng,
                         save_checkpoint, step_dir)
from .config import Config, validate
from .data import BucketBatcher, Corpus, load_corpus
from .data.batching import POOL_BATCHES, make_batch
from .errors import CvaeError, Diverged
from .metrics import evaluate
from .metrics.dynamics import GRAD_BATCH, encoding_module, held_out_gradient_norms
from .metrics.text import response_diversity
from .models import build_model
from .models.text_vae import latent_model
from .objectives import Objective

Callback = Callable[[dict[str, float], Path], None]


class StopTraining(Exception):
    """Raised by a callback to end training after the current evaluation."""


@dataclass
class TrainResult:
    output_dir: Path
    best_checkpoint: Path | None
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> the first CUDA device if there is one (e.g. the GPU Ray assigned), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CvaeError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


def learning_rate(config: Config, step: int) -> float:
    """LR for step t (1-based): halved after every step m < t with m % every == 0 and m > start."""
    t = config.train
    halvings = max(0, (step - 1) // t.lr_decay_every - t.lr_decay_start // t.lr_decay_every)
    return t.lr * 0.5**halvings


def selection_metric(config: Config) -> str:
    """Model selection: lowest validation IS-NLL (the DAE has none: reconstruction xent)."""
    return "val_rec" if config.model.kind == "dae" else "val_nll"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _format_metrics(metrics: dict[str, float], keys: Iterable[str]) -> str:
    return " ".join(f"{k} {metrics[k]:.2f}" for k in keys if metrics.get(k) is not None)


class _Progress:
    """Running means of the loss parts between log lines, tokens/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, log: Callable[[str], None]):
        self.total, self.start_step, self.log = total_steps, start_step, log
        self.t0 = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.count = self.tokens = 0
        self.window_t0 = self.t0
        self.window_tokens = 0
        self.eval_seconds = 0.0  # excluded from throughput, included in the ETA

    def add(self, parts: dict[str, torch.Tensor], tokens: int, extra: dict[str, float]) -> None:
        for key, value in {**{k: v.item() for k, v in parts.items()}, **extra}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.tokens += tokens
        self.window_tokens += tokens

    def means(self) -> dict[str, float]:
        return {f"train_{k}": v / max(1, self.count) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def tokens_per_second(self) -> float:
        """Training throughput since this process started, evaluation time excluded."""
        return self.tokens / max(1e-9, time.perf_counter() - self.t0 - self.eval_seconds)

    def line(self, step: int, kl_weight: float, lr: float) -> str:
        now = time.perf_counter()
        rate = self.window_tokens / max(1e-9, now - self.window_t0)
        self.window_t0, self.window_tokens = now, 0
        done = step - self.start_step
        eta = (now - self.t0) / max(1, done) * (self.total - step)
        means = self.means()
        parts = " ".join(f"{k[6:]} {v:.2f}" for k, v in means.items() if k not in ("train_grad_norm",))
        return (f"step {step}/{self.total} | {parts} | kl_w {kl_weight:.3f} lr {lr:.2e} | "
                f"{rate:,.0f} tok/s | ETA {format_duration(eta)}")


def train(config: Config, output_dir: str | Path, callbacks: Iterable[Callback] = (), resume: bool = False,
          corpus: Corpus | None = None, log: Callable[[str], None] | None = None,
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
    if corpus is None:
        log(f"loading {config.data.dataset} ...")
        corpus = load_corpus(config.data, ("train", "valid"))
    latest = ckpt_root / LATEST
    if resume_from is not None:
        install_checkpoint(resume_from, ckpt_root)
        resume = True
    resuming = resume and latest.exists()
    dae_checkpoint = None if resuming else _prefb_dae(config, output_dir, corpus, log)
    torch.manual_seed(config.train.seed)  # after any pretraining stage, so the run is the same either way
    model = build_model(config, len(corpus.vocab)).to(device)
    if dae_checkpoint is not None:
        _init_from_dae(model, dae_checkpoint, corpus.vocab, log)
    optimizer = make_optimizer(model, config)
    objective = Objective(config)
    batcher = BucketBatcher(corpus["train"].examples, config.train.batch_size, config.train.seed,
                            pool_batches=POOL_BATCHES[config.data.batching])
    step = epoch = index = 0
    best_value, best_step, history = math.inf, 0, []
    # Lagging-VAE: aggressive phase on until validation MI stops rising
    aggressive, previous_mi = config.train.aggressive, None
    if resuming:
        data = load_checkpoint(latest, map_location=device)
        _check_resumable(data.config, config, latest)
        model.load_state_dict(data.weights)
        optimizer.load_state_dict(data.optimizer)
        restore_rng(data.rng)
        step, epoch, index = data.state["step"], data.state["epoch"], data.state["batch_index"]
        best_value, best_step = data.state["best_value"], data.state["best_step"]
        history = data.state.get("history", [])
        aggressive, previous_mi = data.state.get("aggressive", aggressive), data.state.get("previous_mi")
        log(f"resumed from {latest.resolve().name} at step {step} (best {selection_metric(config)} "
            f"{best_value:.3f} at step {best_step})")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(config.to_json())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{config.preset} on {config.data.dataset} ({config.scale} scale): {n_params:,} parameters, "
        f"{len(corpus['train'].examples):,} training sentences, device {device}, {config.train.steps} steps")

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if config.train.amp and device.type == "cuda"
                else contextlib.nullcontext())
    progress = _Progress(config.train.steps, step, log)
    dynamics = (_Dynamics(model, corpus["valid"].examples[:GRAD_BATCH], device, config)
                if config.train.dynamics_every else None)
    order = batcher.order(epoch)
    last_metrics: dict[str, float] = {}

    def fresh_batch():  # Lagging-VAE's inner loop: a random batch of the current epoch
        return batcher.batch(order[int(torch.randint(len(order), ()))]).to(device)

    while step < config.train.steps:
        if index >= len(order):
            epoch, index = epoch + 1, 0
            order = batcher.order(epoch)
        batch = batcher.batch(order[index]).to(device)
        index += 1
        step += 1
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        extra = {}
        if config.train.aggressive:
            extra["inner_steps"] = (aggressive_encoder_updates(model, objective, optimizer, batch, fresh_batch,
                                                               step, config, autocast) if aggressive else 0)
        # in the aggressive phase the step itself updates the decoder side only
        with _frozen(optimizer.param_groups[0]["params"] if aggressive else ()):
            with _divergence_as_outcome(step, config):
                with autocast:
                    output = model(batch)
                    loss, parts = objective(model, output, step)
            _check_finite(loss, step, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_norm)
        if not torch.isfinite(grad_norm):  # stepping would write NaN/inf into the parameters
            raise Diverged(step, f"gradient norm is {grad_norm.item()} ({config.preset}); lower train.lr")
        optimizer.step()
        kl_weight = objective.kl_weight(step)
        progress.add(parts, batch.n_tokens, {"grad_norm": grad_norm.item(), **extra})
        if dynamics is not None and step % config.train.dynamics_every == 0:
            dynamics.measure()
        if step % config.train.log_every == 0:
            log(progress.line(step, kl_weight, lr))
        if step % config.train.eval_every == 0 or step == config.train.steps:
            metrics = {"step": float(step), "epoch": float(epoch), "kl_weight": kl_weight, "lr": lr,
                       "tokens_per_s": progress.tokens_per_second(), **progress.means(),
                       **(dynamics.means() if dynamics is not None else {})}
            progress.reset()
            eval_start = time.perf_counter()
            with _divergence_as_outcome(step, config):
                scores = evaluate(model, corpus["valid"], n_samples=config.train.val_samples,
                                  mi_samples=config.train.mi_samples, seed=config.train.seed)
                if getattr(model, "conditional", False):  # Table 8's diversity: one response per validation post
                    scores.update(response_diversity(model, corpus["valid"], seed=config.train.seed,
                                                     max_steps=config.data.max_len))
            metrics.update({f"val_{k}": float(v) for k, v in scores.items() if v is not None})
            if config.train.aggressive:
                aggressive, previous_mi = _lagging_switch(aggressive, previous_mi, metrics["val_mi_batch"], step, log)
                metrics["aggressive"] = float(aggressive)  # still on after this evaluation
            eval_seconds = time.perf_counter() - eval_start
            progress.eval_seconds += eval_seconds
            progress.window_t0 += eval_seconds
            key = selection_metric(config)
            improved = metrics[key] < best_value
            if improved:
                best_value, best_step = metrics[key], step
            metrics.update({"is_best": float(improved), f"best_{key}": best_value, "best_step": float(best_step)})
            history.append(metrics)
            state = {"step": step, "epoch": epoch, "batch_index": index, "best_value": best_value,
                     "best_step": best_step, "metrics": metrics, "history": history, "version": __version__}
            if config.train.aggressive:
                state.update(aggressive=aggressive, previous_mi=previous_mi)
            ckpt = save_checkpoint(step_dir(ckpt_root, step), model=model, optimizer=optimizer,
                                   state=state, config=config, vocab=corpus.vocab)
            point_link(latest, ckpt)
            if improved:
                point_link(ckpt_root / BEST, ckpt)
            _prune(ckpt_root, config.train.keep_last)
            log(f"eval step {step} | " + _format_metrics(
                metrics, ("val_nll", "val_kl", "val_ppl", "val_rec", "val_mi_loo", "val_au"))
                + (" | new best" if improved else f" | best {best_value:.2f} @ {best_step}"))
            last_metrics = metrics
            try:
                for callback in callbacks:
                    callback(metrics, ckpt)
            except StopTraining:
                log(f"stopped by a callback at step {step}")
                break
    best = ckpt_root / BEST
    best_dir = best.resolve() if best.exists() else None
    best_metrics = next((m for m in history if m["step"] == best_step), {})
    return TrainResult(output_dir, best_dir, best_metrics, last_metrics or (history[-1] if history else {}),
                       step, history)


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Adam:
    """The authors' Adam (betas 0.9, 0.999), with fused kernels: one pass over all parameters
    instead of a chain of per-tensor ops (clip + Adam 8.6 -> 4.0 ms per PTB step on 2 CPU cores)."""
    return torch.optim.Adam(_parameter_groups(model, config), lr=config.train.lr, betas=(0.9, 0.999), fused=True)


class _Dynamics:
    """train.dynamics_every: Figure 2's gradient norms on a fixed held-out batch, averaged between
    evaluations and reported as train_grad_total, train_grad_reg, train_dh_de."""

    def __init__(self, model: nn.Module, examples, device: torch.device, config: Config):
        encoding_module(model)  # a clear error for models the analysis does not cover
        self.model, self.seed = model, config.train.seed
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


def _check_finite(loss: torch.Tensor, step: int, config: Config) -> None:
    if not torch.isfinite(loss):
        raise Diverged(step, f"loss is {loss.item()} ({config.preset}); lower train.lr or check the "
                             "posterior's numerics")


@contextlib.contextmanager
def _divergence_as_outcome(step: int, config: Config):
    """torch.distributions refuse non-finite parameters with a ValueError (and a tensor dump)
    when activations overflowed: that is divergence, reported in one line."""
    try:
        yield
    except ValueError as exc:
        if "invalid values" not in str(exc):
            raise
        raise Diverged(step, f"non-finite activations in the forward pass ({config.preset}); "
                             "lower train.lr") from None


# ---------------------------------------------------------------------------------------------
# Lagging-VAE (He et al. 2019): aggressive inference-network updates.

def _parameter_groups(model: nn.Module, config: Config):
    """All parameters in one Adam group; for Lagging-VAE two groups, [inference network, rest],
    so either side can be stepped alone. Each parameter appears once either way."""
    if not config.train.aggressive:
        return model.parameters()
    inference = model.inference_parameters()
    ids = {id(p) for p in inference}
    return [{"params": inference}, {"params": [p for p in model.parameters() if id(p) not in ids]}]


def _lagging_switch(aggressive: bool, previous_mi: float | None, mi: float, step: int,
                    log: Callable[[str], None]) -> tuple[bool, float]:
    """He et al.: the aggressive phase ends at the first evaluation where MI does not rise.
    -> (still aggressive, the MI to compare the next evaluation with)."""
    if aggressive and previous_mi is not None and not mi > previous_mi:
        log(f"step {step}: val_mi_batch {mi:.3f} did not rise above {previous_mi:.3f}; "
            "Lagging-VAE aggressive phase over")
        aggressive = False
    return aggressive, mi


@contextlib.contextmanager
def _frozen(parameters):
    """Parameters get no gradient inside the block (skipped by Adam, and cheaper backward)."""
    parameters = [p for p in parameters if p.requires_grad]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def aggressive_encoder_updates(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                               batch, fresh_batch: Callable[[], object], step: int, config: Config,
                               autocast=contextlib.nullcontext()) -> int:
    """He et al.'s inner loop: update only the inference network (optimizer group 0) on ``batch``,
    then on ``fresh_batch()`` draws, with the step's loss; at most train.aggressive_max_inner
    updates, stopping once the per-token loss of a window of train.aggressive_window updates is
    above the previous window's. The decoder side (group 1, incl. the shared embedding) is
    frozen. -> number of inner updates made."""
    t = config.train
    previous, window_loss, window_tokens = math.inf, 0.0, 0
    inner = 0
    with _frozen(optimizer.param_groups[1]["params"]):
        for inner in range(1, t.aggressive_max_inner + 1):
            with _divergence_as_outcome(step, config), autocast:
                loss, _ = objective(model, model(batch), step)
            _check_finite(loss, step, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], t.clip_norm)
            optimizer.step()
            window_loss, window_tokens = window_loss + loss.item() * batch.size, window_tokens + batch.n_tokens
            if inner % t.aggressive_window == 0:
                if window_loss / window_tokens > previous:
                    break
                previous, window_loss, window_tokens = window_loss / window_tokens, 0.0, 0
            if inner < t.aggressive_max_inner:
                batch = fresh_batch()
    return inner


# ---------------------------------------------------------------------------------------------
# PreFB (Li et al. 2019): a DAE whose embedding, encoder and code layer initialise the VAE.

def pretraining_config(config: Config) -> Config:
    """The DAE stage of a PreFB run: the same data, sizes and schedule, ``train.pretrain_steps`` long."""
    dae = copy.deepcopy(config)
    dae.preset = "dae"
    dae.model.kind = "dae"
    dae.coupling.enabled = False
    dae.train.steps, dae.train.pretrain_steps, dae.train.init_from = config.train.pretrain_steps, 0, ""
    dae.train.aggressive = False
    validate(dae)
    return dae


def _prefb_dae(config: Config, output_dir: Path, corpus: Corpus, log: Callable[[str], None]) -> Path | None:
    """The DAE checkpoint that initialises this run: ``train.init_from``, or the best checkpoint of
    a DAE trained (or resumed, or reused when finished) in ``output_dir/pretrain``; None if neither."""
    if config.train.init_from:
        return Path(config.train.init_from)
    if not config.train.pretrain_steps:
        return None
    stage = output_dir / "pretrain"
    log(f"PreFB stage 1: DAE for {config.train.pretrain_steps} steps in {stage} (resumed or reused if there)")
    result = train(pretraining_config(config), stage, resume=True, corpus=corpus,
                   log=lambda text: log(f"[pretrain] {text}"))
    if result.best_checkpoint is None:
        raise CvaeError(f"the PreFB pretraining stage in {stage} left no best checkpoint")
    return result.best_checkpoint


def _init_from_dae(model: nn.Module, path: Path, vocab, log: Callable[[str], None]) -> None:
    data = load_checkpoint(path)
    if data.config.model.kind != "dae":
        raise CvaeError(f"train.init_from={path} is a {data.config.model.kind!r} checkpoint; PreFB needs a DAE")
    if data.vocab.itos != vocab.itos:
        raise CvaeError(f"train.init_from={path}: its vocabulary differs from this run's (another dataset?)")
    try:
        latent_model(model).init_encoder_from_dae(data.weights)
    except ValueError as exc:
        raise CvaeError(f"train.init_from={path}: {exc} (same model.embed_dim/hidden_dim/latent_dim?)") from None
    log(f"PreFB stage 2: embedding, encoder and posterior mean head initialised from {path}")


def _check_resumable(saved: Config, requested: Config, path: Path) -> None:
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

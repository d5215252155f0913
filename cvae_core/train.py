"""The training loop: step-based schedule, clipping, periodic validation, best checkpoint, callbacks.

``train(config, output_dir, callbacks=...)`` calls every callback at each evaluation with a flat
``dict[str, float]`` of metrics and the path of the checkpoint just written; the study service
plugs in there.  A callback may raise :class:`StopTraining` to end the run cleanly.
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

from . import __version__
from .checkpoint import load_checkpoint, point_link, restore_rng, save_checkpoint
from .config import Config, validate
from .data import BucketBatcher, Corpus, load_corpus
from .errors import CvaeError
from .metrics import evaluate
from .models import build_model
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


def _format_duration(seconds: float) -> str:
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
                f"{rate:,.0f} tok/s | ETA {_format_duration(eta)}")


def train(config: Config, output_dir: str | Path, callbacks: Iterable[Callback] = (), resume: bool = False,
          corpus: Corpus | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``config`` into ``output_dir`` (checkpoints under ``output_dir/checkpoints``).

    resume=True continues from ``checkpoints/latest`` if present (same config required, except
    that ``train.steps`` may be raised).  ``corpus`` lets a caller share data already loaded
    (the study service passes it through Ray's object store).
    """
    log = log or (lambda text: print(text, file=sys.stdout, flush=True))
    validate(config)
    output_dir = Path(output_dir).absolute()
    ckpt_root = output_dir / "checkpoints"
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    if corpus is None:
        log(f"loading {config.data.dataset} ...")
        corpus = load_corpus(config.data, ("train", "valid"))
    model = build_model(config, len(corpus.vocab)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr, betas=(0.9, 0.999))
    objective = Objective(config)
    batcher = BucketBatcher(corpus["train"].examples, config.train.batch_size, config.train.seed)
    step = epoch = index = 0
    best_value, best_step, history = math.inf, 0, []
    latest = ckpt_root / "latest"
    if resume and latest.exists():
        data = load_checkpoint(latest, map_location=device)
        _check_resumable(data.config, config, latest)
        model.load_state_dict(data.weights)
        optimizer.load_state_dict(data.optimizer)
        restore_rng(data.rng)
        step, epoch, index = data.state["step"], data.state["epoch"], data.state["batch_index"]
        best_value, best_step = data.state["best_value"], data.state["best_step"]
        history = data.state.get("history", [])
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
    order = batcher.order(epoch)
    last_metrics: dict[str, float] = {}
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
        with autocast:
            output = model(batch)
            loss, parts = objective(model, output, step)
        if not torch.isfinite(loss):
            raise CvaeError(f"training diverged: loss is {loss.item()} at step {step} ({config.preset}); "
                            "lower train.lr or check the posterior's numerics")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_norm)
        optimizer.step()
        kl_weight = objective.kl_weight(step)
        progress.add(parts, batch.n_tokens, {"grad_norm": grad_norm.item()})
        if step % config.train.log_every == 0:
            log(progress.line(step, kl_weight, lr))
        if step % config.train.eval_every == 0 or step == config.train.steps:
            metrics = {"step": float(step), "epoch": float(epoch), "kl_weight": kl_weight, "lr": lr,
                       "tokens_per_s": progress.tokens_per_second(), **progress.means()}
            progress.reset()
            eval_start = time.perf_counter()
            scores = evaluate(model, corpus["valid"], n_samples=config.train.val_samples,
                              mi_samples=config.train.mi_samples, seed=config.train.seed)
            metrics.update({f"val_{k}": float(v) for k, v in scores.items() if v is not None})
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
            ckpt = save_checkpoint(ckpt_root / f"step-{step:07d}", model=model, optimizer=optimizer,
                                   state=state, config=config, vocab=corpus.vocab)
            point_link(latest, ckpt)
            if improved:
                point_link(ckpt_root / "best", ckpt)
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
    best = ckpt_root / "best"
    best_dir = best.resolve() if best.exists() else None
    best_metrics = next((m for m in history if m["step"] == best_step), {})
    return TrainResult(output_dir, best_dir, best_metrics, last_metrics or (history[-1] if history else {}),
                       step, history)


def _check_resumable(saved: Config, requested: Config, path: Path) -> None:
    a, b = saved.flat(), requested.flat()
    a.pop("train.steps"), b.pop("train.steps")
    diff = sorted(k for k in a if a[k] != b.get(k))
    if diff:
        raise CvaeError(f"cannot resume from {path}: its config differs in {', '.join(diff)}")


def _prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete step checkpoints that are neither best, latest, nor among the last ``keep_last``."""
    keep = {(ckpt_root / name).resolve() for name in ("best", "latest") if (ckpt_root / name).exists()}
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    keep.update(p.resolve() for p in steps[-keep_last:] if keep_last)
    for path in steps:
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)

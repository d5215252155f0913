"""Lagging-VAE (He et al. 2019): aggressive inference-network updates.

Before each training step, encoder-only updates on fresh batches (:func:`aggressive_encoder_updates`),
then a decoder-side-only step; the phase ends at the first evaluation where ``val_mi_batch`` does
not rise.  One Adam with two parameter groups (inference network, the rest), so the checkpoint
format is unchanged.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

from torch import nn

from .config import Config
from .errors import check_finite_loss, divergence_as_outcome
from .objectives import Objective


def parameter_groups(model: nn.Module, config: Config):
    """All parameters in one Adam group; for Lagging-VAE two groups, [inference network, rest],
    so either side can be stepped alone. Each parameter appears once either way."""
    if not config.train.aggressive:
        return model.parameters()
    inference = model.inference_parameters()
    ids = {id(p) for p in inference}
    return [{"params": inference}, {"params": [p for p in model.parameters() if id(p) not in ids]}]


@contextlib.contextmanager
def frozen(parameters):
    """Parameters get no gradient inside the block (skipped by Adam, and cheaper backward)."""
    parameters = [p for p in parameters if p.requires_grad]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def aggressive_encoder_updates(model: nn.Module, objective: Objective, optimizer, batch,
                               fresh_batch: Callable[[], object], step: int, config: Config,
                               autocast=contextlib.nullcontext()) -> int:
    """He et al.'s inner loop: update only the inference network (optimizer group 0) on ``batch``,
    then on ``fresh_batch()`` draws, with the step's loss; at most train.aggressive_max_inner
    updates, stopping once the per-token loss of a window of train.aggressive_window updates is
    above the previous window's. The decoder side (group 1, incl. the shared embedding) is
    frozen. -> number of inner updates made."""
    t = config.train
    previous, window_loss, window_tokens = math.inf, 0.0, 0
    inner = 0
    with frozen(optimizer.param_groups[1]["params"]):
        for inner in range(1, t.aggressive_max_inner + 1):
            with divergence_as_outcome(step, config.preset), autocast:
                loss, _ = objective(model, model(batch), step)
            check_finite_loss(loss, step, config.preset)
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


class LaggingPhase:
    """The aggressive phase of one run, around the loop's steps and evaluations.  Its state
    (``aggressive``, ``previous_mi``) lives in the run's TrainState, so a resumed run carries on."""

    def __init__(self, model: nn.Module, objective: Objective, optimizer, config: Config, state, autocast,
                 log: Callable[[str], None]):
        self.model, self.objective, self.optimizer, self.config = model, objective, optimizer, config
        self.state, self.autocast, self.log = state, autocast, log

    def encoder_updates(self, batch, fresh_batch: Callable[[], object], step: int) -> dict[str, float]:
        """Before a step: the inner loop while the phase is on. -> the step's extra train metrics."""
        inner = (aggressive_encoder_updates(self.model, self.objective, self.optimizer, batch, fresh_batch, step,
                                            self.config, self.autocast) if self.state.aggressive else 0)
        return {"inner_steps": inner}

    def step_scope(self):
        """During the phase the step itself updates the decoder side only."""
        return frozen(self.optimizer.param_groups[0]["params"] if self.state.aggressive else ())

    def after_evaluation(self, metrics: dict[str, float], step: int) -> None:
        """He et al.: the phase ends at the first evaluation where MI does not rise."""
        mi, previous = metrics["val_mi_batch"], self.state.previous_mi
        if self.state.aggressive and previous is not None and not mi > previous:
            self.log(f"step {step}: val_mi_batch {mi:.3f} did not rise above {previous:.3f}; "
                     "Lagging-VAE aggressive phase over")
            self.state.aggressive = False
        self.state.previous_mi = mi
        metrics["aggressive"] = float(self.state.aggressive)  # still on after this evaluation

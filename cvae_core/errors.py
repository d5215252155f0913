"""The exception types users see: a one-line message naming the bad value and what is allowed."""

import argparse
import contextlib
import math


class CvaeError(Exception):
    """A problem the user can fix (bad config, bad data, missing or corrupted file)."""


class Diverged(CvaeError):
    """Training produced a non-finite loss, gradient or activation: an outcome of the
    configuration (e.g. too high a learning rate), not a crash. Retrying it would diverge again."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"diverged at step {step}: {reason}")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (not the whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_finite_loss(loss, step: int, preset: str) -> None:
    """A non-finite training loss (a scalar tensor) is divergence, reported in one line."""
    if not math.isfinite(loss.item()):
        raise Diverged(step, f"loss is {loss.item()} ({preset}); lower train.lr or check the posterior's numerics")


@contextlib.contextmanager
def divergence_as_outcome(step: int, preset: str):
    """torch.distributions refuse non-finite parameters with a ValueError (and a tensor dump)
    when activations overflowed: that is divergence, reported in one line."""
    try:
        yield
    except ValueError as exc:
        if "invalid values" not in str(exc):
            raise
        raise Diverged(step, f"non-finite activations in the forward pass ({preset}); lower train.lr") from None

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


def argument_type(check):
    """An argparse ``type=`` from a check that returns its (string) argument or raises CvaeError:
    the check's message becomes the one-line usage error naming the flag."""
    def parse(text: str):
        try:
            return check(text)
        except CvaeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__
    return parse


def finite_float(text: str) -> float:
    """argparse ``type=`` for a number flag: float() takes 'nan' and 'inf', which pass every
    range check after it; refuse them here."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def check_counts(args: argparse.Namespace, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Count flags (``args.<name>``, spelled ``--<name with dashes>``): each in ``positive`` must
    be >= 1, each in ``non_negative`` >= 0 (where 0 means "all" or "the default")."""
    for name in positive:
        if getattr(args, name) < 1:
            raise CvaeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise CvaeError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


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

"""The exception types users see: a one-line message naming the bad value and what is allowed."""

import argparse


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

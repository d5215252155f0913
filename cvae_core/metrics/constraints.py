"""Feasibility constraints on validation metrics: ``"val_au >= 1"``, ``"val_kl > 0.5"``.

A study spec lists them; a trial is feasible when the metrics of its best evaluation (the core's
``is_best``, the checkpoint it keeps) satisfy every one.  The study summary, Optuna and
``analysis best`` judge with this module, so the three never disagree about a trial.

A constraint's *violation* follows Optuna's convention: <= 0 when satisfied, > 0 by how much
it is not (a metric the trial did not report violates it infinitely).
"""
from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import CvaeError
from .names import metric

OPERATORS = (">=", "<=", ">", "<")
EXAMPLE = "'val_au >= 1'"
# metric, then a run of comparison characters (a bad operator such as "=>" is named, not a
# parse failure), then the bound
_SHAPE = re.compile(r"\s*(?P<metric>[^<>=!\s]+)\s*(?P<op>[<>=!]+)\s*(?P<bound>.*?)\s*")


@dataclass(frozen=True)
class Constraint:
    metric: str  # a validation metric of the registry, e.g. val_au
    op: str  # one of OPERATORS
    bound: float

    def __str__(self) -> str:
        bound = str(int(self.bound)) if self.bound.is_integer() else repr(self.bound)
        return f"{self.metric} {self.op} {bound}"

    def violation(self, metrics: Mapping[str, float]) -> float:
        """<= 0 when ``metrics`` satisfy this constraint, else > 0 (inf: the metric is missing)."""
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return math.inf
        gap = self.bound - value if self.op in (">=", ">") else value - self.bound
        if gap == 0 and self.op in (">", "<"):
            return sys.float_info.min  # a strict bound met with equality is violated, by the least amount
        return gap


def parse_constraint(text: object) -> Constraint:
    """``"val_au >= 1"`` (spaces optional) -> Constraint; a one-line CvaeError saying what is wrong."""
    if not isinstance(text, str):
        raise CvaeError(f"must be a string such as {EXAMPLE}")
    shape = _SHAPE.fullmatch(text)
    if shape is None or not shape["bound"]:
        raise CvaeError(f"expected '<metric> <op> <number>' with op one of {', '.join(OPERATORS)}, e.g. {EXAMPLE}")
    name, op, bound_text = shape["metric"], shape["op"], shape["bound"]
    if op not in OPERATORS:
        raise CvaeError(f"operator {op!r} is not one of {', '.join(OPERATORS)}")
    metric(name)  # an unknown metric: its error names the known ones
    if not name.startswith("val_"):
        raise CvaeError(f"metric {name!r}: a trial is judged on its best validation evaluation; use a val_ metric "
                        f"such as val_{metric(name).name}")
    try:
        bound = float(bound_text)
    except ValueError:
        raise CvaeError(f"bound {bound_text!r} is not a number") from None
    if not math.isfinite(bound):
        raise CvaeError(f"bound {bound_text!r} must be a finite number")
    return Constraint(name, op, bound)


def violations(constraints: Iterable[Constraint], metrics: Mapping[str, float]) -> dict[str, float]:
    """Each constraint (by its text) -> its violation for ``metrics``: what Optuna stores."""
    return {str(c): c.violation(metrics) for c in constraints}


def violated(constraints: Iterable[Constraint], metrics: Mapping[str, float]) -> list[Constraint]:
    """The constraints that ``metrics`` do not satisfy (empty: feasible)."""
    return [c for c in constraints if c.violation(metrics) > 0]

"""What a trial reports to Tune, read by the driver's searcher, scheduler, callbacks and summary
(no ray import).

* A diverged trial's last report: ``DIVERGED`` = 1 and a NaN for every metric an objective or
  the scheduler may name (``NAN_OBJECTIVES``).
* A pack trial (``--pack K``) reports one flat result per evaluation: ``member/<member id>/<metric>``
  for each member evaluated, and ``member/<member id>/outcome`` (+ ``/reason``) once a member has
  ended; its config lists its members under ``PACK_CONFIG``.
"""
from __future__ import annotations

import math
from typing import Any

from cvae_core.metrics.names import METRICS

DIVERGED = "diverged"  # the result key of a diverged trial's last report
NAN_OBJECTIVES = {f"val_{m.name}": float("nan") for m in METRICS.values() if m.ranked or m.name == "kl"}

PACK_CONFIG = "pack_members"  # a pack trial's config: {PACK_CONFIG: [{"trial_id": ..., "config": {...}}, ...]}
MEMBER_PREFIX = "member/"
OUTCOME = "outcome"
REASON = "reason"
TRAINING_ITERATION = "training_iteration"  # a member's own number of evaluations
PACK_STATE = "pack.json"  # in a pack's Tune checkpoint: the members that ended, and how


def member_key(member_id: str, name: str) -> str:
    return f"{MEMBER_PREFIX}{member_id}/{name}"


def member_results(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A pack trial's flat result -> member id -> its values in that result (finite numbers and
    strings; a dataframe row's NaN for a member absent from that report is dropped)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in result.items():
        if not key.startswith(MEMBER_PREFIX):
            continue
        member_id, _, name = key[len(MEMBER_PREFIX):].partition("/")
        if isinstance(value, float) and math.isnan(value) and name != OUTCOME:
            continue
        if value is None or (name == OUTCOME and not isinstance(value, str)):
            continue
        out.setdefault(member_id, {})[name] = value
    return out


def pack_members(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
    """A trial's config -> [(member id, member config)] for a pack trial, else None."""
    members = config.get(PACK_CONFIG)
    if members is None:
        return None
    return [(m["trial_id"], dict(m["config"])) for m in members]


def count_trials(trials) -> int:
    """Study trials among Ray's trials: a pack counts its members."""
    return sum(len(pack_members(dict(t.config)) or [None]) for t in trials)

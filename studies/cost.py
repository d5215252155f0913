"""What a trial costs, in the units a cluster bills: CPU-seconds and GPU-seconds.

* ``cpu_seconds``: CPU time of the trial's process, all its threads (``time.process_time``:
  training, evaluation, MLflow logging and monitoring, Ray's own threads in that process),
  from the start of the trial function (the worker's start-up before it is not counted).
* ``gpu_seconds`` (CUDA only): wall seconds x the GPUs Ray assigned the trial
  (``gpus_per_trial``, a fraction allowed): what the trial held, busy or not.

Both are cumulative over the trial's attempts: a retry or ``--resume`` carries on from the
largest value the run logged (``TrialRun.carried``), so the work a failed attempt did and a
retry does again counts twice, as it was paid twice.  A pack (``--pack K``) trains its
members in one process: the process's cost between two evaluations is split evenly over the
members evaluated at the second, so the members' costs add up to the pack's.

The names and the study's total are part of the record (``studies/record.py``); this module
measures.  Pure Python (no ray/mlflow)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .record import COST_METRICS, CPU_SECONDS, GPU_SECONDS


class CostMeter:
    """The cumulative cost of the trials one process trains: one trial (member 0) or a pack's
    members (their index in the pack), counted from the meter's creation.  ``gpus``: the GPUs
    the process holds (0 on CPU: no ``gpu_seconds``)."""

    def __init__(self, gpus: float = 0.0):
        self.gpus = gpus
        self.spent: list[dict[str, float]] = []
        self.last_charged: list[int] = []
        self._cpu, self._wall = time.process_time(), time.monotonic()

    def carry(self, carried: Sequence[dict[str, float]]) -> None:
        """Each member's cost before this attempt (what its run logged), in member order."""
        self.spent = [{CPU_SECONDS: float(c.get(CPU_SECONDS, 0.0)),
                       **({GPU_SECONDS: float(c.get(GPU_SECONDS, 0.0))} if self.gpus else {})} for c in carried]
        self.last_charged = list(range(len(self.spent)))

    def charge(self, members: Sequence[int] | None = None) -> None:
        """Split the process's cost since the last charge evenly over ``members`` (default: the
        members charged last time, e.g. for the time after a pack's last evaluation)."""
        members = list(self.last_charged if members is None else members)
        cpu, wall = time.process_time(), time.monotonic()
        spent_cpu, spent_wall = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        if not members:
            return
        for member in members:
            self.spent[member][CPU_SECONDS] += spent_cpu / len(members)
            if self.gpus:
                self.spent[member][GPU_SECONDS] += spent_wall * self.gpus / len(members)
        self.last_charged = members

    def of(self, member: int = 0) -> dict[str, float]:
        return dict(self.spent[member])


def trial_cost(values: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The largest value of each cost metric among ``values`` (a trial's results, its MLflow
    run's metrics): cumulative, so the largest is the latest."""
    cost: dict[str, float] = {}
    for entry in values:
        for key in COST_METRICS:
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                cost[key] = max(cost.get(key, 0.0), float(value))
    return cost

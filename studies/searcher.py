"""The study searcher: fixed configurations first, then the inner searcher, each run once per seed.

``StudySearcher`` wraps a Tune searcher (``OptunaSearch``, or :class:`NoSearch` for grid
studies) and adds what a paper-style study needs:

* fixed configurations (the VAE baseline, or every grid cell) that run before, and outside
  of, the Optuna space, so Optuna only ever sees points of its own space;
* repeated seeds: each configuration becomes ``len(seeds)`` trials that differ only in
  ``train.seed``.  Optuna sees one trial per configuration (the first seed's trial id) and is
  told the mean over the seeds of each objective once all seeds have finished;
* multi-objective results (a list of metrics), which Tune's ``Repeater`` does not handle, and
  its own state in Tune's experiment checkpoint, so ``Tuner.restore`` keeps the grouping;
* no configuration trains twice: when the inner searcher proposes one that already finished
  (mostly categorical spaces do), it is told the known result again and asked anew.

Tune finds the inner searcher through the ``searcher`` attribute: the base searcher is saved
with its own ``save`` (OptunaSearch pickles its study handle) and this wrapper with
``get_state``/``set_state``.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any

from ray.tune.search import Searcher

MAX_REPEATS = 50  # re-asks when the inner searcher proposes configurations that already ran


class NoSearch(Searcher):
    """A searcher with nothing to propose (grid studies: every cell is a fixed configuration)."""

    def __init__(self, metric: str | list[str] | None = None, mode: str | list[str] | None = None):
        super().__init__(metric=metric, mode=mode)

    def suggest(self, trial_id: str) -> dict | str | None:
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as handle:
            handle.write("{}")

    def restore(self, checkpoint_path: str) -> None:
        pass


class StudySearcher(Searcher):
    """Fixed configurations, then ``n_search`` proposals of ``searcher``, each for every seed.

    ``metric``/``mode`` are the objective(s) told to the inner searcher (str or list).
    """

    def __init__(self, searcher: Searcher, fixed: list[dict[str, Any]], n_search: int, seeds: list[int],
                 metric: str | list[str], mode: str | list[str]):
        super().__init__(metric=metric, mode=mode)
        self.searcher = searcher
        self.fixed = [dict(c) for c in fixed]
        self.n_search = n_search
        self.seeds = list(seeds)
        self.groups: list[dict[str, Any]] = []  # {"config", "primary", "source", "trials": {id: result}}
        self.trial_group: dict[str, int] = {}
        self.told: set[int] = set()
        self.known_results: dict[str, dict[str, float]] = {}  # config -> objective means told
        self.exhausted = False

    @property
    def total_trials(self) -> int:
        return (len(self.fixed) + self.n_search) * len(self.seeds)

    # -- Tune Searcher API -------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        # The objective(s) come from the spec; TuneConfig's single metric is the scheduler's.
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.groups and len(self.groups[-1]["trials"]) < len(self.seeds):
            group_index = len(self.groups) - 1
        else:
            group_index = self._new_group(trial_id)
            if group_index is None:
                return None
            if group_index == -1:
                return Searcher.FINISHED
        group = self.groups[group_index]
        seed = self.seeds[len(group["trials"])]
        group["trials"][trial_id] = None
        self.trial_group[trial_id] = group_index
        return {**copy.deepcopy(group["config"]), "train.seed": seed}

    def _new_group(self, trial_id: str) -> int | None:
        n_fixed = sum(1 for g in self.groups if g["source"] == "fixed")
        n_searched = len(self.groups) - n_fixed
        if n_fixed < len(self.fixed):
            config, source = self.fixed[n_fixed], "fixed"
        elif n_searched < self.n_search and not self.exhausted:
            primary = trial_id
            for attempt in range(1, MAX_REPEATS + 1):
                config = self.searcher.suggest(primary)
                if config is None:
                    return None  # the inner searcher waits (e.g. its own concurrency limit)
                if config == Searcher.FINISHED:
                    self.exhausted = True
                    return -1
                known = self.known_results.get(_key(config))
                if known is None:
                    break
                # A configuration that already ran (likely in mostly categorical spaces): tell
                # the searcher its result again instead of training it twice, and ask anew.
                self.searcher.on_trial_complete(primary, result=known)
                primary = f"{trial_id}~{attempt}"
            else:  # the searcher keeps proposing what already ran: treat the space as exhausted
                self.exhausted = True
                return -1
            source = "search"
            trial_id = primary
        else:
            return -1
        self.groups.append({"config": dict(config), "primary": trial_id, "source": source, "trials": {}})
        return len(self.groups) - 1

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        group = self._group(trial_id)
        if group and group["source"] == "search" and len(self.seeds) == 1:
            self.searcher.on_trial_result(group["primary"], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        index = self.trial_group.get(trial_id)
        if index is None:
            return
        group = self.groups[index]
        group["trials"][trial_id] = {"result": _objective_values(result, self.metric), "error": error}
        done = [v for v in group["trials"].values() if v is not None]
        if group["source"] != "search" or index in self.told or len(done) < len(self.seeds):
            return
        self.told.add(index)
        metrics = [self.metric] if isinstance(self.metric, str) else list(self.metric)
        means: dict[str, float] = {}
        for metric in metrics:
            values = [v["result"][metric] for v in done if v["result"].get(metric) is not None]
            if values:
                means[metric] = sum(values) / len(values)
        all_failed = all(v["error"] for v in done)
        result = means if len(means) == len(metrics) else None
        if result is not None:
            self.known_results[_key(group["config"])] = result
        self.searcher.on_trial_complete(group["primary"], result=result, error=all_failed)

    def _group(self, trial_id: str) -> dict[str, Any] | None:
        index = self.trial_group.get(trial_id)
        return None if index is None else self.groups[index]

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        state.pop("searcher", None)
        return state

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:  # only used if this is ever the base searcher
        raise NotImplementedError

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _objective_values(result: dict | None, metric: str | list[str]) -> dict[str, float | None]:
    metrics = [metric] if isinstance(metric, str) else list(metric)
    out: dict[str, float | None] = {}
    for name in metrics:
        value = (result or {}).get(name)
        out[name] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return out

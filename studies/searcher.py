"""The study searcher: fixed configurations first, then the inner searcher, each run once per seed.

``StudySearcher`` wraps a Tune searcher (:class:`StudyOptunaSearch`, Optuna's ask-and-tell, or
:class:`NoSearch` for grid studies) and adds what a paper-style study needs:

* fixed configurations (the VAE baseline, or every grid cell) that run before, and outside
  of, the Optuna space, so Optuna only ever sees points of its own space;
* repeated seeds: each configuration becomes ``len(seeds)`` trials that differ only in
  ``train.seed``.  Optuna sees one trial per configuration (the first seed's trial id) and is
  told the mean over the seeds of each objective once all seeds have finished.  A fixed
  configuration that sets its own ``train.seed`` runs once, with that seed (the spec refuses
  one that also asks for repeated seeds);
* multi-objective results (a list of metrics), which Tune's ``Repeater`` does not handle, and
  its own state in Tune's experiment checkpoint, so ``Tuner.restore`` keeps the grouping;
* no configuration trains twice: when the inner searcher proposes one that already finished
  (mostly categorical spaces do), it is told the known result again and asked anew;
* Optuna is told what the record says: a configuration that ran its whole budget reports the
  objective(s) at its best evaluation (the core's ``is_best``: the checkpoint the trial keeps,
  the numbers of the summary and MLflow); one that a scheduler stopped early (ASHA) is PRUNED, with
  the intermediate values it reported, never COMPLETE with a half-budget number; one with a
  diverged trial is FAIL (also ending early, but not stopped: TPE must not read a divergent
  region as merely slow);
* the spec's constraints (``val_au >= 1``): a COMPLETE or PRUNED configuration carries, before
  it is told, its constraint values (Optuna's ``Trial.set_constraint``, <= 0 = satisfied) from
  the metrics of its best evaluation (the mean over its seeds, like the objectives), so that TPE
  learns where the feasible region is and ``study.best_trial`` is feasible.

Tune finds the inner searcher through the ``searcher`` attribute: the base searcher is saved
with its own ``save`` (StudyOptunaSearch pickles its trial numbers; the study stays in its
storage) and this wrapper with ``get_state``/``set_state``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import statistics
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from ray.tune.search import Searcher

from cvae_core.metrics.constraints import Constraint, violations
from cvae_core.metrics.names import IS_BEST

from .results import DIVERGED
from .spec import own_seed
from .summary import TrialRow, finite

MAX_REPEATS = 50  # re-asks when the inner searcher proposes configurations that already ran
RANK_METRIC = "val_nll"  # the core's selection metric, for results that do not carry its is_best flag


def is_new_best(result: dict, best: dict | None) -> bool:
    """Whether ``result`` is the trial's best evaluation so far: the core says so itself
    (``is_best``, by its selection metric: val_nll, val_rec for a DAE); a result without the
    flag is compared by val_nll."""
    if IS_BEST in result:
        return bool(result[IS_BEST])
    value = result.get(RANK_METRIC)
    return isinstance(value, (int, float)) and math.isfinite(value) and (best is None or value < best[RANK_METRIC])


def name_objectives(study: optuna.Study, metrics: list[str]) -> None:
    """Name the study's objectives (plots and dashboard show ``val_nll``, not "Objective 0")."""
    with warnings.catch_warnings():  # experimental since Optuna 3.2 and unchanged since: say it once here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metrics)


class StudyOptunaSearch(Searcher):
    """Optuna's ask-and-tell behind Tune's ``Searcher`` interface, through public APIs only.

    The Optuna study lives in its storage; this searcher keeps only which Optuna trial number
    each Tune trial got, so a restored driver reloads the study by name and loses nothing.

    * The objectives carry their names (``study.set_metric_names``), so Optuna's plots and
      dashboard say ``val_nll``, not "Objective 0".
    * After a killed driver, Tune restores this searcher from its last experiment snapshot.
      Optuna trials asked after that snapshot are still RUNNING in the storage and no Tune
      trial knows them.  Instead of leaving them RUNNING and asking the sampler again (a
      phantom trial per lost ask), the next suggestions adopt them: same Optuna trial, same
      parameters (a define-by-run space re-reads parameters a trial already has).
    * Trials that ended after that snapshot (a pack member ends while its pack trains on) are
      not told again when their resumed pack re-reports them: the storage keeps its first word.
    * :meth:`set_constraints` gives a trial its constraint values before it is told.
    * Like Ray's ``OptunaSearch``: a trial told no value is PRUNED, or FAIL with ``error``;
      intermediate values are reported for a single objective only (Optuna's rule).
    """

    def __init__(self, space, metric: str | list[str], mode: str | list[str], sampler: optuna.samplers.BaseSampler,
                 study_name: str, storage: str | optuna.storages.BaseStorage):
        super().__init__(metric=metric, mode=mode)
        # one storage object for the study and the lookups by trial number (a URL becomes one)
        self.space, self.sampler, self.study_name = space, sampler, study_name
        self.storage = optuna.storages.get_storage(storage)
        self.trial_numbers: dict[str, int] = {}  # Tune trial id -> its Optuna trial's number
        self.orphans: list[int] = []  # RUNNING Optuna trials no Tune trial knows (after a restore)
        self.study = self._load_study()

    def _load_study(self) -> optuna.Study:
        metrics = [self.metric] if isinstance(self.metric, str) else list(self.metric)
        modes = [self.mode] if isinstance(self.mode, str) else list(self.mode)
        study = optuna.create_study(storage=self.storage, study_name=self.study_name, sampler=self.sampler,
                                    pruner=optuna.pruners.NopPruner(), load_if_exists=True,
                                    directions=["minimize" if m == "min" else "maximize" for m in modes])
        name_objectives(study, metrics)
        self.study_id = self.storage.get_study_id_from_name(self.study_name)  # looked up once, not per report
        return study

    def __getstate__(self) -> dict:  # Tune pickles searchers; the study is reloaded from its storage
        state = self.__dict__.copy()
        state.pop("study", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.study = self._load_study()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__getstate__(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__setstate__(pickle.load(handle))
        known = set(self.trial_numbers.values())
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self.orphans = sorted(t.number for t in running if t.number not in known)

    def _trial(self, number: int) -> optuna.Trial:
        """The live Optuna trial with this number, found through the storage's public API."""
        return optuna.Trial(self.study, self._storage_id(number))

    def _storage_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _finished(self, trial_id: str) -> bool:
        """Whether the storage already holds this trial's end: after a killed driver, a pack
        member may have ended (and been told) after the searcher snapshot Tune restores."""
        number = self.trial_numbers.get(trial_id)
        if number is None:
            return False
        return self.storage.get_trial(self._storage_id(number)).state.is_finished()

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self.trial_numbers:
            trial = self._trial(self.trial_numbers[trial_id])
        elif self.orphans:
            trial = self._trial(self.orphans.pop(0))
        else:
            trial = self.study.ask()
        self.trial_numbers[trial_id] = trial.number
        constants = self.space(trial) or {}
        return {**trial.params, **constants}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not isinstance(self.metric, str) or trial_id not in self.trial_numbers or self._finished(trial_id):
            return
        self._trial(self.trial_numbers[trial_id]).report(result[self.metric], result["training_iteration"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.trial_numbers.get(trial_id)
        if number is None or self._finished(trial_id):
            return
        values = None
        if result:
            values = ([result.get(m) for m in self.metric] if isinstance(self.metric, list)
                      else result.get(self.metric))
            if isinstance(values, list) and None in values:
                values = None
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL if error else TrialState.PRUNED
        try:
            self.study.tell(number, values, state=state)
        except (ValueError, RuntimeError) as exc:  # a value Optuna refuses: the study goes on (Ray's OptunaSearch too)
            logging.getLogger(__name__).warning("Optuna refused the result of trial %s: %s", number, exc)

    def set_constraints(self, trial_id: str, values: dict[str, float]) -> None:
        """Set the constraint values (name -> value, <= 0 satisfied) of the Optuna trial proposed
        for ``trial_id``, before it is told: Optuna 5's samplers and ``study.best_trial(s)`` read
        them from the finished trial (its ``constraints_func`` is deprecated)."""
        trial = self._trial(self.trial_numbers[trial_id])
        for name, value in values.items():
            trial.set_constraint(name, value)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of Optuna trial ``number`` in a study seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """A TPE sampler whose randomness for trial number n comes from ``(seed, n)`` instead of one
    stream. After a killed driver, Tune restores the sampler as it was at its last snapshot: with
    one stream, the proposal lost with the driver (adopted again by StudyOptunaSearch) was drawn
    a second time for the next trial, which trained the same configuration twice. Seeded per
    trial number, each trial draws what the uninterrupted study would have drawn from the same
    history."""

    def __init__(self, seed: int, **tpe_options: Any):
        self.seed, self.tpe_options = seed, tpe_options
        self._by_number: dict[int, optuna.samplers.TPESampler] = {}

    def _sampler(self, trial) -> optuna.samplers.TPESampler:
        if trial.number not in self._by_number:
            self._by_number[trial.number] = optuna.samplers.TPESampler(seed=trial_seed(self.seed, trial.number),
                                                                       **self.tpe_options)
        return self._by_number[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)
        self._by_number.pop(trial.number, None)

    def reseed_rng(self) -> None:  # seeds are a function of the trial number: nothing to reseed
        pass


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


class SearcherWrapper(Searcher):
    """A searcher around another one (its ``searcher`` attribute): Tune saves the innermost
    searcher with its own ``save`` and each wrapper with ``get_state``/``set_state``, so that
    ``Tuner.restore`` rebuilds the whole chain."""

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


class StudySearcher(SearcherWrapper):
    """Fixed configurations, then ``n_search`` proposals of ``searcher``, each for every seed.

    ``metric``/``mode`` are the objective(s) told to the inner searcher (str or list);
    ``evaluations`` is a trial's full budget in reports (``training_iteration``): a trial that
    ends earlier without an error was stopped by the scheduler; ``constraints`` (the spec's) are
    set on each configuration's Optuna trial before it is told (the inner searcher must then be
    a :class:`StudyOptunaSearch`).
    """

    constraints: tuple[Constraint, ...] = ()  # also the value of a searcher pickled before constraints existed

    def __init__(self, searcher: Searcher, fixed: list[dict[str, Any]], n_search: int, seeds: list[int],
                 metric: str | list[str], mode: str | list[str], evaluations: int | None = None,
                 constraints: tuple[Constraint, ...] = ()):
        super().__init__(metric=metric, mode=mode)
        self.evaluations = evaluations
        self.constraints = tuple(constraints)
        self.known_constraints: dict[str, dict[str, float]] = {}  # config -> constraint values told
        self.best_results: dict[str, dict] = {}  # trial id -> its best report (the core's is_best)
        self.reported: dict[str, int] = {}  # trial id -> last training_iteration told to the searcher
        self.searcher = searcher
        self.fixed = [dict(c) for c in fixed]
        self.n_search = n_search
        self.seeds = list(seeds)
        self.groups: list[dict[str, Any]] = []  # {"config", "primary", "source", "trials": {id: result}}
        self.trial_group: dict[str, int] = {}
        self.told: set[int] = set()
        self.known_results: dict[str, dict[str, float] | None] = {}  # config -> means told (None: pruned)
        self.diverged_configs: set[str] = set()  # configs told FAIL because a trial of theirs diverged
        self.exhausted = False

    @property
    def total_trials(self) -> int:
        return (len(self.fixed) + self.n_search) * len(self.seeds)

    # -- Tune Searcher API -------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        # The objective(s) come from the spec; TuneConfig's single metric is the scheduler's.
        return True

    def _seeds(self, group: dict[str, Any]) -> list[int]:
        own = own_seed(group["config"])
        return self.seeds if own is None else [own]

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.groups and len(self.groups[-1]["trials"]) < len(self._seeds(self.groups[-1])):
            group_index = len(self.groups) - 1
        else:
            group_index = self._new_group(trial_id)
            if group_index is None:
                return None
            if group_index == -1:
                return Searcher.FINISHED
        group = self.groups[group_index]
        seed = self._seeds(group)[len(group["trials"])]
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
                key = _key(config)
                if key not in self.known_results and key not in self.diverged_configs:
                    break
                # A configuration that already ran (likely in mostly categorical spaces): tell
                # the searcher its result again (or that it was pruned, or diverged) instead of
                # training it twice, and ask anew.
                if self.constraints and key in self.known_constraints:
                    self.searcher.set_constraints(primary, self.known_constraints[key])
                self.searcher.on_trial_complete(primary, result=self.known_results.get(key),
                                                error=key in self.diverged_configs)
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
        if result.get(DIVERGED):
            return  # the divergence report is no evaluation: the trial's end tells Optuna FAIL
        if is_new_best(result, self.best_results.get(trial_id)):
            self.best_results[trial_id] = dict(result)
        group = self._group(trial_id)
        iteration = result.get("training_iteration")
        if (group and group["source"] == "search" and len(self._seeds(group)) == 1
                and self.reported.get(trial_id) != iteration):
            self.reported[trial_id] = iteration
            self.searcher.on_trial_result(group["primary"], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        index = self.trial_group.get(trial_id)
        if index is None:
            return
        group = self.groups[index]
        if result and not error:
            # A report on which the scheduler stops the trial (ASHA's rung, or max_t) reaches the
            # searcher only here, not through on_trial_result: count it as an evaluation too.
            self.on_trial_result(trial_id, result)
        reports = int((result or {}).get("training_iteration", 0) or 0)
        # a diverged trial ends without an error (an outcome, not retried) and before its last
        # evaluation, but it was not stopped: its configuration FAILs in Optuna
        diverged = bool((result or {}).get(DIVERGED))
        error = error or diverged
        stopped = not error and self.evaluations is not None and reports < self.evaluations
        at_best = None if diverged else self.best_results.get(trial_id, result)
        group["trials"][trial_id] = {"result": _metric_values(at_best, self._objectives + self._constrained),
                                     "error": error, "stopped": stopped, "diverged": diverged}
        done = [v for v in group["trials"].values() if v is not None]
        if group["source"] != "search" or index in self.told or len(done) < len(self._seeds(group)):
            return
        self.told.add(index)
        if any(v.get("diverged") for v in done):
            self.diverged_configs.add(_key(group["config"]))
            self.searcher.on_trial_complete(group["primary"], result=None, error=True)
            return
        all_failed = all(v["error"] for v in done)
        key = _key(group["config"])
        if self.constraints and not all_failed:  # COMPLETE or PRUNED: Optuna reads both trials' constraints
            self.known_constraints[key] = violations(self.constraints, _means(done, self._constrained))
            self.searcher.set_constraints(group["primary"], self.known_constraints[key])
        if any(v.get("stopped") for v in done) and not all_failed:
            # Stopped early: PRUNED in Optuna (result None, no error), keeping the intermediate
            # values already reported, so TPE and importances never mistake it for a final number.
            self.known_results[key] = None
            self.searcher.on_trial_complete(group["primary"], result=None, error=False)
            return
        means = _means(done, self._objectives)
        result = means if len(means) == len(self._objectives) else None
        if result is not None:
            self.known_results[key] = result
        self.searcher.on_trial_complete(group["primary"], result=result, error=result is None or all_failed)

    def remember_finished(self, inner: StudyOptunaSearch) -> None:
        """Know the configurations the Optuna study already finished (an extension of a study:
        its earlier experiments' searchers are not this one), so that a repeated proposal is told
        its known result again instead of being trained twice."""
        finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        for trial in inner.study.get_trials(deepcopy=False, states=finished):
            key = _key({**trial.params, **(inner.space(optuna.trial.FixedTrial(trial.params)) or {})})
            if trial.state == TrialState.FAIL:
                self.diverged_configs.add(key)
                continue
            self.known_results[key] = (dict(zip(self._objectives, trial.values)) if trial.state == TrialState.COMPLETE
                                       else None)
            if self.constraints and trial.constraints:
                self.known_constraints[key] = dict(trial.constraints)

    @property
    def _objectives(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def _constrained(self) -> list[str]:
        return [c.metric for c in self.constraints]

    def rename_trial(self, old: str, new: str) -> None:
        """Call the trial proposed as ``old`` ``new`` from now on (a pack names its members only
        once it knows which pack they go to); the inner searcher keeps its own id for it."""
        index = self.trial_group.pop(old)
        self.trial_group[new] = index
        trials = self.groups[index]["trials"]
        trials[new] = trials.pop(old)

    def _group(self, trial_id: str) -> dict[str, Any] | None:
        index = self.trial_group.get(trial_id)
        return None if index is None else self.groups[index]



def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _means(done: list[dict], metrics: list[str]) -> dict[str, float]:
    """The mean over a configuration's seeds of each metric at their best evaluations (seeds
    without a value left out; a metric no seed has is missing)."""
    means: dict[str, float] = {}
    for metric in metrics:
        values = [v["result"][metric] for v in done if v["result"].get(metric) is not None]
        if values:
            means[metric] = sum(values) / len(values)
    return means


def _metric_values(result: dict | None, metric: str | list[str]) -> dict[str, float | None]:
    metrics = [metric] if isinstance(metric, str) else list(metric)
    out: dict[str, float | None] = {}
    for name in metrics:
        value = (result or {}).get(name)
        out[name] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return out


def record_grid_in_optuna(spec, state, rows) -> None:
    """Grid studies have no Optuna sampler; record each finished configuration (``rows``: the
    study's :class:`~studies.summary.TrialRow` list) in the same kind of Optuna study a TPE
    study persists (mean over seeds, like StudySearcher tells Optuna, constraints included), so that
    optuna-dashboard and importance analysis read both kinds of study alike."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=state.optuna_storage, study_name=state.study_name, load_if_exists=True,
                                directions=["minimize" if o.mode == "min" else "maximize" for o in spec.objectives])
    name_objectives(study, [o.metric for o in spec.objectives])
    recorded = {t.user_attrs.get("config") for t in study.get_trials(deepcopy=False)}
    groups: dict[str, list[TrialRow]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    cells = [{k: v for k, v in r[0].config.items() if k != "train.seed"} for r in groups.values()]
    choices: dict[str, set] = {}
    for cell in cells:
        for key, value in cell.items():
            choices.setdefault(key, set()).add(value)
    distributions = {k: CategoricalDistribution(sorted(v, key=str)) for k, v in choices.items()}
    for (label, members), cell in zip(groups.items(), cells):
        if label in recorded or any(m.status in ("interrupted", "pending") for m in members):
            continue
        if len(members) < spec.seeds:
            continue
        means = {}
        for metric in dict.fromkeys([o.metric for o in spec.objectives] + [c.metric for c in spec.constraints]):
            scored = [m.best[metric] for m in members if finite(m.best.get(metric))]
            if scored:
                means[metric] = statistics.fmean(scored)
        values = [means.get(o.metric) for o in spec.objectives]
        complete = all(v is not None for v in values)
        study.add_trial(create_trial(
            state=TrialState.COMPLETE if complete else TrialState.FAIL, values=values if complete else None,
            params=cell, distributions={k: distributions[k] for k in cell},
            user_attrs={"config": label, "ray_trial_ids": [m.trial_id for m in members]},
            constraints=violations(spec.constraints, means) if complete and spec.constraints else None))

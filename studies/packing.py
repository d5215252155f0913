"""Packed studies (``resources.pack`` / ``--pack K``): up to K trials that differ only in loss
weights, schedule and seed train as one packed model (``cvae_core.packed.train_pack``) inside one
Ray Tune trial, and stay K trials everywhere else.

* :class:`PackSearcher` wraps the study's :class:`~studies.searcher.StudySearcher`: Tune asks it
  for one *pack*; it draws up to K proposals that share every setting members of a pack must
  share (each becomes a trial with its own id, ``<pack's Ray trial id>-<k>``), and fans each
  pack result out to the study searcher member by member, so Optuna sees K trials.
* Members are stopped by ASHA's rule (:class:`studies.outcomes.AshaRule`; Tune's scheduler can
  only stop a whole pack); the pack trials ask it, held in one Ray actor on the driver's node, at
  every evaluation.
* A pack trial's result layout (member keys, outcomes) is in :mod:`studies.results`.

The pack trainable itself is :func:`studies.trainable.train_pack_trial`.

The trainable, the outcomes and the model builder load inside the functions that need them:
they bring Ray and torch, which a pack's grouping does not need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher

from .results import DIVERGED, NAN_OBJECTIVES, OUTCOME, PACK_CONFIG, REASON, TRAINING_ITERATION, member_results
from .searcher import SearcherWrapper

@dataclass(frozen=True)
class PackKey:
    """The settings members of one pack must share: the resolved config of a trial config
    (the study's base + the proposal) without ``PER_MEMBER_SETTINGS``, as a string."""

    preset: str
    dataset: str
    scale: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def __call__(self, trial_config: dict[str, Any]) -> str:
        from cvae_core.packed.training import PER_MEMBER_SETTINGS

        from .trainable import resolve_trial_config

        flat = resolve_trial_config(self, trial_config).flat()  # reads preset/dataset/scale/overrides
        return json.dumps({k: v for k, v in flat.items() if k not in PER_MEMBER_SETTINGS}, sort_keys=True,
                          default=str)


class PackSearcher(SearcherWrapper):
    """Groups the proposals of ``searcher`` (a StudySearcher) into packs of up to ``pack``.

    ``suggest(pack_id)`` first places the proposals that earlier packs could not take, then draws
    new ones while the pack has room (member ids ``<pack_id>-<k>``, k = place in the pack); a proposal whose shared
    settings (``key``) differ from the pack's waits for a later pack.  A partial pack goes out
    when the study searcher waits or finishes, or after K proposals that did not fit.
    """

    def __init__(self, searcher: Searcher, pack: int, key):
        # No metric of its own: a pack result holds only member/<id>/<metric> keys, and Tune
        # checks that every result carries the searcher's metric.
        super().__init__(metric=None, mode=None)
        self.searcher = searcher
        self.pack = pack
        self.key = key
        self.waiting: list[tuple[str, dict[str, Any]]] = []  # drawn, not yet in a pack
        self.packs: dict[str, list[str]] = {}  # pack trial id -> member ids
        self.last: dict[str, dict[str, Any]] = {}  # member id -> its latest evaluation (as told)
        self.completed: set[str] = set()
        self.finished = False

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        members: list[tuple[str, dict[str, Any]]] = []
        pack_key = None
        for member in list(self.waiting):
            if len(members) == self.pack:
                break
            key = self.key(member[1])
            pack_key = pack_key or key
            if key == pack_key:
                members.append(member)
                self.waiting.remove(member)
        drawn = 0
        while len(members) < self.pack and len(self.waiting) < self.pack and not self.finished:
            member_id = f"{trial_id}.draw{drawn}"  # named once it has its pack
            config = self.searcher.suggest(member_id)
            if config is None:
                break  # the study searcher waits: go with what the pack has
            if config == Searcher.FINISHED:
                self.finished = True
                break
            drawn += 1
            key = self.key(config)
            pack_key = pack_key or key
            (members if key == pack_key else self.waiting).append((member_id, config))
        if not members:
            return Searcher.FINISHED if self.finished else None
        for k, (drawn_as, config) in enumerate(members):
            members[k] = (f"{trial_id}-{k}", config)
            self.searcher.rename_trial(drawn_as, members[k][0])
        self.packs[trial_id] = [member_id for member_id, _ in members]
        return {PACK_CONFIG: [{"trial_id": member_id, "config": config} for member_id, config in members]}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        for member_id, values in member_results(result).items():
            if member_id in self.completed or member_id not in self.packs.get(trial_id, ()):
                continue
            if "step" in values:  # evaluated in this report
                evaluation = {k: v for k, v in values.items() if k not in (OUTCOME, REASON)}
                self.last[member_id] = evaluation
                self.searcher.on_trial_result(member_id, evaluation)
            outcome = values.get(OUTCOME)
            if outcome is None:
                continue
            last = self.last.get(member_id, {})
            if outcome == "diverged":
                # as an unpacked trial's divergence report: one more result, NaN objectives
                final = {**NAN_OBJECTIVES, DIVERGED: 1.0, "step": values.get("diverged_at_step", last.get("step", 0)),
                         TRAINING_ITERATION: int(last.get(TRAINING_ITERATION, 0)) + 1}
            else:
                final = last
            self.completed.add(member_id)
            self.searcher.on_trial_complete(member_id, result=final or None, error=False)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error:
            self.on_trial_result(trial_id, result)
        for member_id in self.packs.get(trial_id, ()):
            if member_id not in self.completed:
                self.completed.add(member_id)
                self.searcher.on_trial_complete(member_id, result=None if error else self.last.get(member_id),
                                                error=error)


def start_member_asha(**kwargs) -> Any:
    """One :class:`~studies.outcomes.AshaRule` in a Ray actor on this (the driver's) node: every
    pack trial asks the same one, and its state file is on the driver's disk."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .outcomes import AshaRule

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(AshaRule)
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(**kwargs)


def pack_memory_estimate(config, vocab_size: int, pack: int) -> tuple[float, str]:
    """A rough upper bound of one pack's training memory -> (GiB, how it is computed).

    Parameters x members x 4 float32 copies (weights, gradients, Adam's two moments), plus
    activations: batch x sentence length x (vocabulary + 8 x hidden) floats per member and decoder
    (the output logits dominate; a coupled model has two decoders)."""
    from cvae_core.models import build_model

    params = sum(p.numel() for p in build_model(config, vocab_size).parameters())
    decoders = 2 if config.coupling.enabled else 1
    length = min(config.data.max_len, 64)  # sentences are bucketed; long ones are rare
    activations = config.train.batch_size * length * (vocab_size + 8 * config.model.hidden_dim) * decoders
    total = 4 * pack * (4 * params + activations)
    how = (f"{params:,} parameters x {pack} members x 4 float32 copies (weights, gradients, Adam's 2 moments) "
           f"+ activations ~ batch {config.train.batch_size} x {length} tokens x (vocabulary {vocab_size} + "
           f"8 x hidden {config.model.hidden_dim}) x {decoders} decoder(s) per member")
    return total / 1024**3, how

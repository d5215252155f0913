"""``--warm-start STUDY[:top=K]``: a new Optuna study starts from the best configurations of an
earlier one.

The earlier study's finished configurations are ranked as its own summary ranks them: the mean
over its seeds of its first objective, among those whose means satisfy its constraints, counting
only configurations that ran their whole budget at every seed (a half-budget number is no
evidence).  The best K that the new study's search space can express are enqueued in its Optuna
study (``Study.enqueue_trial``), marked with where they came from; its first proposals are those,
trained at the new study's budget and ranked only by what they measure there.

Grid cells name only what differs from the base configuration, so a cell is completed from the
earlier study's base configuration (:data:`~studies.spaces.SPACE_PARAMS`) and kept only if the
space, replayed on those parameters, gives back the configuration that ran.

Optuna loads inside :func:`space_params`: the runner imports this module, and ``--help`` and bad
input must answer before Optuna loads (``tests/test_house.py``).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from cvae_core.config import build_config
from cvae_core.guards import check_name
from cvae_core.metrics.constraints import violated

from .options import StudyError
from .spaces import SEARCH_PREFIX, SPACE_PARAMS, SPACES
from .spec import StudySpec
from .state import StudyState

DEFAULT_TOP = 3
USER_ATTR = "warm_start_from"  # on each enqueued Optuna trial: the study it came from


@dataclasses.dataclass
class WarmStart:
    source: str  # the earlier study's name
    top: int
    params: list[dict[str, Any]]  # Optuna parameters to enqueue, best first
    labels: list[str]  # what each one is, for the start-up lines
    skipped: list[str]  # configurations among the best that this space cannot express

    @property
    def tag(self) -> str:
        return f"{self.source}:top={self.top}"


def parse_warm_start(text: str) -> tuple[str, int]:
    """``STUDY`` or ``STUDY:top=K`` -> (STUDY, K)."""
    name, _, option = text.partition(":")
    top = DEFAULT_TOP
    if option:
        key, _, value = option.partition("=")
        if key != "top" or not value.lstrip("-").isdigit():
            raise StudyError(f"--warm-start {text}: expected STUDY or STUDY:top=K with K a whole number")
        top = int(value)
    if top < 1:
        raise StudyError(f"--warm-start {text}: top must be at least 1, got {top}")
    if not name:
        raise StudyError(f"--warm-start {text}: name the earlier study (a folder under --root)")
    return name, top


def plan_warm_start(text: str, root: Path, spec: StudySpec) -> WarmStart:
    """What a new study ``spec`` enqueues when seeded from ``text``; every problem is one line,
    found before anything is written."""
    name, top = parse_warm_start(text)
    check_name(name, "--warm-start")
    if spec.search != "tpe":
        raise StudyError(f"--warm-start seeds Optuna's proposals: this study's search is {spec.search} "
                         "(use --search tpe)")
    folder = root / name
    if not (folder / "study.json").is_file():
        raise StudyError(f"--warm-start {text}: no study {name} under {root} (pass --root where it lives)")
    source = StudyState.load(folder)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise StudyError(f"--warm-start {text}: study {name} has no summary.json yet (finish it with --resume {name})")
    try:
        trials = json.loads(summary_path.read_text(encoding="utf-8"))["trials"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StudyError(f"--warm-start {text}: {summary_path} is damaged ({type(exc).__name__})") from None
    source_spec = source.study_spec()
    ranked = rank_configurations(source_spec, trials)
    if not ranked:
        raise StudyError(f"--warm-start {text}: study {name} has no feasible configuration that ran its whole "
                         "budget at every seed")
    params, labels, skipped = [], [], []
    for config, label in ranked:
        if len(params) == top:
            break
        found = space_params(spec, source_spec, config)
        if found is None:
            skipped.append(label)
        else:
            params.append(found)
            labels.append(label)
    if not params:
        raise StudyError(f"--warm-start {text}: none of the best configurations of {name} "
                         f"({', '.join(skipped)}) is a point of this study's space {spec.space!r}")
    return WarmStart(name, top, params, labels, skipped)


def rank_configurations(spec: StudySpec, trials: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The configurations of a finished study (its ``summary.json`` trials), best first by the
    mean over seeds of its first objective; only feasible ones whose every trial is done."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for trial in trials:
        config = {k: v for k, v in trial["config"].items() if k != "train.seed"}
        groups.setdefault(json.dumps(config, sort_keys=True), []).append(trial)
    first = spec.objectives[0]
    metrics = [first.metric, *(c.metric for c in spec.constraints)]
    scored = []
    for key, members in groups.items():
        if not all(m["status"] == "done" and all(k in m["best"] for k in metrics) for m in members):
            continue
        means = {k: statistics.fmean(m["best"][k] for m in members) for k in metrics}
        if violated(spec.constraints, means):
            continue
        value = means[first.metric] if first.mode == "min" else -means[first.metric]
        scored.append((value, json.loads(key), members[0]["label"]))
    return [(config, label) for _, config, label in sorted(scored, key=lambda s: s[0])]


def space_params(spec: StudySpec, source_spec: StudySpec, config: dict[str, Any]) -> dict[str, Any] | None:
    """The parameters of ``spec``'s space that give back ``config`` (a configuration of the study
    ``source_spec`` describes), or None when the space has no such point."""
    import optuna

    if config.get("preset", source_spec.preset) != spec.preset:
        return None  # another model (e.g. the VAE baseline, which runs as this study's baseline)
    overrides = {**source_spec.overrides, **{k: v for k, v in config.items()
                                             if k != "preset" and not k.startswith(SEARCH_PREFIX)}}
    built = build_config(spec.preset, source_spec.dataset, source_spec.scale, overrides)
    ran = {**built.flat(), "coupling.rq_c": built.rq_c}  # RQ's C as trained (0 in the config = 2 x latent dim)
    complete = SPACE_PARAMS.get(spec.space)
    candidate = complete(config, ran) if complete else dict(config)
    trial = optuna.trial.FixedTrial(candidate)
    try:
        constants = SPACES[spec.space](trial) or {}
    except ValueError:  # the space asks for a parameter the configuration does not have
        return None
    replayed = {**trial.params, **constants}
    for key, value in replayed.items():
        if key.startswith(SEARCH_PREFIX) or key == "preset":
            continue
        if key not in ran or not _same(ran[key], value):
            return None
    return dict(trial.params)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    return a == b


def enqueue(study, plan: WarmStart) -> None:
    """Put the planned configurations first in ``study``'s queue (an ``optuna.Study``)."""
    for params in plan.params:
        study.enqueue_trial(params, user_attrs={USER_ATTR: plan.source})

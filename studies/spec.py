"""Declarative study specs: ``studies/specs/<name>.yaml`` -> :class:`StudySpec`.

A spec names everything that defines a study except where it runs: the base configuration
(preset, dataset, scale, overrides), the search space and grid, the objective(s), the budget,
the scheduler and the per-trial resources.  Command-line flags may override the budget and the
resources (see ``studies/runner.py``).  Every error names the file and the key.

The packed loop's settings load inside the one function that checks a pack, so a spec is read
and refused without torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvae_core.config import PRESETS, build_config, resolve_key
from cvae_core.errors import CvaeError
from cvae_core.guards import decode_text
from cvae_core.metrics.constraints import Constraint, parse_constraint
from cvae_core.metrics.names import METRICS, direction

from .spaces import GRIDS, SEARCH_PREFIX, SPACES

SPEC_DIR = Path(__file__).resolve().parent / "specs"

SEARCH_MODES = ("tpe", "grid")


class SpecError(CvaeError):
    """A study spec (or a flag overriding it) is invalid."""


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "min" | "max"

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


@dataclass
class Scheduler:
    type: str = "asha"
    metric: str = "val_nll"
    mode: str = ""  # "min" | "max"; empty: the metric's direction in the registry
    grace_period: int = 2  # evaluations a trial always gets before ASHA may stop it
    reduction_factor: int = 2
    # grace_period: anneal in a spec: the first evaluation at which the KL weight has reached its
    # full value (recomputed from the configuration whenever the spec is validated): before it, a
    # trial's NLL and MI say little about where it ends (docs/default-study-design.md)
    grace_after_anneal: bool = False
    # metrics in whose best 1/reduction_factor at a rung a trial also continues (e.g. val_mi_loo:
    # early stopping on NLL alone stops the trials with a live latent); their registry direction
    keep: list[str] = field(default_factory=list)

    def keep_modes(self) -> dict[str, str]:
        return {name: direction(name) for name in self.keep}


@dataclass
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 2
    max_failures: int = 1
    # trials trained as one packed model in one Ray trial (cvae_core.packed); 1 = no packing
    pack: int = 1


@dataclass
class StudySpec:
    name: str
    description: str
    preset: str
    dataset: str
    scale: str
    overrides: dict[str, Any]
    space: str  # name in studies.spaces.SPACES
    grid: str  # name in studies.spaces.GRIDS
    search: str  # default search mode: tpe | grid
    baselines: list[dict[str, Any]]
    objectives: list[Objective]
    scheduler: Scheduler
    resources: Resources
    num_samples: int  # configurations proposed by Optuna (baselines come on top)
    seeds: int  # training seeds per configuration
    seed: int  # sampler seed and first training seed
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # a trial is feasible when its best evaluation satisfies every one (cvae_core.metrics.constraints)
    constraints: list[Constraint] = field(default_factory=list)

    # -- derived ---------------------------------------------------------------------------
    @property
    def evaluations(self) -> int:
        """Evaluations (= tune.report calls = ASHA time units) in one full trial."""
        config = build_config(self.preset, self.dataset, self.scale, self.overrides)
        return math.ceil(config.train.steps / config.train.eval_every)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def summary_params(self, search: str) -> dict[str, str]:
        """Flat description of the spec for the parent MLflow run's params."""
        return {
            "spec": self.name, "search": search, "space": self.space if search == "tpe" else self.grid,
            "objectives": ",".join(str(o) for o in self.objectives), "num_samples": str(self.num_samples),
            "constraints": "; ".join(str(c) for c in self.constraints) or "none",
            "seeds": str(self.seeds), "seed": str(self.seed), "base.preset": self.preset,
            "base.dataset": self.dataset, "base.scale": self.scale,
            "baselines": ";".join(",".join(f"{k}={v}" for k, v in b.items()) for b in self.baselines) or "none",
            "scheduler": f"{self.scheduler.type}(metric={self.scheduler.metric}, grace={self.scheduler.grace_period}, "
                         f"rf={self.scheduler.reduction_factor}, max_t={self.evaluations}"
                         + (f", keep={'+'.join(self.scheduler.keep)}" if self.scheduler.keep else "") + ")",
            "cpus_per_trial": str(self.resources.cpus_per_trial),
            "gpus_per_trial": str(self.resources.gpus_per_trial),
            "max_concurrent_trials": str(self.resources.max_concurrent_trials),
            "max_failures": str(self.resources.max_failures),
            **({"pack": str(self.resources.pack)} if self.resources.pack > 1 else {}),
            **{f"base.{k}": str(v) for k, v in sorted(self.overrides.items())},
        }

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["objectives"] = [str(o) for o in self.objectives]
        out["constraints"] = [str(c) for c in self.constraints]
        return out


def _known_direction(metric: str) -> str:
    """The registry's direction of ``metric``; "" for a metric it does not rank."""
    try:
        return direction(metric)
    except CvaeError:
        return ""


def parse_objectives(text: str | list[str], where: str) -> list[Objective]:
    """"val_nll,val_mi_loo" or ["val_nll", "val_kl:max"] -> [Objective, ...]."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip()]
    if not items:
        raise SpecError(f"{where}: at least one objective is needed, e.g. val_nll")
    out = []
    for item in items:
        metric, _, mode = str(item).partition(":")
        mode = mode or _known_direction(metric)
        if not metric.startswith("val_"):
            raise SpecError(f"{where}: objective {item!r} must be a validation metric (val_nll, val_mi_loo, ...)")
        if mode not in ("min", "max"):
            ranked = ", ".join(f"val_{m.name}:{m.direction}" for m in METRICS.values() if m.ranked)
            raise SpecError(f"{where}: objective {item!r} needs a direction, e.g. {metric}:max "
                            f"(known defaults: {ranked})")
        out.append(Objective(metric, mode))
    if len({o.metric for o in out}) != len(out):
        raise SpecError(f"{where}: objectives repeat a metric: {items}")
    return out


def parse_constraints(items: Any, where: str) -> list[Constraint]:
    """["val_au >= 1", "val_kl > 0.5"] -> [Constraint, ...]; a SpecError naming ``where`` and the
    offending constraint (``where`` is the spec file and key, or the flag)."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise SpecError(f"{where}: must be a list of strings such as ['val_au >= 1'], got {items!r}")
    out = []
    for item in items:
        try:
            out.append(parse_constraint(item))
        except CvaeError as exc:
            raise SpecError(f"{where}: constraint {item!r}: {exc}") from None
    repeated = sorted({str(c) for c in out if out.count(c) > 1})
    if repeated:
        raise SpecError(f"{where}: constraint {repeated[0]!r} is listed twice")
    return out


def _take(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in raw:
        if default is ...:
            raise SpecError(f"{where}: missing key {key!r}")
        return default
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SpecError(f"{where}: {key!r} must be a {name}, got {value!r}")
    return value


def _section(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {}) or {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: {key!r} must be a mapping, got {value!r}")
    return value


def _check_unknown(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def parse_spec(raw: dict[str, Any], source: str = "<dict>") -> StudySpec:
    """Validate a spec mapping (as loaded from YAML)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a study spec must be a mapping, got {type(raw).__name__}")
    _check_unknown(raw, {"name", "description", "base", "space", "grid", "search", "baselines", "objectives",
                         "constraints", "scheduler", "budget", "resources", "extra"}, source)
    base = _section(raw, "base", source)
    _check_unknown(base, {"preset", "dataset", "scale", "overrides"}, f"{source}: base")
    sched_raw = _section(raw, "scheduler", source)
    spec_keys = {f.name for f in dataclasses.fields(Scheduler)} - {"grace_after_anneal"}  # that one: grace_period: anneal
    _check_unknown(sched_raw, spec_keys, f"{source}: scheduler")
    res_raw = _section(raw, "resources", source)
    _check_unknown(res_raw, {f.name for f in dataclasses.fields(Resources)}, f"{source}: resources")
    budget = _section(raw, "budget", source)
    _check_unknown(budget, {"num_samples", "seeds", "seed"}, f"{source}: budget")

    space = _take(raw, "space", str, source)
    if space not in SPACES:
        raise SpecError(f"{source}: space {space!r} is not one of {', '.join(SPACES)}")
    grid = _take(raw, "grid", str, source)
    if grid not in GRIDS:
        raise SpecError(f"{source}: grid {grid!r} is not one of {', '.join(GRIDS)}")
    baselines = raw.get("baselines", []) or []
    if not isinstance(baselines, list) or not all(isinstance(b, dict) for b in baselines):
        raise SpecError(f"{source}: 'baselines' must be a list of mappings such as {{preset: vae}}")
    grace = sched_raw.get("grace_period")
    scheduler = Scheduler(
        type=_take(sched_raw, "type", str, f"{source}: scheduler", "asha"),
        metric=_take(sched_raw, "metric", str, f"{source}: scheduler", "val_nll"),
        mode=_take(sched_raw, "mode", str, f"{source}: scheduler", ""),
        grace_period=2 if grace == "anneal" else _take(sched_raw, "grace_period", int, f"{source}: scheduler", 2),
        grace_after_anneal=grace == "anneal",
        reduction_factor=_take(sched_raw, "reduction_factor", int, f"{source}: scheduler", 2),
        keep=list(_take(sched_raw, "keep", list, f"{source}: scheduler", [])),
    )
    resources = Resources(
        cpus_per_trial=_take(res_raw, "cpus_per_trial", float, f"{source}: resources", 1.0),
        gpus_per_trial=_take(res_raw, "gpus_per_trial", float, f"{source}: resources", 0.0),
        max_concurrent_trials=_take(res_raw, "max_concurrent_trials", int, f"{source}: resources", 2),
        max_failures=_take(res_raw, "max_failures", int, f"{source}: resources", 1),
        pack=_take(res_raw, "pack", int, f"{source}: resources", 1),
    )
    spec = StudySpec(
        name=_take(raw, "name", str, source),
        description=_take(raw, "description", str, source, ""),
        preset=_take(base, "preset", str, f"{source}: base"),
        dataset=_take(base, "dataset", str, f"{source}: base", "ptb"),
        scale=_take(base, "scale", str, f"{source}: base", "quick"),
        overrides=dict(_take(base, "overrides", dict, f"{source}: base", {}) or {}),
        space=space, grid=grid,
        search=_take(raw, "search", str, source, "tpe"),
        baselines=[dict(b) for b in baselines],
        objectives=parse_objectives(raw.get("objectives", ["val_nll"]), f"{source}: objectives"),
        scheduler=scheduler, resources=resources,
        num_samples=_take(budget, "num_samples", int, f"{source}: budget", 8),
        seeds=_take(budget, "seeds", int, f"{source}: budget", 1),
        seed=_take(budget, "seed", int, f"{source}: budget", 0),
        source=source, extra=dict(raw.get("extra") or {}),
        constraints=parse_constraints(raw.get("constraints"), f"{source}: constraints"),
    )
    validate_spec(spec)
    return spec


def own_seed(config: dict[str, Any]) -> int | None:
    """The training seed a configuration sets itself (``train.seed``, or the bare ``seed``), else None."""
    for key, value in config.items():
        try:
            if key != "preset" and resolve_key(key) == "train.seed":
                return int(value)
        except (CvaeError, TypeError, ValueError):
            continue  # an unknown key or a bad value: the configuration's own validation names it
    return None


def validate_spec(spec: StudySpec) -> None:
    """Check a spec (also after flags changed it); raise SpecError naming the value."""
    where = spec.source or spec.name
    if spec.search not in SEARCH_MODES:
        raise SpecError(f"{where}: search {spec.search!r} is not one of {', '.join(SEARCH_MODES)}")
    if spec.preset not in PRESETS:
        raise SpecError(f"{where}: base preset {spec.preset!r} is unknown; choose from {', '.join(PRESETS)}")
    try:
        config = build_config(spec.preset, spec.dataset, spec.scale, spec.overrides)
    except CvaeError as exc:
        raise SpecError(f"{where}: base configuration is invalid: {exc}") from None
    for i, baseline in enumerate(spec.baselines):
        preset = baseline.get("preset", spec.preset)
        try:
            build_config(preset, spec.dataset, spec.scale,
                         {**spec.overrides, **{k: v for k, v in baseline.items() if k != "preset"}})
        except CvaeError as exc:
            raise SpecError(f"{where}: baselines[{i}] is invalid: {exc}") from None
    owned = sorted(searched_keys(spec) & {resolve_key(k) for k in spec.overrides})
    if owned:
        raise SpecError(f"{where}: {', '.join(owned)} is set per trial by the {spec.search} search "
                        f"({spec.space if spec.search == 'tpe' else spec.grid}), so a base override (--set) of it "
                        "would be silently replaced; drop it, or write a spec whose space leaves it alone")
    if spec.search == "tpe" and not spec.baselines and spec.num_samples == 0:
        raise SpecError(f"{where}: nothing to run: no baselines and num_samples 0 (use --num-samples N)")
    if spec.scheduler.type != "asha":
        raise SpecError(f"{where}: scheduler.type {spec.scheduler.type!r} is not supported; use asha "
                        "(it stops trials and never pauses them, so it works with any searcher)")
    if not spec.scheduler.mode:
        spec.scheduler.mode = _known_direction(spec.scheduler.metric)
    if spec.scheduler.mode not in ("min", "max"):
        raise SpecError(f"{where}: scheduler.mode must be min or max, got {spec.scheduler.mode!r}")
    n_evals = math.ceil(config.train.steps / config.train.eval_every)
    if spec.scheduler.grace_after_anneal:
        full_weight = config.regularizer.anneal_start + config.regularizer.anneal_steps
        spec.scheduler.grace_period = min(n_evals, max(2, math.ceil(full_weight / config.train.eval_every)))
    if spec.scheduler.grace_period < 2:
        raise SpecError(f"{where}: scheduler.grace_period must be >= 2 evaluations, got {spec.scheduler.grace_period}")
    if spec.scheduler.grace_period > n_evals:
        raise SpecError(f"{where}: scheduler.grace_period {spec.scheduler.grace_period} exceeds the "
                        f"{n_evals} evaluations of a trial (train.steps / train.eval_every)")
    for name in spec.scheduler.keep:
        if not isinstance(name, str) or not _known_direction(name):
            raise SpecError(f"{where}: scheduler.keep: {name!r} is not a metric with a direction; choose from: "
                            f"{', '.join(m for m in METRICS if _known_direction(m))}")
    if spec.scheduler.reduction_factor < 2:
        raise SpecError(f"{where}: scheduler.reduction_factor must be >= 2, got {spec.scheduler.reduction_factor}")
    r = spec.resources
    for name in ("cpus_per_trial", "gpus_per_trial"):  # nan passes every comparison below
        if not math.isfinite(getattr(r, name)):
            raise SpecError(f"{where}: {name} must be a finite number, got {getattr(r, name)}")
    if r.cpus_per_trial <= 0:
        raise SpecError(f"{where}: cpus_per_trial must be > 0, got {r.cpus_per_trial}")
    if r.gpus_per_trial < 0 or (r.gpus_per_trial > 1 and not float(r.gpus_per_trial).is_integer()):
        raise SpecError(f"{where}: gpus_per_trial must be a fraction in [0, 1] or a whole number, got {r.gpus_per_trial}")
    if r.max_concurrent_trials < 1:
        raise SpecError(f"{where}: max_concurrent_trials must be >= 1, got {r.max_concurrent_trials}")
    if r.max_failures < 1:
        raise SpecError(f"{where}: max_failures must be >= 1 (trials are retried from their last checkpoint), "
                        f"got {r.max_failures}")
    if spec.num_samples < 0 or spec.seeds < 1:
        raise SpecError(f"{where}: budget needs num_samples >= 0 and seeds >= 1, got {spec.num_samples}, {spec.seeds}")
    seeded = [b for b in spec.baselines if own_seed(b) is not None]
    if spec.seeds > 1 and seeded:
        raise SpecError(f"{where}: baseline {seeded[0]} sets its own train.seed and the budget repeats every "
                        f"configuration over {spec.seeds} seeds; use one or the other (list each seed as a "
                        "baseline with seeds: 1, or drop the baseline's train.seed)")
    if r.pack < 1:
        raise SpecError(f"{where}: pack must be >= 1 (1 = one model per trial), got {r.pack}")
    if r.pack > 1:
        check_packable(spec)


def check_packable(spec: StudySpec) -> None:
    """With ``resources.pack`` > 1 the space may only vary settings that members of one pack may
    differ in (``cvae_core.packed.training.PER_MEMBER_SETTINGS``), and the base configuration,
    every baseline and every configuration the search proposes (a sample of them) must be a model
    the packed loop trains; else a SpecError naming the problem."""
    from cvae_core.packed.training import PER_MEMBER_SETTINGS, check_pack_configs

    where = spec.source or spec.name
    varied = sorted(searched_keys(spec) - PER_MEMBER_SETTINGS)
    if varied:
        raise SpecError(f"{where}: pack {spec.resources.pack}: the {spec.search} search varies {', '.join(varied)}, "
                        "which members of one pack must share; use --pack 1")
    cells = [{}] + list(spec.baselines) + search_cells(spec)
    for cell in cells:
        overrides = {k: v for k, v in cell.items() if k != "preset" and not k.startswith(SEARCH_PREFIX)}
        config = build_config(cell.get("preset", spec.preset), spec.dataset, spec.scale, {**spec.overrides, **overrides})
        try:
            check_pack_configs([config, config])
        except CvaeError as exc:
            raise SpecError(f"{where}: pack {spec.resources.pack}: {exc}; use --pack 1") from None


def searched_keys(spec: StudySpec) -> set[str]:
    """Core config keys the search sets per trial (the grid's cells, or what the define-by-run
    space suggests or returns over a fixed sample of 32 draws)."""
    return {resolve_key(k) for cell in search_cells(spec) for k in cell
            if k != "preset" and not k.startswith(SEARCH_PREFIX)}


def search_cells(spec: StudySpec) -> list[dict[str, Any]]:
    """The grid's cells, or a fixed sample of 32 draws of the define-by-run space (each the
    parameters suggested plus the constants the space returns)."""
    if spec.search == "grid":
        cells = GRIDS[spec.grid]()
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        cells = []
        for _ in range(32):
            trial = study.ask()
            constants = SPACES[spec.space](trial) or {}
            cells.append({**trial.params, **constants})
    return cells


def spec_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path.resolve()
    return SPEC_DIR / f"{name_or_path}.yaml"


def load_spec(name_or_path: str) -> StudySpec:
    """Load ``studies/specs/<name>.yaml`` (or a path to a YAML file)."""
    path = spec_path(name_or_path)
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.yaml")))
        raise SpecError(f"study spec not found: {path} (available in {SPEC_DIR}: {available})")
    try:
        raw = yaml.safe_load(decode_text(path.read_bytes(), path))
    except yaml.YAMLError as exc:  # its text spans several lines; keep the position and the problem
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or type(exc).__name__}") from None
    return parse_spec(raw, str(path))

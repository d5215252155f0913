"""``python -m analysis compare S1 S2 ...``: studies of one experiment side by side.

Per study: its budget (dataset, scale, ``train.steps``, batch, evaluations per trial, seeds per
configuration, trial runs), its best feasible trial (:func:`analysis.best.rank_runs` under the
constraints on its parent run, as ``analysis best`` chooses) with its configuration's mean and
95% t-interval over seeds, and its Pareto front over (val NLL, val MI) among feasible trials
(:func:`analysis.best.pareto_front`, as ``analysis best --pareto``).  Studies are ranked against
each other only when their budgets are equal: a screen at 400 steps and a study at 4,000 differ
in budget, not only in quality.

Every number is a validation metric at a trial's best evaluation (its checkpoint), FINISHED
trials only.  Writes ``compare.md`` (the table printed) and ``fronts.png`` (every study's trials
and front in one plot).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cvae_core.metrics.names import metric as metric_info  # noqa: E402
from cvae_core.metrics.names import sort_key  # noqa: E402
from cvae_core.stats import PairedDifference, mean_interval  # noqa: E402
from studies.record import read_constraints_tag  # noqa: E402

from .best import pareto_front, rank_runs  # noqa: E402
from .plots import DPI  # noqa: E402
from .runs import BEST_PREFIX, Study, run_label  # noqa: E402
from .selection import broken_constraints, cfg, config_keys  # noqa: E402
from .store import AnalysisError  # noqa: E402

METRICS = ("val_nll", "val_kl", "val_mi_loo", "val_au")
FRONT = ("val_nll", "val_mi_loo")  # the objectives of `analysis best --pareto`
CONFIDENCE = 0.95
MARK = "★"  # the overall best, only among studies of one budget


@dataclass(frozen=True)
class Budget:
    """What a study spent. Studies rank against each other only when all of it is equal; a
    value its trials do not share reads "a/b"."""
    dataset: Any
    scale: Any  # the spec's base scale (parent run param ``base.scale``)
    steps: Any  # config train.steps
    batch: Any  # config train.batch_size
    evaluations: Any  # of a full trial: ceil(train.steps / train.eval_every)
    seeds: Any  # per configuration (parent run param ``seeds``)
    trials: int  # trial runs of the study, whatever their status

    def label(self) -> str:
        return (f"{self.steps} steps × batch {self.batch}, {self.evaluations} evaluations, "
                f"{_count(self.seeds, 'seed')}, {_count(self.trials, 'trial')}, scale {self.scale}, {self.dataset}")

    def short(self) -> str:
        return f"{self.steps} steps, {_count(self.seeds, 'seed')}, {_count(self.trials, 'trial')}"


@dataclass
class Block:
    """One study's part of the comparison."""
    study: Study
    budget: Budget
    constraints: tuple
    best: pd.Series | None  # its best feasible FINISHED trial
    no_best: str  # why there is none
    over_seeds: dict[str, PairedDifference]  # the best trial's configuration, over its seeds
    front: pd.DataFrame  # Pareto front of the feasible FINISHED trials
    points: pd.DataFrame  # FINISHED trials with both front metrics; column ``feasible``

    @property
    def name(self) -> str:
        return self.study.name

    def best_value(self) -> float:
        return float(self.best[BEST_PREFIX + "val_nll"]) if self.best is not None else math.nan


@dataclass
class Comparison:
    experiment: str
    blocks: list[Block]  # ranked (best first) when comparable, else in the order asked for
    differ: list[str]  # budget fields that differ between the studies; empty: comparable

    @property
    def comparable(self) -> bool:
        return not self.differ

    @property
    def overall_best(self) -> Block | None:
        ranked = [b for b in self.blocks if b.best is not None]
        return ranked[0] if self.comparable and ranked else None


def check_names(names: Sequence[str]) -> None:
    """Before the store is read: at least two studies, none named twice."""
    if len(names) < 2:
        raise AnalysisError(f"compare needs at least two studies, got {len(names)}"
                            + (f" ({names[0]!r})" if names else ""))
    twice = [n for n in dict.fromkeys(names) if names.count(n) > 1]
    if twice:
        raise AnalysisError(f"study {twice[0]!r} is named more than once; compare it with another study")


def _plain(value: Any) -> Any:
    """A frame value as a plain Python value: 400 for numpy's 400 or 400.0."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _one(values) -> Any:
    """The one value the trials share, or "a/b" for several, "?" for none."""
    distinct = sorted({_plain(v) for v in values if not _missing(v)}, key=lambda v: (str(type(v)), v))
    if not distinct:
        return "?"
    return distinct[0] if len(distinct) == 1 else "/".join(str(v) for v in distinct)


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def budget_of(study: Study) -> Budget:
    runs, params = study.runs, study.parent.data.params
    evaluations = [math.ceil(s / e) for s, e in zip(cfg(runs, "train.steps"), cfg(runs, "train.eval_every"))
                   if not _missing(s) and not _missing(e) and e > 0]
    seeds: Any = int(params["seeds"]) if params.get("seeds", "").isdigit() else None
    if seeds is None:  # a parent run without the spec's params: the most seeds any configuration has
        per_config: dict[tuple, set] = {}
        for key, seed in zip(config_keys(runs), runs["seed"]):
            per_config.setdefault(key, set()).add(seed)
        seeds = max((len(s) for s in per_config.values()), default="?")
    return Budget(dataset=_one(runs["dataset"]), scale=params.get("base.scale", "?"),
                  steps=_one(cfg(runs, "train.steps")), batch=_one(cfg(runs, "train.batch_size")),
                  evaluations=_one(evaluations), seeds=seeds,
                  trials=len(runs))


def block_of(study: Study) -> Block:
    runs = study.runs
    constraints = tuple(read_constraints_tag(study.parent.data.tags))
    finished = runs[runs["status"] == "FINISHED"]
    best, no_best, over_seeds = None, "", {}
    try:
        top = rank_runs(runs, "val_nll", None, ("FINISHED",), constraints).iloc[0]
    except AnalysisError as exc:
        no_best = str(exc)
    else:
        if top["violated"]:
            no_best = f"no FINISHED trial satisfies {', '.join(str(c) for c in constraints)}"
        else:
            best = top
            keys = config_keys(finished)
            same = finished[[key == keys.loc[top.name] for key in keys]]
            over_seeds = {m: mean_interval(same[BEST_PREFIX + m].tolist(), CONFIDENCE) for m in METRICS
                          if BEST_PREFIX + m in same.columns}
    try:
        front = pareto_front(runs, FRONT, constraints)
    except AnalysisError:
        front = runs.iloc[0:0]
    columns = [BEST_PREFIX + m for m in FRONT]
    points = (finished.dropna(subset=columns) if all(c in runs.columns for c in columns) else finished.iloc[0:0])
    points = points.assign(feasible=~broken_constraints(points, constraints).map(bool).astype(bool))
    return Block(study, budget_of(study), constraints, best, no_best, over_seeds, front, points)


def compare_studies(studies: Sequence[Study], experiment: str) -> Comparison:
    """The comparison of studies already read; an error if two of them are one study."""
    seen: dict[str, str] = {}
    for study in studies:
        if study.parent_run_id in seen:
            raise AnalysisError(f"{seen[study.parent_run_id]!r} and {study.name!r} are the same study "
                                f"(parent run {study.parent_run_id}); compare it with another study")
        seen[study.parent_run_id] = study.name
    blocks = [block_of(s) for s in studies]
    differ = [f.name for f in fields(Budget) if len({str(getattr(b.budget, f.name)) for b in blocks}) > 1]
    if not differ:  # one budget: rank by the best feasible trial's val NLL, studies without one last
        blocks.sort(key=lambda b: (b.best is None, sort_key("val_nll", b.best_value()) if b.best is not None else 0))
    return Comparison(experiment, blocks, differ)


# ---------------------------------------------------------------------------------------------
# Output

def _number(metric: str, value: Any) -> str:
    """One digit more than the paper's tables (cvae_core/metrics/names.py): near values of two
    small studies stay apart."""
    if _missing(value):
        return "–"
    return f"{float(value):.{metric_info(metric).decimals + 1}f}"


def _interval(metric: str, d: PairedDifference) -> str:
    if d.n < 2:
        return _number(metric, d.mean)
    return f"{_number(metric, d.mean)} [{_number(metric, d.low)}, {_number(metric, d.high)}]"


def configuration_label(row: pd.Series) -> str:
    """A trial's label without its seed: the configuration its seeds share."""
    return run_label({**row.to_dict(), "seed": None})


def ranking_sentence(comparison: Comparison) -> str:
    if comparison.comparable:
        return (f"Same budget ({comparison.blocks[0].budget.label()}): the studies are ranked against each other "
                f"by their best feasible trial's val NLL; {MARK} marks the overall best.")
    verb = "differs" if len(comparison.differ) == 1 else "differ"
    return (f"Different budgets ({', '.join(comparison.differ)} {verb}): not ranked against each other; each "
            "study's numbers hold at its own budget.")


def render_markdown(comparison: Comparison) -> str:
    names = ", ".join(b.name for b in comparison.blocks)
    lines = [f"# {len(comparison.blocks)} studies compared (experiment {comparison.experiment}): {names}", "",
             ranking_sentence(comparison), "",
             "Validation metrics at each trial's best evaluation (its checkpoint), FINISHED trials; with several "
             f"seeds, the best trial's configuration as mean [{CONFIDENCE:.0%} t-interval] over its seeds.", ""]
    overall = comparison.overall_best
    for rank, block in enumerate(comparison.blocks, 1):
        place = f"{rank}. " if comparison.comparable else ""
        lines += [f"## {place}{block.name}: {block.budget.label()}", ""]
        among = (f" among the trials that satisfy {', '.join(str(c) for c in block.constraints)}"
                 if block.constraints else "")
        if block.best is None:
            lines += [f"Best feasible trial: none ({block.no_best}).", ""]
        else:
            best = block.best
            mark = f" {MARK} best of the compared studies" if block is overall else ""
            lines += [f"Best feasible trial (lowest val NLL{among}): {run_label(best)}, run {best['run_id']}{mark}", "",
                      "| | " + " | ".join(metric_info(m).label for m in METRICS) + " |",
                      "|---|" + "---:|" * len(METRICS),
                      "| best trial | " + " | ".join(_number(m, best.get(BEST_PREFIX + m)) for m in METRICS) + " |"]
            n = max((d.n for d in block.over_seeds.values()), default=0)
            if n >= 2:
                lines.append(f"| {configuration_label(best)} over {n} seeds | "
                             + " | ".join(_interval(m, block.over_seeds[m]) if m in block.over_seeds else "–"
                                          for m in METRICS) + " |")
            lines.append("")
        front = block.front
        lines.append(f"Pareto front over val NLL (lower) and val MI (higher){among}: "
                     f"{len(front)} of {len(block.points)} trials" + (":" if len(front) else "."))
        if len(front):
            lines += ["", "| trial | run | NLL | MI |", "|---|---|---:|---:|"]
            lines += [f"| {run_label(row)} | {row['run_id']} | {_number('val_nll', row[BEST_PREFIX + 'val_nll'])} | "
                      f"{_number('val_mi_loo', row[BEST_PREFIX + 'val_mi_loo'])} |" for _, row in front.iterrows()]
        lines.append("")
    return "\n".join(lines)


def as_json(comparison: Comparison) -> dict[str, Any]:
    """The comparison as plain values (NaN stays NaN here; ``analysis.runs.dumps`` makes it null)."""
    def studies():
        for block in comparison.blocks:
            best = block.best
            yield {
                "study": block.name, "parent_run_id": block.study.parent_run_id, "budget": asdict(block.budget),
                "budget_label": block.budget.label(), "constraints": [str(c) for c in block.constraints],
                "best": None if best is None else {
                    "run_id": best["run_id"], "label": run_label(best), "configuration": configuration_label(best),
                    "metrics": {m: float(best.get(BEST_PREFIX + m, math.nan)) for m in METRICS},
                    "over_seeds": {m: {"n": d.n, "mean": d.mean, "low": d.low, "high": d.high,
                                       "confidence": d.confidence} for m, d in block.over_seeds.items()}},
                "no_best": block.no_best or None,
                "front": [{"run_id": row["run_id"], "label": run_label(row),
                           **{m: float(row[BEST_PREFIX + m]) for m in FRONT}} for _, row in block.front.iterrows()],
                "n_points": len(block.points),
            }

    overall = comparison.overall_best
    return {"experiment": comparison.experiment, "ranked": comparison.comparable, "differ": comparison.differ,
            "statement": ranking_sentence(comparison), "overall_best": overall.name if overall else None,
            "studies": list(studies())}


def plot_fronts(comparison: Comparison, path: Path) -> Path:
    """Every study's FINISHED trials (val NLL on x, val MI on y; × infeasible) and its Pareto front
    as a line, in one plot; the legend names each study with its budget."""
    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    for i, block in enumerate(comparison.blocks):
        color = plt.get_cmap("tab10")(i % 10)
        points, x, y = block.points, BEST_PREFIX + FRONT[0], BEST_PREFIX + FRONT[1]
        label = f"{block.name} ({block.budget.short()})" + (", best" if block is comparison.overall_best else "")
        feasible = points[points["feasible"]]
        ax.scatter(feasible[x], feasible[y], color=color, s=28, alpha=0.7)
        ax.scatter(points.loc[~points["feasible"], x], points.loc[~points["feasible"], y], color=color, marker="x",
                   s=28, alpha=0.7)
        front = block.front.sort_values(x)
        ax.step(front[x], front[y], where="post", color=color, linewidth=1.6, marker="o", markersize=6,
                label=label if len(front) else None)
        if not len(front):
            ax.plot([], [], color=color, label=f"{label}: no front")
    ax.set_xlabel("validation NLL (nats/sentence, lower is better)")
    ax.set_ylabel("validation MI (nats, higher is better)")
    ax.set_title("Pareto fronts (line) and trials (points; × infeasible)\n"
                 + ("same budget: ranked against each other" if comparison.comparable
                    else f"different budgets ({', '.join(comparison.differ)}): not ranked against each other"),
                 fontsize=10)
    ax.margins(x=0.08, y=0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path

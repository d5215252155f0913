"""Choosing and grouping a study's runs for a table, a plot or the reproduction report.

A runs frame (:mod:`analysis.runs`) has one row per trial; here rows are told apart by their
configuration without the seed, grouped into cells, paired seed by seed across two settings, and
named the way the paper names its rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import pandas as pd

from cvae_core.config import PRESETS
from cvae_core.metrics.constraints import Constraint, violated
from cvae_core.metrics.names import sort_key
from cvae_core.stats import PairedDifference, Summary, paired_difference, summarize

from .paper import PAPER_ROWS
from .runs import BEST_PREFIX, CONFIG_PREFIX, FINAL_PREFIX

DATASET_ORDER = ("ptb", "yelp13", "yahoo", "text", "switchboard")
DIALOGUE_PRESETS = ("seq2seq", "cvae", "coupled-cvae")
IGNORED_CONFIG = {"train.seed", "train.device"}  # never part of a configuration's identity


@dataclass
class Comparison:
    """``a − b`` seed by seed, per dataset and metric."""
    label: str
    dataset: str
    diffs: dict[str, PairedDifference]


def broken_by(run: pd.Series, constraints: Iterable[Constraint]) -> list[str]:
    """The study's constraints that a run's best evaluation (its ``best.*`` values: the checkpoint
    it saved) does not satisfy, as texts; empty: feasible. A missing metric breaks its constraint
    (the study summary and Optuna judge alike: ``cvae_core.metrics.constraints``)."""
    constraints = list(constraints)
    values = {c.metric: _plain(run.get(BEST_PREFIX + c.metric)) for c in constraints}
    return [str(c) for c in violated(constraints, values)]


def broken_constraints(runs: pd.DataFrame, constraints: Iterable[Constraint]) -> pd.Series:
    """:func:`broken_by` for every run of a frame."""
    constraints = list(constraints)
    return pd.Series([broken_by(run, constraints) for _, run in runs.iterrows()], index=runs.index, dtype=object)


def metric_column(metric: str, at: str = "best", split: str = "val") -> str:
    prefix = {"best": BEST_PREFIX, "final": FINAL_PREFIX}[at]
    return f"{prefix}{split}_{metric}"


def cfg(frame: pd.DataFrame, key: str, default: Any = None) -> pd.Series:
    column = CONFIG_PREFIX + key
    if column in frame.columns:
        return frame[column]
    return pd.Series([default] * len(frame), index=frame.index, dtype=object)


def _plain(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return value


def config_keys(frame: pd.DataFrame, ignore: Iterable[str] = ()) -> pd.Series:
    """A hashable identity per run: its config without the seed (and without ``ignore`` keys)."""
    skip = IGNORED_CONFIG | set(ignore)
    columns = [c for c in frame.columns if c.startswith(CONFIG_PREFIX) and c[len(CONFIG_PREFIX):] not in skip
               and not any(c[len(CONFIG_PREFIX):].startswith(p[:-1]) for p in skip if p.endswith("*"))]
    if not len(frame):
        return pd.Series([], dtype=object)
    values = frame[columns].astype(object)
    return pd.Series([tuple((c, _plain(v)) for c, v in zip(columns, row)) for row in values.itertuples(index=False)],
                     index=frame.index, dtype=object)


def summarize_runs(runs: pd.DataFrame, metrics: Iterable[str], at: str = "best") -> dict[str, Summary]:
    out = {}
    for metric in metrics:
        column = metric_column(metric, at)
        out[metric] = summarize(runs[column].tolist()) if column in runs.columns else Summary(0, math.nan, math.nan)
    return out


def pick_config(runs: pd.DataFrame, at: str) -> tuple[pd.DataFrame, str]:
    """Runs of one cell share one configuration; if several do, keep the best by mean val NLL."""
    keys = config_keys(runs)
    groups = {k: runs.loc[keys == k] for k in dict.fromkeys(keys)}
    if len(groups) <= 1:
        return runs, ""
    name = "nll" if metric_column("nll", at) in runs.columns else "rec"
    column = metric_column(name, at)
    best = min(groups.values(), key=lambda g: (sort_key(name, summarize(g[column].tolist()).mean)
                                               if column in g.columns else math.inf))
    differing = sorted({c for k in groups for c, v in k if any(dict(o).get(c) != v for o in groups)})
    names = ", ".join(c[len(CONFIG_PREFIX):] for c in differing[:4]) + (" ..." if len(differing) > 4 else "")
    return best, f"best of {len(groups)} configurations (by mean val NLL) that differ in {names}"


def paired_runs(a: pd.DataFrame, b: pd.DataFrame, ignore: Iterable[str]) -> list[tuple[pd.Series, pd.Series]]:
    """Pairs (run of a, run of b) with the same dataset and seed whose configs are equal except
    for the ``ignore`` keys (e.g. ``coupling.*`` and ``preset`` for coupled vs base)."""
    ignore = set(ignore) | {"preset"}
    ka, kb = config_keys(a, ignore), config_keys(b, ignore)
    index: dict[tuple, list[int]] = {}
    for i, (key, dataset, seed) in enumerate(zip(kb, b["dataset"], b["seed"])):
        index.setdefault((key, dataset, None if pd.isna(seed) else int(seed)), []).append(i)
    pairs = []
    for i, (key, dataset, seed) in enumerate(zip(ka, a["dataset"], a["seed"])):
        match = index.get((key, dataset, None if pd.isna(seed) else int(seed)))
        if match:
            pairs.append((a.iloc[i], b.iloc[match[0]]))
    return pairs


def compare(label: str, a: pd.DataFrame, b: pd.DataFrame, ignore: Iterable[str], metrics: Iterable[str],
            at: str = "best", confidence: float = 0.95) -> list[Comparison]:
    out = []
    pairs = paired_runs(a, b, ignore)
    for dataset in ordered_datasets({p[0]["dataset"] for p in pairs}):
        these = [p for p in pairs if p[0]["dataset"] == dataset]
        diffs = {}
        for metric in metrics:
            column = metric_column(metric, at)
            if column in a.columns and column in b.columns:
                diffs[metric] = paired_difference([p[0][column] for p in these], [p[1][column] for p in these],
                                                  confidence)
        out.append(Comparison(label, dataset, diffs))
    return out


def ordered_datasets(datasets: Iterable[str]) -> list[str]:
    datasets = [d for d in set(datasets) if d is not None and not (isinstance(d, float) and math.isnan(d))]
    return sorted(datasets, key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d))


def family_of(preset: str) -> str:
    return preset[len("coupled-"):] if preset.startswith("coupled-") else preset


def family_label(family: str, coupled: bool) -> str:
    preset = f"coupled-{family}" if coupled else family
    for row in PAPER_ROWS:
        if row.preset == preset and row.table in ("1", "8"):
            return row.label
    return preset


def preset_order(preset: str) -> tuple[int, str]:
    names = list(PRESETS)
    return (names.index(preset) if preset in names else len(names), preset)


def format_lambda(value: Any) -> str:
    """λ as printed in the paper: whole numbers with one decimal (1.0, 5.0), others as they are
    (0.1, 0.25); values drawn by a continuous search are cut to three significant digits (0.507, 339)."""
    if value is None or pd.isna(value):
        return "?"
    value = float(value)
    return f"{value:.1f}" if value.is_integer() else f"{value:.3g}"


def coupling_triples(runs: pd.DataFrame) -> pd.Series:
    """(distance, λ_m, λ_r) per run; a distance the run does not use (λ_m = 0) is None, never
    NaN, so that such runs group together (NaN != NaN)."""
    distances = [None if d is None or pd.isna(d) else d for d in cfg(runs, "coupling.distance")]
    return pd.Series(list(zip(distances, cfg(runs, "coupling.lambda_m").astype(float),
                              cfg(runs, "coupling.lambda_r").astype(float))), index=runs.index, dtype=object)


def distance_label(distance) -> str:
    """As the paper prints a matching distance; "–" where the run has none (λ_m = 0 matches nothing)."""
    if distance is None or (isinstance(distance, float) and math.isnan(distance)):
        return "–"
    return {"rq": "RQ", "eucl": "Eucl"}.get(distance, str(distance))


def triple_order(triple: tuple) -> tuple:
    return ({"rq": 0, "eucl": 1}.get(triple[0], 2), str(triple[0]), triple[1], triple[2])


def matches_coupling(runs: pd.DataFrame, settings: dict) -> pd.Series:
    """Rows whose coupling.* config equals ``settings`` (floats compared with a tolerance)."""
    keep = pd.Series(True, index=runs.index)
    for key, value in settings.items():
        column = cfg(runs, f"coupling.{key}")
        if isinstance(value, str):
            keep &= column == value
        else:
            keep &= pd.Series([v is not None and not pd.isna(v) and math.isclose(float(v), value, abs_tol=1e-12)
                               for v in column], index=runs.index)
    return keep

"""Paper-format tables from a study's runs frame (see :mod:`analysis.runs`).

Layouts (rows × datasets):
  table1  language modelling: each posterior/regularizer family, base vs coupled: NLL (KL), PPL
  table2  the same rows: MI, BLEU-1/2
  table3  hyperparameter analysis: blocks by matching distance, λ_m (at λ_r = 1) and λ_r (at
          λ_m = 0.1), the base model last: NLL (KL), PPL, MI, BLEU-1/2
  table4  signal matching off: each coupled family at its own λ_m vs λ_m = 0: NLL, PPL
  table8  dialogue (CVAE): base models and Coupled-CVAE by λ_m: NLL (KL), PPL, D-1, D-2

Numbers are the study's VALIDATION metrics (``val_*``) at each run's best evaluation (lowest
val_nll, i.e. the checkpoint the run saved), or at its last evaluation with ``at="final"``.
A cell with several seeds shows mean ± sample std; the best value per block is bold.  Under the
table, each coupled (or λ_m) row is compared with its baseline seed by seed: the mean paired
difference with a Student-t 95% confidence interval.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd

from .paper import DATASET_LABELS
from .runs import AnalysisError, BEST_PREFIX, CONFIG_PREFIX, FINAL_PREFIX
from .stats import PairedDifference, Summary, paired_difference, summarize

LAYOUTS = ("table1", "table2", "table3", "table4", "table8")
DATASET_ORDER = ("ptb", "yelp13", "yahoo", "text", "switchboard")
DIALOGUE_PRESETS = ("seq2seq", "cvae", "coupled-cvae")
DECIMALS = {"nll": 1, "kl": 1, "ppl": 1, "elbo": 1, "rec": 1, "mi_loo": 2, "mi_batch": 2, "au": 0,
            "bleu1": 1, "bleu2": 1, "dist1": 2, "dist2": 2}
# Direction of "better" for bold marks and effect directions; KL has none (it follows NLL in a cell).
BETTER = {"nll": "min", "ppl": "min", "rec": "min", "elbo": "max", "mi_loo": "max", "mi_batch": "max",
          "au": "max", "bleu1": "max", "bleu2": "max", "dist1": "max", "dist2": "max"}
METRIC_LABELS = {"nll": "NLL", "kl": "KL", "ppl": "PPL", "mi_loo": "MI", "mi_batch": "MI (batch)", "au": "AU",
                 "bleu1": "BLEU-1", "bleu2": "BLEU-2", "dist1": "D-1", "dist2": "D-2", "elbo": "ELBO", "rec": "Rec"}
IGNORED_CONFIG = {"train.seed", "train.device"}  # never part of a configuration's identity


@dataclass(frozen=True)
class Column:
    """A printed column: one metric, or NLL (KL) / BLEU-1/2 shown as one composite cell."""
    header: str
    metrics: tuple[str, ...]
    sep: str = " / "  # between parts; "nll_kl" uses the parenthesised form

    def format(self, parts: list[str]) -> str:
        if self.metrics == ("nll", "kl"):
            return f"{parts[0]} ({parts[1]})"
        return self.sep.join(parts)


NLL_KL = Column("NLL (KL)", ("nll", "kl"))
NLL = Column("NLL", ("nll",))
PPL = Column("PPL", ("ppl",))
MI = Column("MI", ("mi_loo",))
BLEU = Column("BLEU-1/2", ("bleu1", "bleu2"))
DIST1 = Column("D-1", ("dist1",))
DIST2 = Column("D-2", ("dist2",))


@dataclass
class Row:
    label: list[str]                              # leading cells (e.g. model; or Dist, λ_m, λ_r)
    cells: dict[str, dict[str, Summary]]          # dataset -> metric -> Summary
    notes: dict[str, str] = field(default_factory=dict)   # dataset -> footnote mark reason
    runs: dict[str, pd.DataFrame] = field(default_factory=dict)  # dataset -> the runs behind the cell


@dataclass
class Block:
    title: str | None
    rows: list[Row]
    mark_best: bool = True


@dataclass
class Comparison:
    """``a − b`` seed by seed, per dataset and metric."""
    label: str
    dataset: str
    diffs: dict[str, PairedDifference]


@dataclass
class Table:
    layout: str
    title: str
    label_headers: list[str]
    datasets: list[str]
    columns: list[Column]
    blocks: list[Block]
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    comparison_metrics: tuple[str, ...] = ("nll", "kl", "ppl", "mi_loo")


# ---------------------------------------------------------------------------------------------
# Selecting and grouping runs

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
    if isinstance(value, float) and value.is_integer():
        return value
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


def _pick_config(runs: pd.DataFrame, at: str) -> tuple[pd.DataFrame, str]:
    """Runs of one cell share one configuration; if several do, keep the best by mean val NLL."""
    keys = config_keys(runs)
    groups = {k: runs.loc[keys == k] for k in dict.fromkeys(keys)}
    if len(groups) <= 1:
        return runs, ""
    column = metric_column("nll", at) if metric_column("nll", at) in runs.columns else metric_column("rec", at)
    best = min(groups.values(), key=lambda g: (summarize(g[column].tolist()).mean
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
    for dataset in _ordered({p[0]["dataset"] for p in pairs}):
        these = [p for p in pairs if p[0]["dataset"] == dataset]
        diffs = {}
        for metric in metrics:
            column = metric_column(metric, at)
            if column in a.columns and column in b.columns:
                diffs[metric] = paired_difference([p[0][column] for p in these], [p[1][column] for p in these],
                                                  confidence)
        out.append(Comparison(label, dataset, diffs))
    return out


def _ordered(datasets: Iterable[str]) -> list[str]:
    datasets = [d for d in set(datasets) if d is not None and not (isinstance(d, float) and math.isnan(d))]
    return sorted(datasets, key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d))


def _row(label: list[str], runs: pd.DataFrame, datasets: list[str], metrics: Iterable[str], at: str) -> Row:
    row = Row(label, {})
    metrics = list(metrics)
    for dataset in datasets:
        cell = runs[runs["dataset"] == dataset]
        if not len(cell):
            continue
        cell, note = _pick_config(cell, at)
        row.cells[dataset] = summarize_runs(cell, metrics, at)
        row.runs[dataset] = cell
        if note:
            row.notes[dataset] = note
    return row


def _metrics_of(columns: list[Column]) -> list[str]:
    return [m for c in columns for m in c.metrics]


def _family(preset: str) -> str:
    return preset[len("coupled-"):] if preset.startswith("coupled-") else preset


def _family_label(family: str, coupled: bool) -> str:
    from .paper import PAPER_ROWS

    preset = f"coupled-{family}" if coupled else family
    for row in PAPER_ROWS:
        if row.preset == preset and row.table in ("1", "8"):
            return row.label
    return preset


def _preset_order(preset: str) -> tuple[int, str]:
    from cvae_core.config import PRESETS

    names = list(PRESETS) + list(DIALOGUE_PRESETS)
    return (names.index(preset) if preset in names else len(names), preset)


def _num(value: Any) -> str:
    return "?" if value is None or pd.isna(value) else f"{float(value):g}"


def _lam(value: Any) -> str:
    """λ as printed in the paper: whole numbers with one decimal (1.0, 5.0), others as they are
    (0.1, 0.25); values drawn by a continuous search are cut to three significant digits (0.507, 339)."""
    if value is None or pd.isna(value):
        return "?"
    value = float(value)
    return f"{value:.1f}" if value.is_integer() else f"{value:.3g}"


def _coupling_triples(runs: pd.DataFrame) -> pd.Series:
    return pd.Series(list(zip(cfg(runs, "coupling.distance"), cfg(runs, "coupling.lambda_m").astype(float),
                              cfg(runs, "coupling.lambda_r").astype(float))), index=runs.index, dtype=object)


def _triple_order(triple: tuple) -> tuple:
    return ({"rq": 0, "eucl": 1}.get(triple[0], 2), str(triple[0]), triple[1], triple[2])


def _caption(study: str, at: str, runs: pd.DataFrame) -> str:
    where = ("each run at its lowest-val_nll evaluation (the checkpoint it saved)" if at == "best"
             else "each run at its last evaluation")
    seeds = runs.groupby(config_keys(runs).astype(str))["seed"].nunique() if len(runs) else pd.Series([1])
    spread = ("mean ± std over seeds" if seeds.max() > 1 else "one run per configuration")
    return (f"Study `{study}`: " if study else "") + f"VALIDATION split (val_*), {where}; {spread}; best per block in bold."


# ---------------------------------------------------------------------------------------------
# Layouts

def table1(runs: pd.DataFrame, at: str = "best", study: str = "", columns: list[Column] | None = None,
           layout: str = "table1") -> Table:
    columns = columns or [NLL_KL, PPL]
    runs = runs[~runs["preset"].isin(DIALOGUE_PRESETS)]
    datasets = _ordered(runs["dataset"])
    metrics = _metrics_of(columns)
    blocks, comparisons = [], []
    families = sorted({_family(p) for p in runs["preset"].dropna()}, key=_preset_order)
    for family in families:
        base = runs[runs["preset"] == family]
        coupled = runs[runs["preset"] == f"coupled-{family}"]
        rows = []
        if len(base):
            rows.append(_row([_family_label(family, False)], base, datasets, metrics, at))
        triples = _coupling_triples(coupled)
        distinct = list(dict.fromkeys(triples))
        for triple in sorted(distinct, key=_triple_order):
            label = _family_label(family, True)
            if len(distinct) > 1:
                label += f" ({'RQ' if triple[0] == 'rq' else 'Eucl'}, λ_m={_lam(triple[1])}, λ_r={_lam(triple[2])})"
            these = coupled[triples == triple]
            rows.append(_row([label], these, datasets, metrics, at))
            if len(base):
                comparisons += compare(f"{label} − {_family_label(family, False)}", these, base,
                                       ("coupling.*",), metrics_for_comparison(metrics), at)
        if rows:
            blocks.append(Block(None, rows))
    title = ("Table 1 layout: language modelling" if layout == "table1"
             else "Table 2 layout: mutual information and reconstruction")
    return Table(layout, title, ["Model"], datasets, columns, blocks, _caption(study, at, runs),
                 comparisons=comparisons, comparison_metrics=tuple(metrics_for_comparison(metrics)))


def metrics_for_comparison(metrics: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(m for m in metrics))


def table2(runs: pd.DataFrame, at: str = "best", study: str = "") -> Table:
    return table1(runs, at, study, columns=[MI, BLEU], layout="table2")


def table3(runs: pd.DataFrame, at: str = "best", study: str = "", family: str | None = None,
           ref_lambda_m: float = 0.1, ref_lambda_r: float = 1.0) -> Table:
    columns = [NLL_KL, PPL, MI, BLEU]
    metrics = _metrics_of(columns)
    if family is None:
        coupled_presets = runs.loc[runs["preset"].str.startswith("coupled-", na=False), "preset"]
        if not len(coupled_presets):
            raise AnalysisError("table3 needs coupled runs (preset coupled-*); this study has none")
        family = "vae" if (coupled_presets == "coupled-vae").any() else _family(coupled_presets.mode().iloc[0])
    coupled = runs[runs["preset"] == f"coupled-{family}"]
    base = runs[runs["preset"] == family]
    if not len(coupled):
        raise AnalysisError(f"table3: no runs of preset coupled-{family} in this study")
    datasets = _ordered(pd.concat([coupled["dataset"], base["dataset"]]))
    triples = _coupling_triples(coupled)
    distances = sorted(set(t[0] for t in triples), key=lambda d: ({"rq": 0, "eucl": 1}.get(d, 2), str(d)))
    blocks, covered, comparisons = [], set(), []
    base_label = _family_label(family, False)

    def add_block(title: str, selected: list[tuple]) -> None:
        rows = []
        for triple in selected:
            these = coupled[triples == triple]
            dist = "RQ" if triple[0] == "rq" else ("Eucl" if triple[0] == "eucl" else str(triple[0]))
            rows.append(_row([dist, _lam(triple[1]), _lam(triple[2])], these, datasets, metrics, at))
            covered.add(triple)
        blocks.append(Block(title, rows))

    for distance in distances:
        name = "RQ" if distance == "rq" else ("Eucl" if distance == "eucl" else str(distance))
        mine = sorted({t for t in triples if t[0] == distance}, key=lambda t: (t[1], t[2]))
        by_lm = [t for t in mine if math.isclose(t[2], ref_lambda_r)]
        if by_lm:
            add_block(f"{name}, λ_r = {_lam(ref_lambda_r)}", by_lm)
        by_lr = sorted([t for t in mine if math.isclose(t[1], ref_lambda_m)], key=lambda t: t[2])
        if len({t[2] for t in by_lr}) >= 2:
            add_block(f"{name}, λ_m = {_lam(ref_lambda_m)}", by_lr)
        rest = [t for t in mine if t not in covered]
        if rest:
            add_block(f"{name}, other λ", rest)
    if len(base):
        blocks.append(Block(None, [_row([base_label, "", ""], base, datasets, metrics, at)], mark_best=False))
        for triple in sorted(set(triples), key=_triple_order):
            dist = "RQ" if triple[0] == "rq" else "Eucl"
            comparisons += compare(f"{dist} λ_m={_lam(triple[1])} λ_r={_lam(triple[2])} − {base_label}",
                                   coupled[triples == triple], base, ("coupling.*",), metrics, at)
    table = Table("table3", f"Table 3 layout: hyperparameter analysis of {_family_label(family, True)}",
                  ["Dist", "λ_m", "λ_r"], datasets, columns, blocks, _caption(study, at, runs),
                  comparisons=comparisons, comparison_metrics=("nll", "kl", "ppl", "mi_loo"))
    return table


def preset_coupling(preset: str, dataset: str) -> dict | None:
    """The coupling settings (distance, lambda_m, lambda_r) a coupled preset uses on ``dataset``,
    or None when cvae_core does not know the preset (or it does not run on that dataset)."""
    from cvae_core.config import preset_coupling as core_preset_coupling
    from cvae_core.errors import CvaeError

    known = dataset if dataset in ("ptb", "yelp13", "yahoo") else "ptb"
    try:
        c = core_preset_coupling(preset, known)
    except CvaeError:
        return None
    return {"distance": c.distance, "lambda_m": c.lambda_m, "lambda_r": c.lambda_r}


def _matches(runs: pd.DataFrame, settings: dict) -> pd.Series:
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


def table4(runs: pd.DataFrame, at: str = "best", study: str = "", ref_lambda_m: float = 0.1) -> Table:
    columns = [NLL, PPL]
    metrics = _metrics_of(columns)
    coupled = runs[runs["preset"].str.startswith("coupled-", na=False) & ~runs["preset"].isin(DIALOGUE_PRESETS)]
    lm = cfg(coupled, "coupling.lambda_m").astype(float)
    datasets = _ordered(coupled["dataset"])
    blocks, comparisons = [], []
    for preset in sorted(set(coupled.loc[lm == 0, "preset"]), key=_preset_order):
        mine = coupled[coupled["preset"] == preset]
        is_reference = pd.Series(False, index=mine.index)
        is_zero = pd.Series(False, index=mine.index)
        for dataset in set(mine["dataset"]):
            # the preset's own distance and λ_r; its own λ_m unless that is 0 (then --ref-lambda-m)
            settings = preset_coupling(preset, dataset) or {"distance": "rq", "lambda_m": ref_lambda_m, "lambda_r": 1.0}
            if settings["lambda_m"] == 0:
                settings["lambda_m"] = ref_lambda_m
            on_dataset = mine["dataset"] == dataset
            is_reference |= on_dataset & _matches(mine, settings)
            is_zero |= on_dataset & _matches(mine, {**settings, "lambda_m": 0.0})
        reference, zero = mine[is_reference], mine[is_zero]
        label = _family_label(_family(preset), True)
        rows = [_row([f"{label}*"], reference, datasets, metrics, at),
                _row([f"{label} (λ_m=0)"], zero, datasets, metrics, at)]
        blocks.append(Block(None, rows))
        comparisons += compare(f"{label}* − {label} (λ_m=0)", reference, zero, ("coupling.lambda_m",), metrics, at)
    if not blocks:
        raise AnalysisError("table4 needs coupled runs with coupling.lambda_m = 0; this study has none")
    notes = ["* each coupled preset at its own λ_m (as in Table 1; coupled-vae: 0.1, coupled-vmf-vae: 7.5 on PTB)"]
    return Table("table4", "Table 4 layout: the effect of signal matching (λ_m = 0)", ["Model"], datasets, columns,
                 blocks, _caption(study, at, runs), notes, comparisons, comparison_metrics=("nll", "ppl"))


def table8(runs: pd.DataFrame, at: str = "best", study: str = "") -> Table:
    columns = [NLL_KL, PPL, DIST1, DIST2]
    metrics = _metrics_of(columns)
    dialogue = runs[runs["preset"].isin(DIALOGUE_PRESETS)]
    if not len(dialogue):
        raise AnalysisError(f"table8 needs dialogue runs (presets {', '.join(DIALOGUE_PRESETS)}); this study has none")
    datasets = _ordered(dialogue["dataset"])
    rows, base_rows = [], {}
    for preset in ("seq2seq", "cvae"):
        these = dialogue[dialogue["preset"] == preset]
        if len(these):
            rows.append(_row([_family_label(preset, False)], these, datasets, metrics, at))
            base_rows[preset] = these
    coupled = dialogue[dialogue["preset"] == "coupled-cvae"]
    lm = cfg(coupled, "coupling.lambda_m").astype(float)
    comparisons = []
    for value in sorted(set(lm)):
        these = coupled[lm == value]
        label = f"Coupled-CVAE (λ_m={_lam(value)})"
        rows.append(_row([label], these, datasets, metrics, at))
        if "cvae" in base_rows:
            comparisons += compare(f"{label} − CVAE", these, base_rows["cvae"], ("coupling.*",), metrics, at)
    notes = ["D-1/D-2: percent distinct uni/bigrams of one prior response per post"]
    return Table("table8", "Table 8 layout: dialogue generation", ["Model"], datasets, columns,
                 [Block(None, rows)], _caption(study, at, runs), notes, comparisons,
                 comparison_metrics=("nll", "kl", "ppl", "dist1", "dist2"))


def build_table(runs: pd.DataFrame, layout: str, at: str = "best", study: str = "",
                statuses: Iterable[str] | None = ("FINISHED",), **options) -> Table:
    if layout not in LAYOUTS:
        raise AnalysisError(f"unknown layout {layout!r}; choose {', '.join(LAYOUTS)}")
    if at not in ("best", "final"):
        raise AnalysisError(f"--at must be best or final, got {at!r}")
    total = len(runs)
    if statuses is not None:
        runs = runs[runs["status"].isin(list(statuses))]
    if not len(runs):
        raise AnalysisError(f"no {'/'.join(statuses or ())} runs to tabulate (of {total} runs)")
    if metric_column("nll", at) not in runs.columns:
        raise AnalysisError(f"the runs logged no val_nll: cannot build {layout}")
    builder: Callable[..., Table] = {"table1": table1, "table2": table2, "table3": table3, "table4": table4,
                                     "table8": table8}[layout]
    table = builder(runs, at=at, study=study, **options)
    from .runs import stopped_early

    early = int(stopped_early(runs).sum())
    if early:
        table.notes.append(f"{early} of the tabulated runs stopped before config train.steps (early stopping); "
                           "--complete-only leaves them out")
    if statuses is not None and len(runs) < total:
        table.notes.append(f"{total - len(runs)} of {total} runs left out (status not {'/'.join(statuses)})")
    return table


# ---------------------------------------------------------------------------------------------
# Rendering

def _fmt(summary: Summary, metric: str, latex: bool = False) -> str:
    if summary.n == 0 or math.isnan(summary.mean):
        return "–" if not latex else "--"
    d = DECIMALS.get(metric, 2)
    text = f"{summary.mean:.{d}f}"
    if summary.n > 1 and not math.isnan(summary.std):
        text += (r" $\pm$ " if latex else " ± ") + f"{summary.std:.{d}f}"
    return text


def best_marks(block: Block, dataset: str, metric: str) -> set[int]:
    """Indices of the rows of ``block`` with the best (rounded, as printed) mean of ``metric``."""
    better = BETTER.get(metric)
    if not block.mark_best or better is None:
        return set()
    d = DECIMALS.get(metric, 2)
    values = {}
    for i, row in enumerate(block.rows):
        s = row.cells.get(dataset, {}).get(metric)
        if s is not None and s.n and not math.isnan(s.mean):
            values[i] = round(s.mean, d)
    if len(values) < 2:
        return set()
    target = (min if better == "min" else max)(values.values())
    return {i for i, v in values.items() if v == target}


def _cells(table: Table, block: Block, latex: bool) -> list[list[str]]:
    bold = (lambda s: rf"\textbf{{{s}}}") if latex else (lambda s: f"**{s}**")
    marks = {(d, m): best_marks(block, d, m) for d in table.datasets for c in table.columns for m in c.metrics}
    out = []
    for i, row in enumerate(block.rows):
        line = [(_latex_escape(x) if latex else x) for x in row.label]
        for dataset in table.datasets:
            cell = row.cells.get(dataset)
            for column in table.columns:
                if cell is None:
                    line.append("--" if latex else "–")
                    continue
                parts = [_fmt(cell[m], m, latex) for m in column.metrics]
                if column.metrics == ("nll", "kl"):
                    text = column.format(parts)
                    text = bold(text) if i in marks[(dataset, "nll")] else text
                else:
                    parts = [bold(p) if i in marks[(dataset, m)] else p for p, m in zip(parts, column.metrics)]
                    text = column.format(parts)
                if dataset in row.notes and column is table.columns[0]:
                    text += r"$^\dagger$" if latex else " †"
                line.append(text)
        out.append(line)
    return out


def _n_label(row: Row, dataset: str) -> str:
    runs = row.runs.get(dataset)
    return str(len(runs)) if runs is not None else "0"


def _show_n(table: Table) -> bool:
    return any(len(r) != 1 for b in table.blocks for row in b.rows for r in row.runs.values())


def _headers(table: Table) -> list[str]:
    headers = list(table.label_headers)
    for dataset in table.datasets:
        name = DATASET_LABELS.get(dataset, dataset)
        if _show_n(table):
            headers.append(f"{name} n")
        headers += [f"{name} {c.header}" for c in table.columns]
    return headers


def _with_n(table: Table, block: Block, lines: list[list[str]]) -> list[list[str]]:
    if not _show_n(table):
        return lines
    k, width = len(table.label_headers), len(table.columns)
    out = []
    for row, line in zip(block.rows, lines):
        new = line[:k]
        for j, dataset in enumerate(table.datasets):
            new.append(_n_label(row, dataset))
            new += line[k + j * width:k + (j + 1) * width]
        out.append(new)
    return out


def _footnotes(table: Table) -> list[str]:
    notes = []
    for block in table.blocks:
        for row in block.rows:
            for dataset, note in row.notes.items():
                notes.append(f"† {' '.join(x for x in row.label if x)} on {DATASET_LABELS.get(dataset, dataset)}: {note}")
    return notes + table.notes


def _fmt_diff(diff: PairedDifference | None, metric: str) -> str:
    if diff is None or diff.n == 0:
        return "–"
    d = DECIMALS.get(metric, 2)
    text = f"{diff.mean:+.{d}f}"
    if diff.n >= 2:
        text += f" [{diff.low:+.{d}f}, {diff.high:+.{d}f}]"
    return text


def render_markdown(table: Table) -> str:
    headers = _headers(table)
    lines = [f"**{table.title}**", "", table.caption, "", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for block in table.blocks:
        if block.title:
            lines.append("| " + " | ".join([f"*{block.title}*"] + [""] * (len(headers) - 1)) + " |")
        for line in _with_n(table, block, _cells(table, block, latex=False)):
            lines.append("| " + " | ".join(line) + " |")
    notes = _footnotes(table)
    if notes:
        lines += [""] + notes
    if table.comparisons:
        lines += ["", comparison_markdown(table)]
    return "\n".join(lines) + "\n"


def comparison_markdown(table: Table) -> str:
    metrics = table.comparison_metrics
    n_max = max(max((d.n for d in c.diffs.values()), default=0) for c in table.comparisons)
    conf = next((d.confidence for c in table.comparisons for d in c.diffs.values()), 0.95)
    head = ("Paired by seed (same dataset and seed, config equal but for the compared setting): "
            "difference a − b" + (f", mean [{conf:.0%} t-interval]" if n_max >= 2 else "") + ".")
    headers = ["a − b", "Dataset", "pairs"] + [f"Δ {METRIC_LABELS.get(m, m)}" for m in metrics]
    lines = [head, "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for c in table.comparisons:
        n = max((d.n for d in c.diffs.values()), default=0)
        cells = [c.label, DATASET_LABELS.get(c.dataset, c.dataset), str(n)]
        cells += [_fmt_diff(c.diffs.get(m), m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_LATEX_TOKENS = {"λ_m": r"$\lambda_m$", "λ_r": r"$\lambda_r$", "β": r"$\beta$", "−": "$-$", "±": r"$\pm$",
                 "†": r"$^\dagger$", "–": "--"}


def _latex_escape(text: str) -> str:
    """Plain text (with the table's Greek/dash symbols) -> LaTeX."""
    parts = re.split("(" + "|".join(map(re.escape, _LATEX_TOKENS)) + ")", text)
    out = []
    for part in parts:
        if part in _LATEX_TOKENS:
            out.append(_LATEX_TOKENS[part])
            continue
        part = part.replace("\\", r"\textbackslash{}")
        for char in "&%$#_{}":
            part = part.replace(char, "\\" + char)
        out.append(part)
    return "".join(out)


def render_latex(table: Table) -> str:
    k, show_n = len(table.label_headers), _show_n(table)
    per = len(table.columns) + (1 if show_n else 0)
    spec = "l" * k + "".join("|" + "c" * per for _ in table.datasets)
    lines = [f"% {table.title}. Needs \\usepackage{{booktabs}}.", r"\begin{table}[t]", r"\centering", r"\small",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    top = [""] * k + [rf"\multicolumn{{{per}}}{{c}}{{{DATASET_LABELS.get(d, d)}}}" for d in table.datasets]
    lines.append(" & ".join(top) + r" \\")
    sub = [_latex_escape(h) for h in table.label_headers]
    for _ in table.datasets:
        sub += (["n"] if show_n else []) + [_latex_escape(c.header) for c in table.columns]
    lines += [" & ".join(sub) + r" \\", r"\midrule"]
    for index, block in enumerate(table.blocks):
        if index:
            lines.append(r"\midrule")
        for line in _with_n(table, block, _cells(table, block, latex=True)):
            lines.append(" & ".join(line) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = _latex_escape(table.caption.replace("`", ""))
    notes = " ".join(_latex_escape(n) for n in _footnotes(table))
    lines += [rf"\caption{{{_latex_escape(table.title)}. {caption}{(' ' + notes) if notes else ''}}}",
              r"\end{table}"]
    if table.comparisons:
        lines += ["", comparison_latex(table)]
    return "\n".join(lines) + "\n"


def comparison_latex(table: Table) -> str:
    metrics = table.comparison_metrics
    lines = [r"\begin{tabular}{llr" + "c" * len(metrics) + "}", r"\toprule",
             " & ".join(["$a - b$", "Dataset", "pairs"] + [rf"$\Delta$ {METRIC_LABELS.get(m, m)}" for m in metrics])
             + r" \\", r"\midrule"]
    for c in table.comparisons:
        n = max((d.n for d in c.diffs.values()), default=0)
        cells = [_latex_escape(c.label), DATASET_LABELS.get(c.dataset, c.dataset), str(n)]
        cells += [_fmt_diff(c.diffs.get(m), m).replace("–", "--") for m in metrics]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def render(table: Table, fmt: str = "markdown") -> str:
    if fmt == "markdown":
        return render_markdown(table)
    if fmt == "latex":
        return render_latex(table)
    raise AnalysisError(f"unknown format {fmt!r}; choose markdown or latex")

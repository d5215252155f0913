"""Paper-format table layouts from a study's runs frame (see :mod:`analysis.runs`); the runs
are chosen by :mod:`analysis.selection` and printed by :mod:`analysis.render`.

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
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pandas as pd

from cvae_core.config import preset_coupling as core_preset_coupling
from cvae_core.errors import CvaeError
from cvae_core.stats import Summary
from studies.record import cost_line

from .runs import runs_cost, stopped_early
from .selection import (DIALOGUE_PRESETS, Comparison, cfg, compare, config_keys, coupling_triples, distance_label,
                        family_label, family_of, format_lambda, matches_coupling, metric_column, ordered_datasets,
                        pick_config, preset_order, summarize_runs, triple_order)
from .store import AnalysisError

# the settings that differ between a coupled run and its λ_m = 0 twin (the last two are unused there)
UNUSED_WITHOUT_MATCHING = ("coupling.lambda_m", "coupling.distance", "coupling.rq_c")

LAYOUTS = ("table1", "table2", "table3", "table4", "table8")


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


def _row(label: list[str], runs: pd.DataFrame, datasets: list[str], metrics: Iterable[str], at: str) -> Row:
    row = Row(label, {})
    metrics = list(metrics)
    for dataset in datasets:
        cell = runs[runs["dataset"] == dataset]
        if not len(cell):
            continue
        cell, note = pick_config(cell, at)
        row.cells[dataset] = summarize_runs(cell, metrics, at)
        row.runs[dataset] = cell
        if note:
            row.notes[dataset] = note
    return row


def _metrics_of(columns: list[Column]) -> list[str]:
    return [m for c in columns for m in c.metrics]


def _caption(study: str, at: str, runs: pd.DataFrame) -> str:
    where = ("each run at its lowest-val_nll evaluation (the checkpoint it saved)" if at == "best"
             else "each run at its last evaluation")
    seeds = runs.groupby(config_keys(runs).astype(str))["seed"].nunique() if len(runs) else pd.Series([1])
    spread = ("mean ± std over seeds" if seeds.max() > 1 else "one run per configuration")
    return (f"Study `{study}`: " if study else "") + f"VALIDATION split (val_*), {where}; {spread}; best per block in bold."


def table1(runs: pd.DataFrame, at: str = "best", study: str = "", columns: list[Column] | None = None,
           layout: str = "table1") -> Table:
    columns = columns or [NLL_KL, PPL]
    runs = runs[~runs["preset"].isin(DIALOGUE_PRESETS)]
    datasets = ordered_datasets(runs["dataset"])
    metrics = _metrics_of(columns)
    blocks, comparisons = [], []
    families = sorted({family_of(p) for p in runs["preset"].dropna()}, key=preset_order)
    for family in families:
        base = runs[runs["preset"] == family]
        coupled = runs[runs["preset"] == f"coupled-{family}"]
        rows = []
        if len(base):
            rows.append(_row([family_label(family, False)], base, datasets, metrics, at))
        triples = coupling_triples(coupled)
        distinct = list(dict.fromkeys(triples))
        for triple in sorted(distinct, key=triple_order):
            label = family_label(family, True)
            if len(distinct) > 1:
                label += (f" ({distance_label(triple[0])}, λ_m={format_lambda(triple[1])}, "
                          f"λ_r={format_lambda(triple[2])})")
            these = coupled[triples == triple]
            rows.append(_row([label], these, datasets, metrics, at))
            if len(base):
                comparisons += compare(f"{label} − {family_label(family, False)}", these, base,
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
        family = "vae" if (coupled_presets == "coupled-vae").any() else family_of(coupled_presets.mode().iloc[0])
    coupled = runs[runs["preset"] == f"coupled-{family}"]
    base = runs[runs["preset"] == family]
    if not len(coupled):
        raise AnalysisError(f"table3: no runs of preset coupled-{family} in this study")
    datasets = ordered_datasets(pd.concat([coupled["dataset"], base["dataset"]]))
    triples = coupling_triples(coupled)
    distances = sorted(set(t[0] for t in triples), key=lambda d: triple_order((d, 0.0, 0.0)))
    blocks, covered, comparisons = [], set(), []
    base_label = family_label(family, False)

    def add_block(title: str, selected: list[tuple]) -> None:
        rows = []
        for triple in selected:
            these = coupled[triples == triple]
            cells = [distance_label(triple[0]), format_lambda(triple[1]), format_lambda(triple[2])]
            rows.append(_row(cells, these, datasets, metrics, at))
            covered.add(triple)
        blocks.append(Block(title, rows))

    for distance in distances:
        name = "no matching" if distance_label(distance) == "–" else distance_label(distance)
        mine = sorted({t for t in triples if t[0] == distance}, key=lambda t: (t[1], t[2]))
        by_lm = [t for t in mine if math.isclose(t[2], ref_lambda_r)]
        if by_lm:
            add_block(f"{name}, λ_r = {format_lambda(ref_lambda_r)}", by_lm)
        by_lr = sorted([t for t in mine if math.isclose(t[1], ref_lambda_m)], key=lambda t: t[2])
        if len({t[2] for t in by_lr}) >= 2:
            add_block(f"{name}, λ_m = {format_lambda(ref_lambda_m)}", by_lr)
        rest = [t for t in mine if t not in covered]
        if rest:
            add_block(f"{name}, other λ", rest)
    if len(base):
        blocks.append(Block(None, [_row([base_label, "", ""], base, datasets, metrics, at)], mark_best=False))
        for triple in sorted(set(triples), key=triple_order):
            label = f"{distance_label(triple[0])} λ_m={format_lambda(triple[1])} λ_r={format_lambda(triple[2])} − {base_label}"
            comparisons += compare(label, coupled[triples == triple], base, ("coupling.*",), metrics, at)
    table = Table("table3", f"Table 3 layout: hyperparameter analysis of {family_label(family, True)}",
                  ["Dist", "λ_m", "λ_r"], datasets, columns, blocks, _caption(study, at, runs),
                  comparisons=comparisons, comparison_metrics=("nll", "kl", "ppl", "mi_loo"))
    return table


def preset_coupling(preset: str, dataset: str) -> dict | None:
    """The coupling settings (distance, lambda_m, lambda_r) a coupled preset uses on ``dataset``,
    or None when cvae_core does not know the preset (or it does not run on that dataset)."""
    known = dataset if dataset in ("ptb", "yelp13", "yahoo") else "ptb"
    try:
        c = core_preset_coupling(preset, known)
    except CvaeError:
        return None
    return {"distance": c.distance, "lambda_m": c.lambda_m, "lambda_r": c.lambda_r}


def table4(runs: pd.DataFrame, at: str = "best", study: str = "", ref_lambda_m: float = 0.1) -> Table:
    columns = [NLL, PPL]
    metrics = _metrics_of(columns)
    coupled = runs[runs["preset"].str.startswith("coupled-", na=False) & ~runs["preset"].isin(DIALOGUE_PRESETS)]
    lm = cfg(coupled, "coupling.lambda_m").astype(float)
    datasets = ordered_datasets(coupled["dataset"])
    blocks, comparisons = [], []
    for preset in sorted(set(coupled.loc[lm == 0, "preset"]), key=preset_order):
        mine = coupled[coupled["preset"] == preset]
        is_reference = pd.Series(False, index=mine.index)
        is_zero = pd.Series(False, index=mine.index)
        for dataset in set(mine["dataset"]):
            # the preset's own distance and λ_r; its own λ_m unless that is 0 (then --ref-lambda-m)
            settings = preset_coupling(preset, dataset) or {"distance": "rq", "lambda_m": ref_lambda_m, "lambda_r": 1.0}
            if settings["lambda_m"] == 0:
                settings["lambda_m"] = ref_lambda_m
            on_dataset = mine["dataset"] == dataset
            is_reference |= on_dataset & matches_coupling(mine, settings)
            # without matching the distance and RQ's C are unused (logged "none" since the record
            # says so; older stores logged the preset's): λ_m and λ_r decide
            is_zero |= on_dataset & matches_coupling(mine, {"lambda_m": 0.0, "lambda_r": settings["lambda_r"]})
        reference, zero = mine[is_reference], mine[is_zero]
        label = family_label(family_of(preset), True)
        rows = [_row([f"{label}*"], reference, datasets, metrics, at),
                _row([f"{label} (λ_m=0)"], zero, datasets, metrics, at)]
        blocks.append(Block(None, rows))
        comparisons += compare(f"{label}* − {label} (λ_m=0)", reference, zero, UNUSED_WITHOUT_MATCHING, metrics, at)
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
    datasets = ordered_datasets(dialogue["dataset"])
    rows, base_rows = [], {}
    for preset in ("seq2seq", "cvae"):
        these = dialogue[dialogue["preset"] == preset]
        if len(these):
            rows.append(_row([family_label(preset, False)], these, datasets, metrics, at))
            base_rows[preset] = these
    coupled = dialogue[dialogue["preset"] == "coupled-cvae"]
    lm = cfg(coupled, "coupling.lambda_m").astype(float)
    comparisons = []
    for value in sorted(set(lm)):
        these = coupled[lm == value]
        label = f"Coupled-CVAE (λ_m={format_lambda(value)})"
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
    study_runs, total = runs, len(runs)
    if statuses is not None:
        runs = runs[runs["status"].isin(list(statuses))]
    if not len(runs):
        raise AnalysisError(f"no {'/'.join(statuses or ())} runs to tabulate (of {total} runs)")
    if metric_column("nll", at) not in runs.columns:
        raise AnalysisError(f"the runs logged no val_nll: cannot build {layout}")
    builder: Callable[..., Table] = {"table1": table1, "table2": table2, "table3": table3, "table4": table4,
                                     "table8": table8}[layout]
    table = builder(runs, at=at, study=study, **options)
    early = int(stopped_early(runs).sum())
    if early:
        table.notes.append(f"{early} of the tabulated runs stopped before config train.steps (early stopping); "
                           "--complete-only leaves them out")
    if statuses is not None and len(runs) < total:
        table.notes.append(f"{total - len(runs)} of {total} runs left out (status not {'/'.join(statuses)})")
    cost = runs_cost(study_runs)
    if cost["trials"]:
        table.notes.append(f"{cost_line(cost)} (every trial run of the study; per run: final.cpu_seconds, "
                           "final.gpu_seconds in `export`)")
    return table

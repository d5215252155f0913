"""Reproduction report: our numbers beside the paper's published values (:mod:`analysis.paper`),
the deltas, and a check of every effect direction the paper reports (coupled vs base, larger
vs smaller λ, λ_m = 0 vs on) against ours.

Our numbers come from the study runs (VALIDATION split, each run's best evaluation); the paper's
are TEST-split numbers after the full 60K-step schedule.  The report says so at the top, and it
flags the scale our runs used (``config.scale``): absolute deltas of a quick-scale study are
expected to be large; the effect directions are the comparable part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from cvae_core.metrics.names import METRICS
from cvae_core.metrics.names import metric as metric_info
from cvae_core.stats import PairedDifference, decimals_needed, paired_difference, summarize

from .paper import DATASET_LABELS, PAPER_ROWS, SOURCE, PaperRow
from .selection import cfg, matches_coupling, metric_column, paired_runs, pick_config
from .store import AnalysisError
from .tables import preset_coupling

DATASET_ALIASES = {"swda": "switchboard"}
TABLES = ("1", "2", "3", "4", "8")


def match_runs(runs: pd.DataFrame, row: PaperRow) -> pd.DataFrame:
    """Our runs that correspond to one paper row (same preset, dataset and coupling settings)."""
    if row.preset is None:
        return runs.iloc[0:0]
    datasets = runs["dataset"].map(lambda d: DATASET_ALIASES.get(d, d))
    selected = runs[(runs["preset"] == row.preset) & (datasets == row.dataset)]
    coupling = dict(row.coupling or {})
    if row.preset.startswith("coupled-") and row.table in ("1", "2"):
        coupling = preset_coupling(row.preset, row.dataset) or coupling
    if row.table == "4":  # the starred row: the preset's own settings; the λ_m = 0 row: those with λ_m = 0
        coupling = {**(preset_coupling(row.preset, row.dataset) or {"lambda_m": 0.1}), **coupling}
    return selected[matches_coupling(selected, coupling)]


@dataclass
class Effect:
    table: str
    dataset: str
    a: str
    b: str
    metric: str
    paper: float
    ours: PairedDifference | None  # paired by seed
    ours_unpaired: float           # difference of means when no seed pairs exist

    @property
    def ours_value(self) -> float:
        return self.ours.mean if self.ours is not None and self.ours.n else self.ours_unpaired

    def verdict(self) -> str:
        """reproduced / contradicted: our paired 95% interval excludes 0, on the paper's side or
        the other; cannot check: it includes 0, or no seed pairs give one (the sign is said)."""
        ours = self.ours_value
        if math.isnan(ours):
            return "n/a"
        if self.paper == 0:
            return "paper: no change"
        sign = "same sign" if (ours > 0) == (self.paper > 0) else "opposite sign"
        if self.ours is None or self.ours.n < 2:
            return f"cannot check: no seed pairs ({sign})"
        if not self.ours.excludes_zero:
            return f"cannot check: interval includes 0 ({sign})"
        return "reproduced" if sign == "same sign" else "contradicted"

    @property
    def same_sign(self) -> bool:
        return self.paper != 0 and not math.isnan(self.ours_value) and (self.ours_value > 0) == (self.paper > 0)


def _pairs_of_rows(table: str) -> list[tuple[PaperRow, PaperRow]]:
    """(a, b) paper rows whose difference a − b is an effect the paper reports."""
    rows = [r for r in PAPER_ROWS if r.table == table]
    out = []
    if table in ("1", "2"):
        by_label = {(r.label, r.dataset): r for r in rows}
        for r in rows:
            if r.label.startswith("Coupled-"):
                base = by_label.get((r.label[len("Coupled-"):], r.dataset))
                if base is not None:
                    out.append((r, base))
    elif table == "3":
        blocks: dict[tuple[str, str], list[PaperRow]] = {}
        for r in rows:
            if r.block != "VAE":
                blocks.setdefault((r.block, r.dataset), []).append(r)
        for (block, dataset), members in blocks.items():
            varying = "lambda_m" if "λ_r" in block else "lambda_r"
            members = sorted(members, key=lambda r: r.coupling[varying])
            out += list(zip(members[1:], members[:-1]))  # larger λ − smaller λ
    elif table == "4":
        for r in rows:
            if r.coupling is None:
                zero = next(z for z in rows if z.preset == r.preset and z.dataset == r.dataset and z.coupling)
                out.append((r, zero))
    elif table == "8":
        cvae = {r.dataset: r for r in rows if r.preset == "cvae"}
        out += [(r, cvae[r.dataset]) for r in rows if r.preset == "coupled-cvae" and r.dataset in cvae]
    return out


def _ignore_for(a: PaperRow, b: PaperRow) -> tuple[str, ...]:
    if a.preset != b.preset:
        return ("coupling.*",)
    return ("coupling.lambda_m", "coupling.lambda_r")


def effects(runs: pd.DataFrame, at: str = "best", confidence: float = 0.95) -> list[Effect]:
    out = []
    for table in TABLES:
        for a, b in _pairs_of_rows(table):
            ra, rb = pick_config(match_runs(runs, a), at)[0], pick_config(match_runs(runs, b), at)[0]
            if not len(ra) or not len(rb):
                continue
            pairs = paired_runs(ra, rb, _ignore_for(a, b))
            for metric, paper_a in a.values.items():
                paper_b = b.values.get(metric)
                column = metric_column(metric, at)
                if paper_a is None or paper_b is None or column not in runs.columns:
                    continue
                paired = None
                if pairs:
                    paired = paired_difference([p[0][column] for p in pairs], [p[1][column] for p in pairs],
                                               confidence)
                unpaired = summarize(ra[column]).mean - summarize(rb[column]).mean
                out.append(Effect(table, a.dataset, a.label, b.label, metric, round(paper_a - paper_b, 4),
                                  paired, unpaired))
    return out


def values_frame(runs: pd.DataFrame, at: str = "best") -> pd.DataFrame:
    """Long frame: each paper value with ours beside it.  Only rows and metrics we have runs for;
    a value the paper prints twice (Table 3's starred row is Table 1's) is listed once."""
    records, seen = [], set()
    for row in PAPER_ROWS:
        ours, note = pick_config(match_runs(runs, row), at)
        if not len(ours):
            continue
        for metric, paper in row.values.items():
            column = metric_column(metric, at)
            s = summarize(ours[column]) if column in ours.columns else summarize([])
            key = (frozenset(ours["run_id"]), metric, paper)
            if s.n == 0 or key in seen:
                continue
            seen.add(key)
            records.append({"table": row.table, "label": row.label, "dataset": row.dataset, "metric": metric,
                            "paper": paper, "ours_mean": s.mean, "ours_std": s.std, "n": s.n,
                            "delta": (s.mean - paper) if paper is not None and s.n else math.nan,
                            "note": "; ".join(x for x in (row.note, note) if x)})
    return pd.DataFrame(records, columns=["table", "label", "dataset", "metric", "paper", "ours_mean", "ours_std",
                                          "n", "delta", "note"])


def _effect_decimals(e: Effect) -> int:
    """The metric's decimals, or more when the difference would otherwise print as 0: an
    interval such as [+0.001, +0.010] nats must not read [+0.0, +0.0]."""
    return decimals_needed(e.ours_value, metric_info(e.metric).decimals)


def _fmt(value: float | None, metric: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    d = metric_info(metric).decimals
    return f"{value:+.{d}f}" if signed else f"{value:.{d}f}"


def report(runs: pd.DataFrame, study: str = "", at: str = "best", statuses=("FINISHED",)) -> str:
    """The reproduction report as Markdown."""
    total = len(runs)
    if statuses is not None:
        runs = runs[runs["status"].isin(list(statuses))]
    if not len(runs):
        raise AnalysisError(f"no {'/'.join(statuses or ())} runs to compare with the paper (of {total} runs)")
    values = values_frame(runs, at)
    if not len(values):
        raise AnalysisError("none of the study's runs matches a configuration the paper reports "
                            f"(presets {', '.join(sorted(set(runs['preset'].dropna())))}); see analysis/paper.py")
    scales = sorted(set(cfg(runs, "scale").dropna()))
    lines = [f"# Reproduction report: study `{study}`", "",
             f"Paper: {SOURCE}.",
             "Paper values: TEST split, full schedule (60K steps), one run each. "
             f"Ours: VALIDATION split (val_*), {'best' if at == 'best' else 'last'} evaluation of each run, "
             "mean ± std over seeds.",
             ]
    if scales and scales != ["paper"]:
        lines.append(f"Our runs use the `{'/'.join(scales)}` scale, not the paper's: absolute deltas are expected; "
                     "compare the directions of the effects.")
    if statuses is not None and len(runs) < total:
        lines.append(f"{total - len(runs)} of {total} runs left out (status not {'/'.join(statuses)}).")
    missing = sorted({m for r in PAPER_ROWS for m in r.values if r.values[m] is not None}
                     - set(values["metric"]), key=list(METRICS).index)
    if missing:
        lines.append("Not in the study's runs: " + ", ".join(metric_info(m).label for m in missing)
                     + " (test-split BLEU/Dist come from `python -m analysis best`).")
    lines += ["", "## Values", "", "| Table | Row | Dataset | Metric | Paper | Ours | n | Δ (ours − paper) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in values.itertuples(index=False):
        ours = _fmt(r.ours_mean, r.metric) + (f" ± {_fmt(r.ours_std, r.metric)}" if r.n > 1 else "")
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.table} | {r.label}{note} | {DATASET_LABELS.get(r.dataset, r.dataset)} | "
                     f"{metric_info(r.metric).label} | {_fmt(r.paper, r.metric)} | {ours} | {r.n} | "
                     f"{_fmt(r.delta, r.metric, signed=True)} |")
    found = effects(runs, at)
    lines += ["", "## Effect directions", "",
              "Each effect is a − b as the paper reports it; ours is the mean paired difference over seeds "
              "(95% t-interval) when a and b share seeds, else the difference of means.", ""]
    if not found:
        lines.append("No effect can be checked: the study lacks one side of every comparison the paper makes.")
    else:
        lines += ["| Table | Dataset | a − b | Metric | Paper | Ours | Verdict |", "|---|---|---|---|---|---|---|"]
        for e in found:
            d = _effect_decimals(e)
            ours = f"{e.ours_value:+.{d}f}"
            if e.ours is not None and e.ours.n >= 2:
                ours += f" [{e.ours.low:+.{d}f}, {e.ours.high:+.{d}f}] (n={e.ours.n})"
            verdict = e.verdict()
            verdict = f"**{verdict}**" if verdict == "contradicted" else verdict
            lines.append(f"| {e.table} | {DATASET_LABELS.get(e.dataset, e.dataset)} | {e.a} − {e.b} | "
                         f"{metric_info(e.metric).label} | {_fmt(e.paper, e.metric, True)} | {ours} | "
                         f"{verdict} |")
        verdicts = [e.verdict() for e in found]
        reproduced, contradicted = verdicts.count("reproduced"), verdicts.count("contradicted")
        unchecked = sum(v.startswith("cannot check") for v in verdicts)
        agree = sum(e.same_sign for e in found)
        lines += ["", f"{len(found)} effects: {reproduced} reproduced, {contradicted} contradicted (a paired 95% "
                      f"interval excluding 0), {unchecked} cannot check (an interval including 0, or no seed pairs); "
                      f"by sign alone {agree} agree, {len(found) - agree} do not."]
    return "\n".join(lines) + "\n"

"""A built table (:mod:`analysis.tables`) as Markdown or LaTeX: mean ± std cells with the
metric's decimals, the best value per block in bold, footnotes, and the paired comparisons."""
from __future__ import annotations

import math
import re

from cvae_core.metrics.names import metric as metric_info

from .paper import DATASET_LABELS
from cvae_core.stats import PairedDifference, Summary
from .store import AnalysisError
from .tables import Block, Row, Table


def _fmt(summary: Summary, metric: str, latex: bool = False) -> str:
    if summary.n == 0 or math.isnan(summary.mean):
        return "–" if not latex else "--"
    d = metric_info(metric).decimals
    text = f"{summary.mean:.{d}f}"
    if summary.n > 1 and not math.isnan(summary.std):
        text += (r" $\pm$ " if latex else " ± ") + f"{summary.std:.{d}f}"
    return text


def best_marks(block: Block, dataset: str, metric: str) -> set[int]:
    """Indices of the rows of ``block`` with the best (rounded, as printed) mean of ``metric``."""
    better = metric_info(metric).direction
    if not block.mark_best or not better:
        return set()
    d = metric_info(metric).decimals
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
    d = metric_info(metric).decimals
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
    headers = ["a − b", "Dataset", "pairs"] + [f"Δ {metric_info(m).label}" for m in metrics]
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
             " & ".join(["$a - b$", "Dataset", "pairs"] + [rf"$\Delta$ {metric_info(m).label}" for m in metrics])
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

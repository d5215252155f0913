"""``python -m analysis compare`` on real studies: three tiny lambda_sweep studies (local Ray,
Optuna, one SQLite MLflow store) through the study driver, then the command line in a subprocess.

* ``screen``: 4 steps, 2 seeds per configuration (4 trials); ``full``: 6 steps, 1 seed (2 trials);
  ``full-again``: the budget of ``full`` with another seed.
* screen vs full: different budgets, said so, nothing ranked; each study's best trial, its seeds'
  interval and its front are the ones its own summary.json implies (the driver's numbers, read
  here without analysis).
* full vs full-again: one budget, ranked, the lower best NLL marked.
* bad input (an unknown study, a study twice by name or by name and run id, one study): exit 2,
  one stderr line, nothing written.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import TINY_STUDY as TINY
from test_analysis import REPO, run_cli

pytestmark = pytest.mark.slow

CONSTRAINT = "val_au >= 0"  # every trial satisfies it: the parent run's constraints are read and named
T_95_1DF = 12.7062  # Student's t, 95% two-sided, 1 degree of freedom (2 seeds), from the printed tables


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from studies.runner import Options, run_study

    root = tmp_path_factory.mktemp("compare_studies")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    studies = {"screen": dict(seeds=2, overrides=[*TINY, "train.steps=4"]),
               "full": dict(seeds=1, overrides=TINY),
               "full-again": dict(seeds=1, seed=1, overrides=TINY)}
    summaries, parents = {}, {}
    for name, flags in studies.items():
        outcome = run_study(Options(profile="lambda_sweep", search="tpe", constraints=[CONSTRAINT], num_samples=1,
                                    root=str(root / "out"), tracking_uri=uri, study_name=name, **flags))
        assert outcome.exit_code == 0, name
        summaries[name] = json.loads((root / "out" / name / "summary.json").read_text())
        parents[name] = outcome.state.parent_run_id
    return {"uri": uri, "summaries": summaries, "parents": parents}


def compare(store, *args: str):
    return run_cli("compare", "--tracking-uri", store["uri"], *args)


def expected_front(summary: dict) -> set[str]:
    """Run ids of the feasible trials no other feasible trial beats on both NLL (lower) and MI (higher)."""
    points = [(t["run_id"], t["best"]["val_nll"], t["best"]["val_mi_loo"]) for t in summary["trials"]
              if t["best"] and not t["violated"]]
    return {run for run, nll, mi in points
            if not any(n <= nll and m >= mi and (n < nll or m > mi) for _, n, m in points)}


def test_studies_at_different_budgets_side_by_side_and_not_ranked(store, tmp_path):
    out = tmp_path / "cmp"
    done = compare(store, "screen", "full", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ranked"] is False and result["overall_best"] is None
    assert result["differ"] == ["steps", "evaluations", "seeds", "trials"]
    blocks = {b["study"]: b for b in result["studies"]}
    assert list(blocks) == ["screen", "full"]  # as asked: no order of merit
    for name, steps, evaluations, seeds, trials in (("screen", 4, 2, 2, 4), ("full", 6, 3, 1, 2)):
        block, summary = blocks[name], store["summaries"][name]
        assert block["budget"] == {"dataset": "ptb", "scale": "quick", "steps": steps, "batch": 8,
                                   "evaluations": evaluations, "seeds": seeds, "trials": trials}
        # what the driver says each trial ran: evaluations every 2 steps up to train.steps
        assert [t["evaluations"] for t in summary["trials"]] == [evaluations] * trials
        assert block["constraints"] == [CONSTRAINT]
        best = summary["best"]  # the driver's own best feasible trial
        assert block["best"]["run_id"] == best["run_id"]
        for metric in ("val_nll", "val_kl", "val_mi_loo", "val_au"):
            assert block["best"]["metrics"][metric] == pytest.approx(best["best"][metric], rel=1e-12), metric
        assert {p["run_id"] for p in block["front"]} == expected_front(summary)
        assert block["n_points"] == trials
    # the screen's best configuration ran with 2 seeds: its mean and 95% t-interval over them
    summary = store["summaries"]["screen"]
    seeds = [t["best"]["val_nll"] for t in summary["trials"] if t["config_id"] == summary["best"]["config_id"]]
    assert len(seeds) == 2
    nll = blocks["screen"]["best"]["over_seeds"]["val_nll"]
    half = T_95_1DF * statistics.stdev(seeds) / math.sqrt(2)
    assert nll["n"] == 2 and nll["mean"] == pytest.approx(statistics.fmean(seeds), rel=1e-12)
    assert nll["low"] == pytest.approx(nll["mean"] - half, rel=1e-4) and nll["high"] == pytest.approx(
        nll["mean"] + half, rel=1e-4)
    assert blocks["full"]["best"]["over_seeds"]["val_nll"]["n"] == 1  # one seed: no interval
    assert blocks["full"]["best"]["over_seeds"]["val_nll"]["low"] is None

    # the table: printed, and the same text in compare.md; the plot beside it
    done = compare(store, "screen", "full", "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = (out / "compare.md").read_text()
    assert done.stdout.startswith(text)
    assert ("Different budgets (steps, evaluations, seeds, trials differ): not ranked against each other; each "
            "study's numbers hold at its own budget.") in text
    assert "## screen: 4 steps × batch 8, 2 evaluations, 2 seeds, 4 trials, scale quick, ptb" in text
    assert "## full: 6 steps × batch 8, 3 evaluations, 1 seed, 2 trials, scale quick, ptb" in text
    assert "★" not in text and "## 1." not in text
    for name in ("screen", "full"):
        best = store["summaries"][name]["best"]
        row = f"| best trial | {best['best']['val_nll']:.2f} | {best['best']['val_kl']:.2f} | "
        assert row in text, (name, row)
        assert f"run {best['run_id']}" in text and f"lowest val NLL among the trials that satisfy {CONSTRAINT}" in text
    assert f"| {statistics.fmean(seeds):.2f} [" in text  # the screen's interval row
    png = out / "fronts.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in done.stdout


def test_studies_at_one_budget_are_ranked_and_the_best_is_marked(store, tmp_path):
    done = compare(store, "full", "full-again", "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    nll = {name: store["summaries"][name]["best"]["best"]["val_nll"] for name in ("full", "full-again")}
    first, second = sorted(nll, key=nll.get)
    assert nll[first] < nll[second]
    assert ("Same budget (6 steps × batch 8, 3 evaluations, 1 seed, 2 trials, scale quick, ptb): the studies are "
            "ranked against each other") in done.stdout
    assert done.stdout.index(f"## 1. {first}: ") < done.stdout.index(f"## 2. {second}: ")
    marked = [line for line in done.stdout.splitlines() if line.endswith("★ best of the compared studies")]
    assert len(marked) == 1 and f"run {store['summaries'][first]['best']['run_id']}" in marked[0]


@pytest.mark.parametrize("studies,fragment", [
    (["screen", "no-such-study"], "no study 'no-such-study' in experiment 'coupled-vae-studies'; studies: "),
    (["full", "full"], "study 'full' is named more than once"),
    (["screen", "parent:screen"], "'screen' and 'screen' are the same study (parent run "),
    (["screen"], "compare needs at least two studies, got 1 ('screen')"),
])
def test_bad_input_stops_in_one_line_and_writes_nothing(store, tmp_path, studies, fragment):
    studies = [store["parents"]["screen"] if s == "parent:screen" else s for s in studies]
    out = tmp_path / "cmp"
    done = compare(store, *studies, "--out", str(out))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("analysis: error: ") and fragment in lines[0], lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_after_a_study_page_command_runs_as_written(store):
    """docs/after-a-study.md's compare command (the output it shows is these studies'), copied from
    the page and run in the folder the studies ran in, after the README's activation line."""
    from test_readme_commands import VENV, bash, commands

    page = (REPO / "docs" / "after-a-study.md").read_text()
    (command,) = [c for c in commands(page) if c.startswith("python -m analysis compare")]
    root = Path(store["uri"].removeprefix("sqlite:///")).parent
    (root / ".venv").symlink_to(VENV)
    done = bash(command, root)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "# 2 studies compared (experiment coupled-vae-studies): screen, full" in done.stdout, done.stdout
    assert (root / "analysis-compare" / "screen-vs-full" / "compare.md").is_file()

"""Every benchmark runs: each ``bench/*.py`` (found by glob, so a new script is covered at once)
runs in a subprocess at its smallest settings (``--smoke``; ``asha_front.py`` replays a real tiny
study's Ray experiment, its only input), exits 0 and prints its figure lines. At these sizes the
figures mean nothing; the point is that no benchmark breaks silently. The documents name only
scripts that exist. Slow: 5.7 minutes on the 2-core machine while other jobs ran (2026-12-06),
bench_study.py's three studies 1.7 of them, the tiny study (shared with the session) 0.6."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from processes import env_without_mlflow

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py"))
NUMBER = r"-?[\d,]+(\.\d+)?"

# The lines that carry each script's figures (regular expressions, multi-line mode).
FIGURES = {
    "asha_front.py": [r"^\d+ trials, grace 1, reduction factor 2",
                      r"^ASHA on val_nll: stops \d+ trials, \d+ of the \d+ on the front",
                      r"^ASHA, keep val_mi_loo: stops \d+ trials"],
    "bench_bf16.py": [rf"^fp32 +{NUMBER} +{NUMBER} +{NUMBER} +\d+ +{NUMBER}$",
                      rf"^bf16 - fp32: NLL [+-]{NUMBER}, KL [+-]{NUMBER}, MI [+-]{NUMBER} nats per sentence",
                      r"^(training with train.amp=true: not run: train.amp=true needs bf16|amp - fp32: val_nll )"],
    "bench_batching.py": [rf"^vae +bucket +{NUMBER} ± ", rf"^vae +random +{NUMBER} ± "],
    "bench_dynamics.py": [rf"^coupled-vae: training step {NUMBER} ms, one measurement {NUMBER} ms",
                          rf"^overhead at train.dynamics_every=10: {NUMBER}% of training time \(limit 10%\)"],
    "bench_families.py": [rf"^\| .+ \| {NUMBER} \({NUMBER}\) \| {NUMBER} \({NUMBER}\) \| [+-]{NUMBER} \|"],
    "bench_is_nll.py": [rf"^batched samples +: +{NUMBER} s +mean NLL {NUMBER}", rf"^speed-up +: +{NUMBER}x"],
    "bench_output_layer.py": [rf"^training, fused, buffer kept +{NUMBER} +{NUMBER} +\d+%",
                              rf"^training speed-up, fused \(kept\) / plain: {NUMBER}x; evaluation: {NUMBER}x"],
    "bench_packing.py": [
        # the default study's model sets train.dynamics_every, which packed training lacks: said, not failed
        r"^default-study model: packed training supports neither .* trains with train.dynamics_every 0 "
        r"\(its config: 10\)",
        rf"^default-study model: separate runs one after another \(any K\): {NUMBER} tokens/s",
        rf"^ +2 +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}", r"^no target applies"],
    "bench_study.py": [rf"^direct cvae_core.train, s +{NUMBER}", rf"^study overhead per trial +{NUMBER}% +5%",
                       rf"^tokens/s: two 1-CPU trials \(sum\) / one 2-CPU +{NUMBER}"],
    "bench_system_metrics.py": [rf"^  trial wall time, median of rounds +[+-]{NUMBER}% +2%",
                                rf"^  one sample: {NUMBER} ms every 1 s +[+-]{NUMBER}% +2%"],
    "bench_tracking_load.py": [r"^sqlite +\d+ +\d+ +0 +\d+ +0 +0 .* ok$"],
    "bench_train.py": [rf"^vae +{NUMBER} +{NUMBER} +1.00", rf"^coupled-vae +{NUMBER} +{NUMBER} +{NUMBER}"],
    "effect_design.py": [rf"^  vae +n=1  nll {NUMBER}", r"^  rq-0.1 − vae \(1 seeds, paired, 95% t\): Δnll "],
    "profile_hotspots.py": [r"^== training step, coupled-vae", r"^== IS-NLL, 32 PTB test sentences, N = 2",
                            r"Self CPU time total"],
    "run_all.py": [rf"^training VAE, tokens/s +{NUMBER} +{NUMBER} +\d+%",
                   rf"^IS-NLL N=2, sentences/s +{NUMBER}", rf"^peak RSS evaluation, MB +{NUMBER}"],
}


def _arguments(name: str, request) -> list[str]:
    if name == "asha_front.py":  # it replays a finished study: the smallest is a tiny real one
        return [request.getfixturevalue("tiny_study").outcome.state.experiment_path, "--grace", "1"]
    if name == "run_all.py":  # its study rows are bench_study.py's, which runs them on its own
        return ["--smoke", "--skip-study"]
    return ["--smoke"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_benchmark_runs_at_its_smallest_settings_and_prints_its_figures(name, request, tmp_path):
    assert name in FIGURES, f"bench/{name}: add the lines that show its figures to FIGURES"
    # this checkout's packages, whatever the environment installed; files it writes go to tmp_path
    env = env_without_mlflow(PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, str(BENCH / name), *_arguments(name, request)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    shown = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, shown
    for pattern in FIGURES[name]:
        assert re.search(pattern, done.stdout, re.MULTILINE), f"no line matches {pattern!r}\n{shown}"


def test_the_documents_name_only_benchmarks_that_exist():
    named = set()
    for document in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        named |= set(re.findall(r"bench/(\w+\.py)", document.read_text()))
    assert named and named <= set(SCRIPTS), sorted(named - set(SCRIPTS))

"""The study-overhead figure of bench/run_all.py: per-trial overhead against the 5% target."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_study(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_study")


def test_overhead_is_extra_time_per_trial_against_the_limit(bench_study):
    assert bench_study.OVERHEAD_LIMIT == 0.05
    within = bench_study.overhead(direct_s=100.0, trial_s=104.0)
    assert within["fraction"] == pytest.approx(0.04)
    assert within["ratio"] == pytest.approx(0.8)  # <= 1: target met
    over = bench_study.overhead(direct_s=50.0, trial_s=60.0)
    assert over["fraction"] == pytest.approx(0.2) and over["ratio"] == pytest.approx(4.0)
    faster = bench_study.overhead(direct_s=10.0, trial_s=9.0, limit=0.1)
    assert faster["fraction"] == pytest.approx(-0.1) and faster["ratio"] == pytest.approx(-1.0)


def test_overhead_refuses_a_non_positive_direct_time(bench_study):
    with pytest.raises(ValueError, match="direct run time must be positive, got 0"):
        bench_study.overhead(direct_s=0.0, trial_s=5.0)


def test_study_options_make_identical_short_trials(bench_study, tmp_path):
    from studies.runner import apply_flags
    from studies.spec import load_spec

    options = bench_study.study_options(tmp_path, steps=20, trials=2, cpus=1)
    spec = apply_flags(load_spec(bench_study.SPEC), options)
    assert spec.num_samples == 0 and spec.seeds == 2 and spec.baselines == [{"preset": "vae"}]
    assert spec.resources.cpus_per_trial == 1 and spec.resources.max_concurrent_trials == 2
    assert spec.evaluations == 2
    assert options.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and options.root == str(tmp_path)


def test_trial_phases_split_the_trial_time_at_the_run_creation_and_the_last_metrics(bench_study):
    phases = bench_study.trial_phases(trials_start=1000.0, run_created=1009.5, last_metrics=1030.0, study_end=1031.2)
    assert phases == pytest.approx({"start_s": 9.5, "run_s": 20.5, "end_s": 1.2})
    assert sum(phases.values()) == pytest.approx(31.2)
    with pytest.raises(ValueError, match="trial times out of order"):
        bench_study.trial_phases(trials_start=1000.0, run_created=999.0, last_metrics=1030.0, study_end=1031.0)

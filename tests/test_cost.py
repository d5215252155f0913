"""What trials and studies cost (issue 22, item 4), checked on a real tiny study (local Ray,
SQLite MLflow store in a temp dir, then ``python -m analysis``):

* each trial run has MLflow's system metrics (CPU utilisation, memory) and a positive
  ``cpu_seconds`` no larger than its wall time x its CPUs x a small factor;
* ``summary.json``'s study total is the sum over its trials, each trial's cost is its run's, and
  the parent run has the totals;
* the study's last printed lines and ``summary.md`` say what it cost;
* ``analysis export`` has the per-trial cost columns and prints the total, ``analysis table`` too;

and, without Ray, that a retry carries the cost of the failed attempt on, that GPU-seconds are
wall time x the GPUs held, and that a pack's cost is split over its members.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import time

import pytest
from test_analysis import run_cli
from conftest import TINY_STUDY as TINY

STUDY = "tiny-cost"
CPU_FACTOR = 2.0  # a trial's process: torch on cpus_per_trial threads, plus Ray's and MLflow's threads
COST_LINE = re.compile(r"^Cost: (\S+) CPU-hours \((\S+) GPU-hours\) over (\d+) trials, (\S+) min wall this session$")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from studies.runner import Options, run_study

    root = tmp_path_factory.mktemp("cost_study")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        outcome = run_study(Options(profile="lambda_sweep", search="tpe", constraints=["none"], num_samples=2, seeds=1,
                                    root=str(root / "out"), tracking_uri=uri, study_name=STUDY, overrides=TINY))
    assert outcome.exit_code == 0, printed.getvalue()[-3000:]
    folder = root / "out" / STUDY
    return {"uri": uri, "outcome": outcome, "printed": printed.getvalue(), "root": root,
            "summary": json.loads((folder / "summary.json").read_text()),
            "markdown": (folder / "summary.md").read_text()}


@pytest.fixture(scope="module")
def trial_runs(study):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=study["uri"])
    return {row.trial_id: client.get_run(row.run_id) for row in study["outcome"].rows}


@pytest.mark.slow
def test_each_trial_run_has_system_metrics_and_a_plausible_cpu_time(study, trial_runs):
    assert len(trial_runs) == 3  # 2 proposals + the VAE baseline
    for run in trial_runs.values():
        metrics = run.data.metrics
        assert "system/cpu_utilization_percentage" in metrics, sorted(metrics)
        assert metrics["system/system_memory_usage_megabytes"] > 0
        assert "gpu_seconds" not in metrics  # trained on CPU
        wall_s = (run.info.end_time - run.info.start_time) / 1000
        cpu_s = metrics["cpu_seconds"]
        assert 0 < cpu_s <= wall_s * 1 * CPU_FACTOR, (cpu_s, wall_s)  # lambda_sweep: cpus_per_trial 1


@pytest.mark.slow
def test_the_summary_adds_the_trials_costs_up_and_says_so_last(study, trial_runs):
    from mlflow import MlflowClient

    from studies.record import hours_text

    summary = study["summary"]
    trials = summary["trials"]
    assert len(trials) == 3
    for trial in trials:  # each trial's cost is what its run recorded
        assert trial["cost"]["cpu_seconds"] == pytest.approx(trial_runs[trial["trial_id"]].data.metrics["cpu_seconds"])
    total = summary["cost"]
    assert total["trials"] == 3
    assert total["cpu_seconds"] == pytest.approx(sum(t["cost"]["cpu_seconds"] for t in trials))
    assert total["cpu_hours"] == pytest.approx(total["cpu_seconds"] / 3600) and total["gpu_hours"] == 0
    parent = MlflowClient(tracking_uri=study["uri"]).get_run(summary["parent_run_id"]).data.metrics
    assert parent["cpu_seconds"] == pytest.approx(total["cpu_seconds"]) and parent["gpu_hours"] == 0

    last = study["printed"].rstrip().splitlines()[-6:]
    lines = [COST_LINE.match(line) for line in last]
    match = next((m for m in lines if m), None)
    assert match is not None, last
    cpu_hours, gpu_hours, n, minutes = match.groups()
    assert (cpu_hours, gpu_hours, n) == (hours_text(total["cpu_hours"]), "0", "3")
    assert float(minutes) == pytest.approx(summary["elapsed_s"] / 60, abs=0.06)
    assert match.group(0) in study["markdown"]
    assert any("CPU-h" in line and "status" in line for line in study["printed"].splitlines())  # the cost column


@pytest.mark.slow
def test_analysis_shows_each_trials_cost_and_the_study_total(study, trial_runs):
    import pandas as pd

    from studies.record import hours_text

    out = study["root"] / "runs.parquet"
    result = run_cli("export", "--tracking-uri", study["uri"], "--study", STUDY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out)
    for _, row in frame.iterrows():
        run = next(r for r in trial_runs.values() if r.info.run_id == row["run_id"])
        assert row["final.cpu_seconds"] == pytest.approx(run.data.metrics["cpu_seconds"])
        assert row["final.system/cpu_utilization_percentage"] >= 0
    assert "best.system/cpu_utilization_percentage" not in frame.columns  # samples are no training steps
    expected = hours_text(study["summary"]["cost"]["cpu_hours"])
    assert f"Cost: {expected} CPU-hours (0 GPU-hours) over 3 trials" in result.stdout, result.stdout

    table = run_cli("table", "--layout", "table3", "--tracking-uri", study["uri"], "--study", STUDY)
    assert table.returncode == 0, table.stderr
    assert f"Cost: {expected} CPU-hours (0 GPU-hours) over 3 trials" in table.stdout, table.stdout


def _busy(cpu_s: float) -> None:
    start = time.process_time()
    while time.process_time() - start < cpu_s:
        pass


def test_a_retry_carries_the_failed_attempts_cost_on(tmp_path, tiny_config):
    from mlflow import MlflowClient

    from studies.cost import CostMeter
    from studies.record import CPU_SECONDS
    from studies.tracking import StudyContext, TrialRun, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(client, "cost", (tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id).info.run_id
    study = StudyContext(study_name="s", spec_name="lambda_sweep", tracking_uri=uri, experiment_name="cost",
                         experiment_id=experiment_id, parent_run_id=parent, preset="vae", dataset="text", scale="quick")
    config = tiny_config("vae")

    first = TrialRun.open(study, "t1", "trial_t1", config, extra_tags={})
    meter = CostMeter()
    meter.carry([first.carried])
    assert first.carried == {}
    _busy(0.1)
    meter.charge()
    first.log_metrics({"step": 10, "val_nll": 100.0, **meter.of()})
    at_evaluation = meter.of()[CPU_SECONDS]
    _busy(0.1)  # work after the last evaluation, then the attempt fails
    meter.charge()
    first.log_cost(meter.of())
    failed = meter.of()[CPU_SECONDS]
    assert failed >= at_evaluation + 0.1

    retry = TrialRun.open(study, "t1", "trial_t1", config, extra_tags={})
    assert retry.run_id == first.run_id
    assert retry.carried[CPU_SECONDS] == pytest.approx(failed)  # the lost work still counts
    assert client.get_run(first.run_id).data.metrics[CPU_SECONDS] == pytest.approx(failed)  # the run's latest
    meter = CostMeter()
    meter.carry([retry.carried])
    _busy(0.1)
    meter.charge()
    assert meter.of()[CPU_SECONDS] >= failed + 0.1


def test_gpu_seconds_are_wall_time_times_the_gpus_held_and_a_pack_splits_its_cost():
    from studies.cost import CostMeter
    from studies.record import CPU_SECONDS, GPU_SECONDS

    cpu_only = CostMeter(gpus=0.0)
    cpu_only.carry([{}])
    cpu_only.charge()
    assert GPU_SECONDS not in cpu_only.of()

    pack = CostMeter(gpus=0.5)
    pack.carry([{CPU_SECONDS: 1.0, GPU_SECONDS: 2.0}, {}, {}])
    wall, cpu = time.monotonic(), time.process_time()
    time.sleep(0.2)
    _busy(0.1)
    pack.charge([0, 1])  # member 2 ended before this evaluation: it gets no share
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    first, second, ended = pack.of(0), pack.of(1), pack.of(2)
    assert first[CPU_SECONDS] - 1.0 == pytest.approx(second[CPU_SECONDS])  # carried on, then an even share
    assert second[CPU_SECONDS] == pytest.approx(cpu / 2, rel=0.1)
    assert first[GPU_SECONDS] - 2.0 == pytest.approx(second[GPU_SECONDS])
    assert second[GPU_SECONDS] == pytest.approx(wall * 0.5 / 2, rel=0.1)  # wall x GPUs held, split
    assert ended == {CPU_SECONDS: 0.0, GPU_SECONDS: 0.0}
    assert second[GPU_SECONDS] >= 0.2 * 0.5 / 2

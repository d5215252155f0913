"""Overhead of MLflow's system-metrics monitor on a trial, against its limit (2% of a trial).

    python bench/bench_system_metrics.py [--rounds 4] [--steps 400] [--interval 10] [--threads 1]
    python bench/bench_system_metrics.py --smoke    # the smallest settings: checks that it runs (figures meaningless)

The trial: the default study's VAE baseline trial (``bench_study``'s config:
``studies/specs/lambda_sweep.yaml``, shortened to ``--steps`` with two evaluations), trained by
the core on one loaded corpus, logging each evaluation to its own run in a SQLite MLflow store
through ``TrialRun``, as a study's trial does.  With the monitor: training inside
``studies.tracking.SystemMetrics`` on that run (what ``studies/trainable.py`` does: a sample every
``--interval`` seconds, and one last sample as it stops); without: the same, no monitor.

One process, interleaved rounds in ABBA order (with, without, without, with, ...) so that a
drift of the machine's speed cancels; each training timed from the monitor's start to its stop
(wall and process CPU).  Overhead = median over rounds of (with / without - 1).  Also measured
directly: the work of one sample (psutil and NVML readings, the log request, the run-status
request MLflow's thread makes), as a share of one core at the sampling interval: the overhead
without the noise of whole trainings.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_study import SPEC, study_options

LIMIT = 0.02  # the target: the monitor adds at most 2% to a trial


def setup(root: Path, steps: int, threads: int):
    """-> (config, corpus, study context) of the trial, with a SQLite store under ``root``."""
    from mlflow import MlflowClient

    from cvae_core.data import load_corpus
    from studies.runner import apply_flags
    from studies.spec import load_spec
    from studies.tracking import StudyContext, ensure_experiment
    from studies.trainable import resolve_trial_config

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(client, "bench-system-metrics", (root / "mlartifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="bench").info.run_id
    spec = apply_flags(load_spec(SPEC), study_options(root, steps, 1, threads))
    study = StudyContext(study_name="bench", spec_name=spec.name, tracking_uri=uri,
                         experiment_name="bench-system-metrics", experiment_id=experiment_id, parent_run_id=parent,
                         preset=spec.preset, dataset=spec.dataset, scale=spec.scale, overrides=dict(spec.overrides))
    config = resolve_trial_config(study, {**spec.baselines[0], "train.seed": spec.seed})
    return config, load_corpus(config.data, ("train", "valid")), study


def one_trial(config, corpus, study, root: Path, name: str, monitored: bool, interval_s: float) -> dict:
    """Train once, logging to a new trial run. -> {wall_s, cpu_s, samples (system-metric samples logged)}."""
    from cvae_core.train import train
    from studies.tracking import SystemMetrics, TrialRun

    run = TrialRun.open(study, name, name, config, extra_tags={})
    monitor = SystemMetrics(study.tracking_uri, interval_s) if monitored else contextlib.nullcontext()
    wall, cpu = time.perf_counter(), time.process_time()
    with monitor:
        if monitored:
            monitor.start(run.run_id)
        train(config, root / name, callbacks=[lambda metrics, checkpoint: run.log_metrics(metrics)], corpus=corpus,
              log=lambda text: None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = len(run.client.get_metric_history(run.run_id, "system/cpu_utilization_percentage"))
    return {"wall_s": wall, "cpu_s": cpu, "samples": samples}


def sample_cost(study, repeats: int = 20) -> float:
    """Seconds of work of one sample of the monitor's thread (readings, the run-status request,
    the log request), the mean over ``repeats``, done here without the thread; sampled into the
    study's (RUNNING) parent run."""
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(study.parent_run_id, tracking_uri=study.tracking_uri)
    client = MlflowClient(tracking_uri=study.tracking_uri)
    start = time.perf_counter()
    for _ in range(repeats):
        monitor.collect_metrics()
        client.get_run(study.parent_run_id)  # the thread checks the run's status at each sample
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    return (time.perf_counter() - start) / repeats


SMOKE = {"rounds": 1, "steps": 4, "interval": 1.0}  # --smoke


def main(argv: list[str] | None = None) -> int:
    from studies.tracking import SYSTEM_METRICS_INTERVAL_S

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of (with, without) pairs, ABBA order")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the trial")
    parser.add_argument("--interval", type=float, default=SYSTEM_METRICS_INTERVAL_S,
                        help="sampling interval in seconds (the trials': %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the study's cpus_per_trial)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-system-metrics-") as tmp:
        root = Path(tmp)
        config, corpus, study = setup(root, args.steps, args.threads)
        one_trial(config, corpus, study, root, "warmup", False, args.interval)  # first-call costs out of the way
        rounds = []
        for index in range(args.rounds):
            order = (True, False) if index % 2 == 0 else (False, True)
            result = {monitored: one_trial(config, corpus, study, root, f"r{index}-{monitored}", monitored,
                                           args.interval) for monitored in order}
            rounds.append(result)
            print(f"round {index + 1}: with {result[True]['wall_s']:.2f} s wall, {result[True]['cpu_s']:.2f} s CPU, "
                  f"{result[True]['samples']} samples; without {result[False]['wall_s']:.2f} s wall, "
                  f"{result[False]['cpu_s']:.2f} s CPU", file=sys.stderr, flush=True)
        per_sample_s = sample_cost(study)
    wall = statistics.median(r[True]["wall_s"] / r[False]["wall_s"] - 1 for r in rounds)
    cpu = statistics.median(r[True]["cpu_s"] / r[False]["cpu_s"] - 1 for r in rounds)
    trial_s = statistics.median(r[False]["wall_s"] for r in rounds)
    samples = statistics.median(r[True]["samples"] for r in rounds)
    direct = per_sample_s / args.interval

    def verdict(value: float) -> str:
        return "within" if value <= LIMIT else "OVER"

    print(f"System-metrics monitor overhead ({args.rounds} rounds, trial {trial_s:.1f} s, {args.steps} steps, "
          f"a sample every {args.interval:g} s: {samples:g} samples a trial)")
    print(f"  {'measure':<44} {'overhead':>9} {'limit':>6}")
    print(f"  {'trial wall time, median of rounds':<44} {wall:>+9.2%} {LIMIT:>6.0%}  {verdict(wall)}")
    print(f"  {'trial process CPU time, median of rounds':<44} {cpu:>+9.2%} {LIMIT:>6.0%}  {verdict(cpu)}")
    print(f"  {f'one sample: {per_sample_s * 1000:.1f} ms every {args.interval:g} s':<44} {direct:>+9.2%} "
          f"{LIMIT:>6.0%}  {verdict(direct)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Study overhead: one short training run directly vs as trials of a real study.

    python bench/bench_study.py [--study-steps 200] [--smoke]   (= bench/run_all.py --only-study: its rows)

The run is the VAE baseline trial of the default study (studies/specs/lambda_sweep.yaml: its
small model, data subset, evaluations and gradient-norm measurements), shortened to ``steps``
with two evaluations; ``--num-samples 0`` leaves only that baseline, ``--seeds N`` makes it N
identical trials (seeds 0..N-1).

* direct: ``cvae_core.train.train`` on the same resolved config, timed around the call only
  (imports and the corpus are loaded before, as the study's driver loads them before its trials).
* study: ``studies.runner.run_study`` on a local Ray with a SQLite MLflow store in a temp dir.
  Ray start-up = ``studies.raysetup.init_ray``; per-trial time = the study's own ``elapsed_s`` (Tuner created ->
  trial process started -> training with MLflow logging and checkpoint upload -> results collected
  -> summary written); study set-up = the rest (data, MLflow store, experiment and parent run).
  Tokens/s are the trials' own ``tokens_per_s`` (training only) read back from MLflow.
  The per-trial time is split (``trial_phases``) into start-up, training and end at the trial's
  MLflow run creation and its last evaluation's metrics.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

SPEC = "lambda_sweep"
OVERHEAD_LIMIT = 0.05  # the target: a trial costs at most 5% more than the same run done directly


def study_options(root: Path, steps: int, trials: int, cpus: int):
    """The flags of ``python studies/lambda_sweep.py`` for ``trials`` concurrent copies of the
    study's VAE baseline trial, ``steps`` long, ``cpus`` torch threads each."""
    from studies.runner import Options

    return Options(profile=SPEC, search="tpe", num_samples=0, seeds=trials, cpus_per_trial=cpus, max_concurrent=trials,
                   root=str(root), tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                   overrides=[f"train.steps={steps}", f"train.eval_every={steps // 2}"])


def run_direct(steps: int, cpus: int) -> dict[str, float]:
    """The study's first trial config trained by the core alone. -> {seconds, tokens_per_s}."""
    from cvae_core.data import load_corpus
    from cvae_core.train import train
    from studies.runner import apply_flags
    from studies.spec import load_spec
    from studies.tracking import StudyContext
    from studies.trainable import resolve_trial_config

    torch.set_num_threads(cpus)  # what the trainable does with cpus_per_trial
    with tempfile.TemporaryDirectory() as tmp:
        spec = apply_flags(load_spec(SPEC), study_options(Path(tmp), steps, 1, cpus))
        context = StudyContext(study_name="direct", spec_name=spec.name, tracking_uri="", experiment_name="",
                               experiment_id="", parent_run_id="", preset=spec.preset, dataset=spec.dataset,
                               scale=spec.scale, overrides=dict(spec.overrides))
        config = resolve_trial_config(context, {**spec.baselines[0], "train.seed": spec.seed})
        corpus = load_corpus(config.data, ("train", "valid"))
        start = time.perf_counter()
        result = train(config, Path(tmp) / "run", corpus=corpus, log=lambda text: None)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": result.last_metrics["tokens_per_s"]}


def run_study_timed(steps: int, trials: int, cpus: int) -> dict:
    """``trials`` copies of the run as one study. -> {ray_start_s, setup_s, trials_s, tokens_per_s: [...]}."""
    import ray
    from mlflow import MlflowClient

    from studies.raysetup import init_ray
    from studies.runner import run_study

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        start = time.perf_counter()
        init_ray(None, verbose=False)  # the study's own call; run_study then finds Ray running
        ray_start_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            outcome = run_study(study_options(Path(tmp), steps, trials, cpus))
            study_s = time.perf_counter() - start
            study_end = time.time()
        finally:
            ray.shutdown()
        statuses = [row.status for row in outcome.rows]
        if outcome.exit_code or statuses != ["done"] * trials:
            raise RuntimeError(f"benchmark study failed: exit code {outcome.exit_code}, trials {statuses}")
        client = MlflowClient(tracking_uri=outcome.state.tracking_uri)
        tokens = [max(client.get_metric_history(row.run_id, "tokens_per_s"), key=lambda m: m.step).value
                  for row in outcome.rows]
        # Where the per-trial time goes, from MLflow's own clocks: the trial run's creation and its
        # last evaluation's metrics.  The trials started elapsed_s before the study ended (only the
        # summary's printing, milliseconds, comes after elapsed_s).
        trials_s = outcome.summary["elapsed_s"]
        first = min((client.get_run(row.run_id).info for row in outcome.rows), key=lambda info: info.start_time)
        phases = trial_phases(trials_start=study_end - trials_s, study_end=study_end,
                              run_created=first.start_time / 1000,
                              last_metrics=max(m.timestamp for m in client.get_metric_history(first.run_id, "val_nll"))
                              / 1000)
    return {"ray_start_s": ray_start_s, "setup_s": study_s - trials_s, "trials_s": trials_s,
            "tokens_per_s": tokens, **phases}


def trial_phases(trials_start: float, run_created: float, last_metrics: float, study_end: float) -> dict[str, float]:
    """Split a study's trial time (wall-clock seconds since the epoch) into -> {start_s: until the
    trial's MLflow run exists (Ray schedules the trial, starts its process, which imports torch,
    Ray Tune, MLflow and cvae_core), run_s: from then to its last evaluation logged (training,
    evaluations, logging), end_s: the rest (last upload, Tune's result handling, runs ended,
    summary written)}."""
    if not trials_start <= run_created <= last_metrics <= study_end:
        raise ValueError(f"trial times out of order: start {trials_start}, run created {run_created}, "
                         f"last metrics {last_metrics}, end {study_end}")
    return {"start_s": run_created - trials_start, "run_s": last_metrics - run_created,
            "end_s": study_end - last_metrics}


def overhead(direct_s: float, trial_s: float, limit: float = OVERHEAD_LIMIT) -> dict[str, float]:
    """Per-trial overhead of the study service. -> {fraction: trial_s / direct_s - 1,
    ratio: fraction / limit (achieved / limit: <= 1 meets the target)}."""
    if direct_s <= 0:
        raise ValueError(f"direct run time must be positive, got {direct_s}")
    fraction = trial_s / direct_s - 1
    return {"fraction": fraction, "ratio": fraction / limit}


def main() -> int:
    """The study-overhead rows of ``bench/run_all.py``, which measures and prints them (in child
    processes, each with its own peak memory): ``run_all.py --only-study`` with these flags, run
    as a program (run_all imports this module: importing it back would make a circle)."""
    import subprocess

    return subprocess.run([sys.executable, str(Path(__file__).with_name("run_all.py")), "--only-study",
                           *sys.argv[1:]]).returncode


if __name__ == "__main__":
    sys.exit(main())

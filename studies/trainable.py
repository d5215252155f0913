"""The Ray Tune function trainable: trial config -> ``cvae_core.train`` -> ``tune.report``.

A thin adapter (no model code): it resolves the core config from the study's base plus the
trial config, opens (or, after a retry/restore, reopens) the trial's MLflow child run, and
plugs one callback into the core loop that, at every evaluation,

1. logs the metrics to MLflow with ``step`` = training step, with the trial's cost so far
   (``cpu_seconds``, on CUDA ``gpu_seconds``: ``studies/cost.py``),
2. uploads the checkpoint to MLflow as ``checkpoint/`` when it is the new best (its
   evaluation-only copy: no optimizer or RNG state), and the trial's ``train.log``,
3. calls ``tune.report(metrics, checkpoint=...)`` with the core checkpoint directory (the full
   one: Ray's copy is what a retry or ``--resume`` continues from).

Steps 1-2 come first because Tune may end the trial's process inside or right after any
report (ASHA at a rung, and the ``max_t`` stop at the last evaluation; there the metrics a
tracking outage held back are sent first, bounded): code after the core loop is not
guaranteed to run, so the driver ends the MLflow run and writes the trial's outcome
(``studies/outcomes.py``).

It resumes from ``tune.get_checkpoint()`` (FailureConfig retries, ``Tuner.restore``) with
``train(resume_from=<that checkpoint's directory>)``: the core installs it in its own tree.
The corpus arrives through ``tune.with_parameters`` (object store), never through the config.
It runs on the GPU Ray assigned (fractions allowed), else on CPU.  While it trains, MLflow's
system-metrics monitor logs ``system/*`` (CPU, memory, GPUs) to the trial's run
(``tracking.SystemMetrics``).

The packed loop loads inside ``train_pack_trial``: an ordinary trial never imports it.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from cvae_core import build_config, checkpoint_step, train
from cvae_core.config import Config, resolve_key
from cvae_core.data import Corpus
from cvae_core.errors import CvaeError, Diverged
from cvae_core.metrics.names import IS_BEST

from .cost import CostMeter
from .record import Outcome, Tag
from .results import (DIVERGED, NAN_OBJECTIVES, OUTCOME, PACK_STATE, REASON, TRAINING_ITERATION, member_key,
                      pack_members)
from .spaces import SEARCH_PREFIX, describe
from .tracking import StudyContext, SystemMetrics, TrialRun

RESERVED = {"preset"}
FINAL_FLUSH_S = 300.0
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def resolve_trial_config(study: StudyContext, trial_config: dict[str, Any]) -> Config:
    """Base preset/dataset/scale/overrides of the study + the trial config -> a validated Config.

    Keys: ``preset`` replaces the base preset; ``search.*`` and ``__*`` are the searcher's own
    and ignored; everything else must be a core config key (a typo raises, naming the key).
    """
    overrides = dict(study.overrides)
    for key, value in trial_config.items():
        if key in RESERVED or key.startswith(SEARCH_PREFIX) or key.startswith("__"):
            continue
        try:
            overrides[resolve_key(key)] = value
        except CvaeError as exc:
            raise CvaeError(f"trial config key {key!r}: {exc}") from None
    return build_config(trial_config.get("preset", study.preset), study.dataset, study.scale, overrides)


def _assigned_device(gpus_per_trial: float) -> tuple[str, list[str]]:
    """-> ("cuda" | "cpu", the GPU ids Ray assigned).  Falls back to CPU when CUDA is absent
    (e.g. a logical GPU in tests).  Fractional GPUs are only logical in Ray: cap the memory."""
    import ray

    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if gpu_ids and torch.cuda.is_available():
        if 0 < gpus_per_trial < 1:
            torch.cuda.set_per_process_memory_fraction(gpus_per_trial, 0)
        return "cuda", gpu_ids
    return "cpu", gpu_ids


def _scratch_dir(trial_id: str) -> Path:
    """Where the core writes its run: the trial's own Ray working directory when Tune chdirs
    into it (the default), else a private temp dir. Always absolute."""
    if os.environ.get("RAY_CHDIR_TO_TRIAL_DIR", "1") != "0":
        base = Path.cwd().resolve()
    else:
        base = Path(tempfile.gettempdir()).resolve() / "cvae-trials"
    return base / f"cvae-run-{trial_id}"


def run_name(config: dict[str, Any], core_config: Config, study: StudyContext) -> str:
    """The trial run's name says what the trial is (e.g. "rq λr=3 λm=0.12 seed=0"); its id is a tag."""
    return f"{describe(config, study.preset)} seed={core_config.train.seed}"


def report_divergence(run: TrialRun, exc: Diverged, log_path: Path) -> None:
    """A diverged trial is an outcome, not a crash: one last result with ``diverged=1`` and NaN
    objectives tells Ray (the trial ends TERMINATED, never retried), Optuna (a NaN value is a
    FAIL) and the driver, which writes ``Tag.OUTCOME`` = diverged and ends the MLflow run."""
    run.set_tags({Tag.DIVERGED_AT_STEP: str(exc.step)})
    run.upload(log_path)
    tune.report({"step": float(exc.step), DIVERGED: 1.0, "diverged_reason": exc.reason, **NAN_OBJECTIVES})


def _prepare_worker(study: StudyContext) -> None:
    torch.set_num_threads(max(1, int(study.cpus_per_trial)))
    # The MLflow client's own retries wait up to minutes with growing back-off; a trial buffers
    # instead (TrialRun.flush), so each request fails fast while the server is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)  # a retry on the same node: the Tune checkpoint is the truth
    path.mkdir(parents=True)
    return path


def _placement_tags(device: str, gpu_ids: list[str], resumed_step: int | None) -> dict[str, str]:
    import ray

    return {Tag.DEVICE: device, Tag.GPU_IDS: ",".join(gpu_ids) or "none",
            Tag.NODE_ID: ray.get_runtime_context().get_node_id(), Tag.PID: str(os.getpid()),
            Tag.RESUMED_FROM_STEP: str(resumed_step) if resumed_step is not None else "none"}


def _log_name(resumed_step: int | None) -> str:
    # one log per attempt, so that a retry does not overwrite the first attempt's log in MLflow
    return "train.log" if resumed_step is None else f"train-resumed-at-step-{resumed_step}.log"


def record_evaluation(run: TrialRun, metrics: dict[str, float], checkpoint_dir: Path, log_path: Path,
                      stop_point: bool, log) -> None:
    """Everything MLflow needs from one evaluation, *before* the Tune report: the metrics, then
    (when it is the new best) the evaluation-only checkpoint and the log.  While the server is
    down, metrics wait in a bounded buffer and training goes on; where Tune may stop the trial
    (``stop_point``: a scheduler rung, the last evaluation) the process can end inside
    tune.report, taking the buffer with it, so there it waits (bounded) for the backlog to go out."""
    run.log_metrics(metrics)
    if stop_point and not run.flush(wait_s=FINAL_FLUSH_S):
        log(f"warning: {len(run.pending)} metrics could not reach MLflow within {FINAL_FLUSH_S} s")
    best = checkpoint_dir if metrics.get(IS_BEST, 0.0) >= 1.0 else None
    # artifacts follow the metrics once the server answers again; a failed upload stays due
    if not run.pending and not run.upload(log_path, best, wait_s=FINAL_FLUSH_S if stop_point else 0.0):
        log("warning: the checkpoint/log upload to MLflow is waiting for the server")
    elif run.pending and best is not None:
        run.checkpoint_due = best


def train_trial(config: dict[str, Any], corpus: Corpus | None = None, study: StudyContext | None = None) -> None:
    """Function trainable. ``corpus`` and ``study`` come from ``tune.with_parameters``."""
    if study is None:
        raise CvaeError("train_trial needs the study context: wrap it with tune.with_parameters(..., study=...)")
    _prepare_worker(study)
    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    core_config = resolve_trial_config(study, config)
    # train.device stays "auto": Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU (or to nothing),
    # so "auto" picks exactly that; the config (params, config_id, resume check) stays device-free.
    device, gpu_ids = _assigned_device(study.gpus_per_trial)
    meter = CostMeter(gpus=study.gpus_per_trial if device == "cuda" else 0.0)

    output_dir = _fresh_dir(_scratch_dir(trial_id))
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_from:
        _run_trial(config, core_config, study, corpus, output_dir, resume_from, trial_id, trial_name, device, gpu_ids,
                   meter)


def _run_trial(config: dict[str, Any], core_config: Config, study: StudyContext, corpus: Corpus | None,
               output_dir: Path, resume_from: str | None, trial_id: str, trial_name: str, device: str,
               gpu_ids: list[str], meter: CostMeter) -> None:
    """One attempt of a trial: the MLflow run (with MLflow's system metrics while it trains), the
    core loop (resumed from ``resume_from``, a checkpoint directory, when Tune handed one back),
    its cost (``meter``: cpu_seconds, gpu_seconds at each evaluation and as the attempt ends),
    and the trial's outcome."""
    resumed_step = checkpoint_step(resume_from) if resume_from is not None else None
    log_path = output_dir / _log_name(resumed_step)
    system = SystemMetrics(study.tracking_uri)
    run = TrialRun.open(study, trial_id, trial_name, core_config, run_name=run_name(config, core_config, study),
                        extra_tags=_placement_tags(device, gpu_ids, resumed_step))
    meter.carry([run.carried])

    def report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        evaluation = math.ceil(metrics["step"] / core_config.train.eval_every)
        last = metrics["step"] >= core_config.train.steps
        stop_point = last or evaluation in study.stop_points
        meter.charge()
        metrics = {**metrics, **meter.of(0)}
        record_evaluation(run, metrics, checkpoint_dir, log_path, stop_point, log)
        if last:
            system.stop()  # training is over: its last sample, before Tune ends the process
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    with open(log_path, "a", encoding="utf-8") as log_file, system:
        system.start(run.run_id)

        def log(text: str) -> None:
            log_file.write(text + "\n")
            log_file.flush()

        try:
            train(core_config, output_dir, callbacks=[report], resume_from=resume_from, corpus=corpus, log=log)
        except SystemExit:
            shutil.rmtree(output_dir, ignore_errors=True)
            raise  # Tune stopped the trial inside tune.report; the driver ends the MLflow run
        except Diverged as exc:
            log(str(exc))
            report_divergence(run, exc, log_path)
            shutil.rmtree(output_dir, ignore_errors=True)
            return
        except BaseException:
            run.upload(log_path)  # the run stays open: a retry reopens it, the driver ends it
            raise
        finally:
            # the work since the last evaluation, a failed attempt's included: a retry carries it on
            meter.charge()
            run.log_cost(meter.of(0))
    shutil.rmtree(output_dir, ignore_errors=True)


def train_pack_trial(config: dict[str, Any], corpus: Corpus | None = None, study: StudyContext | None = None,
                     asha=None) -> None:
    """Function trainable of one pack (``studies/packing.py``): its members train as one packed
    model (``cvae_core.packed.train_pack``), and each member is a trial everywhere else: its own
    MLflow run (``Tag.PACK`` = this Ray trial's id), metrics, best checkpoint and log.  ``asha``:
    the :class:`~studies.outcomes.AshaRule` actor that decides which members stop (None: none
    stop early).  One ``tune.report`` per evaluation with every member's result and a Tune
    checkpoint holding each active member's latest checkpoint and which members ended, and how;
    a retry or ``--resume`` continues the active members from it."""
    if study is None:
        raise CvaeError("train_pack_trial needs the study context: wrap it with tune.with_parameters(..., study=...)")
    _prepare_worker(study)
    context = tune.get_context()
    members = pack_members(config)
    if not members:
        raise CvaeError(f"a pack trial's config needs its members, got keys {sorted(config)}")
    device, gpu_ids = _assigned_device(study.gpus_per_trial)
    meter = CostMeter(gpus=study.gpus_per_trial if device == "cuda" else 0.0)
    output_dir = _fresh_dir(_scratch_dir(context.get_trial_id()))
    checkpoint = tune.get_checkpoint()
    try:
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as restored:
            _run_pack(members, study, corpus, asha, output_dir, restored, context.get_trial_id(), device, gpu_ids,
                      meter)
    except SystemExit:
        shutil.rmtree(output_dir, ignore_errors=True)
        raise  # Tune stopped the pack inside tune.report; the driver ends the MLflow runs
    shutil.rmtree(output_dir, ignore_errors=True)


def _run_pack(members: list[tuple[str, dict[str, Any]]], study: StudyContext, corpus: Corpus | None, asha,
              output_dir: Path, restored: str | None, pack_id: str, device: str, gpu_ids: list[str],
              meter: CostMeter) -> None:
    """One attempt of a pack: ``restored`` is the pack's Tune checkpoint when Tune handed one back.
    The machine's system metrics go to the run of the first member still training (one monitor
    per process: ``tracking.SystemMetrics``); each member's run gets its share of the pack's cost
    (``meter``): the cost between two evaluations split evenly over the members evaluated at the
    second."""
    import json

    import ray

    from cvae_core.packed import train_pack

    ended: dict[str, dict[str, str]] = json.loads((Path(restored) / PACK_STATE).read_text())["ended"] if restored else {}
    active = [(member_id, trial_config) for member_id, trial_config in members if member_id not in ended]
    if not active:
        return  # every member ended before the last checkpoint
    ids = [member_id for member_id, _ in active]
    configs = [resolve_trial_config(study, trial_config) for _, trial_config in active]
    resume_from = [Path(restored) / member_id for member_id in ids] if restored else None
    resumed_step = checkpoint_step(resume_from[0]) if resume_from else None
    log_path = output_dir / _log_name(resumed_step)
    tags = {**_placement_tags(device, gpu_ids, resumed_step), Tag.PACK: pack_id}
    system = SystemMetrics(study.tracking_uri)
    runs = [TrialRun.open(study, member_id, f"trial_{member_id}", core_config,
                          run_name=run_name(trial_config, core_config, study), extra_tags=tags)
            for (member_id, trial_config), core_config in zip(active, configs)]
    meter.carry([run.carried for run in runs])
    eval_every, steps = configs[0].train.eval_every, configs[0].train.steps
    reported: set[str] = set(ended)  # ends already in a report
    metric = study.scheduler_metric

    def end_values() -> dict[str, Any]:
        values: dict[str, Any] = {}
        for member_id, end in ended.items():
            if member_id not in reported:
                values.update({member_key(member_id, name): value for name, value in end.items()})
        reported.update(ended)
        return values

    def on_evaluation(evaluations) -> list[int]:
        step = int(evaluations[0].metrics["step"])
        evaluation = math.ceil(step / eval_every)
        stop_point = step >= steps or evaluation in study.stop_points
        result: dict[str, Any] = {"step": float(step)}
        stops = []
        meter.charge([item.member for item in evaluations])
        for item in evaluations:
            member_id = ids[item.member]
            metrics = {**item.metrics, **meter.of(item.member)}
            record_evaluation(runs[item.member], metrics, item.checkpoint, log_path, stop_point, log)
            result.update({member_key(member_id, k): v for k, v in metrics.items()})
            result[member_key(member_id, TRAINING_ITERATION)] = evaluation
            if step >= steps:
                ended[member_id] = {OUTCOME: Outcome.DONE}
            elif asha is not None:
                reason = ray.get(asha.decide.remote(member_id, evaluation, step, item.metrics.get(metric), item.metrics))
                if reason:
                    stops.append(item.member)
                    ended[member_id] = {OUTCOME: Outcome.STOPPED_EARLY, REASON: reason}
        result.update(end_values())
        folder = output_dir / f"pack-checkpoint-{step}"
        for item in evaluations:
            if ids[item.member] not in ended:
                shutil.copytree(item.checkpoint, folder / ids[item.member])
        folder.mkdir(exist_ok=True)
        (folder / PACK_STATE).write_text(json.dumps({"ended": ended}))
        if step >= steps:
            system.stop()  # training is over: its last sample, before Tune ends the process
        elif any(member_id in ended for member_id in monitored):
            monitor_first_active()  # the monitored member stopped: the next one still training
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)
        return stops

    def on_member_end(end) -> None:
        member_id = ids[end.member]
        if end.outcome == "diverged" and member_id not in ended:
            log(f"{member_id}: {end.diverged}")
            runs[end.member].set_tags({Tag.DIVERGED_AT_STEP: str(end.diverged.step)})
            runs[end.member].upload(log_path)
            runs[end.member].log_cost(meter.of(end.member))
            ended[member_id] = {OUTCOME: Outcome.DIVERGED, "diverged_at_step": float(end.diverged.step),
                                REASON: f"diverged at step {end.diverged.step}: {end.diverged.reason}"}

    monitored: list[str] = []  # the member whose run gets the system metrics

    def monitor_first_active() -> None:
        """The machine's system metrics go to one member's run: the first still training."""
        member = next((i for i, member_id in enumerate(ids) if member_id not in ended), None)
        monitored[:] = [ids[member]] if member is not None else []
        if member is None:
            system.stop()
        else:
            system.start(runs[member].run_id)

    with open(log_path, "a", encoding="utf-8") as log_file, system:
        monitor_first_active()

        def log(text: str) -> None:
            log_file.write(text + "\n")
            log_file.flush()

        try:
            train_pack(configs, [output_dir / member_id for member_id in ids], callbacks=[on_evaluation],
                       corpus=corpus, log=log, resume_from=resume_from, on_member_end=on_member_end)
        except SystemExit:
            raise
        except BaseException:
            for run in runs:
                run.upload(log_path)  # the runs stay open: a retry reopens them, the driver ends them
            raise
        finally:
            # the work since the last evaluation goes to the members evaluated last
            meter.charge()
            for member, run in enumerate(runs):
                run.log_cost(meter.of(member))
    for run in runs:
        run.flush(wait_s=FINAL_FLUSH_S)
        run.upload(log_path, wait_s=FINAL_FLUSH_S)
    last = end_values()  # ends no evaluation reported (a member that diverged last)
    if last:
        tune.report(last)

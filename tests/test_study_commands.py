"""The study command as a user runs it (a local Ray, SQLite MLflow, tiny budgets), end to end:

* every command the study prints at its end runs as printed: the MLflow UI line starts a lean
  server that answers (then it is stopped by its process group), the analysis line prints the
  study's table;
* Optuna tells the truth about each trial: ASHA-stopped trials are PRUNED with the values they
  reported, finished ones COMPLETE with the summary's number, objectives named;
* a SIGKILLed driver and --resume leave no Optuna trial RUNNING and ask no configuration twice.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from processes import env_without_mlflow, free_port, group_members, kill_group, wait_until_healthy

from studies.record import dashboard_script

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "studies" / "lambda_sweep.py"
TINY = {
    "data.train_limit": 300, "data.valid_limit": 40, "model.embed_dim": 16, "model.hidden_dim": 16,
    "model.latent_dim": 4, "model.dropout": 0.0, "train.batch_size": 8, "train.steps": 40, "train.eval_every": 10,
    "train.log_every": 10, "train.val_samples": 2, "train.mi_samples": 2, "regularizer.anneal_start": 2,
    "regularizer.anneal_steps": 20, "train.lr_decay_start": 30, "train.lr_decay_every": 10,
}
TINY_FLAGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
# These tests drive Optuna's proposals (the default is a grid) and what a study writes, whichever
# trial wins: the default's constraint (val_au >= 1) is for the full budget, not these tiny models.
TPE = ["--search", "tpe", "--seeds", "1", "--constraint", "none"]
START = re.compile(r"^\[\s*\d+:\d\d\] start\s+(\w+)\s+(.*)$", re.M)


def _env() -> dict[str, str]:
    return env_without_mlflow(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def _run_sweep(cwd: Path, *args: str, timeout_s: int = 1500, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *TPE, *args, *TINY_FLAGS], cwd=cwd, env={**_env(), **env},
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)


def _processes_using(path: str) -> list[int]:
    """Live processes whose command line names `path` (the local Ray a killed driver started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and path.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_gone(path: str, timeout_s: float = 60) -> None:
    """Ray's own processes follow a SIGKILLed driver within seconds; whatever is left is ended by PID."""
    deadline = time.monotonic() + timeout_s
    while _processes_using(path) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _processes_using(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _printed(output: str, label: str) -> str:
    match = re.search(rf"^{label}:\s+(.*)$", output, re.M)
    assert match, f"the study did not print a {label!r} line:\n{output[-3000:]}"
    return match.group(1)


def _optuna_trials_by_config(summary: dict) -> list[tuple[optuna.trial.FrozenTrial, dict]]:
    study = optuna.load_study(study_name=summary["study"], storage=summary["optuna_storage"])
    assert study.metric_names == ["val_nll"]
    pairs = []
    for trial in study.trials:
        matches = [t for t in summary["trials"]
                   if all(t["config"].get(k) == v for k, v in trial.params.items())]
        assert len(matches) == 1, (trial.params, [t["config"] for t in summary["trials"]])
        pairs.append((trial, matches[0]))
    return pairs


def serve_mlflow_ui(command: str, cwd: Path) -> None:
    """Start the printed MLflow UI command on a free loopback port, check it answers and is lean
    (no job-runner processes), then stop it by its process group."""
    port = free_port()
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env={**_env(), "CVAE_MLFLOW_PORT": str(port)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}", 90, proc.stdout.read)
        time.sleep(2)
        # the launcher (exec'd into `mlflow server`) and one uvicorn process: no job runner, no huey consumers
        assert len(group_members(proc.pid)) == 2, group_members(proc.pid)
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search"
        request = urllib.request.Request(url, data=b'{"max_results": 10}', headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            names = [e["name"] for e in json.loads(response.read())["experiments"]]
        assert "coupled-vae-studies" in names
    finally:
        assert not kill_group(proc)


def test_printed_commands_run_and_optuna_matches_the_record(tmp_path):
    # ASHA must stop a trial for its PRUNED record to be checked: the default spec with a rung at
    # evaluation 2 on NLL alone (the default's rung follows the KL anneal and also keeps high MI)
    spec = yaml.safe_load((REPO / "studies" / "specs" / "lambda_sweep.yaml").read_text())
    spec["scheduler"] = {"type": "asha", "metric": "val_nll", "grace_period": 2, "reduction_factor": 2}
    (tmp_path / "lambda_sweep.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    # one trial at a time: the order in which results reach ASHA is fixed, so what it stops is too
    result = _run_sweep(tmp_path, "--profile", str(tmp_path / "lambda_sweep.yaml"), "--num-samples", "4",
                        "--study-name", "printed", "--max-concurrent", "1")
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    summary = json.loads((tmp_path / "studies_out" / "printed" / "summary.json").read_text())

    # every command printed at the end runs as printed, from another folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    analyse = subprocess.run(["bash", "-c", _printed(output, "Analyse")], cwd=elsewhere, env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert analyse.returncode == 0 and "Table 3 layout" in analyse.stdout, analyse.stdout
    serve_mlflow_ui(_printed(output, "Compare runs"), elsewhere)
    # with the dashboard extra a Dashboard line too, which tests/test_dashboard.py runs as printed
    assert ("Dashboard:" in output) == (dashboard_script() is not None)

    # Optuna: PRUNED with intermediate values for ASHA-stopped trials, the record's number otherwise
    pairs = _optuna_trials_by_config(summary)
    assert len(pairs) == 4
    for trial, row in pairs:
        if row["status"] == "stopped":
            assert trial.state == TrialState.PRUNED, (trial.number, row)
            assert len(trial.intermediate_values) == row["evaluations"]
        else:
            assert row["status"] == "done" and trial.state == TrialState.COMPLETE, (trial.number, row)
            assert trial.value == pytest.approx(row["best"]["val_nll"], abs=1e-9)
            assert len(trial.intermediate_values) == row["evaluations"]
    assert any(row["status"] == "stopped" for row in summary["trials"]), "ASHA stopped nothing: nothing checked"

    # the MLflow UI opens on training runs; runs say what they are; the baseline has no coupling values
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    experiment = client.get_experiment_by_name("coupled-vae-studies")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], "tags.`cvae.role` = 'trial'")
    names = {r.data.tags["ray_trial_id"]: r.info.run_name for r in runs}
    for row in summary["trials"]:
        assert names[row["trial_id"]] == f"{row['label']} seed=0"
    for run in runs:
        assert run.data.tags["mlflow.source.name"] == "studies spec lambda_sweep"
        if run.data.tags["cvae.preset"] == "vae":
            assert all(run.data.params[k] == "none" for k in ("coupling.lambda_m", "coupling.lambda_r",
                                                               "coupling.distance"))
        else:
            assert float(run.data.params["coupling.lambda_r"]) >= 0


def kill_driver_then_resume(tmp_path: Path, args: list[str], study_name: str,
                            kill_at) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the sweep with ``args`` (and TINY_FLAGS), SIGKILL the driver and the local Ray it
    started at the first output line for which ``kill_at(line, lines so far)`` is true, then
    ``--resume`` the study.  -> (the lines printed before the kill, the resumed run)."""
    # a Ray temp dir of its own (short: Ray's socket paths must fit 107 bytes), so this study's local
    # Ray is told apart from any other on the machine
    ray_tmp = tempfile.mkdtemp(prefix="cvae-ray-", dir="/tmp")
    proc = subprocess.Popen([sys.executable, str(SWEEP), *TPE, *args, *TINY_FLAGS], cwd=tmp_path,
                            env={**_env(), "RAY_TMPDIR": ray_tmp}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen, killed = [], False
    deadline = time.monotonic() + 1200
    for line in proc.stdout:
        seen.append(line)
        if kill_at(line, seen):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
            killed = True
            break
        assert time.monotonic() < deadline, "".join(seen[-40:])
    assert killed, "".join(seen[-40:])
    kill_group(proc)
    _wait_gone(ray_tmp)
    try:
        return seen, _run_sweep(tmp_path, "--resume", study_name, RAY_TMPDIR=ray_tmp)
    finally:
        _wait_gone(ray_tmp, timeout_s=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_killed_driver_and_resume_leave_no_running_or_phantom_optuna_trial(tmp_path):
    def at_third_start(line: str, seen: list[str]) -> bool:
        # the third trial is the second Optuna proposal, asked right before its start line
        return bool(START.match(line)) and sum(1 for s in seen if START.match(s)) == 3

    _, result = kill_driver_then_resume(tmp_path, ["--num-samples", "3", "--study-name", "killed"], "killed",
                                        at_third_start)
    assert result.returncode == 0, result.stdout[-4000:]
    summary = json.loads((tmp_path / "studies_out" / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed"
    study = optuna.load_study(study_name="killed", storage=summary["optuna_storage"])
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    searched = [t for t in summary["trials"] if t["config"].get("preset") != "vae"]
    assert len(study.trials) == len(searched) == 3, [t.params for t in study.trials]
    _optuna_trials_by_config(summary)  # each Optuna trial is exactly one trained configuration

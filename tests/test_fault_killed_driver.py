"""Fault scenario: the study driver is SIGKILLed (with the local Ray it started) while Optuna
proposals are in flight, then ``--resume`` continues the study (real local Ray, SQLite MLflow and
Optuna). The kill comes at a Tune event (tests/killing_driver.py), never after a wait.

Whatever the last experiment snapshot before the kill held, no configuration is trained twice,
every Optuna trial is one trained configuration (none left RUNNING, no phantom), and the study
completes with the trials its spec asks for."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from processes import env_without_mlflow, kill_group

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).resolve().parent / "killing_driver.py"


def _drive(tmp_path: Path, spec: Path, event: str, n: int, *resume: str, ray_tmp: str) -> subprocess.CompletedProcess:
    env = env_without_mlflow(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(spec), str(tmp_path / "out"), "killed", event, str(n),
                             *resume], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output = proc.communicate(timeout=900)[0]
    finally:
        kill_group(proc)  # what a SIGKILLed driver leaves of its Ray, if anything
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


@pytest.mark.parametrize("event, n", [("trials", 4), ("on_trial_start", 4)],
                         ids=["after-the-ask", "at-the-start"])
def test_a_proposal_in_flight_when_the_driver_dies_is_trained_once(tmp_path, event, n):
    from test_fault_divergence import tiny_spec

    # the VAE baseline, then 5 proposals, 3 at a time: the 4th trial is the 3rd proposal, asked
    # while two others train
    spec = tiny_spec(tmp_path / "killed.yaml", [{"preset": "vae"}], num_samples=5, steps=40, max_concurrent=3)
    with tempfile.TemporaryDirectory(prefix="cvae-ray-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        first = _drive(tmp_path, spec, event, n, ray_tmp=ray_tmp)
        assert first.returncode == -9 and (tmp_path / "killed").exists(), first.stdout[-3000:]
        second = _drive(tmp_path, spec, event, n, "--resume", ray_tmp=ray_tmp)
    assert second.returncode == 0, second.stdout[-4000:]

    summary = json.loads((tmp_path / "out" / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed"
    searched = [t for t in summary["trials"] if t["config"].get("preset") != "vae"]
    configs = [json.dumps({k: v for k, v in t["config"].items() if k != "train.seed"}, sort_keys=True)
               for t in searched]
    assert len(searched) == 5 and len(set(configs)) == 5, configs  # no configuration trained twice
    assert all(t["status"] == "done" for t in summary["trials"]), summary["trials"]
    study = optuna.load_study(study_name="killed", storage=summary["optuna_storage"])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5, [(t.state, t.params) for t in study.trials]

"""Interrupting a study does not change its answer (real local Ray, SQLite MLflow and Optuna).

A tiny coupled-VAE study whose trials run one at a time (so the order in which results reach
ASHA is fixed, and training on CPU is deterministic) runs once uninterrupted, and once stopped at
a Tune event — SIGKILL of the driver and its Ray, or Ctrl-C (SIGINT) — at a rung boundary (the
checkpoint of an evaluation at ASHA's rung) and between rungs, then ``--resume``d. Both end with
the same trials stopped at the same rungs, the same best metrics and the same champion."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from processes import env_without_mlflow, kill_group

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).resolve().parent / "killing_driver.py"


def _spec(path: Path) -> Path:
    from test_fault_divergence import TINY

    spec = {
        "name": "alike", "description": "tiny study for resume equality",
        "base": {"preset": "coupled-vae", "dataset": "ptb", "scale": "quick", "overrides": {**TINY, "train.steps": 40}},
        "space": "lambda", "grid": "table3", "search": "tpe", "baselines": [{"preset": "vae"}],
        "objectives": ["val_nll"],
        "scheduler": {"type": "asha", "metric": "val_nll", "mode": "min", "grace_period": 2, "reduction_factor": 2},
        "budget": {"num_samples": 4, "seeds": 1, "seed": 0},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent_trials": 1, "max_failures": 1},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _drive(folder: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="cvae-ray-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        env = env_without_mlflow(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, str(DRIVER), str(folder / "alike.yaml"), str(folder / "out"), "alike",
                                 *args], cwd=folder, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output = proc.communicate(timeout=900)[0]
        finally:
            kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


def _answer(folder: Path) -> tuple[dict, str]:
    """-> ({configuration: (status, evaluations, best val_nll/kl/mi)}, the champion's configuration)."""
    summary = json.loads((folder / "out" / "alike" / "summary.json").read_text())
    assert summary["status"] == "completed"

    def key(trial: dict) -> str:
        return json.dumps({k: v for k, v in trial["config"].items() if k != "train.seed"}, sort_keys=True)

    rows = {key(t): (t["status"], t["evaluations"], *(round(t["best"].get(m, float("nan")), 6)
                                                      for m in ("val_nll", "val_kl", "val_mi_loo")))
            for t in summary["trials"]}
    assert len(rows) == len(summary["trials"]) == 5
    return rows, key(summary["best"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    _spec(folder / "alike.yaml")
    done = _drive(folder, "never", "0")
    assert done.returncode == 0, done.stdout[-4000:]
    rows, champion = _answer(folder)
    assert any(status == "stopped" for status, *_ in rows.values()), rows  # ASHA decides something here
    return rows, champion


@pytest.mark.parametrize("how", ["sigkill", "sigint"])
@pytest.mark.parametrize("where", ["on_checkpoint@2", "on_checkpoint@3"], ids=["at-the-rung", "between-rungs"])
def test_an_interrupted_and_resumed_study_decides_as_the_uninterrupted_one(uninterrupted, tmp_path, how, where):
    _spec(tmp_path / "alike.yaml")
    # the 3rd trial's checkpoint of its 2nd (ASHA's rung) or 3rd evaluation: earlier trials have
    # filled the rung, so ASHA's records must survive the interruption for its next decisions
    first = _drive(tmp_path, where, "3", *(["--sigint"] if how == "sigint" else []))
    assert (tmp_path / "killed").exists(), first.stdout[-3000:]
    assert first.returncode == (-9 if how == "sigkill" else 130), first.stdout[-3000:]
    second = _drive(tmp_path, where, "3", "--resume")
    assert second.returncode == 0, second.stdout[-4000:]
    rows, champion = _answer(tmp_path)
    assert rows == uninterrupted[0]
    assert champion == uninterrupted[1]

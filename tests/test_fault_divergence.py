"""Fault scenario: a diverging trial is an outcome, not a crash (real local Ray, SQLite MLflow).

The base configuration has train.lr=1e6: the Optuna proposal and one baseline diverge within a
few steps, another baseline (train.lr=1e-3) trains normally. A diverged trial must stop at once
with `diverged at step N`, never be retried, end TERMINATED in Ray, FAIL in Optuna (with no NaN
intermediate value), FINISHED with `cvae.outcome=diverged` in MLflow,
show as diverged in the progress lines and the summary, and the study must exit 0."""
from __future__ import annotations

import json
import math
import os

import pytest
import yaml

pytestmark = pytest.mark.slow

TINY = {
    "data.train_limit": 200, "data.valid_limit": 20, "model.embed_dim": 16, "model.hidden_dim": 16,
    "model.latent_dim": 4, "model.dropout": 0.0, "train.batch_size": 8, "train.eval_every": 10,
    "train.log_every": 10, "train.val_samples": 2, "train.mi_samples": 2, "regularizer.anneal_start": 2,
    "regularizer.anneal_steps": 20, "train.steps": 20,
}


def tiny_spec(path, baselines, num_samples=0, steps=20, max_concurrent=2):
    spec = {
        "name": path.stem, "description": "tiny fault study",
        "base": {"preset": "vae", "dataset": "ptb", "scale": "quick", "overrides": {**TINY, "train.steps": steps}},
        "space": "lambda", "grid": "table3", "search": "tpe", "baselines": baselines,
        "objectives": ["val_nll"],
        "scheduler": {"type": "asha", "metric": "val_nll", "mode": "min", "grace_period": 2, "reduction_factor": 2},
        "budget": {"num_samples": num_samples, "seeds": 1, "seed": 0},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent_trials": max_concurrent,
                      "max_failures": 1},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_diverging_trial_is_an_outcome_and_the_study_goes_on(tmp_path, capsys, no_tracking_uri_env):
    import optuna
    from mlflow import MlflowClient
    from ray import tune

    from studies.runner import Options, run_study
    from studies.tracking import child_runs

    # lr 1e6 in the base: the Optuna proposal and the second baseline diverge, the first trains
    spec = tiny_spec(tmp_path / "diverge.yaml", [{"preset": "vae", "train.lr": 1e-3}, {"preset": "vae"}])
    raw = yaml.safe_load(spec.read_text())
    raw["base"]["overrides"]["train.lr"] = 1e6
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_study(Options(profile=str(spec), root=str(tmp_path / "out"), tracking_uri=uri,
                                study_name="diverge", num_samples=1))
    out = capsys.readouterr().out
    assert outcome.exit_code == 0 and not outcome.interrupted, out
    statuses = sorted(r.status for r in outcome.rows)
    assert len(outcome.rows) == 3 and statuses.count("diverged") == 2, statuses
    diverged = next(r for r in outcome.rows if r.status == "diverged")
    assert diverged.error.startswith("diverged at step ") and not diverged.best
    assert f"DIVERGED {diverged.trial_id}  at step" in out and "2 diverged" in out
    assert "Traceback" not in out

    # Ray: TERMINATED, not ERROR, and no retry (one attempt only: no resumed log)
    analysis = tune.ExperimentAnalysis(str(tmp_path / "out" / "ray_results" / "diverge"))
    trial = next(t for t in analysis.trials if t.trial_id == diverged.trial_id)
    assert trial.status == "TERMINATED" and trial.num_failures == 0

    # MLflow: one run per trial, the diverged one FINISHED and tagged, nothing RUNNING
    state = json.loads((tmp_path / "out" / "diverge" / "study.json").read_text())
    client = MlflowClient(uri)
    runs = child_runs(client, state["experiment_id"], state["parent_run_id"])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    diverged_ids = {r.trial_id for r in outcome.rows if r.status == "diverged"}
    for row in outcome.rows:
        if row.status != "diverged":
            continue
        run = next(r for r in runs if r.data.tags["ray_trial_id"] == row.trial_id)
        assert run.data.tags["cvae.outcome"] == "diverged"
        assert int(run.data.tags["cvae.diverged_at_step"]) == int(row.error.split()[3].rstrip(":"))
        assert "val_nll" not in run.data.metrics  # no number invented for it
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"train.log"}
    # every other trial carries its own outcome (the study service writes one on every trial run)
    assert all(r.data.tags["cvae.outcome"] in ("done", "stopped_early") for r in runs
               if r.data.tags["ray_trial_id"] not in diverged_ids)

    # summary
    summary = json.loads((tmp_path / "out" / "diverge" / "summary.json").read_text())
    assert summary["counts"]["diverged"] == 2 and summary["status"] == "completed"
    assert "diverged at step" in (tmp_path / "out" / "diverge" / "summary.md").read_text()

    # Optuna: the diverged proposal is FAIL, with no NaN intermediate value (the divergence report
    # is no evaluation); the baselines are not Optuna proposals
    study = optuna.load_study(study_name="diverge", storage=state["optuna_storage"])
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert all(math.isfinite(v) for v in study.trials[0].intermediate_values.values())

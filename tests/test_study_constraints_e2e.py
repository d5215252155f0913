"""Constraints end to end (a real tiny study: local Ray, Optuna over SQLite, a SQLite MLflow
store, then ``python -m analysis best`` on it).

The study is built so that the trial with the lowest validation NLL is infeasible by
construction: the proposals train at lr 1e-9 (untrained), the VAE baseline at 1e-4 and one more
baseline at 1e-3 (over 20 steps, more learning rate, more progress), and that one has a 2-d
latent, so at most 2 active units, under the constraint ``val_au >= 3``; the 4-d models measured
4 active units. The summary's Best, the parent run's best tags and ``analysis best``'s choice
must then be the lowest-NLL feasible trial, the VAE baseline, and Optuna's trials carry the
constraint values of their best evaluations. A second study of the same spec with ``--constraint 'val_au >= 5'``
(impossible: no model has 5 latent dimensions) has no feasible trial: no best, said plainly, and
``analysis best`` evaluates the best infeasible run without registering it."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY
from test_analysis import run_cli

pytestmark = pytest.mark.slow

WINNER = {"preset": "vae", "model.latent_dim": 2, "train.lr": 0.001}  # lowest NLL, at most 2 active units
RUNNER_UP = {"preset": "vae", "train.lr": 0.0001}  # the best feasible trial
QUICK_EVALUATION = ("--n-samples", "4", "--mi-samples", "4", "--limit", "24", "--no-bleu", "--no-dist",
                    "--no-grad-norms")


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory, tiny_data_dir):
    path = tmp_path_factory.mktemp("constrained_spec") / "constrained.yaml"
    path.write_text(yaml.safe_dump({
        "name": "constrained", "description": "tiny study whose lowest-NLL trial is infeasible",
        "base": {"preset": "coupled-vae", "dataset": "text", "scale": "quick",
                 "overrides": {**TINY, "data.data_dir": str(tiny_data_dir), "train.lr": 1e-9}},
        "space": "lambda", "grid": "table3", "search": "tpe", "baselines": [WINNER, RUNNER_UP],
        "objectives": ["val_nll"], "constraints": ["val_au >= 3"],
        "scheduler": {"type": "asha", "metric": "val_nll", "mode": "min", "grace_period": 2, "reduction_factor": 2},
        "budget": {"num_samples": 2, "seeds": 1, "seed": 0},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent_trials": 2, "max_failures": 1},
    }))
    return path


def _run(spec_path, root, name: str, **flags):
    from studies.runner import Options, run_study

    uri = f"sqlite:///{root / 'mlflow.db'}"
    outcome = run_study(Options(profile=str(spec_path), root=str(root / "out"), tracking_uri=uri, study_name=name,
                                **flags))
    summary = json.loads((root / "out" / name / "summary.json").read_text())
    return outcome, summary, uri


def _parent(uri: str, outcome):
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(outcome.state.parent_run_id)


def _winner(rows):
    return next(r for r in rows if r.config.get("model.latent_dim") == 2)


def test_the_lowest_nll_trial_is_infeasible_and_every_best_is_the_best_feasible_trial(spec_path, tmp_path, capsys):
    import optuna

    outcome, summary, uri = _run(spec_path, tmp_path, "constrained")
    out = capsys.readouterr().out
    rows = outcome.rows
    assert outcome.exit_code == 0 and len(rows) == 4 and all(r.status == "done" for r in rows), rows
    winner = _winner(rows)
    assert winner.best["val_nll"] == min(r.best["val_nll"] for r in rows)  # it would win without the constraint
    assert winner.best["val_au"] <= 2  # a 2-d latent: infeasible by construction
    feasible = [r for r in rows if r.best["val_au"] >= 3]
    assert len(feasible) == 3, [r.best for r in rows]
    expected = min(feasible, key=lambda r: r.best["val_nll"])
    assert expected.config == {**RUNNER_UP, "train.seed": 0}
    assert all(r.best["val_nll"] > expected.best["val_nll"] for r in feasible if r is not expected)  # no tie

    # the summary: feasible first, the winner marked, Best from the feasible trials
    assert summary["best"]["trial_id"] == expected.trial_id and summary["best"]["violated"] == []
    assert summary["best_infeasible"] is None and summary["n_feasible"] == len(feasible)
    entries = {t["trial_id"]: t for t in summary["trials"]}
    assert entries[winner.trial_id]["violated"] == ["val_au >= 3"]
    assert [t["trial_id"] for t in summary["trials"]][:len(feasible)] == [
        r.trial_id for r in sorted(feasible, key=lambda r: r.best["val_nll"])]
    winner_line = next(line for line in out.splitlines() if line.split()[1:2] == [winner.trial_id])  # its table row
    assert "  no  " in winner_line and winner_line.endswith("(fails val_au >= 3)"), winner_line
    assert f"\nBest: {expected.trial_id} ({expected.label}, seed 0), val_nll {expected.best['val_nll']:.2f}" in out
    assert "Constraints: val_au >= 3 at each trial's best checkpoint." in out

    # the parent run: the constraints for analysis, the best tags from the feasible trial
    parent = _parent(uri, outcome)
    assert parent.data.tags["cvae.constraints"] == '["val_au >= 3"]'
    assert parent.data.params["constraints"] == "val_au >= 3"
    assert parent.data.tags["cvae.best_trial_id"] == expected.trial_id
    assert parent.data.tags["cvae.best_run_id"] == expected.run_id
    assert parent.data.metrics["n_feasible"] == len(feasible)

    # Optuna: each proposal carries the constraint value of its best evaluation; its best is feasible
    study = optuna.load_study(study_name="constrained", storage=outcome.state.optuna_storage)
    assert len(study.trials) == 2
    proposals = [r for r in rows if r.config.get("preset", "coupled-vae") == "coupled-vae"]
    for trial in study.trials:
        row = next(r for r in proposals if all(r.config.get(k) == v for k, v in trial.params.items()))
        assert trial.value == pytest.approx(row.best["val_nll"], abs=1e-9)
        assert trial.constraints == {"val_au >= 3": pytest.approx(3.0 - row.best["val_au"], abs=1e-9)}
    assert study.best_trial.constraints["val_au >= 3"] == -1.0  # 4 active units

    # analysis best: the same trial, among the runs that satisfy the study's constraints
    best = run_cli("best", "--tracking-uri", uri, "--study", "constrained", *QUICK_EVALUATION, "--no-log",
                   "--no-register", "--out", str(tmp_path / "download"))
    assert best.returncode == 0, best.stderr
    assert f"best run by val_nll (min, runs that satisfy val_au >= 3): {expected.run_id}" in best.stdout
    assert "INFEASIBLE" not in best.stdout


def test_with_no_feasible_trial_no_best_is_chosen_and_nothing_is_registered(spec_path, tmp_path, capsys):
    from mlflow import MlflowClient

    # --constraint replaces the spec's: no model of this study has 5 latent dimensions
    outcome, summary, uri = _run(spec_path, tmp_path, "none-feasible", num_samples=0, constraints=["val_au >= 5"])
    out = capsys.readouterr().out
    assert outcome.exit_code == 0 and len(outcome.rows) == 2
    winner = _winner(outcome.rows)
    assert summary["best"] is None and summary["n_feasible"] == 0
    assert summary["best_infeasible"]["trial_id"] == winner.trial_id
    assert (f"\nBest: none feasible: no trial satisfies val_au >= 5. Best infeasible trial (not a champion): "
            f"{winner.trial_id} ({winner.label}, seed 0)") in out
    parent = _parent(uri, outcome)
    assert parent.data.tags["cvae.constraints"] == '["val_au >= 5"]'
    assert "cvae.best_run_id" not in parent.data.tags and parent.data.metrics["n_feasible"] == 0

    # a full evaluation (it would register), of the best infeasible run, which stays unregistered
    best = run_cli("best", "--tracking-uri", uri, "--study", "none-feasible", "--no-bleu", "--no-dist",
                   "--no-grad-norms", "--out", str(tmp_path / "download"))
    assert best.returncode == 0, best.stderr
    assert "none feasible: no run with a checkpoint satisfies val_au >= 5; evaluating the best infeasible run" in best.stdout
    assert f": {winner.run_id} " in best.stdout and "(INFEASIBLE: fails val_au >= 5)" in best.stdout
    assert "not registered: an infeasible run (val_au >= 5) leaves @champion where it is" in best.stdout
    assert MlflowClient(uri).search_registered_models() == []

"""The study service and the analysis agree on the record, checked on a real study: a tiny
lambda_sweep (local Ray, SQLite MLflow store in a temp dir) is run once, then

* every tag analysis reads (``analysis.runs.READ_TAGS``) is on every run of the role it reads it from;
* the runs frame's best evaluation is the one the core reported (``best_step``), and it agrees
  with the lowest validation NLL of the history, the rule analysis used before.
"""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow

TINY = ["data.train_limit=200", "data.valid_limit=24", "data.max_len=20", "model.embed_dim=16",
        "model.hidden_dim=16", "model.latent_dim=4", "train.steps=6", "train.eval_every=2", "train.log_every=2",
        "train.batch_size=8", "train.val_samples=2", "train.mi_samples=2", "train.dynamics_every=0",
        "train.lr_decay_start=4", "train.lr_decay_every=2", "regularizer.anneal_start=1",
        "regularizer.anneal_steps=4"]
STUDY = "tiny-record"


@pytest.fixture(scope="module")
def study_store(tmp_path_factory):
    from studies.runner import Options, run_study

    root = tmp_path_factory.mktemp("record_study")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    outcome = run_study(Options(profile="lambda_sweep", search="tpe", constraints=["none"], num_samples=2, seeds=1, root=str(root / "out"),
                                tracking_uri=uri, study_name=STUDY, overrides=TINY))
    assert outcome.exit_code == 0
    return uri


def test_every_tag_analysis_reads_is_written_by_the_study_service(study_store):
    from mlflow import MlflowClient

    from analysis.runs import READ_TAGS
    from analysis.store import DEFAULT_EXPERIMENT
    from studies.record import Tag, search_all

    client = MlflowClient(tracking_uri=study_store)
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    runs = search_all(client, experiment.experiment_id, "")
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags.get(Tag.ROLE), []).append(run)
    assert len(by_role.get("study", [])) == 1 and len(by_role.get("trial", [])) == 3  # 2 proposals + the VAE
    for role, tags in READ_TAGS.items():
        assert by_role.get(role), f"the study wrote no {role} run"
        for run in by_role[role]:
            missing = [tag for tag in tags if tag not in run.data.tags]
            assert not missing, f"{role} run {run.info.run_name} lacks {missing}"


def test_best_evaluation_is_the_cores_and_agrees_with_the_lowest_validation_nll(study_store):
    from analysis.runs import fetch_study

    study = fetch_study(study=STUDY, tracking_uri=study_store)
    assert len(study.runs) == 3
    for _, row in study.runs.iterrows():
        history = study.history[study.history["run_id"] == row["run_id"]].drop_duplicates(["metric", "step"],
                                                                                           keep="last")
        history = history[~history["metric"].str.startswith("system/")]  # their steps count samples
        curve = history[history["metric"] == "val_nll"].sort_values("step")
        lowest = curve.iloc[int(curve["value"].to_numpy().argmin())]
        assert row["best_by"] == "val_nll" and row["best_step"] == int(lowest["step"])
        assert row["best.val_nll"] == lowest["value"] == row["final.best_val_nll"]
        at_best = history[history["step"] == row["best_step"]]
        assert len(at_best) > 5
        for metric, value in zip(at_best["metric"], at_best["value"]):
            assert row[f"best.{metric}"] == value or (math.isnan(value) and math.isnan(row[f"best.{metric}"]))
        assert row["n_evals"] == len(curve) and row["steps_done"] == int(curve["step"].max())

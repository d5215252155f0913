"""The study service and the analysis agree on the record, checked on a real study: a tiny
lambda_sweep (conftest's ``tiny_study``: local Ray, SQLite MLflow store in a temp dir) is run once, then

* every tag analysis reads (``analysis.runs.READ_TAGS``) is on every run of the role it reads it from;
* the runs frame's best evaluation is the one the core reported (``best_step``), and it agrees
  with the lowest validation NLL of the history, the rule analysis used before.
"""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow
STUDY = "tiny-record"


@pytest.fixture(scope="module")
def study_store(tiny_study) -> str:
    assert tiny_study.name == STUDY
    return tiny_study.uri


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

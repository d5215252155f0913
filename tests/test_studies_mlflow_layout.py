"""What a study writes for people who browse MLflow (fast; a SQLite store, no training): the
experiment opens on training runs, and a baseline carries no coupling values it does not use."""
from __future__ import annotations

from mlflow import MlflowClient

from analysis.runs import _parse_param
from cvae_core.config import build_config
from studies.tracking import ensure_experiment, run_params


def test_experiment_is_marked_as_training_runs_new_or_existing(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    created = ensure_experiment(client, "fresh", (tmp_path / "a").as_uri())
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-before", artifact_location=(tmp_path / "b").as_uri())
    assert ensure_experiment(client, "made-before", None) == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def test_baseline_params_say_none_for_coupling_and_analysis_reads_them_as_missing():
    vae = run_params(build_config("vae", "ptb", "quick", {}))
    assert {vae[k] for k in ("coupling.lambda_r", "coupling.lambda_m", "coupling.distance", "coupling.rq_c")} == {"none"}
    assert _parse_param("coupling.lambda_m", vae["coupling.lambda_m"]) is None
    coupled = run_params(build_config("coupled-vae", "ptb", "quick", {"coupling.lambda_m": 0.12}))
    assert coupled["coupling.lambda_m"] == "0.12" and coupled["coupling.distance"] == "rq"

"""What a study writes for people who browse MLflow (fast; a SQLite store, no training): the
experiment opens on training runs, and a baseline carries no coupling values it does not use."""
from __future__ import annotations

from mlflow import MlflowClient

from analysis.runs import parse_param
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
    assert parse_param("coupling.lambda_m", vae["coupling.lambda_m"]) is None
    coupled = run_params(build_config("coupled-vae", "ptb", "quick", {"coupling.lambda_m": 0.12}))
    assert coupled["coupling.lambda_m"] == "0.12" and coupled["coupling.distance"] == "rq"


def test_settings_a_coupled_model_does_not_read_are_none_too():
    no_matching = run_params(build_config("coupled-vae", "ptb", "quick", {"coupling.lambda_m": 0.0}))
    assert no_matching["coupling.distance"] == no_matching["coupling.rq_c"] == "none"
    assert no_matching["coupling.lambda_m"] == "0.0" and no_matching["coupling.lambda_r"] != "none"
    eucl = run_params(build_config("coupled-vae", "ptb", "quick", {"coupling.distance": "eucl"}))
    assert eucl["coupling.distance"] == "eucl" and eucl["coupling.rq_c"] == "none"


def test_a_trial_logs_the_study_objectives_first(tmp_path):
    """MLflow lists a run's metrics in logging order and its comparison charts open on the first."""
    from studies.tracking import TrialRun

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("order")).info.run_id
    trial = TrialRun(client, run_id, set(), first_metrics=("val_nll", "val_mi_loo"))
    assert trial.log_metrics({"step": 10.0, "epoch": 1.0, "val_mi_loo": 0.5, "val_kl": 2.0, "val_nll": 90.0})
    assert list(client.get_run(run_id).data.metrics)[:2] == ["val_nll", "val_mi_loo"]

"""Fault scenario: the MLflow server goes away mid-trial and comes back (a real server on
loopback, stopped and restarted on the same port and store). A trial's TrialRun keeps training:
each evaluation's metrics wait in a bounded buffer (every attempt fails fast instead of stalling
in the client's growing retry waits), and once the server answers the backlog arrives in order,
each step once."""
from __future__ import annotations

import time

import pytest

from processes import free_port, mlflow_server

pytestmark = pytest.mark.slow


def test_metrics_logged_during_an_outage_arrive_once_the_server_is_back(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from studies.tracking import TrialRun

    # what train_trial sets in a trial process
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    port, store = free_port(), tmp_path / "server"
    with mlflow_server(store, port=port) as server:
        url = server["url"]
        client = MlflowClient(url)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        trial = TrialRun(client, run_id, set())
        assert trial.log_metrics({"step": 10.0, "val_nll": 9.0, "val_kl": 1.0})

    started = time.monotonic()
    for step in (20, 30, 40):  # the server is down: training goes on
        assert trial.log_metrics({"step": float(step), "val_nll": 9.0 - step / 10, "val_kl": 1.0})
    assert time.monotonic() - started < 30, "a trial stalled on the unreachable server"
    assert len(trial.pending) == 9
    assert trial.flush(wait_s=1) is False and len(trial.pending) == 9

    with mlflow_server(store, port=port):
        assert trial.log_metrics({"step": 50.0, "val_nll": 4.0, "val_kl": 1.0})
        assert trial.pending == []
        assert not trial.log_metrics({"step": 50.0, "val_nll": 4.0, "val_kl": 1.0})  # no duplicate
        for key in ("val_nll", "val_kl", "step"):
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == [10, 20, 30, 40, 50], key
        assert [m.value for m in sorted(client.get_metric_history(run_id, "val_nll"), key=lambda m: m.step)] == [
            9.0, 7.0, 6.0, 5.0, 4.0]


def test_a_study_survives_a_tracking_server_outage_with_complete_histories(tmp_path, monkeypatch):
    """The whole study against a real server that is stopped for 30 s mid-study and restarted
    on the same port and store: the study completes, every trial run is FINISHED with its
    outcome, and every metric history has each evaluation exactly once."""
    import threading

    from mlflow import MlflowClient
    from test_fault_divergence import tiny_spec

    from studies.record import Role, Tag
    from studies.runner import Options, run_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port, store = free_port(), tmp_path / "server"
    url = f"http://127.0.0.1:{port}"
    spec = tiny_spec(tmp_path / "outage.yaml", [{"preset": "vae"}, {"preset": "vae", "train.seed": 1}], steps=80)
    up, study_done, log = threading.Event(), threading.Event(), []

    def serve_with_an_outage():
        with mlflow_server(store, port=port):
            up.set()
            client = MlflowClient(url)
            while not study_done.is_set():  # wait until a trial has logged 2 evaluations
                runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                        if r.data.tags.get(Tag.ROLE) == Role.TRIAL]
                if any(len(client.get_metric_history(r.info.run_id, "val_nll")) >= 2 for r in runs):
                    break
                time.sleep(0.5)
        log.append(("down", time.monotonic()))
        study_done.wait(timeout=30)
        with mlflow_server(store, port=port):
            log.append(("up", time.monotonic()))
            study_done.wait(timeout=900)

    server = threading.Thread(target=serve_with_an_outage, daemon=True)
    server.start()
    assert up.wait(timeout=120)
    try:
        outcome = run_study(Options(profile=str(spec), root=str(tmp_path / "out"), tracking_uri=url,
                                    study_name="outage"))
    finally:
        study_done.set()
    assert [event for event, _ in log][:2] == ["down", "up"], "the server was never stopped mid-study"
    assert outcome.exit_code == 0 and sorted(r.status for r in outcome.rows) == ["done", "done"], outcome.rows

    with mlflow_server(store, port=port):
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("coupled-vae-studies")
        runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(Tag.ROLE) == Role.TRIAL]
        assert len(runs) == 2
        for run in runs:
            assert run.info.status == "FINISHED" and run.data.tags[Tag.OUTCOME] == "done"
            for key in ("val_nll", "val_kl", "train_loss"):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert sorted(steps) == [10, 20, 30, 40, 50, 60, 70, 80], (key, steps)
    server.join(timeout=60)

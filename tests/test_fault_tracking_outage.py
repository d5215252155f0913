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

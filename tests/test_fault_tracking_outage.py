"""Fault scenario: the MLflow server goes away mid-trial and comes back (a real server on
loopback, stopped and restarted on the same port and store, at trial evaluations). A trial's TrialRun keeps training:
each evaluation's metrics wait in a bounded buffer (every attempt fails fast instead of stalling
in the client's growing retry waits), and once the server answers the backlog arrives in order,
each step once."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import yaml
from ray import tune

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


_servers: dict[int, contextlib.ExitStack] = {}  # port -> the running server (this process's)
_events: list[tuple[str, int]] = []  # ("down" | "up", the trial evaluation that triggered it)


class OutageAt(tune.Callback):
    """Stops the tracking server when a trial reports its ``down_at``-th evaluation and starts it
    again (same port and store) when one reports its ``up_at``-th: the outage comes at events the
    study exposes, and trials log the evaluations between them while the server is away."""

    def __init__(self, store: Path, port: int, down_at: int, up_at: int):
        self.store, self.port, self.down_at, self.up_at = store, port, down_at, up_at

    def on_trial_result(self, iteration, trials, trial, result, **info):
        evaluation = int(result.get("training_iteration", 0))
        if evaluation >= self.down_at and not _events:
            _servers.pop(self.port).close()
            _events.append(("down", evaluation))
        elif evaluation >= self.up_at and [e for e, _ in _events] == ["down"]:
            _servers[self.port] = serve(self.store, self.port)
            _events.append(("up", evaluation))


def serve(store: Path, port: int) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(mlflow_server(store, port=port))
    return stack


def test_a_study_survives_a_tracking_server_outage_with_complete_histories(tmp_path, monkeypatch):
    """The whole study against a real server that is stopped mid-study (when a trial reports its
    2nd of 8 evaluations) and restarted on the same port and store (when one reports its 3rd):
    the study completes, every trial run is FINISHED with its outcome, and every metric history
    has each evaluation exactly once."""
    from mlflow import MlflowClient
    from test_fault_divergence import tiny_spec

    from studies.record import Role, Tag
    from studies.runner import Options, run_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port, store = free_port(), tmp_path / "server"
    url = f"http://127.0.0.1:{port}"
    spec = tiny_spec(tmp_path / "outage.yaml", [{"preset": "vae"}, {"preset": "vae", "train.seed": 1}], steps=80)
    # no ASHA stop (its only rung is the last evaluation): the two seeds differ, and this test is
    # about both trials' complete histories
    raw = yaml.safe_load(spec.read_text())
    raw["scheduler"]["grace_period"] = 8
    spec.write_text(yaml.safe_dump(raw))
    _events.clear()
    _servers[port] = serve(store, port)
    try:
        outcome = run_study(Options(profile=str(spec), root=str(tmp_path / "out"), tracking_uri=url,
                                    study_name="outage", callbacks=(OutageAt(store, port, down_at=2, up_at=3),)))
    finally:
        if port in _servers:
            _servers.pop(port).close()
    assert [event for event, _ in _events] == ["down", "up"], _events
    assert outcome.exit_code == 0 and sorted(r.status for r in outcome.rows) == ["done", "done"], outcome.rows
    assert sorted(r.seed for r in outcome.rows) == [0, 1]

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

"""mlflow/server.py for real: a server on 127.0.0.1 (free port, SQLite backend and a local
artifacts destination under a temp dir), a run with a metric and an artifact logged through the
artifact proxy, the Host-header check, and the one-line refusals for bad input.

The server (the shared `mlflow_server` fixture) has its whole process group killed at teardown,
and the teardown checks that nothing of it survives."""
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from processes import MLFLOW_LAUNCHER, env_without_mlflow, free_port


def _run_launcher(*args, env):
    return subprocess.run(
        [sys.executable, str(MLFLOW_LAUNCHER), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_run_metric_and_artifact_round_trip_through_proxy(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    client = mlflow.MlflowClient(tracking_uri=mlflow_server["url"])
    experiment_id = client.create_experiment("cluster-smoke")
    run = client.create_run(experiment_id, run_name="trial-0")
    run_id = run.info.run_id
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri

    for step, value in enumerate([3.5, 2.25]):
        client.log_metric(run_id, "val_nll", value, step=step)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    payload = os.urandom(4096)
    (checkpoint / "weights.bin").write_bytes(payload)
    client.log_artifacts(run_id, str(checkpoint), artifact_path="checkpoint")
    client.set_terminated(run_id)

    history = client.get_metric_history(run_id, "val_nll")
    assert [(m.step, m.value) for m in history] == [(0, 3.5), (1, 2.25)]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/weights.bin"]

    downloaded = Path(client.download_artifacts(run_id, "checkpoint/weights.bin", str(tmp_path / "dl")))
    assert downloaded.read_bytes() == payload

    # The bytes went through the server into the configured destination, not to a client-side dir.
    stored = list(mlflow_server["artifacts"].rglob("weights.bin"))
    assert len(stored) == 1 and stored[0].read_bytes() == payload
    assert not (mlflow_server["cwd"] / "mlartifacts").exists()
    assert not (mlflow_server["cwd"] / "mlruns").exists()


def test_foreign_host_header_is_rejected(mlflow_server):
    request = urllib.request.Request(
        f"{mlflow_server['url']}/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Host": "attacker.example.com"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 403

    allowed = urllib.request.Request(
        f"{mlflow_server['url']}/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Host": f"localhost:{mlflow_server['port']}"},
    )
    with urllib.request.urlopen(allowed, timeout=10) as response:
        assert response.status == 200


@pytest.fixture
def valid_env(tmp_path):
    return env_without_mlflow(
        CVAE_MLFLOW_BACKEND_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        CVAE_MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
    )


def _assert_one_line_refusal(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mlflow/server.py: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def test_busy_port_is_one_line_error_and_the_running_server_keeps_serving(mlflow_server, valid_env):
    started = time.monotonic()
    result = _run_launcher("--host", "127.0.0.1", "--port", str(mlflow_server["port"]), env=valid_env)
    assert result.returncode == 2
    _assert_one_line_refusal(result, f"port {mlflow_server['port']} on 127.0.0.1 is already in use")
    assert time.monotonic() - started < 20, "refused before starting a server"
    with urllib.request.urlopen(f"{mlflow_server['url']}/health", timeout=10) as response:
        assert response.status == 200


def test_wildcard_bind_without_allowed_hosts_is_refused(valid_env):
    started = time.monotonic()
    result = _run_launcher("--host", "0.0.0.0", "--port", str(free_port()), env=valid_env)
    _assert_one_line_refusal(result, "0.0.0.0", "allowed-hosts")
    assert time.monotonic() - started < 20, "refusal must not start a server first"


def test_missing_backend_uri_is_refused(tmp_path):
    env = env_without_mlflow(CVAE_MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"))
    _assert_one_line_refusal(_run_launcher("--dry-run", env=env), "CVAE_MLFLOW_BACKEND_URI")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--backend-store-uri", "sqlite:///relative.db"], "absolute path"),
        (["--backend-store-uri", "file:///tmp/mlruns"], "maintenance mode"),
        (["--backend-store-uri", "postgres://u@h/db"], "postgresql://"),
        (["--host", "0.0.0.0", "--allowed-hosts", "*"], "'*'"),
        (["--host", "mlflow.internal"], "not an IP address"),
        (["--port", "70000"], "out of range"),
        (["--workers", "0"], "out of range"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_error(valid_env, args, fragment):
    _assert_one_line_refusal(_run_launcher(*args, "--dry-run", env=valid_env), fragment)


def test_explicit_allowed_hosts_get_port_forms(valid_env, tmp_path):
    result = _run_launcher(
        "--host", "0.0.0.0", "--port", "5000", "--workers", "3",
        "--allowed-hosts", "10.0.0.5,ip-10-0-0-5,localhost:5000",
        "--dry-run", env=valid_env,
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    assert command[1:4] == ["-m", "mlflow", "server"]

    def flag(name):
        return command[command.index(name) + 1]

    assert flag("--allowed-hosts") == "10.0.0.5,10.0.0.5:5000,ip-10-0-0-5,ip-10-0-0-5:5000,localhost:5000"
    assert flag("--backend-store-uri") == valid_env["CVAE_MLFLOW_BACKEND_URI"]
    assert flag("--artifacts-destination") == str(tmp_path / "artifacts")
    assert flag("--workers") == "3"
    assert "--serve-artifacts" in command


def test_default_allowed_hosts_follow_the_bind_address(valid_env):
    result = _run_launcher("--host", "10.1.2.3", "--port", "5001", "--dry-run", env=valid_env)
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    assert command[command.index("--host") + 1] == "10.1.2.3"
    assert command[command.index("--allowed-hosts") + 1].split(",") == [
        "10.1.2.3", "10.1.2.3:5001", "localhost", "localhost:5001", "127.0.0.1", "127.0.0.1:5001",
    ]


def test_the_launcher_redacts_with_the_projects_guards_and_loads_no_torch(tmp_path):
    """mlflow/server.py needs only the standard library and cvae_core.guards, which must not pull
    in torch (cvae_core/__init__.py loads its public names lazily)."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{str(MLFLOW_LAUNCHER)!r}, '--dry-run', '--backend-store-uri',"
             f" 'postgresql://ray:secret@localhost/mlflow', '--artifacts-destination', {str(tmp_path)!r}]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as exit_:\n    assert exit_.code in (0, None), exit_.code\n"
             "print('torch loaded:', 'torch' in sys.modules)\n")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env=env_without_mlflow())
    assert shown.returncode == 0, shown.stderr
    assert "postgresql://ray:***@localhost/mlflow" in shown.stdout and "secret" not in shown.stdout
    assert shown.stdout.rstrip().endswith("torch loaded: False")


def test_the_core_package_loads_its_names_on_first_use():
    probe = ("import sys, cvae_core.guards, cvae_core.errors\n"
             "assert 'torch' not in sys.modules\n"
             "import cvae_core.train\n"  # the submodule import must not rebind the package's `train`
             "from cvae_core import train, PRESETS, CvaeError\n"
             "assert callable(train) and train.__module__ == 'cvae_core.train' and 'vae' in PRESETS\n"
             "assert sorted(set(dir(cvae_core)) & {'train', 'load_model'}) == ['load_model', 'train']\n"
             "print('ok')\n")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout == "ok\n", shown.stderr

"""Security checks that run locally: MLflow's basic-auth app behind mlflow/server.py (credentials
from an owner-only file, never on the command line), credentials in a tracking URI redacted
everywhere a study writes or prints (real Ray, real authenticated server on loopback), the cluster
YAML's secrets kept owner-only, and the redaction helper itself."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from processes import MLFLOW_LAUNCHER, env_without_mlflow, mlflow_server

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-Pa55word-9f8e7d"


def _auth_file(folder: Path, mode: int = 0o600) -> Path:
    path = folder / "mlflow_auth"
    path.write_text(f"admin:{PASSWORD}\n")
    path.chmod(mode)
    return path


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    import base64

    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_redact_hides_passwords_in_any_uri():
    from cvae_core.guards import adopt_tracking_credentials, redact

    text = "see http://user:pw%40x@127.0.0.1:5000/#/x and postgresql+psycopg://ray:hunter2@db/mlflow, http://h:1"
    assert redact(text) == ("see http://user:***@127.0.0.1:5000/#/x and postgresql+psycopg://ray:***@db/mlflow, "
                            "http://h:1")
    environ: dict[str, str] = {}
    assert adopt_tracking_credentials("http://ann:pa%3Ass@127.0.0.1:5001", environ) == "http://127.0.0.1:5001"
    assert environ == {"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "pa:ss"}


@pytest.mark.parametrize("mode,message", [(0o644, "must be owned by this user and private"),
                                          (0o600, "at least 12 characters")])
def test_auth_file_must_be_private_and_strong(tmp_path, mode, message):
    path = _auth_file(tmp_path, mode)
    if mode == 0o600:
        path.write_text("admin:short\n")
    result = subprocess.run([sys.executable, str(MLFLOW_LAUNCHER), "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'm.db'}", "--artifacts-destination", str(tmp_path / "a"),
                             "--auth-file", str(path), "--dry-run"], env=env_without_mlflow(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "short" not in result.stderr + result.stdout


def test_cluster_yaml_keeps_secrets_owner_only_and_turns_mlflow_auth_on():
    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert "chmod 600 ~/.ray/auth_token ~/.cvae/mlflow_auth ~/.cvae/cluster.env" in raw["setup_commands"]
    assert raw["file_mounts"]["/home/ray/.cvae/mlflow_auth"].startswith("~/")
    assert "export CVAE_MLFLOW_AUTH_FILE=$HOME/.cvae/mlflow_auth" in raw["setup_commands"][0]
    assert PASSWORD not in (REPO / "ray_cluster.yaml").read_text()
    for command in raw["head_start_ray_commands"]:
        assert "--dashboard-host=0.0.0.0" not in command and "MLFLOW_TRACKING_PASSWORD=" not in command


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_leak_nowhere(tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from test_fault_divergence import tiny_spec
    from studies.runner import Options, run_study

    # restored afterwards: the study moves the URI's credentials into these variables
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "placeholder")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "placeholder")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with mlflow_server(tmp_path / "server", ("--auth-file", str(_auth_file(tmp_path)))) as server:
        url, port = server["url"], server["port"]
        # the server enforces authentication
        assert _status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
        assert _status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", ("admin", PASSWORD)) == 200
        secret_uri = f"http://admin:{PASSWORD}@127.0.0.1:{port}"
        spec = tiny_spec(tmp_path / "secret.yaml", [{"preset": "vae"}], steps=20)
        root = tmp_path / "out"
        outcome = run_study(Options(profile=str(spec), root=str(root), tracking_uri=secret_uri, study_name="secret"))
        out, err = capsys.readouterr()
        assert outcome.exit_code == 0 and [r.status for r in outcome.rows] == ["done"], out + err
        assert f"Compare runs: {url}/#/experiments/" in out  # the bare URI is printed

        assert PASSWORD not in out + err
        leaks = [str(p) for p in root.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
        assert not leaks, f"password written to {leaks}"
        assert any(p.name.startswith("tuner.pkl") for p in root.rglob("tuner.pkl"))  # Ray's pickle was checked

        client = MlflowClient(url)  # credentials from the environment the study set
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 2  # the parent and its one trial: the trial authenticated too
        for run in runs:
            record = repr(run.data.params) + repr(run.data.tags)
            assert PASSWORD not in record and "admin:" not in record
            local = download_artifacts(run_id=run.info.run_id, artifact_path="",
                                       dst_path=str(tmp_path / "artifacts" / run.info.run_id), tracking_uri=url)
            for path in Path(local).rglob("*"):
                assert not path.is_file() or PASSWORD.encode() not in path.read_bytes(), path
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD  # where the study put it (monkeypatch restores)

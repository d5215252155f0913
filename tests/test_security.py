"""Security checks that run locally: MLflow's basic-auth app behind mlflow/server.py (credentials
from an owner-only file, never on the command line; its users database owner-only), a study's
credentials taken from MLflow's own variables and kept off every command line it starts (real Ray,
real authenticated server on loopback), refused credentials as a one-line error before anything
starts, credentials in a tracking URI redacted everywhere a study writes or prints, the cluster
YAML's secrets kept owner-only, and the redaction helper itself."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
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


def test_redact_hides_passwords_in_any_uri(capsys):
    from cvae_core.guards import adopt_tracking_credentials, redact

    text = "see http://user:pw%40x@127.0.0.1:5000/#/x and postgresql+psycopg://ray:hunter2@db/mlflow, http://h:1"
    assert redact(text) == ("see http://user:***@127.0.0.1:5000/#/x and postgresql+psycopg://ray:***@db/mlflow, "
                            "http://h:1")
    environ: dict[str, str] = {}
    assert adopt_tracking_credentials("http://ann:pa%3Ass@127.0.0.1:5001", environ) == "http://127.0.0.1:5001"
    assert environ == {"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "pa:ss"}
    # still works, with one line recommending the variables (and never the password itself)
    note = capsys.readouterr().err.splitlines()
    assert len(note) == 1 and note[0].startswith("note: the tracking URI carries a password")
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in note[0] and "http://127.0.0.1:5001" in note[0]
    assert "pa:ss" not in note[0] and "pa%3Ass" not in note[0]
    assert adopt_tracking_credentials("http://127.0.0.1:5001", environ) == "http://127.0.0.1:5001"
    assert capsys.readouterr().err == ""  # a bare URI: no note


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
    assert raw["setup_commands"][0].startswith("mkdir -p ~/.cvae && chmod 700 ~/.cvae &&")  # the users DB's folder
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
        # the URI with a password still works, with one line recommending MLflow's variables
        assert f"note: the tracking URI carries a password, which every local user can read in the process list" \
               f" while it is on a command line; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead " \
               f"and give the URI as {url}\n" in err

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


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A real MLflow server with the basic-auth app, started with a permissive umask (0022) as
    most users have it: what the launcher creates must be owner-only anyway."""
    folder = tmp_path_factory.mktemp("auth_server")
    auth_file = _auth_file(folder)
    with mlflow_server(folder / "server", ("--auth-file", str(auth_file)), umask=0o022) as server:
        yield {**server, "auth_file": auth_file}


def test_users_database_and_auth_config_are_owner_only(auth_server):
    auth_file = auth_server["auth_file"]
    users_db = auth_file.with_name(auth_file.name + ".db")
    assert users_db.stat().st_size > 0  # MLflow created its tables (and the admin) in the file made first
    for path in (users_db, auth_file.with_name(auth_file.name + ".ini")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path}: {stat.S_IMODE(path.stat().st_mode):o}"


def _preflight(program: str, url: str, work: Path, capsys) -> tuple[int, list[str], float]:
    """The study (or `python -m analysis best`) against ``url`` in-process -> (exit code, stderr
    lines, seconds)."""
    from test_bad_input import ANALYSIS, STUDY, _call
    from test_fault_divergence import tiny_spec

    if program == STUDY:
        argv = ["--profile", str(tiny_spec(work / "spec.yaml", [{"preset": "vae"}])), "--tracking-uri", url,
                "--root", str(work / "studies_out")]
    else:
        argv = ["best", "--tracking-uri", url]
    capsys.readouterr()
    started = time.monotonic()
    code, out, err = _call(program, argv, capsys)
    return code, [line for line in err.splitlines() if line.strip()], time.monotonic() - started


@pytest.mark.parametrize("program", ["study", "analysis"])
@pytest.mark.parametrize("password, refused", [
    ("wrong-password-123", "refused the credentials of user 'admin' (from MLFLOW_TRACKING_USERNAME/PASSWORD) "
                           "(HTTP 401)"),
    (None, "refused a request without credentials (HTTP 401: it needs a login)"),
])
def test_refused_credentials_are_one_line_before_anything_starts(auth_server, program, password, refused, tmp_path,
                                                                 capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials of the developer's
    if password is None:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, lines, elapsed = _preflight(program, auth_server["url"], work, capsys)
    prefix = "analysis: error: " if program == "analysis" else "error: "
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{prefix}MLflow tracking server {auth_server['url']} {refused}; set "
                               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"), lines[0]
    assert elapsed < 5, f"took {elapsed:.1f} s"
    written = sorted(p.name for p in work.iterdir())
    assert written == (["spec.yaml"] if program == "study" else []), f"{written}: written before the check"


def test_right_credentials_from_the_environment_pass_the_preflight_and_reach_mlflow(auth_server, monkeypatch):
    from mlflow import MlflowClient

    from cvae_core.errors import CvaeError
    from cvae_core.guards import check_tracking_server

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    check_tracking_server(auth_server["url"])
    assert MlflowClient(auth_server["url"]).search_experiments(max_results=1)  # MLflow reads the same variables
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD + "x")
    with pytest.raises(CvaeError, match="refused the credentials of user 'admin'"):
        check_tracking_server(auth_server["url"])


class CommandLineWatch:
    """Reads every process's /proc/PID/cmdline (what any local user can read) every 0.1 s in a
    thread: the command lines that contain ``secret``, and the Ray worker titles seen."""

    def __init__(self, secret: str):
        self.secret = secret.encode()
        self.leaks: set[str] = set()
        self.ray_titles: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
                except OSError:
                    continue
                text = cmdline.replace(b"\0", b" ").decode(errors="replace")
                if self.secret in cmdline:
                    self.leaks.add(f"{entry.name}: {text[:300]}")
                if text.startswith("ray::"):
                    self.ray_titles.add(text.split()[0])
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.mark.slow
def test_credentials_only_in_the_environment_reach_the_trials_and_no_command_line(tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    from test_fault_divergence import tiny_spec
    from studies.record import Role, Tag
    from studies.runner import Options, run_study

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with mlflow_server(tmp_path / "server", ("--auth-file", str(_auth_file(tmp_path)))) as server:
        spec = tiny_spec(tmp_path / "envauth.yaml", [{"preset": "vae"}], steps=20)
        root = tmp_path / "out"
        with CommandLineWatch(PASSWORD) as watch:
            outcome = run_study(Options(profile=str(spec), root=str(root), tracking_uri=server["url"],
                                        study_name="envauth"))
        out, err = capsys.readouterr()
        assert outcome.exit_code == 0 and [r.status for r in outcome.rows] == ["done"], out + err
        assert not watch.leaks, f"password on a command line: {watch.leaks}"
        # the watch saw the study's Ray processes, the trial's among them (Ray titles a function
        # trainable's actor ImplicitFunc)
        assert any("ImplicitFunc" in title for title in watch.ray_titles), watch.ray_titles
        assert "note: the tracking URI carries a password" not in err and PASSWORD not in out + err
        assert not [p for p in root.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]

        client = MlflowClient(server["url"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 2  # the parent and its one trial: the trial's worker authenticated too
        trial = next(r for r in runs if r.data.tags.get(Tag.ROLE) == Role.TRIAL)
        assert "val_nll" in trial.data.metrics

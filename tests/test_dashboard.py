"""Optuna's own dashboard, the optional ``dashboard`` extra (``pip install -e ".[dashboard]"``).

On a real tiny study (conftest's ``tiny_study``): the study's last lines print the command that
serves its Optuna storage, and that command, run as printed from another folder, and ``python -m
analysis dashboard`` both serve the study on loopback: ``/api/studies`` names it and its detail
holds every trial of the persisted study. Each server is started in a process group of its own
and stopped by it. Without the extra, the command stops with one line and exit status 2."""
from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from processes import env_without_mlflow, free_port, kill_group

from studies.record import DASHBOARD_INSTALL, dashboard_command, dashboard_script

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120  # imports Optuna and opens the storage; minutes on a loaded 2-core machine
NOT_INSTALLED = f"analysis: error: optuna-dashboard is not installed: {DASHBOARD_INSTALL}\n"

needs_extra = pytest.mark.skipif(dashboard_script() is None,
                                 reason=f"the dashboard extra is not installed ({DASHBOARD_INSTALL}; CI installs it)")


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def _serving(argv: list[str], port: int, log: Path, cwd: Path):
    """Run ``argv`` (a dashboard on ``port``) in a process group of its own; yield its base URL once
    ``/api/studies`` answers; on exit stop the group and check that nothing of it is left."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env_without_mlflow(),
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _get_json(f"{url}/api/studies")
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/api/studies after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        survivors = kill_group(proc)
    assert not survivors, f"dashboard processes survived: {survivors}"
    assert proc.returncode is not None
    with pytest.raises(OSError):  # nothing listens any more
        _get_json(f"{url}/api/studies")


def _served_study(url: str, name: str) -> tuple[dict, list]:
    """-> (the study's entry in /api/studies, its trials from /api/studies/<id>)."""
    studies = _get_json(f"{url}/api/studies")["study_summaries"]
    (entry,) = [s for s in studies if s["study_name"] == name]
    return entry, _get_json(f"{url}/api/studies/{entry['study_id']}")["trials"]


def _persisted_trials(tiny_study) -> int:
    import optuna

    storage = f"sqlite:///{tiny_study.root / tiny_study.name / 'optuna.db'}"
    return len(optuna.load_study(study_name=tiny_study.name, storage=storage).trials)


def test_the_dashboard_command_is_the_installed_script_on_loopback(monkeypatch):
    script = dashboard_script()
    if script is not None:
        assert Path(script).is_absolute() and Path(script).is_file() and Path(script).name == "optuna-dashboard"
        assert dashboard_command("sqlite:////s/optuna.db", port=8123) == [
            script, "sqlite:////s/optuna.db", "--host", "127.0.0.1", "--port", "8123"]
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as if the extra were not installed
    assert dashboard_script() is None and dashboard_command("sqlite:////s/optuna.db") is None


def test_without_the_extra_the_command_stops_with_one_line(tmp_path):
    store = tmp_path / "mlflow.db"
    hide = ("import sys; sys.modules['optuna_dashboard'] = None; "  # the package cannot be imported or found
            "from analysis.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", hide, "dashboard", "--tracking-uri", f"sqlite:///{store}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env_without_mlflow(), timeout=120)
    assert (done.returncode, done.stderr, done.stdout) == (2, NOT_INSTALLED, "")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the store


@pytest.mark.parametrize("port, message", [("0", "--port must be in 1..65535, got 0"),
                                           ("70000", "--port must be in 1..65535, got 70000"),
                                           ("web", "argument --port: invalid int value: 'web'")])
def test_a_bad_port_is_one_line(tmp_path, port, message):
    done = subprocess.run([sys.executable, "-m", "analysis", "dashboard", "--port", port,
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, cwd=REPO, env=env_without_mlflow(), timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_extra
def test_the_last_lines_print_a_dashboard_command_that_serves_the_study(tiny_study, tmp_path):
    (line,) = [line for line in tiny_study.out.splitlines() if line.startswith("Dashboard:")]
    argv = shlex.split(line.removeprefix("Dashboard:").split("#", 1)[0])  # the comment says which URL to open
    storage = f"sqlite:///{tiny_study.root / tiny_study.name / 'optuna.db'}"
    assert argv == [dashboard_script(), storage, "--host", "127.0.0.1", "--port", "8080"], line
    assert f"Optuna study: {tiny_study.name} in {storage}" in tiny_study.out
    port = free_port()  # not 8080: whatever else this machine runs
    argv[-1] = str(port)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with _serving(argv, port, tmp_path / "dashboard.log", cwd=elsewhere) as url:
        entry, trials = _served_study(url, tiny_study.name)
        assert entry["directions"] == ["minimize"]
        assert len(trials) == _persisted_trials(tiny_study) == 2  # the TPE proposals (the VAE baseline is not Optuna's)


@pytest.mark.slow
@needs_extra
def test_analysis_dashboard_serves_the_study_the_mlflow_record_names(tiny_study, tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "analysis", "dashboard", "--tracking-uri", tiny_study.uri,
            "--study", tiny_study.name, "--port", str(port)]
    with _serving(argv, port, tmp_path / "analysis-dashboard.log", cwd=REPO) as url:
        _, trials = _served_study(url, tiny_study.name)
        assert len(trials) == _persisted_trials(tiny_study)
        assert {t["state"] for t in trials} <= {"Complete", "Pruned"}
    log = (tmp_path / "analysis-dashboard.log").read_text()
    assert f"open http://127.0.0.1:{port}/dashboard/" in log, log


def test_a_study_without_a_recorded_optuna_storage_is_one_line(tmp_path):
    import mlflow
    from test_analysis import EXPERIMENT, log_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    log_study(client, client.create_experiment(EXPERIMENT), name="old-study", optuna_storage="")
    done = subprocess.run([sys.executable, "-m", "analysis", "dashboard", "--tracking-uri", uri],
                          capture_output=True, text=True, cwd=REPO, env=env_without_mlflow(), timeout=120)
    expected = NOT_INSTALLED if dashboard_script() is None else (
        "analysis: error: study 'old-study': the study run has no optuna.storage / optuna.study_name tags\n")
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == expected.rstrip("\n"), done.stderr
    assert "Traceback" not in done.stderr

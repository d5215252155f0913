"""Fault scenario: two study drivers started at the same instant in one folder (same --root, same
fresh mlflow.db, same spec). Each driver is a real process running the study set-up (folder, lock,
MLflow experiment and parent run) and released by one go-file, so both hit MLflow's first use of
the fresh SQLite store, and the clock's second, together.

* default names: both succeed under distinct names, with one parent run each;
* the same --study-name: one succeeds, the other refuses at once with a clear message; never a
  crash, a shared study folder or a second parent run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DRIVER = r'''
import json, sys, time
from pathlib import Path
from cvae_core.errors import CvaeError
from studies.options import Options, StudyError, apply_flags
from studies.runner import create_study
from studies.spec import load_spec

spec_path, root, uri, name, go = sys.argv[1:6]
options = Options(profile=spec_path, root=root, study_name=name or None)
spec = apply_flags(load_spec(spec_path), options)
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.001)
try:
    state = create_study(spec, options, Path(root), uri, str(Path(root) / "ray_results"))
    time.sleep(2)  # hold the study (and its lock) as a running driver does
    result = {"ok": state.study_name, "parent": state.parent_run_id, "folder": state.folder}
except (CvaeError, StudyError) as exc:
    result = {"refused": str(exc)}
print("RESULT " + json.dumps(result), flush=True)
'''


def _spec(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "twin", "base": {"preset": "coupled-vae", "dataset": "ptb", "scale": "quick",
                                 "overrides": {"train.steps": 20, "train.eval_every": 10}},
        "space": "lambda", "grid": "table3", "search": "tpe", "baselines": [{"preset": "vae"}],
        "objectives": ["val_nll"], "budget": {"num_samples": 1, "seeds": 1, "seed": 0}}))
    return path


def _race(tmp_path: Path, name: str) -> tuple[list[dict], str]:
    root, go = tmp_path / "out", tmp_path / f"go-{name or 'default'}"
    root.mkdir(exist_ok=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(_spec(tmp_path / "twin.yaml")), str(root), uri, name,
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Traceback" not in err, err
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
    return results, uri


def _parents(uri: str, study: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("coupled-vae-studies")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`cvae.study` = '{study}' and tags.`cvae.role` = 'study'")


def test_two_drivers_at_once_get_distinct_studies_or_a_clear_refusal(tmp_path):
    # default names, fresh mlflow.db: both set up, under distinct names
    results, uri = _race(tmp_path, "")
    assert all("ok" in r for r in results), results
    names = {r["ok"] for r in results}
    assert len(names) == 2 and all(n.startswith("twin-") for n in names)
    for result in results:
        assert (Path(result["folder"]) / "study.json").is_file()
        assert [p.info.run_id for p in _parents(uri, result["ok"])] == [result["parent"]]

    # the same --study-name: one wins, the other refuses in one line; one parent run only
    results, uri = _race(tmp_path, "shared")
    winners = [r for r in results if "ok" in r]
    refusals = [r["refused"] for r in results if "refused" in r]
    assert len(winners) == 1 and len(refusals) == 1, results
    assert ("is being run by another driver" in refusals[0] or "already exists" in refusals[0]) and \
        "\n" not in refusals[0]
    assert len(_parents(uri, "shared")) == 1

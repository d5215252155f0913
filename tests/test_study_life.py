"""A study's life from the command line, on real tiny studies (local Ray, SQLite MLflow, Optuna):

* ``--resume STUDY --extend N`` adds N configurations to a finished study: the same Optuna study
  (its sampler sees every earlier trial), the same MLflow parent run and summary, ranks
  recomputed over all trials, nothing earlier trained again;
* ``--warm-start STUDY:top=K`` starts a new study with the best K feasible configurations of an
  earlier one enqueued in its Optuna study, and says so in the record and in ``analysis``;
* bad input for either is one line, exit 2, and writes nothing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from studies.spaces import lambda_space
from test_study_commands import _env, _run_sweep

pytestmark = pytest.mark.slow

STUDY = "life"


def _summary(cwd: Path, name: str) -> dict:
    return json.loads((cwd / "studies_out" / name / "summary.json").read_text())


def _child_runs(cwd: Path, summary: dict) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([r.info.experiment_id for r in [client.get_run(summary["parent_run_id"])]],
                              filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    return {r.data.tags["ray_trial_id"]: r for r in runs}


def _config(params: dict) -> dict:
    """A lambda-space trial's configuration, as the study searcher builds it from its parameters."""
    return {**params, **(lambda_space(FixedTrial(params)) or {})}


def _without_seed(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("train.seed", "preset")}


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> Path:
    """A finished TPE study: the VAE baseline and 2 Optuna proposals, one seed."""
    cwd = tmp_path_factory.mktemp("life")
    result = _run_sweep(cwd, "--num-samples", "2", "--study-name", STUDY)
    assert result.returncode == 0, result.stdout[-4000:]
    return cwd


def test_extend_adds_configurations_to_a_finished_study(finished_study):
    cwd = finished_study
    before = _summary(cwd, STUDY)
    assert before["counts"]["done"] == 3 and before["extensions"] == []
    runs_before = _child_runs(cwd, before)
    study = optuna.load_study(study_name=STUDY, storage=before["optuna_storage"])
    trials_before = [(t.params, t.values) for t in study.trials]
    assert len(trials_before) == 2

    result = _run_sweep(cwd, "--resume", STUDY, "--extend", "2")
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"Extending study {STUDY} by 2 configuration(s)" in result.stdout

    after = _summary(cwd, STUDY)
    assert after["status"] == "completed" and after["counts"]["done"] == 5
    assert [e["num_samples"] for e in after["extensions"]] == [2]
    # ranked again over all five trials, the earlier ones unchanged
    values = [t["best"]["val_nll"] for t in after["trials"]]
    assert values == sorted(values)
    earlier = {t["trial_id"]: t["best"] for t in before["trials"]}
    assert {t["trial_id"]: t["best"] for t in after["trials"] if t["trial_id"] in earlier} == earlier
    # no configuration trained twice
    configs = [json.dumps(_without_seed(t["config"]), sort_keys=True) for t in after["trials"]]
    assert len(set(configs)) == 5, configs

    # the same Optuna study: the earlier trials as they were, two new configurations after them
    study = optuna.load_study(study_name=STUDY, storage=after["optuna_storage"])
    assert [(t.params, t.values) for t in study.trials[:2]] == trials_before
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    proposed = {json.dumps(_config(t.params), sort_keys=True) for t in study.trials}
    assert len(proposed) == 4 and proposed <= set(configs)

    # the same MLflow parent run: the earlier child runs untouched, two new ones beside them
    runs_after = _child_runs(cwd, after)
    assert len(runs_after) == 5 and set(runs_before) <= set(runs_after)
    for trial_id, run in runs_before.items():
        assert runs_after[trial_id].info.run_id == run.info.run_id
        assert runs_after[trial_id].info.end_time == run.info.end_time
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    parent = client.get_run(after["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cvae.extensions"] == "2" and parent.data.metrics["n_done"] == 5
    analysis = subprocess.run([sys.executable, "-m", "analysis", "table", "--tracking-uri",
                               f"sqlite:///{cwd / 'mlflow.db'}", "--study", STUDY], cwd=cwd, env=_env(), text=True,
                              capture_output=True, timeout=300)
    assert analysis.returncode == 0, analysis.stderr
    assert "extended with --extend by 2 configuration(s)" in analysis.stderr


def test_warm_start_enqueues_the_best_configurations_of_an_earlier_study(finished_study):
    cwd = finished_study
    source = _summary(cwd, STUDY)
    # the source's best two coupled configurations (the VAE is this study's baseline, not a point of its space)
    coupled = [t for t in source["trials"] if t["config"].get("preset", "coupled-vae") == "coupled-vae"]
    expected = [_without_seed(t["config"]) for t in sorted(coupled, key=lambda t: t["best"]["val_nll"])[:2]]

    result = _run_sweep(cwd, "--num-samples", "2", "--study-name", "warm", "--warm-start", f"{STUDY}:top=2",
                        "--seed", "5")
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"Warm start from {STUDY}: its best 2 feasible configuration(s) first" in result.stdout

    warm = _summary(cwd, "warm")
    assert warm["warm_start"] == f"{STUDY}:top=2"
    study = optuna.load_study(study_name="warm", storage=warm["optuna_storage"])
    first = study.trials[:2]
    assert [_without_seed(_config(t.params)) for t in first] == expected
    assert [t.user_attrs.get("warm_start_from") for t in first] == [STUDY, STUDY]
    # trained again in this study (here: at another training seed), never copied from the earlier one
    ran = {json.dumps(_without_seed(t["config"]), sort_keys=True): t for t in warm["trials"]}
    earlier = {json.dumps(_without_seed(t["config"]), sort_keys=True): t for t in source["trials"]}
    for config in map(lambda c: json.dumps(c, sort_keys=True), expected):
        assert ran[config]["seed"] == 5 and ran[config]["evaluations"] >= 1
        assert ran[config]["best"]["val_nll"] != earlier[config]["best"]["val_nll"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    assert client.get_run(warm["parent_run_id"]).data.tags["cvae.warm_start"] == f"{STUDY}:top=2"
    analysis = subprocess.run([sys.executable, "-m", "analysis", "table", "--tracking-uri",
                               f"sqlite:///{cwd / 'mlflow.db'}", "--study", "warm"], cwd=cwd, env=_env(), text=True,
                              capture_output=True, timeout=300)
    assert analysis.returncode == 0, analysis.stderr
    assert f"seeded from study '{STUDY}' (top=2, --warm-start)" in analysis.stderr


@pytest.mark.parametrize("args, message", [
    (["--warm-start", "nosuch"], "--warm-start nosuch: no study nosuch under"),
    (["--warm-start", f"{STUDY}:top=0"], "top must be at least 1, got 0"),
    (["--warm-start", f"{STUDY}:best=2"], "expected STUDY or STUDY:top=K"),
    (["--num-samples", "-1"], "--num-samples must be at least 0"),
    (["--extend", "1"], "name it with --resume STUDY"),
    (["--resume", STUDY, "--extend", "-1"], "--extend must be at least 1"),
    (["--resume", "nosuch", "--extend", "1"], "no study to resume"),
    (["--resume", "grid-copy", "--extend", "1"], "is a grid study: every cell has run"),
])
def test_bad_input_is_one_line_and_writes_nothing(finished_study, args, message):
    cwd = finished_study
    grid = cwd / "studies_out" / "grid-copy"
    if not grid.exists():  # a finished study whose saved spec is a grid
        shutil.copytree(cwd / "studies_out" / STUDY, grid)
        state = json.loads((grid / "study.json").read_text())
        state.update(study_name="grid-copy", folder=str(grid))
        state["spec"].update(search="grid", grid="coupling_effect")
        (grid / "study.json").write_text(json.dumps(state))
    before = _tree(cwd)
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "studies" / "lambda_sweep.py"),
                             "--search", "tpe", *args], cwd=cwd, env=_env(), text=True, capture_output=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert _tree(cwd) == before

"""`python -m analysis best` on real tiny checkpoints: the study layout is written by a training
callback (as the study service does: every evaluation's metrics to the trial's MLflow run, the
best checkpoint as the ``checkpoint/`` artifact, uploaded by the study service's own code as its
evaluation-only copy; one trial uploads a full checkpoint, as runs logged by older versions hold
one), into a SQLite store and through a real ``mlflow server`` with proxied artifacts."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY
from test_analysis import EXPERIMENT, config_id, log_study, run_cli

from cvae_core.config import build_config
from cvae_core.train import train

REPO = Path(__file__).resolve().parents[1]
STUDY = "best_sweep-20261124-090000"
# --limit/--n-samples keep the evaluation to seconds; BLEU/Dist/gradient norms on, kept tiny
EVAL_ARGS = ("--split", "test", "--n-samples", "4", "--mi-samples", "4", "--limit", "24", "--seed", "3")
EXTRA_ARGS = ("--bleu-samples", "1", "--dist-samples", "16", "--max-steps", "12")


def train_trial(client, experiment_id: str, parent_id: str, preset: str, seed: int, out: Path, data_dir: Path,
                full_upload: bool = False, **overrides) -> dict:
    """Train a tiny model; a callback logs each evaluation to the trial's run; log the best checkpoint
    (the study service's evaluation-only upload, or with ``full_upload`` the whole directory)."""
    from mlflow.entities import Metric, Param

    from cvae_core.checkpoint import export_for_evaluation
    from studies.tracking import TrialRun

    config = build_config(preset, "text", "quick", {**TINY, "data.data_dir": str(data_dir), "train.seed": seed,
                                                    **overrides})
    params = {k: str(v) for k, v in config.flat().items()}
    tags = {"mlflow.parentRunId": parent_id, "cvae.role": "trial", "cvae.study": STUDY,
            "ray_trial_id": f"{preset}_{seed}", "cvae.preset": preset, "cvae.dataset": "text",
            "cvae.seed": str(seed), "cvae.code_version": "0.1.0", "cvae.config_id": config_id(params)}
    run_id = client.create_run(experiment_id, run_name=f"{preset}-seed{seed}", tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])

    def log_evaluation(metrics: dict[str, float], checkpoint: Path) -> None:
        step = int(metrics["step"])
        client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), step)
                                          for k, v in metrics.items() if v is not None and math.isfinite(v)])

    result = train(config, out, callbacks=[log_evaluation], log=lambda _: None)
    if full_upload:
        client.log_artifacts(run_id, str(result.best_checkpoint), artifact_path="checkpoint")
        uploaded = result.best_checkpoint
    else:
        assert TrialRun(client, run_id, set()).upload(out / "train.log", result.best_checkpoint)
        uploaded = export_for_evaluation(result.best_checkpoint, out / "uploaded")  # the same bytes
    client.set_terminated(run_id)
    return {"run_id": run_id, "checkpoint": uploaded,
            "best_val_nll": min(m["val_nll"] for m in result.history)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir):
    """Three tiny trials (vae, coupled-vae at two λ_m) in a SQLite store; the best is known from training."""
    import mlflow

    root = tmp_path_factory.mktemp("best_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    parent = log_study(client, experiment_id, name=STUDY)
    trials = [train_trial(client, experiment_id, parent, "vae", 0, root / "vae", tiny_data_dir, full_upload=True),
              train_trial(client, experiment_id, parent, "coupled-vae", 0, root / "cvae1", tiny_data_dir,
                          **{"coupling.lambda_m": 0.1}),
              train_trial(client, experiment_id, parent, "coupled-vae", 0, root / "cvae2", tiny_data_dir,
                          **{"coupling.lambda_m": 1.0})]
    return {"uri": uri, "root": root, "client": client, "experiment_id": experiment_id, "trials": trials}


def _manifest(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "manifest.json").read_text())


def _cvae_evaluate(checkpoint: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "cvae_core.cli", "evaluate", str(checkpoint), *EVAL_ARGS,
                             "--bleu", "--dist", "--grad-norms", *EXTRA_ARGS, "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_best_evaluates_the_right_checkpoint_logs_it_and_registers_it(trained, tmp_path):
    best = min(trained["trials"], key=lambda t: t["best_val_nll"])
    result = run_cli("best", "--tracking-uri", trained["uri"], "--metric", "val_nll", *EVAL_ARGS, *EXTRA_ARGS,
                     "--out", str(tmp_path / "download"), "--json", "--register")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(result.stdout)
    downloaded = tmp_path / "download" / "checkpoint"
    assert _manifest(downloaded) == _manifest(best["checkpoint"])  # the right run's checkpoint, byte for byte
    assert f"best run by val_nll (min): {best['run_id']}" in result.stderr
    assert "evaluating on test (first 24 sentences)" in result.stderr and "evaluation done in" in result.stderr
    assert "An input example was not provided" not in result.stderr  # MLflow's noise about the signed model

    # the same numbers as `cvae evaluate` on the same checkpoint with the same settings
    assert evaluation == _cvae_evaluate(downloaded)
    assert {"nll", "kl", "ppl", "mi_loo", "mi_batch", "au", "bleu1", "bleu2", "dist1", "dist2", "grad_rec",
            "dh_de"} <= set(evaluation)
    assert evaluation["fingerprint"]["n_samples"] == 4 and evaluation["fingerprint"]["split"] == "test"

    client = trained["client"]
    logged = client.search_runs([trained["experiment_id"]], "tags.`cvae.role` = 'evaluation'")
    assert len(logged) == 1
    run = logged[0]
    assert run.data.tags["cvae.source_run_id"] == best["run_id"]
    assert run.data.tags["mlflow.parentRunId"] == best["run_id"]
    assert run.data.metrics["test_nll"] == pytest.approx(evaluation["nll"])
    assert run.data.metrics["test_bleu1"] == pytest.approx(evaluation["bleu1"])
    assert run.data.params["n_samples"] == "4"
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation.json", str(tmp_path))).read_text())
    assert stored == evaluation

    version = client.get_model_version_by_alias("coupled-vae", "champion")
    # the champion is an MLflow Model (a pyfunc around the checkpoint), made from the best trial run
    assert version.run_id == best["run_id"] and version.source.startswith("models:/")
    assert version.tags["test_nll"] == f"{evaluation['nll']:.4f}"
    assert version.tags["cvae.evaluation_run_id"] == run.info.run_id
    assert client.get_run(best["run_id"]).info.status == "FINISHED"


def _sentences(data_dir: Path, n: int) -> list[str]:
    return (data_dir / "test.txt").read_text().splitlines()[:n]


def test_the_champion_loads_as_a_pyfunc_model_and_predicts_per_sentence_nll(trained, tiny_data_dir):
    import mlflow
    import pandas as pd

    from cvae_core.checkpoint import load_model
    from cvae_core.data.batching import make_batch
    from cvae_core.runtime import seeded
    from cvae_core.metrics.likelihood import importance_sampled_nll

    mlflow.set_tracking_uri(trained["uri"])
    model = mlflow.pyfunc.load_model("models:/coupled-vae@champion")
    sentences = _sentences(tiny_data_dir, 5)
    nll = model.predict(pd.DataFrame({"sentence": sentences}), params={"n_samples": 8, "seed": 1})
    assert list(nll.columns) == ["nll", "n_tokens"] and len(nll) == 5

    best = min(trained["trials"], key=lambda t: t["best_val_nll"])
    core, _, vocab = load_model(best["checkpoint"])
    ids = [vocab.encode(s.split()) for s in sentences]
    with seeded(1):
        expected = importance_sampled_nll(core, make_batch(ids), 8)["nll"].tolist()
    assert nll["nll"].tolist() == pytest.approx(expected, rel=1e-6)
    assert nll["n_tokens"].tolist() == [len(x) + 1 for x in ids]

    again = model.predict(pd.DataFrame({"sentence": sentences}), params={"n_samples": 8, "seed": 1})
    assert again.equals(nll)  # seeded: the same request gives the same answer
    recon = model.predict(pd.DataFrame({"sentence": sentences[:2]}), params={"output": "reconstruction"})
    samples = model.predict(pd.DataFrame({"sentence": ["", "", ""]}), params={"output": "sample"})
    assert len(recon) == 2 and len(samples) == 3
    assert all(set(t.split()) <= set(vocab.itos) for t in [*recon["text"], *samples["text"]])


@pytest.mark.slow
def test_mlflow_models_serve_answers_for_the_champion(trained, tiny_data_dir, tmp_path):
    import urllib.request

    from processes import env_without_mlflow, free_port, kill_group

    port = free_port()
    # as in the README's activated shell: `mlflow models serve` starts `uvicorn` from the PATH
    venv_bin = Path(sys.executable).parent
    env = env_without_mlflow(MLFLOW_TRACKING_URI=trained["uri"], PYTHONPATH=str(REPO),
                             PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    mlflow_cli = venv_bin / "mlflow"
    proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/coupled-vae@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=open(tmp_path / "serve.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = json.dumps({"dataframe_records": [{"sentence": s} for s in _sentences(tiny_data_dir, 3)],
                           "params": {"n_samples": 4}}).encode()
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve never answered"
                time.sleep(1)
        rows = answer["predictions"]
        assert len(rows) == 3 and all(row["nll"] > 0 and row["n_tokens"] > 1 for row in rows)
    finally:
        assert not kill_group(proc)


def test_a_partial_evaluation_registers_nothing_unless_asked_and_says_what_it_rests_on(trained, tmp_path):
    from mlflow.exceptions import MlflowException

    client = trained["client"]
    result = run_cli("best", "--tracking-uri", trained["uri"], *EVAL_ARGS, "--no-bleu", "--no-dist",
                     "--no-grad-norms", "--model-name", "quick-look", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "not registered: a partial evaluation (--limit 24, --n-samples 4 < 100, --mi-samples 4 < 100)" in result.stdout
    with pytest.raises(MlflowException):
        client.get_registered_model("quick-look")
    run = client.search_runs([trained["experiment_id"]], "tags.`cvae.role` = 'evaluation'",
                             order_by=["attributes.start_time DESC"])[0]
    described = run.data.tags["cvae.evaluation"]
    assert described.startswith("test split, 24 sentences, IS-NLL/KL/PPL with N=4, MI with 4 samples; PARTIAL")
    assert run.info.run_name.endswith("-test-partial") and run.data.params["n_sentences"] == "24"

    forced = run_cli("best", "--tracking-uri", trained["uri"], *EVAL_ARGS, "--no-bleu", "--no-dist",
                     "--no-grad-norms", "--model-name", "quick-look", "--out", str(tmp_path), "--no-log", "--register")
    assert forced.returncode == 0, forced.stderr
    version = client.get_model_version_by_alias("quick-look", "champion")
    assert "PARTIAL (--limit 24" in version.tags["cvae.evaluation"]


def test_best_by_another_metric_and_the_pareto_listing(trained, tmp_path):
    by_mi = run_cli("best", "--tracking-uri", trained["uri"], "--metric", "mi_loo", *EVAL_ARGS, "--no-bleu",
                    "--no-dist", "--no-grad-norms", "--no-log", "--no-register", "--out", str(tmp_path))
    assert by_mi.returncode == 0, by_mi.stderr
    runs = {t["run_id"]: t for t in trained["trials"]}
    from analysis.runs import load_study

    frame = load_study(EXPERIMENT, tracking_uri=trained["uri"])
    expected = frame.loc[frame["best.val_mi_loo"].idxmax(), "run_id"]
    assert f"best run by val_mi_loo (max): {expected}" in by_mi.stdout
    assert "bleu1" not in by_mi.stdout and "nll " in by_mi.stdout

    pareto = run_cli("best", "--tracking-uri", trained["uri"], "--pareto")
    assert pareto.returncode == 0, pareto.stderr
    listed = [line.split()[0] for line in pareto.stdout.splitlines()[1:]]
    assert listed and set(listed) <= set(runs)
    assert min(runs, key=lambda r: runs[r]["best_val_nll"]) in listed  # the lowest NLL is always on the front


# --------------------------------------------------------------------------------------------
# A real tracking server with proxied artifacts


@pytest.mark.slow
def test_best_works_against_a_remote_server_with_proxied_artifacts(mlflow_server, trained, tmp_path):
    """The trials' checkpoints go up through the server's artifact proxy; `best` pulls one back."""
    from mlflow.entities import Metric, Param

    import mlflow

    local = trained["client"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server["url"])
    experiment_id = client.create_experiment(EXPERIMENT)
    parent = log_study(client, experiment_id, name=STUDY)
    copies = {}
    for trial in trained["trials"]:  # replay each trial's run onto the server, checkpoint included
        source = local.get_run(trial["run_id"])
        run_id = client.create_run(experiment_id, run_name=source.info.run_name,
                                   tags={**source.data.tags, "mlflow.parentRunId": parent}).info.run_id
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in source.data.metrics
                   for m in local.get_metric_history(trial["run_id"], key)]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in source.data.params.items()])
        client.log_artifacts(run_id, str(trial["checkpoint"]), artifact_path="checkpoint")
        client.set_terminated(run_id)
        assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        copies[run_id] = trial
    best_remote = min(copies, key=lambda r: copies[r]["best_val_nll"])

    result = run_cli("best", "--tracking-uri", mlflow_server["url"], *EVAL_ARGS, "--no-bleu", "--no-dist",
                     "--out", str(tmp_path / "download"), "--json", "--register")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(result.stdout)
    assert _manifest(tmp_path / "download" / "checkpoint") == _manifest(copies[best_remote]["checkpoint"])
    assert evaluation["nll"] > 0 and "grad_rec" in evaluation
    version = client.get_model_version_by_alias("coupled-vae", "champion")
    assert version.run_id == best_remote and version.source.startswith("models:/")
    mlflow.set_tracking_uri(mlflow_server["url"])
    model = mlflow.pyfunc.load_model(f"models:/coupled-vae/{version.version}")  # through the artifact proxy
    assert model.metadata.get_model_info().flavors["python_function"]
    evaluations = client.search_runs([experiment_id], "tags.`cvae.role` = 'evaluation'")
    assert [r.data.tags["cvae.source_run_id"] for r in evaluations] == [best_remote]

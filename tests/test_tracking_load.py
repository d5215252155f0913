"""A small version of bench/bench_tracking_load.py: concurrent trial-like writers against a real
MLflow server on loopback, with a SQLite and a PostgreSQL backend store. Every point a writer
had acknowledged is stored exactly once. PostgreSQL is a throwaway cluster of the test's own
(tests/processes.py private_postgres), set up by mlflow/setup_postgres.sh as on the cluster head."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_tracking_load.py"


def _bench(monkeypatch):
    # importable by name: the writers are spawned processes that import it again
    monkeypatch.syspath_prepend(str(BENCH.parent))
    return importlib.import_module(BENCH.stem)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_writers_lose_and_duplicate_nothing(backend, tmp_path, monkeypatch, request):
    if backend == "postgresql":
        # setup_postgres.sh (called by the bench) then sees, starts and uses only this cluster
        for key, value in request.getfixturevalue("postgres_cluster")["env"].items():
            monkeypatch.setenv(key, value)
    figures = _bench(monkeypatch).run_load(backend, writers=4, seconds=4, interval=0.05, workdir=tmp_path / backend)
    assert figures["acked"] > 4 and figures["errors"] == 0, figures
    assert figures["lost"] == 0 and figures["duplicates"] == 0, figures
    assert figures["stored"] == figures["acked"]

"""mlflow/setup_postgres.sh is captured with $(...) by ray_cluster.yaml and the load benchmark,
so its stdout must be the backend URI and nothing else, also when it has to start a cluster.
CI machines can come up with a stale postmaster.pid, on which pg_ctlcluster prints "Removed
stale pid file." (that line once ended up in the URI).

The script runs against a throwaway cluster (tests/processes.py private_postgres): the test
neither stops nor starts the machine's own PostgreSQL."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "mlflow" / "setup_postgres.sh"


def _clusters(env: dict[str, str]) -> list[list[str]]:
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def test_stdout_is_only_the_uri_when_a_stale_pid_file_is_removed(postgres_cluster):
    env = postgres_cluster["env"]
    [[_version, _name, _port, status, owner, data_dir, *_]] = _clusters(env)  # only the private cluster
    assert status == "down"
    pid_file = Path(data_dir) / "postmaster.pid"
    pid_file.write_text("999999\n")  # no such process: pg_ctlcluster removes it and says so
    shutil.chown(pid_file, user=owner)

    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "CVAE_MLFLOW_DB": "cvae_setup_test"})

    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"postgresql\+psycopg://\w+@/cvae_setup_test\?host=\S+\n", done.stdout), done.stdout
    assert not pid_file.exists() or pid_file.read_text().split()[0] != "999999"
    # the URI names the private socket and port, and the cluster it started is the private one
    assert done.stdout.strip().endswith(f"?host={postgres_cluster['socket_dir']}&port={postgres_cluster['port']}")
    assert _clusters(env)[0][3] == "online"

"""A study on a Ray cluster with token authentication on, set up as ray_cluster.yaml sets up its
nodes: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH naming a file with the token, exported for
`ray start --head` and for the driver (the CLI with --address).

This pytest process stays with RAY_AUTH_MODE=disabled (tests/conftest.py: a driver process
keeps its first session's auth mode), so the cluster and the driver are subprocesses with their
own environment: a HOME of their own (no ~/.ray/auth_token of the machine's user is found, and
none is written there) and no RAY_AUTH_TOKEN from the caller's shell. Clients with a wrong token,
or with auth disabled, must be refused by the cluster, so the test fails if auth is silently off.
The cluster is stopped by its process group, and the test checks that none of it survives."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from processes import free_port, group_members, kill_group
from test_fault_divergence import tiny_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
MB = 1024**2


def _descendants(pids: list[int]) -> set[tuple[int, str]]:
    """(pid, start time) of `pids` and everything below them; the start time tells a reused PID apart."""
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ... starttime
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        start[int(entry.name)] = fields[19]
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid in start and (pid, start[pid]) not in found:
            found.add((pid, start[pid]))
            todo += children.get(pid, [])
    return found


def _alive(process: tuple[int, str]) -> bool:
    try:
        fields = Path(f"/proc/{process[0]}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == process[1]


@pytest.fixture
def token_cluster(tmp_path):
    """`ray start --head` on 127.0.0.1 with token auth, in a process group and temp dir of its own.

    Yields {"address", "env"}: `env` is what a node or driver of the cluster exports (the token
    file, RAY_AUTH_MODE=token). Ray's temp dir is short (/tmp/...): its Unix socket paths must fit
    in 107 bytes, which a pytest tmp_path would not leave room for."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="cvae-ray-auth-"))
    home = tmp_path / "home"
    home.mkdir()
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH_", "MLFLOW_", "CVAE_MLFLOW_"))}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    port = free_port()
    log_path = tmp_path / "ray_start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--num-gpus=0", "--include-dashboard=false", f"--dashboard-port={free_port()}",
             f"--object-store-memory={100 * MB}", f"--memory={2048 * MB}", f"--temp-dir={ray_tmp}",
             "--disable-usage-stats"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    processes: set[tuple[int, str]] = set()
    try:
        # `ray start` returns once the node is up; the node's processes stay in its process group
        assert head.wait(timeout=180) == 0, log_path.read_text()[-3000:]
        processes = _descendants(group_members(head.pid))
        assert processes, "ray start left no processes behind"
        yield {"address": f"127.0.0.1:{port}", "env": env, "token_path": token_path, "temp_dir": ray_tmp}
    finally:
        processes |= _descendants(group_members(head.pid))  # workers started since
        survivors = kill_group(head)
        for process in processes:  # anything that left the group (none expected)
            if _alive(process):
                os.kill(process[0], signal.SIGKILL)
        time.sleep(0.5)
        escaped = [p for p in processes if _alive(p)]
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not survivors and not escaped, f"Ray processes survived teardown: {survivors} {escaped}"


def _ray_status(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), "status", "--address", address], env=env, capture_output=True,
                          text=True, timeout=120)


def test_study_runs_with_token_auth_and_the_cluster_refuses_other_clients(token_cluster, tmp_path):
    address, env = token_cluster["address"], token_cluster["env"]

    # The cluster demands the token: a wrong one and none at all (auth disabled) are refused.
    wrong_token = tmp_path / "wrong_token"
    wrong_token.write_text(secrets.token_hex(32))
    refused_wrong = _ray_status(address, {**env, "RAY_AUTH_TOKEN_PATH": str(wrong_token)})
    refused_disabled = _ray_status(address, {**env, "RAY_AUTH_MODE": "disabled"})
    for refused in (refused_wrong, refused_disabled):
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr + refused.stdout, refused
    accepted = _ray_status(address, env)
    assert accepted.returncode == 0, accepted.stderr[-3000:]

    spec = tiny_spec(tmp_path / "token_auth.yaml", [{"preset": "vae"}])
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "studies" / "lambda_sweep.py"), "--profile", str(spec), "--address", address,
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--root", str(out), "--study-name", "token-auth"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = driver.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        kill_group(driver)
        output, _ = driver.communicate()
        pytest.fail("study did not finish in time:\n" + output[-4000:])
    finally:
        assert not kill_group(driver), "study driver processes survived"

    assert driver.returncode == 0, output[-4000:]
    assert "InvalidAuthToken" not in output and "Traceback" not in output, output[-4000:]
    assert re.search(r"^\[\s*\d+:\d\d\] done\s+\w+", output, re.M), output[-4000:]
    assert (out / "token-auth").is_dir(), sorted(p.name for p in out.iterdir())
    # the driver ran on this cluster (its core-worker log is in the cluster's session), not on a Ray of its own
    assert list(token_cluster["temp_dir"].glob("session_*/logs/python-core-driver-*")), "no driver joined the cluster"

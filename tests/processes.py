"""Child processes for tests: free loopback ports, process groups that are torn down with bounded
waits and checked for survivors, a real `mlflow server` started through mlflow/server.py, a
throwaway PostgreSQL cluster (the machine's own cluster is never started or stopped by a test),
and an S3-compatible object store on loopback (moto's standalone server, from the dev extra)."""
from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MLFLOW_LAUNCHER = REPO / "mlflow" / "server.py"
MLFLOW_STARTUP_TIMEOUT_S = 90


def pump_lines(proc: subprocess.Popen, log_path: Path) -> "queue.Queue[str | None]":
    """Copy ``proc``'s stdout to ``log_path`` and into a queue, line by line, from a daemon thread;
    None follows the last line. A test reads the queue to act on a line as soon as it is printed."""
    lines: queue.Queue = queue.Queue()

    def pump():
        with open(log_path, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def follow_until_exit(proc: subprocess.Popen, lines: "queue.Queue[str | None]", timeout_s: float,
                      on_line=None) -> str:
    """Read ``lines`` (from :func:`pump_lines`) until ``proc`` has printed its last, calling
    ``on_line(line)`` on each as it comes; past ``timeout_s`` kill its group and fail the test.
    -> everything it printed."""
    import pytest

    deadline = time.monotonic() + timeout_s
    out = []
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            out.append(line)
            if on_line:
                on_line(line)
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"{proc.args[1] if len(proc.args) > 1 else proc.args} did not finish in {timeout_s:g} s:\n"
                        + "".join(out[-60:]))
    proc.wait(timeout=30)
    return "".join(out)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without_mlflow(**extra: str) -> dict[str, str]:
    """This process's environment minus any MLflow settings of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVAE_MLFLOW_", "MLFLOW_"))}
    env.update(extra)
    return env


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def kill_group(proc: subprocess.Popen) -> list[int]:
    """SIGTERM the process group led by `proc`, SIGKILL what is left; return the survivors."""
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and group_members(proc.pid):
            proc.poll()
            time.sleep(0.2)
        if not group_members(proc.pid):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return group_members(proc.pid)


@contextlib.contextmanager
def mlflow_server(root: Path, extra_args: tuple[str, ...] = (), port: int | None = None, umask: int = -1,
                  backend_uri: str | None = None, artifacts_destination: str | None = None,
                  env: dict[str, str] | None = None):
    """mlflow/server.py on 127.0.0.1 (free port, SQLite backend and proxied artifacts under `root`
    unless `backend_uri` / `artifacts_destination` say otherwise; `extra_args` such as
    ("--auth-file", PATH) are passed on; `env` is added to the server's environment, e.g. an S3
    endpoint; `umask`, if given, is the server's).

    Yields {"url", "port", "artifacts", "cwd"}; on exit kills the whole process group (uvicorn
    workers included) and fails if any of it survives."""
    artifacts, workdir = artifacts_destination or root / "artifacts", root / "cwd"
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()  # a fixed port: the same server restarted
    env = env_without_mlflow(CVAE_MLFLOW_BACKEND_URI=backend_uri or f"sqlite:///{root / 'mlflow.db'}",
                             CVAE_MLFLOW_ARTIFACTS_DESTINATION=str(artifacts), **(env or {}))
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(MLFLOW_LAUNCHER), "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", *extra_args], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, umask=umask)  # own process group: the workers die with it
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, MLFLOW_STARTUP_TIMEOUT_S, lambda: log_path.read_text()[-3000:])
        yield {"url": url, "port": port, "artifacts": artifacts, "cwd": workdir}
    finally:
        survivors = kill_group(proc)
        assert not survivors, f"MLflow server processes survived teardown: {survivors}"


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout_s: float, output) -> None:
    """Poll ``url``/health until it answers 200; fail (with ``output()``, the server's last words)
    if ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"MLflow server exited with {proc.returncode}:\n{output()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"MLflow server not healthy after {timeout_s} s:\n{output()}")
        time.sleep(0.25)


def pg_version() -> str | None:
    """The newest PostgreSQL server version Debian's postgresql-common can create clusters for."""
    if not (shutil.which("pg_createcluster") and shutil.which("pg_lsclusters")):
        return None
    versions = [p.parent.parent.name for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    return max(versions, key=lambda v: [int(x) for x in v.split(".") if x.isdigit()], default=None)


def _cluster_processes(data_dir: Path, name: str) -> list[int]:
    """PIDs of the postmaster of `data_dir` and its children (their command lines name the data dir
    or the cluster, as in `postgres: 15/cvae_test_1a2b3c4d: checkpointer`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(data_dir) in cmdline or f"/{name}:" in cmdline:
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def private_postgres(start: bool = True):
    """A PostgreSQL cluster of its own, so that no test starts, stops or writes into the machine's.

    Created with Debian's pg_createcluster under a PG_CLUSTER_CONF_ROOT of its own (so pg_lsclusters
    and pg_ctlcluster, and therefore mlflow/setup_postgres.sh, see this cluster and no other), owned
    by the `postgres` user, with its data, configuration, log, pid file and Unix socket in one temporary
    folder, a free port and no TCP listener. Needs root (the cluster belongs to `postgres`).

    Yields {"version", "name", "data_dir", "socket_dir", "port", "owner", "env"}, where `env` holds the
    variables that point pg_* tools and mlflow/setup_postgres.sh at it. `start=False` leaves it down.
    On exit the server is stopped, the folder removed, and it fails if a server process survives."""
    version = pg_version()
    if version is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql)")
    # Not under pytest's tmp_path: its root is 0700 and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="cvae-pg-"))
    name = f"cvae_test_{secrets.token_hex(4)}"  # unique: teardown finds its processes by this name
    root.chmod(0o755)
    socket_dir, data_dir, port = root / "socket", root / "data", free_port()
    env = {"PG_CLUSTER_CONF_ROOT": str(root / "etc"), "CVAE_PG_SOCKET_DIR": str(socket_dir),
           "CVAE_PG_PORT": str(port)}
    full_env = {**os.environ, **env}

    def ctl(action: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["pg_ctlcluster", version, name, action], env=full_env,
                              capture_output=True, text=True, timeout=120, check=check)

    try:
        subprocess.run(["pg_createcluster", "--quiet", version, name, "--user", "postgres",
                        "--datadir", str(data_dir), "--socketdir", str(socket_dir),
                        "--logfile", str(root / "server.log"), "--port", str(port), "--start-conf", "manual",
                        # else pg_ctlcluster puts a pid file into /var/run/postgresql (socket_dir is postgres's)
                        "--pgoption", f"external_pid_file={socket_dir / 'server.pid'}", "--pgoption", "ssl=off"],
                       env=full_env, capture_output=True, text=True, timeout=120, check=True)
        # Unix socket only: nothing listens on a TCP port (pg_createcluster cannot write an empty value).
        (root / "etc" / version / name / "conf.d" / "no_tcp.conf").write_text("listen_addresses = ''\n")
        if start:
            ctl("start")
        yield {"version": version, "name": name, "data_dir": data_dir, "socket_dir": socket_dir,
               "port": port, "owner": "postgres", "env": env}
    finally:
        if data_dir.exists():
            ctl("stop", check=False)  # "Cluster is not running." when the test never started it
            deadline = time.monotonic() + 30
            while _cluster_processes(data_dir, name) and time.monotonic() < deadline:
                time.sleep(0.2)
        survivors = _cluster_processes(data_dir, name)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"PostgreSQL server processes of {data_dir} survived teardown: {survivors}"


S3_STARTUP_TIMEOUT_S = 60
S3_REGION = "us-east-1"


def s3_client_env(endpoint: str) -> dict[str, str]:
    """What every S3 client of the tests needs for the loopback store: boto3 (MLflow's artifact
    store) and pyarrow (Ray Tune's s3:// storage) both honour AWS_ENDPOINT_URL; MLflow's own
    MLFLOW_S3_ENDPOINT_URL names it for MLflow explicitly. The credentials are moto's dummies."""
    return {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": S3_REGION, "AWS_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true"}


def env_without_aws(env: dict[str, str]) -> dict[str, str]:
    """``env`` minus the developer's AWS settings (a profile or a real endpoint must not leak in)."""
    return {k: v for k, v in env.items() if not k.startswith("AWS_")}


@contextlib.contextmanager
def s3_server(root: Path, buckets: tuple[str, ...] = ()):
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1 as its own process group, with
    ``buckets`` created. Everything it stores is in its memory: nothing is written under a local
    folder a test could mistake for the bucket.

    Yields {"endpoint", "env" (see :func:`s3_client_env`), "client" (boto3)}; on exit kills the
    group and fails if any of it survives."""
    import boto3
    from botocore.config import Config

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = s3_client_env(endpoint)
    log_path = root / "moto.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                env={**env_without_aws(os.environ), **env}, cwd=root, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION, aws_access_key_id="testing",
                              aws_secret_access_key="testing", config=Config(retries={"max_attempts": 1}))
        deadline = time.monotonic() + S3_STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not up after {S3_STARTUP_TIMEOUT_S} s:\n"
                                       f"{log_path.read_text()[-3000:]}") from None
                time.sleep(0.25)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "env": env, "client": client}
    finally:
        survivors = kill_group(proc)
        assert not survivors, f"moto server processes survived teardown: {survivors}"

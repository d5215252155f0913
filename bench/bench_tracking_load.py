#!/usr/bin/env python
"""Tracking-server load: N concurrent writers (trial-like processes, one MLflow run each) log a
metric every INTERVAL seconds for SECONDS against a real `mlflow server` on loopback
(mlflow/server.py, 2 uvicorn workers) with a SQLite and/or a PostgreSQL backend store.

For each backend it prints the points the writers had acknowledged, the errors they saw, the
points stored (read back with get_metric_history), lost and duplicated points, throughput and
per-call latency. The limit every row is measured against: lost == 0 and duplicates == 0.

    python bench/bench_tracking_load.py                          # 16 writers, 30 s, both backends
    python bench/bench_tracking_load.py --backend sqlite --seconds 60
    python bench/bench_tracking_load.py --smoke     # the smallest settings: checks that it runs

PostgreSQL: mlflow/setup_postgres.sh starts the local server and creates the database
`cvae_load_bench` (Debian's `postgresql` package, root or passwordless sudo; psycopg 3). A cluster
that was down before the run is stopped again after it.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRIC = "val_nll"
SMOKE = {"backend": "sqlite", "writers": 2, "seconds": 2.0}  # --smoke


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_uri(backend: str, workdir: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{workdir / 'mlflow.db'}"
    done = subprocess.run(["bash", str(REPO / "mlflow" / "setup_postgres.sh")], capture_output=True, text=True,
                          env={**os.environ, "CVAE_MLFLOW_DB": "cvae_load_bench"}, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"PostgreSQL is not available: {done.stderr.strip()}")
    return done.stdout.strip()


def down_clusters() -> set[tuple[str, str]]:
    """(version, name) of the PostgreSQL clusters pg_lsclusters reports down."""
    if not shutil.which("pg_lsclusters"):
        return set()  # backend_uri says that PostgreSQL is missing
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True).stdout
    return {(f[0], f[1]) for f in (line.split() for line in out.splitlines()) if len(f) > 3 and f[3] != "online"}


def stop_clusters(clusters: set[tuple[str, str]]) -> None:
    """Stop the clusters this run started (setup_postgres.sh starts every cluster that is down)."""
    as_root = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for version, name in sorted(clusters):
        subprocess.run([*as_root, "pg_ctlcluster", version, name, "stop"], capture_output=True, timeout=120)


def start_server(uri: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CVAE_MLFLOW_"))}
    env.update(CVAE_MLFLOW_BACKEND_URI=uri, CVAE_MLFLOW_ARTIFACTS_DESTINATION=str(workdir / "artifacts"))
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "mlflow" / "server.py"), "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"MLflow server exited: {(workdir / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError("MLflow server not healthy after 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _writer(url: str, run_id: str, seconds: float, interval: float, ready, go, results) -> None:
    """One trial-like process: log METRIC at step 0, 1, 2, ... every `interval` seconds."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    acked, errors, latencies = 0, 0, []
    ready.put(run_id)
    go.wait()  # all writers start together, after every one has imported mlflow
    start_at = time.time()
    end = start_at + seconds
    step, next_at = 0, start_at
    while time.time() < end:
        t0 = time.perf_counter()
        try:
            client.log_metric(run_id, METRIC, 100.0 - step * 0.01, step=step)
            acked += 1
        except Exception:  # noqa: BLE001 - counted: what a trial would have seen
            errors += 1
        latencies.append(time.perf_counter() - t0)
        step += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.time()))
    results.put({"run_id": run_id, "acked": acked, "errors": errors, "attempted": step, "latencies": latencies})


def run_load(backend: str, writers: int, seconds: float, interval: float, workdir: Path) -> dict:
    """-> the figures of one backend (see the module docstring)."""
    workdir.mkdir(parents=True, exist_ok=True)
    were_down = down_clusters() if backend == "postgresql" else set()
    try:
        return _run_load(backend, writers, seconds, interval, workdir)
    finally:
        if were_down:
            stop_clusters(were_down - down_clusters())


def _run_load(backend: str, writers: int, seconds: float, interval: float, workdir: Path) -> dict:
    from mlflow import MlflowClient

    proc, url = start_server(backend_uri(backend, workdir), workdir)
    try:
        client = MlflowClient(url)
        experiment = client.create_experiment(f"load-{backend}-{os.getpid()}-{int(time.time() * 1000)}")
        run_ids = [client.create_run(experiment).info.run_id for _ in range(writers)]
        context = multiprocessing.get_context("spawn")
        results, ready, go = context.Queue(), context.Queue(), context.Event()
        procs = [context.Process(target=_writer, args=(url, run_id, seconds, interval, ready, go, results))
                 for run_id in run_ids]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=600)
        go.set()
        rows = [results.get(timeout=seconds + 600) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        stored = duplicates = missing = 0
        for row in rows:
            steps = [m.step for m in client.get_metric_history(row["run_id"], METRIC)]
            stored += len(steps)
            duplicates += len(steps) - len(set(steps))
            missing += row["acked"] - len(set(steps))
        latencies = sorted(x for row in rows for x in row["latencies"])
    finally:
        stop_server(proc)
    acked = sum(r["acked"] for r in rows)
    return {"backend": backend, "writers": writers, "seconds": seconds, "interval_s": interval,
            "attempted": sum(r["attempted"] for r in rows), "acked": acked, "errors": sum(r["errors"] for r in rows),
            "stored": stored, "lost": missing, "duplicates": duplicates, "stored_per_s": stored / seconds,
            "offered_per_s": writers / interval,
            "latency_p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "latency_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between one writer's points")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    print(f"{args.writers} writers x one point every {args.interval * 1000:.0f} ms for {args.seconds:g} s "
          f"(offered {args.writers / args.interval:.0f} points/s); limit: lost == 0 and duplicates == 0; "
          f"{os.cpu_count()} CPU cores")
    header = (f"{'backend':<11} {'attempted':>9} {'acked':>7} {'errors':>6} {'stored':>7} {'lost':>5} {'dup':>4} "
              f"{'stored/s':>9} {'p50 ms':>7} {'p99 ms':>7}  verdict")
    print(header)
    print("-" * len(header))
    failed = False
    with tempfile.TemporaryDirectory(prefix="cvae-load-") as tmp:
        for backend in backends:
            r = run_load(backend, args.writers, args.seconds, args.interval, Path(tmp) / backend)
            ok = r["lost"] == 0 and r["duplicates"] == 0
            failed |= not ok
            print(f"{backend:<11} {r['attempted']:>9} {r['acked']:>7} {r['errors']:>6} {r['stored']:>7} {r['lost']:>5} "
                  f"{r['duplicates']:>4} {r['stored_per_s']:>9.1f} {r['latency_p50_ms']:>7.1f} "
                  f"{r['latency_p99_ms']:>7.1f}  {'ok' if ok else 'LOST OR DUPLICATED POINTS'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The cluster layout with no shared disk, on real components on loopback: an S3 object store
(moto's server), PostgreSQL behind mlflow/server.py with ``--artifacts-destination s3://...``,
and a 2-node Ray cluster started with ``ray start`` whose nodes have their own working
directories, temp dirs and TMPDIR (the driver runs on the head, like ``ray submit``). Tune's
storage is ``--storage-path s3://...``.

A tiny study of 2 trials runs; when the trial on the worker node has reported its second
evaluation (the driver's own progress line), the worker node is lost (every process of it
SIGKILLed, as a preempted spot instance). The trial continues on the head node from its
checkpoint in the bucket, in its own MLflow run, with a gap-free metric history. Then
``python -m analysis best`` downloads the champion from the bucket (through the server's
artifact proxy) and evaluates it. Objects are listed in the bucket with boto3, and no Tune or
MLflow artifact may land in a local folder the nodes share."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from processes import env_without_aws, follow_until_exit, free_port, mlflow_server, pump_lines, s3_server
from test_fault_divergence import tiny_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("pg_lsclusters"),
                       reason="PostgreSQL is not installed (.ci/run installs it: apt-get install -y postgresql)"),
]

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
BUCKET = "cvae-object-store-test"
MB = 1024**2
STEPS, EVALS = 100, 10  # eval every 10 steps: the lost trial has evaluations left to resume
EVAL_LINE = re.compile(r"^\[\s*\d+:\d\d\] eval\s+(\w+)\s+(\d+)/(\d+)")
STUDY_TIMEOUT_S = 480


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid ...
        except OSError:
            continue
        if fields[0] != "Z":
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants. Ray's worker processes are in sessions of their own
    (a process group would miss them) but stay children of their node's raylet."""
    children, found, todo = _children_of(), [], [pid]
    while todo:
        p = todo.pop()
        if Path(f"/proc/{p}").exists():
            found.append(p)
        todo.extend(children.get(p, []))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_tree(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Node:
    """One ``ray start --block`` with its own folder: cwd, ``--temp-dir`` and TMPDIR."""

    def __init__(self, name: str, folder: Path, env: dict[str, str], args: list[str]):
        self.name, self.folder = name, folder
        (folder / "tmp").mkdir(parents=True)
        self.log = folder / "ray-start.log"
        cmd = [str(RAY), "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(folder / "ray"),
               "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * MB),
               "--memory", str(2048 * MB), "--dashboard-agent-listen-port", str(free_port()),
               "--metrics-export-port", str(free_port()), *args]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=folder, env={**env, "TMPDIR": str(folder / "tmp")},
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids: set[int] = {self.proc.pid}

    def wait_started(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start ({self.name}) failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def snapshot(self) -> list[int]:
        pids = _tree(self.proc.pid)
        self.pids.update(pids)
        return pids

    def kill(self) -> None:
        """Lose the node at once: SIGKILL every process of it (raylet, agents, trial workers)."""
        _kill_tree(self.snapshot())


def _wait_for_nodes(address: str, n: int, timeout_s: float = 90) -> None:
    from ray._raylet import GcsClient

    client = GcsClient(address=address)
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [i for i in client.get_all_node_info(timeout=10).values() if i.state == 0]  # ALIVE
        if len(alive) == n:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{len(alive)} of {n} Ray nodes registered after {timeout_s} s")
        time.sleep(0.5)


@pytest.fixture
def postgres_uri(postgres_cluster):
    """The cluster's backend store, set up by mlflow/setup_postgres.sh as the head node does, on a
    throwaway PostgreSQL cluster (conftest's postgres_cluster), never the machine's."""
    done = subprocess.run(["bash", str(REPO / "mlflow" / "setup_postgres.sh")], capture_output=True, text=True,
                          env={**os.environ, **postgres_cluster["env"], "CVAE_MLFLOW_DB": "cvae_object_store_test"},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _local_leftovers(root: Path, node_folders: list[Path]) -> list[str]:
    """Tune/MLflow artifact paths under ``root`` outside the nodes' own folders."""
    names = re.compile(r"^(checkpoint_\d+|experiment_state.*\.json|mlartifacts|ray_results|weights\.pt)$")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if any(here == f or f in here.parents for f in node_folders):
            dirnames[:] = []
            continue
        found += [str(here / n) for n in (*dirnames, *filenames) if names.match(n)]
    return found


def test_study_on_two_nodes_without_a_shared_disk_resumes_from_the_bucket(tmp_path, postgres_uri):
    from mlflow import MlflowClient

    run_id = uuid.uuid4().hex[:8]
    study, experiment = f"objstore-{run_id}", f"object-store-{run_id}"
    storage = f"s3://{BUCKET}/ray_results"
    spec_path = tiny_spec(tmp_path / "tiny_objstore.yaml", [{"preset": "vae"}], num_samples=1, steps=STEPS)
    raw = yaml.safe_load(spec_path.read_text())
    raw["scheduler"]["grace_period"] = EVALS  # ASHA stops nothing: both trials train to the end
    raw["base"]["preset"] = "coupled-vae"  # the proposal differs from the vae baseline: no tie for the champion
    spec_path.write_text(yaml.safe_dump(raw))

    # the nodes' folders: short paths (Ray's socket paths under --temp-dir must fit 107 bytes)
    nodes_root = Path(tempfile.mkdtemp(prefix="cvae-nodes-"))
    head_dir, worker_dir = nodes_root / "head", nodes_root / "worker"
    nodes: list[Node] = []
    with s3_server(tmp_path / "s3", buckets=(BUCKET,)) as s3, \
            mlflow_server(tmp_path / "mlflow", backend_uri=postgres_uri,
                          artifacts_destination=f"s3://{BUCKET}/mlartifacts", env=s3["env"]) as server:
        base = {k: v for k, v in env_without_aws(os.environ).items()
                if not k.startswith(("MLFLOW_", "CVAE_", "RAY_"))}
        # what ray_cluster.yaml gives every node: the S3 endpoint/credentials (here moto's),
        # Ray's auth mode, and the code importable by the trial workers
        env = {**base, **s3["env"], "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        gcs_port = free_port()
        address = f"127.0.0.1:{gcs_port}"
        try:
            head = Node("head", head_dir, env, ["--head", "--port", str(gcs_port), "--include-dashboard", "false",
                                                "--dashboard-port", str(free_port())])
            nodes.append(head)
            head.wait_started()
            worker = Node("worker", worker_dir, env, ["--address", address])
            nodes.append(worker)
            worker.wait_started()
            _wait_for_nodes(address, 2)
            for node in nodes:
                node.snapshot()

            client = MlflowClient(server["url"])
            removed: dict[str, str] = {}

            def on_line(line: str) -> None:
                match = EVAL_LINE.match(line)
                if removed or not match or int(match.group(2)) < 2:
                    return
                # the checkpoint of evaluation 1 is in the bucket and on Tune's record by now
                runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                          f"tags.ray_trial_id = '{match.group(1)}'")
                pid = int(runs[0].data.tags["ray.pid"])
                if pid in worker.snapshot():
                    removed.update(trial=match.group(1), node_id=runs[0].data.tags["ray.node_id"], pid=str(pid),
                                   evaluation=match.group(2))
                    worker.kill()

            driver_env = {**env, "TMPDIR": str(head_dir / "tmp")}
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "studies" / "lambda_sweep.py"), "--profile", str(spec_path),
                 "--address", address, "--tracking-uri", server["url"], "--storage-path", storage,
                 "--root", str(head_dir / "studies_out"), "--study-name", study, "--experiment", experiment],
                cwd=head_dir, env=driver_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True)
            output = follow_until_exit(proc, pump_lines(proc, tmp_path / "driver.log"), STUDY_TIMEOUT_S, on_line)
        finally:
            for node in nodes:
                node.kill()
            leftovers = _local_leftovers(nodes_root, [head_dir / "ray", worker_dir / "ray", head_dir / "tmp",
                                                      worker_dir / "tmp"])
            shutil.copytree(nodes_root, tmp_path / "nodes", ignore=shutil.ignore_patterns("sockets", "*.pt"),
                            symlinks=True, dirs_exist_ok=True)  # logs kept for a failure's diagnosis
            shutil.rmtree(nodes_root, ignore_errors=True)
        survivors = [p for node in nodes for p in node.pids if _alive(p)]
        assert not survivors, f"Ray processes survived: {survivors}"

        assert removed, "the worker's trial never reached its second evaluation:\n" + output
        assert proc.returncode == 0, output
        summary = json.loads((tmp_path / "nodes" / "head" / "studies_out" / study / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert len(summary["trials"]) == 2 and all(t["status"] == "done" for t in summary["trials"]), summary

        # MLflow (PostgreSQL): one run per trial; the lost trial continued, on the head, from the
        # checkpoint in the bucket: resumed-from tag, one gap-free history, nothing repeated
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`cvae.study` = '{study}'")
        parent = next(r for r in runs if r.data.tags.get("cvae.role") == "study")
        children = [r for r in runs if r.data.tags.get("cvae.role") == "trial"]
        assert parent.data.tags["ray.experiment_path"] == f"{storage}/{study}"
        assert len(children) == 2 and len({c.data.tags["ray_trial_id"] for c in children}) == 2
        for child in children:
            assert child.info.status == "FINISHED" and child.info.artifact_uri.startswith("mlflow-artifacts:")
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_nll")]
            assert steps == [10 * (i + 1) for i in range(EVALS)], (child.data.tags["ray_trial_id"], steps)
        moved = next(c for c in children if c.data.tags["ray_trial_id"] == removed["trial"])
        resumed = int(moved.data.tags["ray.resumed_from_step"])
        assert 10 <= resumed <= 10 * int(removed["evaluation"]) + 10 * 2  # a checkpoint of the lost attempt
        assert moved.data.tags["ray.node_id"] != removed["node_id"] and moved.data.tags["ray.pid"] != removed["pid"]
        assert {a.path for a in client.list_artifacts(moved.info.run_id)} >= {
            "train.log", f"train-resumed-at-step-{resumed}.log"}

        # the objects really are in the bucket
        keys = [o["Key"] for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                for o in page.get("Contents", [])]
        tune_keys = [k for k in keys if k.startswith(f"ray_results/{study}/")]
        assert any(re.fullmatch(rf"ray_results/{study}/experiment_state-.*\.json", k) for k in tune_keys), tune_keys
        moved_dir = next(k.split("/")[2] for k in tune_keys if removed["trial"] in k.split("/")[2])
        assert any(re.fullmatch(rf"ray_results/{study}/{moved_dir}/checkpoint_\d+/weights\.pt", k)
                   for k in tune_keys), tune_keys
        # the best checkpoint Tune kept is named by its URI (Checkpoint.path alone drops "s3://")
        best_checkpoint = parent.data.tags["cvae.best_checkpoint"]
        assert best_checkpoint.startswith(f"{storage}/{study}/") and f"{best_checkpoint}/weights.pt" in {
            f"s3://{BUCKET}/{k}" for k in keys}
        assert {t["checkpoint"] for t in summary["trials"]} <= {f"s3://{BUCKET}/{k.rsplit('/', 1)[0]}" for k in keys}
        for child in children:
            prefix = f"mlartifacts/{exp.experiment_id}/{child.info.run_id}/artifacts/"
            assert f"{prefix}checkpoint/weights.pt" in keys and f"{prefix}train.log" in keys, child.info.run_id

        # nothing of Tune's or MLflow's in a folder the nodes share (the test's root, the server's
        # cwd, /tmp, the home folder, the repository)
        assert not leftovers and not _local_leftovers(tmp_path, [tmp_path / "nodes"])
        assert not (Path.home() / "ray_results" / study).exists()
        assert not any(Path("/tmp/cvae-trials").glob(f"cvae-run-*{removed['trial']}*"))
        assert not (REPO / "mlartifacts").exists() and not (REPO / "ray_results").exists()
        assert not list(server["cwd"].iterdir())

        # the champion comes from the bucket (through the server's proxy) and is evaluated
        best_dir = tmp_path / "analysis"
        best_dir.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "analysis", "best", "--tracking-uri", server["url"], "--experiment", experiment,
             "--study", study, "--split", "test", "--n-samples", "4", "--mi-samples", "4", "--limit", "24",
             "--no-bleu", "--no-dist", "--no-grad-norms", "--out", str(best_dir / "download"), "--json", "--register",
             "--model-name", f"cvae-{run_id}"],
            cwd=best_dir, env={**base, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        evaluation = json.loads(done.stdout)
        assert evaluation["nll"] > 0 and evaluation["fingerprint"]["split"] == "test"
        champion = parent.data.tags["cvae.best_run_id"]
        assert f"best run by val_nll (min): {champion}" in done.stderr
        manifest = s3["client"].get_object(
            Bucket=BUCKET, Key=f"mlartifacts/{exp.experiment_id}/{champion}/artifacts/checkpoint/manifest.json")
        assert json.loads((best_dir / "download" / "checkpoint" / "manifest.json").read_text()) == json.loads(
            manifest["Body"].read())
        # registered as the champion: the model's files went through the server into the bucket too
        version = client.get_model_version_by_alias(f"cvae-{run_id}", "champion")
        assert version.run_id == champion
        model_keys = [o["Key"] for page in s3["client"].get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"mlartifacts/{exp.experiment_id}/") for o in page.get("Contents", [])]
        assert any(k.endswith("/MLmodel") for k in model_keys), model_keys
        assert not _local_leftovers(server["cwd"], [])

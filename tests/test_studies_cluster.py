"""End to end on real components: a 2-node Ray cluster on loopback (a CPU-less head like the
cluster YAML's, and a worker with one fake GPU that two 0.5-GPU trials share), tracking into a
real MLflow server on loopback (mlflow/server.py, SQLite backend, proxied artifacts).

* a multi-objective TPE study run by the driver in this process: the MLflow run tree, metric
  histories, checkpoint artifacts that load with cvae_core, placement on the GPU node, the
  persisted Optuna study;
* the CLI interrupted with SIGINT mid-study, then `--resume`: finished trials are not re-run,
  interrupted ones reopen their own MLflow run, and nothing is duplicated or left RUNNING;
* a worker node removed mid-study (as a lost spot instance): its trials continue on the node
  that is left, from their checkpoints, in their own MLflow runs (the last test: it changes the
  cluster).

The server's process group and the cluster are torn down in the fixtures, with bounded waits,
and the teardown checks that none of their processes survive."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray import tune

from processes import follow_until_exit, pump_lines

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MB = 1024**2
TINY_OVERRIDES = {
    "data.train_limit": 300, "data.valid_limit": 40, "model.embed_dim": 16, "model.hidden_dim": 16,
    "model.latent_dim": 4, "model.dropout": 0.0, "train.batch_size": 8, "train.eval_every": 10,
    "train.log_every": 10, "train.val_samples": 2, "train.mi_samples": 2, "regularizer.anneal_start": 2,
    "regularizer.anneal_steps": 20,
}
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _tiny_spec(path: Path, steps: int, num_samples: int, grace_period: int = 2) -> Path:
    spec = {
        "name": path.stem, "description": "tiny test study",
        "base": {"preset": "coupled-vae", "dataset": "ptb", "scale": "quick",
                 "overrides": {**TINY_OVERRIDES, "train.steps": steps}},
        "space": "lambda", "grid": "table3", "search": "tpe", "baselines": [{"preset": "vae"}],
        "objectives": ["val_nll"],
        "scheduler": {"type": "asha", "metric": "val_nll", "mode": "min", "grace_period": grace_period,
                      "reduction_factor": 2},
        "budget": {"num_samples": num_samples, "seeds": 1, "seed": 0},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0.5, "max_concurrent_trials": 2, "max_failures": 1},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def ray_env():
    """Token auth off and nodes on 127.0.0.1, for this process and the CLI drivers it starts.
    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import (other test modules import ray
    during collection), so the constant is set as well."""
    from ray._private import ray_constants

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(RAY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    yield dict(RAY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = saved_constant
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def cluster(ray_env):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "object_store_memory": 100 * MB, "memory": 1024 * MB,
        "include_dashboard": False, "resources": {"head": 1}})
    pids: list[int] = []
    try:
        worker = cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=100 * MB, memory=4096 * MB,
                                  resources={"gpu_worker": 1})
        cluster.wait_for_nodes(timeout=60)
        for node in (cluster.head_node, worker):
            pids += [p.process.pid for infos in node.all_processes.values() for p in infos if p.process]
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2 and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes.values())
        yield {"address": cluster.address, "worker_node_id": worker.node_id,
               "head_node_id": cluster.head_node.node_id, "cluster": cluster, "pids": pids}
    finally:
        ray.shutdown()
        cluster.shutdown()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.25)
        survivors = [p for p in pids if _alive(p)]
        assert not survivors, f"Ray processes survived cluster.shutdown(): {survivors}"


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url)


def _study_runs(client, study_name):
    from studies.options import DEFAULT_EXPERIMENT

    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`cvae.study` = '{study_name}'")
    parents = [r for r in runs if r.data.tags.get("cvae.role") == "study"]
    children = [r for r in runs if r.data.tags.get("cvae.role") == "trial"]
    return parents, children


def test_study_on_two_nodes_with_fractional_gpus_tracks_a_full_run_tree(cluster, mlflow_server, tmp_path):
    import optuna
    from mlflow.artifacts import download_artifacts

    from cvae_core.checkpoint import load_checkpoint
    from studies.runner import Options, run_study
    from studies.tracking import run_params, unused_settings

    spec_path = _tiny_spec(tmp_path / "tiny_mo.yaml", steps=60, num_samples=2, grace_period=3)
    # Kill one trial's process after its second evaluation, as a spot preemption would:
    # FailureConfig retries it from its last checkpoint, and it must reopen its own MLflow run.
    killed: dict[str, str] = {}
    outcome = run_study(Options(profile=str(spec_path), root=str(tmp_path / "out"),
                                tracking_uri=mlflow_server["url"], address=cluster["address"],
                                objectives="val_nll,val_mi_loo", study_name="two-node-study",
                                callbacks=(_kill_one_trial_after(mlflow_server["url"], 2, killed),)))
    assert killed, "no trial was killed"
    assert outcome.exit_code == 0 and not outcome.interrupted
    assert len(outcome.rows) == 3
    assert all(r.status in ("done", "stopped") for r in outcome.rows), outcome.rows

    client = _client(mlflow_server["url"])
    parents, children = _study_runs(client, "two-node-study")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "two-node-study"
    tags = parent.data.tags
    assert tags["cvae.spec"] == "tiny_mo" and tags["optuna.study_name"] == "two-node-study"
    assert tags["ray.experiment_path"] == str(tmp_path / "out" / "ray_results" / "two-node-study")
    assert parent.data.params["objectives"] == "val_nll:min,val_mi_loo:max"
    assert "best_val_nll" in parent.data.metrics and tags["cvae.best_run_id"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.md", "summary.json"}

    # one child per trial, nested under the parent, none left RUNNING
    assert len(children) == 3
    assert {c.data.tags["ray_trial_id"] for c in children} == {r.trial_id for r in outcome.rows}
    rows = {r.trial_id: r for r in outcome.rows}
    for child in children:
        t = child.data.tags
        assert t["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert t["cvae.dataset"] == "ptb" and t["cvae.seed"] == "0" and t["cvae.code_version"]
        assert len(t["cvae.config_id"]) == 10
        # placement: on the GPU worker (the head has no CPU), sharing fake GPU 0, CPU fallback
        assert t["ray.node_id"] == cluster["worker_node_id"]
        assert t["ray.gpu_ids"] == "0" and t["cvae.device"] == "cpu"
        # params: the flattened resolved config with Config.flat()'s dotted keys
        params = child.data.params
        assert params["train.steps"] == "60" and params["model.latent_dim"] == "4"
        assert {"coupling.lambda_m", "coupling.distance", "coupling.enabled", "model.posterior"} <= set(params)
        # one metric point per evaluation Ray saw, at the training step
        history = client.get_metric_history(child.info.run_id, "val_nll")
        row = rows[t["ray_trial_id"]]
        assert [m.step for m in history] == [10 * (i + 1) for i in range(row.evaluations)]
        for key in ("val_kl", "val_mi_loo", "val_au", "train_loss", "kl_weight", "lr", "best_val_nll"):
            assert len(client.get_metric_history(child.info.run_id, key)) == row.evaluations, key
        # the best checkpoint as an artifact, loadable by the core
        files = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, "checkpoint")}
        assert {"weights.pt", "config.json", "vocab.json", "manifest.json", "state.json"} <= files
        local = download_artifacts(run_id=child.info.run_id, artifact_path="checkpoint",
                                   dst_path=str(tmp_path / "dl" / child.info.run_id), tracking_uri=mlflow_server["url"])
        data = load_checkpoint(local)
        assert params == run_params(data.config)  # the checkpoint's config, as the run logged it
        unused = {k for k, v in params.items() if v == "none"}
        assert unused == set(unused_settings(data.config))
        assert {k: v for k, v in data.config.flat().items() if k not in unused} == {
            k: _typed(data.config.flat()[k], v) for k, v in params.items() if k not in unused}
        best_step = min(history, key=lambda m: m.value).step
        assert data.state["step"] == best_step

    # the killed trial was retried from its checkpoint into the same run (one run per trial id)
    retried = next(c for c in children if c.data.tags["ray_trial_id"] == killed["trial"])
    assert retried.data.tags["ray.pid"] != killed["pid"]
    assert int(retried.data.tags["ray.resumed_from_step"]) >= 10
    assert {a.path for a in client.list_artifacts(retried.info.run_id)} >= {
        "train.log", f"train-resumed-at-step-{retried.data.tags['ray.resumed_from_step']}.log"}

    # both 0.5-GPU trials of the first wave ran at the same time on the one fake GPU
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:]))

    # the Optuna study is persisted (multi-objective) and holds only the Optuna proposals
    study = optuna.load_study(study_name="two-node-study", storage=tags["optuna.storage"])
    assert len(study.directions) == 2
    # ASHA-stopped proposals are PRUNED, the others COMPLETE: Optuna's states follow the study's rows
    assert len(study.trials) == 2
    searched = [r for r in outcome.rows if r.config.get("preset") != "vae"]
    assert sorted(t.state.name for t in study.trials) == sorted(
        "PRUNED" if r.status == "stopped" else "COMPLETE" for r in searched)


class ActOnEvaluation(tune.Callback):
    """A Tune callback (``Options.callbacks``) that calls ``act(run)`` once, with the MLflow run of
    the first trial (or pack member) whose ``n_evals``-th evaluation the driver receives: the fault comes at that
    event, while the trial is surely still training, not after a poll that a fast trial outruns."""

    def __init__(self, url, n_evals, act):
        self.url, self.n_evals, self.act, self.done = url, n_evals, act, False

    def __getstate__(self):  # Tune pickles its callbacks; the action holds live Ray nodes
        return {**self.__dict__, "act": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.done or result.get("training_iteration", 0) < self.n_evals:
            return
        self.done = True
        # the trial's run, or for a pack trial its first member's (member ids are "<pack id>-<k>")
        runs = _client(self.url).search_runs([e.experiment_id for e in _client(self.url).search_experiments()],
                                             f"tags.ray_trial_id LIKE '{trial.trial_id}%'")
        self.act(min(runs, key=lambda run: run.data.tags["ray_trial_id"]))


def _kill_one_trial_after(url, n_evals, killed):
    """SIGKILL the process of the first trial that reports its ``n_evals``-th evaluation."""
    def kill(run):
        killed.update(trial=run.data.tags["ray_trial_id"], pid=run.data.tags["ray.pid"])
        os.kill(int(killed["pid"]), signal.SIGKILL)

    return ActOnEvaluation(url, n_evals, kill)


def _typed(core_value, text):
    """MLflow params are strings: compare in the core's own type."""
    if isinstance(core_value, bool):
        return text == "True"
    if isinstance(core_value, (int, float)):
        return type(core_value)(float(text))
    return text


def _start_cli(args, env, log_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "studies" / "lambda_sweep.py"), *args], env=env,
                            cwd=log_path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, pump_lines(proc, log_path)


EVENT = re.compile(r"^\[\s*\d+:\d\d\] (start|eval|done|stopped by ASHA after \d+/\d+ evals,)\s+(\w+)\s+(\d+)?")


def test_interrupted_study_resumes_without_rerunning_or_duplicating(cluster, mlflow_server, tmp_path):
    # grace period 4 of 6 evaluations: a trial of the second wave cannot be stopped by ASHA
    # before the interrupt below
    spec_path = _tiny_spec(tmp_path / "tiny_resume.yaml", steps=60, num_samples=3, grace_period=4)
    env = {**os.environ, **RAY_ENV, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    common = ["--profile", str(spec_path), "--address", cluster["address"], "--tracking-uri", mlflow_server["url"],
              "--root", str(tmp_path / "out")]
    log_path = tmp_path / "cli.log"

    # first session: SIGINT once a trial of the second wave has reported twice (Tune registers a
    # checkpoint after the report that carried it, so the first one is then surely on record)
    proc, lines = _start_cli([*common, "--study-name", "resumable"], env, log_path)
    finished, started_late, evals = set(), set(), {}
    sent = {}

    def on_line(line):
        match = EVENT.match(line)
        if not match:
            return
        kind, trial = match.group(1), match.group(2)
        if kind == "start" and finished:
            started_late.add(trial)
        elif kind == "eval":
            evals[trial] = evals.get(trial, 0) + 1
            if trial in started_late and evals[trial] >= 2 and "t" not in sent:
                sent["t"] = time.time()
                proc.send_signal(signal.SIGINT)
        elif kind.startswith(("done", "stopped")) and "t" not in sent:
            finished.add(trial)

    output = follow_until_exit(proc, lines, 300, on_line)
    assert sent, "the study finished before it could be interrupted:\n" + output
    assert proc.returncode == 130, output
    assert (f"Interrupted. Continue with: {sys.executable} {REPO / 'studies' / 'lambda_sweep.py'} --resume resumable "
            f"--root {tmp_path / 'out'}") in output

    client = _client(mlflow_server["url"])
    parents, children = _study_runs(client, "resumable")
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert all(c.info.status != "RUNNING" for c in children)
    before = {c.data.tags["ray_trial_id"]: c for c in children}
    interrupted = {t for t in before if t not in finished}
    assert finished and interrupted
    resumed_at = time.time()

    # second session: --resume completes the study
    proc, lines = _start_cli([*common, "--resume", "resumable"], env, log_path)
    output = follow_until_exit(proc, lines, 300)
    assert proc.returncode == 0, output
    rerun = {m.group(2) for m in map(EVENT.match, output.splitlines()) if m and m.group(1) == "start"}
    assert not rerun & finished, f"finished trials ran again: {rerun & finished}"

    summary = json.loads((tmp_path / "out" / "resumable" / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["trials"]) == 4
    n_evals = {t["trial_id"]: t["evaluations"] for t in summary["trials"]}

    parents, children = _study_runs(client, "resumable")
    assert len(parents) == 1 and parents[0].info.run_id == before[next(iter(before))].data.tags["mlflow.parentRunId"]
    assert parents[0].info.status == "FINISHED"
    ids = [c.data.tags["ray_trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 4, "a restored trial created a second MLflow run"
    for child in children:
        trial = child.data.tags["ray_trial_id"]
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_nll")]
        assert steps == [10 * (i + 1) for i in range(n_evals[trial])], (trial, steps)
        if trial in before:
            assert child.info.run_id == before[trial].info.run_id  # reopened, not recreated
        if trial in finished:
            assert child.data.tags["ray.resumed_from_step"] == "none"
            history = client.get_metric_history(child.info.run_id, "val_nll")
            assert max(m.timestamp for m in history) / 1000 < resumed_at
        if trial in interrupted and evals.get(trial, 0) >= 2:
            # it had reported (and checkpointed) before the interrupt: resumed, not restarted
            assert int(child.data.tags["ray.resumed_from_step"]) >= 10

    import optuna

    study = optuna.load_study(study_name="resumable", storage=parents[0].data.tags["optuna.storage"])
    assert len(study.trials) == 3  # the proposals only; none repeated by the restore


def _remove_node_after(cluster_info, url, n_evals, removed):
    """Remove (hard: its raylet and workers are killed) the node that runs the first trial that
    reports its ``n_evals``-th evaluation (trials run on worker nodes only: the head has no CPU)."""
    nodes = {n.node_id: n for n in cluster_info["cluster"].worker_nodes}

    def remove(run):
        node_id = run.data.tags["ray.node_id"]
        removed.update(node_id=node_id, trial=run.data.tags["ray_trial_id"], pid=run.data.tags["ray.pid"])
        cluster_info["cluster"].remove_node(nodes[node_id], allow_graceful=False)

    return ActOnEvaluation(url, n_evals, remove)


def test_a_removed_node_costs_its_trials_minutes_not_the_study(cluster, mlflow_server, tmp_path):
    from studies.runner import Options, run_study

    spare = cluster["cluster"].add_node(num_cpus=2, num_gpus=1, object_store_memory=100 * MB, memory=4096 * MB,
                                        resources={"gpu_worker": 1})
    cluster["cluster"].wait_for_nodes(timeout=60)
    cluster["pids"].extend(p.process.pid for infos in spare.all_processes.values() for p in infos if p.process)
    spec_path = _tiny_spec(tmp_path / "tiny_node_loss.yaml", steps=60, num_samples=2, grace_period=6)
    removed: dict[str, str] = {}
    outcome = run_study(Options(profile=str(spec_path), root=str(tmp_path / "out"),
                                tracking_uri=mlflow_server["url"], address=cluster["address"],
                                study_name="node-loss", callbacks=(_remove_node_after(cluster, mlflow_server["url"], 2,
                                                                                      removed),)))
    assert removed, "no node was removed"
    assert outcome.exit_code == 0 and not outcome.interrupted
    # grace period = all 6 evaluations: no trial may stop early, so every one trained to the end
    assert len(outcome.rows) == 3 and all(r.status == "done" for r in outcome.rows), outcome.rows

    _, children = _study_runs(_client(mlflow_server["url"]), "node-loss")
    client = _client(mlflow_server["url"])
    ids = [c.data.tags["ray_trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 3, "a retried trial created a second MLflow run"
    moved = [c for c in children if c.data.tags["ray.resumed_from_step"] != "none"]
    assert removed["trial"] in {c.data.tags["ray_trial_id"] for c in moved}
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_nll")]
        assert steps == [10, 20, 30, 40, 50, 60], (child.data.tags["ray_trial_id"], steps)
    for child in moved:  # continued from a checkpoint, on a node that is still there
        assert int(child.data.tags["ray.resumed_from_step"]) >= 10
        assert child.data.tags["ray.node_id"] != removed["node_id"]

"""Ray for a study: start a local instance or join a cluster, and check that a trial fits."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .options import StudyError
from .spec import StudySpec

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2


def init_ray(address: str | None, verbose: bool) -> bool:
    """Start or join Ray unless this process already did. -> whether we own the connection."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Workers must import `studies` even from a checkout that is not pip-installed. Never put
        # a secret in runtime_env: Ray hands it to each new worker on its command line
        # (setup_worker.py --serialized-runtime-env-context), readable by every local user. The
        # tracking server's MLFLOW_TRACKING_USERNAME/PASSWORD reach the workers by inheritance
        # instead: they are in this process's environment before the local Ray starts (on a
        # cluster, in every node's, see ray_cluster.yaml).
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        # address="local": a bare ray.init() would join the newest `ray start` cluster on this
        # machine (Ray records it under /tmp/ray) instead of the study's own local instance.
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **kwargs)
    return True


def _need(spec: StudySpec) -> str:
    return f"{spec.resources.cpus_per_trial:g} CPU" + (
        f" + {spec.resources.gpus_per_trial:g} GPU" if spec.resources.gpus_per_trial else "")


def _fits(cpus: float, gpus: float, spec: StudySpec) -> bool:
    """Whether one node with ``cpus`` and ``gpus`` can run a trial (a GPU fraction needs one GPU)."""
    return cpus >= spec.resources.cpus_per_trial and gpus >= min(1.0, spec.resources.gpus_per_trial)


def check_local_resources(spec: StudySpec) -> None:
    """Before a local Ray starts (no --address): it will get this machine's CPUs and the GPUs torch
    sees, so a trial that cannot fit is refused now, not after Ray's start-up. A Ray this process
    already joined is checked after all, by :func:`check_resources`."""
    import ray
    import torch

    if ray.is_initialized():
        return
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if not _fits(cpus, gpus, spec):
        raise StudyError(f"a trial needs {_need(spec)}, this machine has {cpus} CPU, {gpus} GPU"
                         f"{'' if gpus else ' (torch sees no CUDA device)'}; lower --gpus-per-trial/--cpus-per-trial"
                         " or pass --address of a cluster")


def check_resources(spec: StudySpec, address: str | None) -> None:
    """After Ray started or was joined: some live node must fit a trial (a cluster may still
    autoscale: then a warning)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(_fits(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0), spec) for n in nodes):
        return
    need = _need(spec)
    have = "; ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, "
                     f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
    if address:  # a cluster may still autoscale to a node that fits
        print(f"warning: no node can run a trial ({need}) yet ({have}); waiting for the autoscaler", flush=True)
        return
    raise StudyError(f"no node of the local Ray can run a trial needing {need} ({have}); "
                     "lower --gpus-per-trial/--cpus-per-trial or pass --address of a cluster")

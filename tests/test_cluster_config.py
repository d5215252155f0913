"""ray_cluster.yaml checked offline against Ray's own schema, plus the choices the study service
relies on (no trials on the head, GPU workers scale from zero, loopback dashboard, token auth,
pinned packages, the environment every node exports).

Uses Ray's private prepare_config/validate_config (pinned ray==2.60.0). Neither call talks to
AWS; a socket guard makes sure of it."""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO / "ray_cluster.yaml"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection (e.g. to AWS) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during offline config validation: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def raw():
    return yaml.safe_load(CONFIG_PATH.read_text())


@pytest.fixture
def prepared(raw):
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _ray_start(commands, marker):
    matches = [c for c in commands if marker in c]
    assert len(matches) == 1, f"expected one command containing {marker!r}, got {matches}"
    return matches[0]


def test_config_passes_ray_schema(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_unknown_key_in_node_type_fails_validation(raw):
    mutated = copy.deepcopy(raw)
    mutated["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(mutated))


def test_unknown_head_node_type_fails_validation(raw):
    mutated = copy.deepcopy(raw)
    mutated["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(mutated))


def test_head_runs_no_trials(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0
    assert "InstanceMarketOptions" not in head["node_config"], "the head must stay on-demand"
    head_start = _ray_start(prepared["head_start_ray_commands"], "ray start --head")
    assert "--num-cpus=0" in head_start


def test_gpu_workers_scale_from_zero_on_spot(prepared):
    worker = prepared["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0
    assert 1 <= worker["max_workers"] <= prepared["max_workers"]
    assert worker["resources"]["GPU"] >= 1
    assert worker["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert worker["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert prepared["provider"]["cache_stopped_nodes"] is False
    assert "--gpus all" in prepared["docker"]["worker_run_options"]
    assert "--gpus all" not in prepared["docker"].get("run_options", []), "the CPU head has no GPU"


def test_image_matches_local_ray_and_python(prepared):
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert prepared["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{py}-gpu"
    assert ray.__version__ == "2.60.0"


def test_dashboard_on_loopback_and_token_auth_everywhere(prepared):
    head_start = _ray_start(prepared["head_start_ray_commands"], "ray start --head")
    worker_start = _ray_start(prepared["worker_start_ray_commands"], "ray start --address")
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    all_start = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert "0.0.0.0" not in all_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in worker_start
    # the token travels via file_mounts from outside the repository
    token_local = prepared["file_mounts"]["/home/ray/.ray/auth_token"]
    assert token_local.startswith("~/"), token_local


def test_same_pins_and_project_mount(prepared, raw):
    setup = raw["setup_commands"]
    assert "pip install torch==2.13.0" in setup
    assert "pip install -e /home/ray/cvae" in setup
    assert setup.index("pip install torch==2.13.0") < setup.index("pip install -e /home/ray/cvae")
    # merged by prepare_config into the per-role lists Ray actually runs
    assert "pip install torch==2.13.0" in prepared["worker_setup_commands"]
    assert "pip install torch==2.13.0" in prepared["head_setup_commands"]
    assert prepared["file_mounts"]["/home/ray/cvae"] == "."
    excluded = set(prepared["rsync_exclude"])
    for pattern in [".git", ".venv", "*.db", "mlruns", "mlartifacts", "ray_results", "checkpoints"]:
        assert pattern in excluded


def test_head_starts_mlflow_through_the_launcher(prepared):
    mlflow_cmd = _ray_start(prepared["head_start_ray_commands"], "mlflow/server.py --pidfile")
    assert "/home/ray/cvae/mlflow/setup_postgres.sh" in mlflow_cmd
    assert (REPO / "mlflow" / "server.py").is_file()
    assert (REPO / "mlflow" / "setup_postgres.sh").is_file()
    assert not (REPO / "mlflow" / "__init__.py").exists(), "mlflow/ must never shadow the mlflow library"
    assert 'CVAE_MLFLOW_HOST="$CVAE_HEAD_IP"' in mlflow_cmd


def test_every_node_exports_tracking_uri_and_storage_path(raw, tmp_path):
    """Run the env-writing commands for real (bash, fake HOME) and read what a shell then sees."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "RAY_HEAD_IP": "10.0.0.5"}
    for command in [raw["setup_commands"][0], raw["worker_start_ray_commands"][0]]:
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    probe = ("echo $MLFLOW_TRACKING_URI $CVAE_STORAGE_PATH $RAY_AUTH_MODE $CVAE_HEAD_IP "
             "$CVAE_MLFLOW_ARTIFACTS_DESTINATION $AWS_DEFAULT_REGION")
    shell = subprocess.run(
        ["bash", "-i", "-c", probe], env=env, capture_output=True, text=True, check=True, timeout=30,
        stdin=subprocess.DEVNULL,
    )
    uri, storage, auth_mode, head_ip, artifacts, region = shell.stdout.split()
    assert uri == "http://10.0.0.5:5000"
    assert storage.startswith("s3://") and storage.endswith("/ray_results")
    assert auth_mode == "token"
    assert head_ip == "10.0.0.5"
    # no shared disk: MLflow's artifacts go to the same bucket as Tune's storage, in the region named
    bucket = storage[len("s3://"):].split("/", 1)[0]
    assert artifacts.startswith(f"s3://{bucket}/") and artifacts != storage
    assert region == raw["provider"]["region"]


def test_readme_states_the_storage_a_cluster_needs():
    # The README's cluster paragraph links the page with the settings table; a user reads both.
    readme = (REPO / "README.md").read_text()
    cluster = readme[readme.index("### On a cluster"):readme.index("### Resume")]
    assert "(docs/cluster.md)" in cluster
    cluster += (REPO / "docs" / "cluster.md").read_text()
    for setting in ("CVAE_STORAGE_PATH", "--storage-path s3://", "--artifacts-destination s3://",
                    "CVAE_MLFLOW_ARTIFACTS_DESTINATION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                    "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "tests/test_object_store_cluster.py"):
        assert setting in cluster, setting


def test_every_placeholder_is_listed_in_the_readme_with_the_token_step():
    import re

    placeholders = set(re.findall(r"\bami-YOUR-[A-Z-]+\b|\bYOUR-[A-Z-]+\b", CONFIG_PATH.read_text()))
    placeholders = {p for p in placeholders if not any(p != q and q.endswith(p) for q in placeholders)}
    assert placeholders == {"YOUR-BUCKET", "ami-YOUR-DLAMI-ID", "YOUR-ACCOUNT-ID"}
    readme = (REPO / "README.md").read_text()
    cluster = readme[readme.index("### On a cluster"):readme.index("### Resume")]
    for placeholder in placeholders:
        assert f"`{placeholder}`" in cluster, placeholder
    assert "ray get-auth-token --generate" in cluster and '.[cluster]"' in cluster


def test_the_aws_provider_imports_with_the_cluster_extra():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r for r in extras["cluster"] if r.startswith("boto3==")]
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider  # imports boto3

    assert AWSNodeProvider

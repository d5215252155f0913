"""analysis/: runs -> DataFrame -> Parquet, paper-format tables, statistics, reproduction report, plots.

The MLflow store is real: runs are logged through ``MlflowClient`` into a SQLite file under
tmp_path, in exactly the layout the study service writes (parent study run, nested trial runs,
dotted config params, per-evaluation val_* metrics).  The metric values are chosen by hand so
that every number in the expected tables can be checked on paper.
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cvae_core.config import build_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "coupled-vae-studies"
STUDY = "lambda_sweep-20261124-061500"

# --------------------------------------------------------------------------------------------
# Writing a study in the MLflow layout contract


def config_params(preset: str, dataset: str, seed: int, overrides: dict | None = None) -> dict[str, str]:
    settings = {"train.seed": seed, "train.steps": 20, "train.eval_every": 10,
                **({"data.data_dir": f"/data/{dataset}"} if dataset != "ptb" else {}), **(overrides or {})}
    return {k: str(v) for k, v in build_config(preset, dataset, "quick", settings).flat().items()}


def config_id(params: dict[str, str]) -> str:
    without_seed = {k: v for k, v in params.items() if k != "train.seed"}
    return hashlib.sha1(json.dumps(without_seed, sort_keys=True).encode()).hexdigest()[:12]


def log_study(client, experiment_id: str, name: str = STUDY, optuna_storage: str = "", start_time: int | None = None):
    tags = {"cvae.role": "study", "cvae.study": name, "cvae.spec": name.split("-")[0],
            "optuna.storage": optuna_storage, "optuna.study_name": name, "ray.experiment_path": f"/tmp/ray/{name}"}
    run = client.create_run(experiment_id, run_name=name, tags=tags, start_time=start_time)
    return run.info.run_id


def log_trial(client, experiment_id: str, parent_id: str, preset: str, evals: list[dict], *, study: str = STUDY,
              dataset: str = "ptb", seed: int = 0, overrides: dict | None = None, status: str = "FINISHED",
              checkpoint: Path | None = None, start_time: int | None = None) -> str:
    """One trial run: tags, the flattened config as params, ``evals`` (dicts with a ``step``) as metrics."""
    from mlflow.entities import Metric, Param

    params = config_params(preset, dataset, seed, overrides)
    tags = {"mlflow.parentRunId": parent_id, "cvae.role": "trial", "cvae.study": study,
            "ray_trial_id": f"{preset}_{dataset}_{seed}_{len(evals)}", "cvae.preset": preset, "cvae.dataset": dataset,
            "cvae.seed": str(seed), "cvae.code_version": "0.1.0", "cvae.config_id": config_id(params)}
    run = client.create_run(experiment_id, run_name=f"{preset}-{dataset}-seed{seed}", tags=tags, start_time=start_time)
    run_id = run.info.run_id
    metrics, best, best_step = [], math.inf, 0
    for ev in evals:
        step = int(ev["step"])
        improved = ev.get("val_nll", math.inf) < best  # the core's rule: strictly lower than the best so far
        best, best_step = (ev["val_nll"], step) if improved else (best, best_step)
        values = {**ev, "best_val_nll": best, "is_best": float(improved), "best_step": best_step}
        metrics += [Metric(k, float(v), 1_700_000_000_000 + step, step) for k, v in values.items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    if checkpoint is not None:
        client.log_artifacts(run_id, str(checkpoint), artifact_path="checkpoint")
    client.set_terminated(run_id, status=status)
    return run_id


def evals(nll: float, kl: float, ppl: float, mi: float, *, best_first: bool = False, **extra) -> list[dict]:
    """Two evaluations (steps 10 and 20); the given values are the best one (the last unless best_first)."""
    best = {"val_nll": nll, "val_kl": kl, "val_ppl": ppl, "val_mi_loo": mi, "val_mi_batch": mi + 0.5,
            "val_au": 3.0, "val_elbo": -nll - 1, "val_rec": nll - kl, "train_loss": nll + 2, **extra}
    worse = {k: v + 5.0 for k, v in best.items()}
    if best_first:
        return [{"step": 10, **best}, {"step": 20, **worse}]
    return [{"step": 10, **worse}, {"step": 20, **best}]


# (preset, dataset, seed, distance, lambda_m, lambda_r) -> (NLL, KL, PPL, MI) at the best evaluation
TABLE3_RUNS = [
    ("vae", "ptb", 0, None, None, None, (104.0, 8.0, 115.0, 10.00)),
    ("vae", "ptb", 1, None, None, None, (106.0, 6.0, 117.0, 11.00)),
    ("vae", "yelp13", 0, None, None, None, (194.0, 7.0, 54.5, 8.00)),
    ("coupled-vae", "ptb", 0, "rq", 0.1, 1.0, (103.0, 9.0, 110.0, 12.00)),
    ("coupled-vae", "ptb", 1, "rq", 0.1, 1.0, (104.0, 10.0, 112.0, 13.00)),
    ("coupled-vae", "yelp13", 0, "rq", 0.1, 1.0, (191.0, 8.0, 51.5, 9.50)),
    ("coupled-vae", "ptb", 0, "rq", 1.0, 1.0, (103.5, 12.0, 111.0, 15.00)),
    ("coupled-vae", "ptb", 1, "rq", 1.0, 1.0, (104.5, 14.0, 113.0, 17.00)),
    ("coupled-vae", "ptb", 0, "rq", 0.1, 0.5, (105.0, 7.0, 116.0, 9.50)),
    ("coupled-vae", "ptb", 0, "eucl", 0.1, 1.0, (103.2, 11.0, 110.5, 14.25)),
]


def populate_table3_study(client, experiment_id: str, optuna_storage: str = "") -> tuple[str, list[str]]:
    """-> (parent run id, trial run ids in TABLE3_RUNS order, then the FAILED one)."""
    parent = log_study(client, experiment_id, optuna_storage=optuna_storage, start_time=1_700_000_000_000)
    run_ids = []
    for i, (preset, dataset, seed, distance, lm, lr, (nll, kl, ppl, mi)) in enumerate(TABLE3_RUNS):
        overrides = {} if distance is None else {"coupling.distance": distance, "coupling.lambda_m": lm,
                                                 "coupling.lambda_r": lr}
        run_ids.append(log_trial(client, experiment_id, parent, preset, evals(nll, kl, ppl, mi, best_first=(i == 0)),
                                 dataset=dataset, seed=seed, overrides=overrides,
                                 start_time=1_700_000_000_000 + 1000 * (i + 1)))
    # a crashed trial: reported by load_study, left out of the tables
    run_ids.append(log_trial(client, experiment_id, parent, "coupled-vae", evals(150.0, 1.0, 300.0, 0.1)[:1],
                             seed=2, status="FAILED", start_time=1_700_000_100_000))
    return parent, run_ids


def persist_optuna_study(storage: str, name: str = STUDY, n_trials: int = 16) -> None:
    """A real persisted Optuna study over the Table-3 space (values from a known function + noise)."""
    import random

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    space = {"coupling.lambda_m": FloatDistribution(0.01, 10.0, log=True),
             "coupling.lambda_r": FloatDistribution(0.0, 5.0),
             "coupling.distance": CategoricalDistribution(["rq", "eucl"]),
             "train.lr": FloatDistribution(1e-4, 3e-3, log=True)}
    rng = random.Random(0)
    for _ in range(n_trials):
        p = {"coupling.lambda_m": math.exp(rng.uniform(math.log(0.01), math.log(10.0))),
             "coupling.lambda_r": rng.uniform(0.0, 5.0), "coupling.distance": rng.choice(["rq", "eucl"]),
             "train.lr": math.exp(rng.uniform(math.log(1e-4), math.log(3e-3)))}
        value = (103.0 + 0.8 * math.log10(p["coupling.lambda_m"]) ** 2 + 0.3 * abs(p["coupling.lambda_r"] - 1.0)
                 + (0.4 * p["coupling.lambda_m"] if p["coupling.distance"] == "eucl" else 0.0) + rng.gauss(0, 0.1))
        study.add_trial(optuna.trial.create_trial(params=p, distributions=space, value=value))


def log_grad_curves(client, run_id: str, scale: float) -> None:
    """Figure-2 style gradient norms at steps 5..20 (rising for the coupled run, falling for the VAE)."""
    from mlflow.entities import Metric

    metrics = []
    for step in (5, 10, 15, 20):
        metrics += [Metric("grad_rec", 100.0 + scale * step, 0, step), Metric("grad_reg", 20.0 + scale * step / 4, 0, step),
                    Metric("dh_de", 2.0 + scale * step / 50, 0, step)]
    client.log_batch(run_id, metrics=metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite MLflow store with an older study and the Table-3 study (the latest), its
    persisted Optuna study, and gradient-norm curves on two runs."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    old = log_study(client, experiment_id, name="old_sweep-20261101-000000", start_time=1_600_000_000_000)
    log_trial(client, experiment_id, old, "vae", evals(120.0, 1.0, 200.0, 0.5), study="old_sweep-20261101-000000",
              start_time=1_600_000_001_000)
    optuna_storage = f"sqlite:///{root / 'optuna.db'}"
    persist_optuna_study(optuna_storage)
    parent, run_ids = populate_table3_study(client, experiment_id, optuna_storage=optuna_storage)
    log_grad_curves(client, run_ids[0], scale=-1.0)  # vae, PTB, seed 0
    log_grad_curves(client, run_ids[3], scale=3.0)  # coupled-vae RQ λ_m=0.1 λ_r=1, PTB, seed 0
    return {"uri": uri, "root": root, "experiment_id": experiment_id, "parent": parent, "run_ids": run_ids,
            "client": client}


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=environment, timeout=600)


# --------------------------------------------------------------------------------------------
# Statistics


def test_t_quantiles_match_the_printed_tables():
    from cvae_core.stats import t_quantile

    printed = {1: 12.706, 2: 4.303, 4: 2.776, 10: 2.228, 30: 2.042, 120: 1.980}
    for df, value in printed.items():
        assert t_quantile(0.95, df) == pytest.approx(value, abs=5e-4), df
    assert t_quantile(0.99, 5) == pytest.approx(4.032, abs=5e-4)


def test_mean_std_and_paired_difference_on_known_numbers():
    from cvae_core.stats import paired_difference, summarize

    s = summarize([100.0, 102.0, float("nan")])
    assert (s.n, s.mean, s.std) == (2, 101.0, pytest.approx(math.sqrt(2)))
    assert math.isnan(summarize([5.0]).std)

    # coupled − base per seed: −1, −2 -> mean −1.5, std 1/√2, half-width t(0.975, 1) · 0.5
    d = paired_difference([103.0, 104.0], [104.0, 106.0])
    assert (d.n, d.mean) == (2, -1.5)
    assert d.std == pytest.approx(math.sqrt(0.5))
    assert (d.low, d.high) == (pytest.approx(-1.5 - 12.7062 * 0.5, abs=1e-3), pytest.approx(-1.5 + 12.7062 * 0.5, abs=1e-3))
    assert not d.excludes_zero

    # four seeds, differences 1, 2, 3, 4: mean 2.5, std 1.2910, t(0.975, 3) = 3.1824 -> ± 2.0543
    d = paired_difference([11.0, 12.0, 13.0, 14.0], [10.0, 10.0, 10.0, 10.0])
    assert (d.low, d.high) == (pytest.approx(0.4457, abs=1e-3), pytest.approx(4.5543, abs=1e-3))
    assert d.excludes_zero
    one = paired_difference([3.0], [1.0])
    assert one.mean == 2.0 and math.isnan(one.low)
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_pareto_mask_keeps_the_non_dominated_points():
    from cvae_core.metrics.names import pareto_mask

    points = [(100, 5), (101, 9), (102, 8), (99, 1), (103, float("nan"))]  # (NLL down, MI up)
    assert pareto_mask(points, ["min", "max"]) == [True, True, False, True, False]


# --------------------------------------------------------------------------------------------
# Runs -> DataFrame -> Parquet


def test_load_study_is_one_typed_row_per_trial_of_the_latest_study(store):
    from analysis.runs import IDENTITY_COLUMNS, load_history, load_study

    runs = load_study(EXPERIMENT, tracking_uri=store["uri"])
    assert len(runs) == len(TABLE3_RUNS) + 1
    assert set(runs["study"]) == {STUDY}
    assert runs["status"].value_counts().to_dict() == {"FINISHED": 10, "FAILED": 1}
    assert list(runs.columns[:len(IDENTITY_COLUMNS)]) == list(IDENTITY_COLUMNS)
    assert runs.attrs["study"] == STUDY and runs.attrs["parent_run_id"] == store["parent"]
    dtypes = runs.dtypes.astype(str).to_dict()
    assert dtypes["seed"] == "Int64" and dtypes["best_step"] == "Int64" and dtypes["duration_s"] == "float64"
    assert dtypes["start_time"] == "datetime64[ms, UTC]"
    assert dtypes["config.coupling.enabled"] == "boolean"
    assert dtypes["config.coupling.lambda_m"] == "float64"
    assert dtypes["config.model.latent_dim"] == "Int64"
    assert dtypes["config.coupling.distance"] == "str"
    metric_columns = [c for c in runs.columns if c.startswith(("final.", "best."))]
    assert {"final.val_nll", "best.val_nll", "best.val_mi_loo", "final.grad_rec"} <= set(metric_columns)
    assert all(dtypes[c] == "float64" for c in metric_columns)
    assert runs["artifact_uri"].str.startswith(str(store["root"] / "artifacts")).all()

    first = runs.iloc[0]  # vae PTB seed 0: best at step 10, last evaluation worse
    assert (first["preset"], first["dataset"], first["seed"], first["best_step"]) == ("vae", "ptb", 0, 10)
    assert (first["best.val_nll"], first["final.val_nll"]) == (104.0, 109.0)
    assert (first["best.val_kl"], first["final.val_kl"]) == (8.0, 13.0)
    assert first["config.coupling.enabled"] == False  # noqa: E712 (pandas boolean)
    coupled = runs[(runs["preset"] == "coupled-vae") & (runs["config.coupling.distance"] == "eucl")].iloc[0]
    assert (coupled["config.coupling.lambda_m"], coupled["config.coupling.lambda_r"]) == (0.1, 1.0)
    assert coupled["best.val_nll"] == coupled["final.val_nll"] == 103.2
    failed = runs[runs["status"] == "FAILED"].iloc[0]
    assert (failed["n_evals"], failed["steps_done"], failed["seed"]) == (1, 10, 2)

    old = load_study(EXPERIMENT, study="old_sweep-20261101-000000", tracking_uri=store["uri"])
    assert len(old) == 1 and old.iloc[0]["best.val_nll"] == 120.0

    history = load_history(EXPERIMENT, tracking_uri=store["uri"])
    assert list(history.columns) == ["run_id", "metric", "step", "value", "timestamp"]
    curve = history[(history["run_id"] == first["run_id"]) & (history["metric"] == "val_nll")]
    assert curve[["step", "value"]].values.tolist() == [[10, 104.0], [20, 109.0]]
    grad = history[(history["run_id"] == first["run_id"]) & (history["metric"] == "grad_rec")]
    assert grad["step"].tolist() == [5, 10, 15, 20]


def test_parquet_round_trip_is_identical_with_an_explicit_schema(store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis.runs import fetch_study, read_parquet, write_parquet

    study = fetch_study(EXPERIMENT, tracking_uri=store["uri"])
    path = write_parquet(study.runs, tmp_path / "runs.parquet", {"study": study.name})
    back = read_parquet(path)
    pd.testing.assert_frame_equal(back, study.runs)
    assert back.attrs["study"] == study.name
    schema = pq.read_schema(path)
    assert schema.field("seed").type == pa.int64()
    assert schema.field("config.coupling.enabled").type == pa.bool_()
    assert schema.field("config.coupling.distance").type == pa.string()
    assert schema.field("start_time").type == pa.timestamp("ms", tz="UTC")
    assert schema.field("best.val_nll").type == pa.float64()
    assert schema.metadata[b"cvae.analysis.schema_version"] == b"2"  # 2: the outcome column

    hpath = write_parquet(study.history, tmp_path / "history.parquet")
    pd.testing.assert_frame_equal(read_parquet(hpath), study.history)


def test_export_command_writes_parquet_that_reads_back(store, tmp_path):
    from analysis.runs import load_study, read_parquet

    result = run_cli("export", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"],
                     "--out", str(tmp_path / "runs.parquet"), "--history", str(tmp_path / "history.parquet"))
    assert result.returncode == 0, result.stderr
    assert "11 runs" in result.stdout and "read back identically" in result.stdout
    pd.testing.assert_frame_equal(read_parquet(tmp_path / "runs.parquet"), load_study(EXPERIMENT, tracking_uri=store["uri"]))
    assert len(read_parquet(tmp_path / "history.parquet")) > 0


@pytest.mark.parametrize("args, message", [
    (("table", "--experiment", "no-such-experiment"), "unknown experiment 'no-such-experiment'"),
    (("table", "--study", "nope"), "no study 'nope' in experiment"),
    (("best", "--metric", "val_bogus"), "no run logged metric 'val_bogus'"),
    (("table", "--layout", "table8"), "table8 needs dialogue runs"),
])
def test_user_errors_are_one_line(store, args, message):
    result = run_cli(*args, "--tracking-uri", store["uri"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("analysis: error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_default_tracking_uri_is_the_cwd_store_and_a_missing_store_is_an_error(tmp_path):
    result = run_cli("export", "--out", str(tmp_path / "x.parquet"), cwd=tmp_path)
    assert result.returncode == 2
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_an_experiment_without_trials_is_an_error(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "artifacts"))
    result = run_cli("table", "--tracking-uri", uri)
    assert result.returncode == 2 and "has no study runs" in result.stderr
    log_study(client, experiment_id, name="empty-study")
    result = run_cli("table", "--tracking-uri", uri)
    assert result.returncode == 2 and "study 'empty-study' in experiment 'coupled-vae-studies' has no trial runs" in result.stderr


# --------------------------------------------------------------------------------------------
# Tables

EXPECTED_TABLE3 = """\
**Table 3 layout: hyperparameter analysis of Coupled-VAE**

Study `lambda_sweep-20261124-061500`: VALIDATION split (val_*), each run at its lowest-val_nll evaluation (the checkpoint it saved); mean ± std over seeds; best per block in bold.

| Dist | λ_m | λ_r | PTB n | PTB NLL (KL) | PTB PPL | PTB MI | PTB BLEU-1/2 | Yelp n | Yelp NLL (KL) | Yelp PPL | Yelp MI | Yelp BLEU-1/2 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| *RQ, λ_r = 1.0* |  |  |  |  |  |  |  |  |  |  |  |  |
| RQ | 0.1 | 1.0 | 2 | **103.5 ± 0.7 (9.5 ± 0.7)** | **111.0 ± 1.4** | 12.50 ± 0.71 | – / – | 1 | 191.0 (8.0) | 51.5 | 9.50 | – / – |
| RQ | 1.0 | 1.0 | 2 | 104.0 ± 0.7 (13.0 ± 1.4) | 112.0 ± 1.4 | **16.00 ± 1.41** | – / – | 0 | – | – | – | – |
| *RQ, λ_m = 0.1* |  |  |  |  |  |  |  |  |  |  |  |  |
| RQ | 0.1 | 0.5 | 1 | 105.0 (7.0) | 116.0 | 9.50 | – / – | 0 | – | – | – | – |
| RQ | 0.1 | 1.0 | 2 | **103.5 ± 0.7 (9.5 ± 0.7)** | **111.0 ± 1.4** | **12.50 ± 0.71** | – / – | 1 | 191.0 (8.0) | 51.5 | 9.50 | – / – |
| *Eucl, λ_r = 1.0* |  |  |  |  |  |  |  |  |  |  |  |  |
| Eucl | 0.1 | 1.0 | 1 | 103.2 (11.0) | 110.5 | 14.25 | – / – | 0 | – | – | – | – |
| VAE |  |  | 2 | 105.0 ± 1.4 (7.0 ± 1.4) | 116.0 ± 1.4 | 10.50 ± 0.71 | – / – | 1 | 194.0 (7.0) | 54.5 | 8.00 | – / – |

1 of 11 runs left out (status not FINISHED)

Paired by seed (same dataset and seed, config equal but for the compared setting): difference a − b, mean [95% t-interval].

| a − b | Dataset | pairs | Δ NLL | Δ KL | Δ PPL | Δ MI |
|---|---|---|---|---|---|---|
| RQ λ_m=0.1 λ_r=0.5 − VAE | PTB | 1 | +1.0 | -1.0 | +1.0 | -0.50 |
| RQ λ_m=0.1 λ_r=1.0 − VAE | PTB | 2 | -1.5 [-7.9, +4.9] | +2.5 [-16.6, +21.6] | -5.0 [-5.0, -5.0] | +2.00 [+2.00, +2.00] |
| RQ λ_m=0.1 λ_r=1.0 − VAE | Yelp | 1 | -3.0 | +1.0 | -3.0 | +1.50 |
| RQ λ_m=1.0 λ_r=1.0 − VAE | PTB | 2 | -1.0 [-7.4, +5.4] | +6.0 [-19.4, +31.4] | -4.0 [-4.0, -4.0] | +5.50 [-0.85, +11.85] |
| Eucl λ_m=0.1 λ_r=1.0 − VAE | PTB | 1 | -0.8 | +3.0 | -4.5 | +4.25 |
"""


def test_table3_markdown_matches_the_hand_written_layout(store):
    result = run_cli("table", "--layout", "table3", "--tracking-uri", store["uri"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED_TABLE3


def test_lambda_cells_read_like_the_paper_and_searched_values_are_cut_to_three_digits():
    from analysis.selection import format_lambda

    assert [format_lambda(v) for v in (0.1, 1, 5.0, 0.25, 0.507343, 2.37233, 339.4, float("nan"))] == [
        "0.1", "1.0", "5.0", "0.25", "0.507", "2.37", "339", "?"]


def test_table3_latex_bolds_the_best_per_block_and_groups_datasets(store):
    from analysis.runs import load_study
    from analysis.render import render
    from analysis.tables import build_table

    latex = render(build_table(load_study(EXPERIMENT, tracking_uri=store["uri"]), "table3"), "latex")
    assert r"\multicolumn{5}{c}{PTB} & \multicolumn{5}{c}{Yelp}" in latex
    assert r"Dist & $\lambda_m$ & $\lambda_r$ & n & NLL (KL)" in latex
    assert (r"RQ & 0.1 & 1.0 & 2 & \textbf{103.5 $\pm$ 0.7 (9.5 $\pm$ 0.7)} & \textbf{111.0 $\pm$ 1.4} & "
            r"12.50 $\pm$ 0.71 & -- / -- & 1 & 191.0 (8.0) & 51.5 & 9.50 & -- / -- \\") in latex
    assert latex.count(r"\midrule") == 4 + 1  # header rule + 3 block separators + VAE, and the comparison table
    assert r"RQ $\lambda_m$=0.1 $\lambda_r$=1.0 $-$ VAE & PTB & 2 & -1.5 [-7.9, +4.9]" in latex


def test_final_values_differ_from_best_values(store):
    from analysis.runs import load_study
    from analysis.render import render_markdown
    from analysis.tables import build_table

    runs = load_study(EXPERIMENT, tracking_uri=store["uri"])
    text = render_markdown(build_table(runs, "table3", at="final"))
    assert "last evaluation" in text
    assert "| VAE |  |  | 2 | 107.5 ± 2.1 (9.5 ± 4.9) |" in text  # seed 0: last evaluation 109 (13), seed 1: 106 (6)


def test_early_stopped_runs_are_flagged_and_can_be_left_out(store):
    from analysis.runs import load_study, stopped_early
    from analysis.render import render_markdown
    from analysis.tables import build_table

    runs = load_study(EXPERIMENT, tracking_uri=store["uri"])
    assert stopped_early(runs).tolist() == [False] * 10 + [True]  # the FAILED run stopped at step 10 of 20
    runs.loc[runs["run_name"] == "vae-yelp13-seed0", "steps_done"] = 10  # as if ASHA had stopped it
    assert "1 of the tabulated runs stopped before config train.steps" in render_markdown(build_table(runs, "table3"))
    result = run_cli("table", "--layout", "table1", "--complete-only", "--tracking-uri", store["uri"])
    assert result.returncode == 0 and "stopped before train.steps" not in result.stderr  # only the FAILED one
    assert "left out 1 early-stopped runs" in result.stderr


def test_stopped_early_reads_the_outcome_tag_and_guesses_only_without_it():
    from analysis.runs import stopped_early
    from studies.record import Outcome

    runs = pd.DataFrame({"outcome": [Outcome.STOPPED_EARLY, Outcome.DONE, Outcome.DIVERGED, None, None],
                         "steps_done": [20, 20, 10, 10, 20], "config.train.steps": [20, 20, 20, 20, 20]})
    # tagged: the tag decides (a diverged run also ended early, but ASHA did not stop it);
    # untagged (a store written before the tag): a last evaluation before train.steps
    assert stopped_early(runs).tolist() == [True, False, False, True, False]
    assert stopped_early(runs.drop(columns=["config.train.steps"])).tolist() == [True, False, False, False, False]
    assert stopped_early(runs.drop(columns=["outcome"])).tolist() == [False, False, True, True, False]


def test_table1_and_table2_put_each_family_beside_its_coupled_twin(store):
    from analysis.runs import load_study
    from analysis.render import render_markdown
    from analysis.tables import build_table

    runs = load_study(EXPERIMENT, tracking_uri=store["uri"])
    text = render_markdown(build_table(runs, "table1"))
    assert "| Model | PTB n | PTB NLL (KL) | PTB PPL | Yelp n | Yelp NLL (KL) | Yelp PPL |" in text
    assert "| VAE | 2 | 105.0 ± 1.4 (7.0 ± 1.4) | 116.0 ± 1.4 | 1 | 194.0 (7.0) | 54.5 |" in text
    assert ("| Coupled-VAE (RQ, λ_m=0.1, λ_r=1.0) | 2 | 103.5 ± 0.7 (9.5 ± 0.7) | 111.0 ± 1.4 | 1 | "
            "**191.0 (8.0)** | **51.5** |") in text
    assert "| Coupled-VAE (Eucl, λ_m=0.1, λ_r=1.0) | 1 | **103.2 (11.0)** | **110.5** | 0 | – | – |" in text
    text2 = render_markdown(build_table(runs, "table2"))
    assert "| Coupled-VAE (RQ, λ_m=1.0, λ_r=1.0) | 2 | **16.00 ± 1.41** | – / – | 0 | – | – |" in text2


def _with(runs: pd.DataFrame, mask, **changes) -> pd.DataFrame:
    extra = runs[mask].copy()
    for column, value in changes.items():
        extra[column] = value
    extra["run_id"] = extra["run_id"] + "-copy"
    return pd.concat([runs, extra], ignore_index=True)


def test_table4_pairs_lambda_m_zero_with_the_preset_setting(store):
    from analysis.runs import load_study
    from analysis.render import render_markdown
    from analysis.tables import build_table

    runs = load_study(EXPERIMENT, tracking_uri=store["uri"])
    runs = runs[runs["status"] == "FINISHED"]
    reference = ((runs["preset"] == "coupled-vae") & (runs["config.coupling.distance"] == "rq")
                 & (runs["config.coupling.lambda_m"] == 0.1) & (runs["config.coupling.lambda_r"] == 1.0))
    zero = runs[reference].copy()
    runs = _with(runs, reference, **{"config.coupling.lambda_m": 0.0,
                                     "best.val_nll": zero["best.val_nll"].to_numpy() + [0.5, 1.5, -1.0],
                                     "best.val_ppl": zero["best.val_ppl"].to_numpy() + 2.0})
    text = render_markdown(build_table(runs, "table4"))
    assert "| Coupled-VAE* | 2 | **103.5 ± 0.7** | **111.0 ± 1.4** | 1 | 191.0 | **51.5** |" in text
    assert "| Coupled-VAE (λ_m=0) | 2 | 104.5 ± 1.4 | 113.0 ± 1.4 | 1 | **190.0** | 53.5 |" in text
    # differences reference − zero per seed: PTB −0.5, −1.5 -> −1.0 [−7.4, +5.4]; Yelp +1.0
    assert "| Coupled-VAE* − Coupled-VAE (λ_m=0) | PTB | 2 | -1.0 [-7.4, +5.4] | -2.0 [-2.0, -2.0] |" in text
    assert "| Coupled-VAE* − Coupled-VAE (λ_m=0) | Yelp | 1 | +1.0 | -2.0 |" in text

    # the record of newer studies: a λ_m = 0 run logs its unused distance and RQ's C as "none"
    # (missing values); the table is the same
    zero_rows = runs["config.coupling.lambda_m"] == 0.0
    unused = runs.copy()
    unused.loc[zero_rows, ["config.coupling.distance", "config.coupling.rq_c"]] = None
    assert render_markdown(build_table(unused, "table4")) == text


def test_table8_lists_dialogue_models_by_lambda_m(store):
    from analysis.runs import load_study
    from analysis.render import render_markdown
    from analysis.tables import build_table

    runs = load_study(EXPERIMENT, tracking_uri=store["uri"])
    runs = runs[(runs["status"] == "FINISHED") & (runs["dataset"] == "ptb") & (runs["config.coupling.lambda_r"] == 1.0)
                & (runs["config.coupling.distance"] == "rq")].copy()
    runs["preset"] = runs["preset"].map({"vae": "cvae", "coupled-vae": "coupled-cvae"})
    runs["dataset"] = "switchboard"
    runs["best.val_dist1"] = [0.61, 0.59, 0.70, 0.72, 0.80, 0.86]  # in start order: vae 0, 1, λ_m 0.1: 0, 1, λ_m 1: 0, 1
    text = render_markdown(build_table(runs, "table8"))
    assert "| Model | Switchboard n | Switchboard NLL (KL) | Switchboard PPL | Switchboard D-1 | Switchboard D-2 |" in text
    assert "| CVAE | 2 | 105.0 ± 1.4 (7.0 ± 1.4) | 116.0 ± 1.4 | 0.60 ± 0.01 | – |" in text
    assert "| Coupled-CVAE (λ_m=0.1) | 2 | **103.5 ± 0.7 (9.5 ± 0.7)** | **111.0 ± 1.4** | 0.71 ± 0.01 | – |" in text
    assert "| Coupled-CVAE (λ_m=1.0) | 2 | 104.0 ± 0.7 (13.0 ± 1.4) | 112.0 ± 1.4 | **0.83 ± 0.04** | – |" in text
    assert "| Coupled-CVAE (λ_m=1.0) − CVAE | Switchboard | 2 |" in text


# --------------------------------------------------------------------------------------------
# Reproduction report


def test_reproduce_puts_ours_beside_the_paper_and_checks_effect_directions(store):
    result = run_cli("reproduce", "--tracking-uri", store["uri"])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Wu, Wang & Wang (2020)" in text and "TEST split" in text and "VALIDATION split" in text
    assert "`quick` scale" in text
    assert "| 1 | VAE | PTB | NLL | 103.6 | 105.0 ± 1.4 | 2 | +1.4 |" in text
    assert "| 2 | Coupled-VAE | Yelp | MI | 9.65 | 9.50 | 1 | -0.15 |" in text
    assert "| 3 | Eucl λ_m=0.1 λ_r=1.0 | PTB | KL | 10.1 | 11.0 | 1 | +0.9 |" in text
    assert ("| 1 | PTB | Coupled-VAE − VAE | NLL | -0.5 | -1.5 [-7.9, +4.9] (n=2) | "
            "cannot check: interval includes 0 (same sign) |" in text)
    assert "| 2 | PTB | Coupled-VAE − VAE | MI | +1.51 | +2.00 [+2.00, +2.00] (n=2) | reproduced |" in text
    assert ("16 effects: 4 reproduced, 0 contradicted (a paired 95% interval excluding 0), 12 cannot check "
            "(an interval including 0, or no seed pairs); by sign alone 16 agree, 0 do not." in text)


def test_reproduce_flags_an_effect_whose_direction_disagrees(store):
    from analysis.reproduce import effects, report
    from analysis.runs import load_study

    runs = load_study(EXPERIMENT, tracking_uri=store["uri"])
    coupled_yelp = (runs["preset"] == "coupled-vae") & (runs["dataset"] == "yelp13")
    runs.loc[coupled_yelp, "best.val_nll"] = 196.0  # now worse than the VAE's 194.0, the paper says better
    found = {(e.table, e.dataset, e.metric): e for e in effects(runs)}
    assert found[("1", "yelp13", "nll")].verdict() == "cannot check: no seed pairs (opposite sign)"
    assert found[("1", "yelp13", "nll")].ours_value == pytest.approx(2.0)
    assert found[("1", "ptb", "nll")].verdict() == "cannot check: interval includes 0 (same sign)"
    text = report(runs, STUDY)
    assert "| 1 | Yelp | Coupled-VAE − VAE | NLL | -2.5 | +2.0 | cannot check: no seed pairs (opposite sign) |" in text
    assert "by sign alone 15 agree, 1 do not." in text
    # a paired interval that excludes 0 decides: on the paper's side or the other
    ptb = runs["dataset"] == "ptb"
    vae_by_seed = runs[ptb & (runs["preset"] == "vae")].set_index("seed")["best.val_nll"]
    coupled = ptb & (runs["preset"] == "coupled-vae") & runs["seed"].isin(vae_by_seed.index)
    for shift, verdict in (((-3.0, -3.1), "reproduced"), ((+3.0, +3.1), "contradicted")):  # n=2: t = 12.7
        shifted = runs.copy()
        seeds = shifted.loc[coupled, "seed"].astype(int)
        shifted.loc[coupled, "best.val_nll"] = (seeds.map(vae_by_seed) + seeds.map(dict(enumerate(shift)))).astype(float)
        found = {(e.table, e.dataset, e.metric): e for e in effects(shifted)}
        assert found[("1", "ptb", "nll")].verdict() == verdict


def test_paper_values_are_stored_with_their_source():
    from analysis.paper import PAPER_ROWS, SOURCE, paper_frame, paper_rows

    assert "ACL 2020" in SOURCE
    assert {r.table for r in PAPER_ROWS} == {"1", "2", "3", "4", "8"}
    vae_ptb = next(r for r in paper_rows("1", "ptb") if r.label == "VAE")
    assert vae_ptb.values == {"nll": 103.6, "kl": 8.6, "ppl": 112.9}
    eucl5 = next(r for r in paper_rows("3", "yelp13") if r.coupling == {"distance": "eucl", "lambda_m": 5.0,
                                                                         "lambda_r": 1.0})
    assert eucl5.values["mi_loo"] == 61.62 and eucl5.values["bleu1"] == 36.8
    frame = paper_frame()
    assert len(frame) == sum(len(r.values) for r in PAPER_ROWS)
    assert (frame["source"] == SOURCE).all()
    from cvae_core.config import PRESETS

    missing = {r.preset for r in PAPER_ROWS if r.preset and r.table in ("1", "2", "3", "4")} - set(PRESETS)
    assert not missing, f"paper rows name presets cvae_core lacks: {missing}"


# --------------------------------------------------------------------------------------------
# Plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_plot_is_a_non_empty_png(store, tmp_path):
    from analysis.plots import make_plots
    from analysis.runs import fetch_study

    study = fetch_study(EXPERIMENT, tracking_uri=store["uri"])
    notes: list[str] = []
    finished = study.runs[study.runs["status"] == "FINISHED"]
    paths = make_plots(finished, study.history, study.parent.data.tags, tmp_path / "plots", note=notes.append)
    names = sorted(p.name for p in paths)
    assert names == ["grad_norms.png", "importances.png", "lambda_m_ptb.png", "parallel_coordinates.png",
                     "pareto_nll_mi.png", "top_k_curves.png"], notes
    assert notes == ["λ_m plot for Yelp skipped: one λ_m value only"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, path


def test_plots_command_logs_the_pngs_to_the_study_run(store, tmp_path):
    result = run_cli("plots", "--tracking-uri", store["uri"], "--out", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr
    assert "logged 6 plots to the study run" in result.stdout
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "analysis/plots")}
    assert "analysis/plots/pareto_nll_mi.png" in logged and len(logged) == 6


def test_plots_skip_what_the_study_lacks_with_a_reason(store, tmp_path):
    from analysis.plots import make_plots
    from analysis.runs import fetch_study

    study = fetch_study(EXPERIMENT, study="old_sweep-20261101-000000", tracking_uri=store["uri"])
    notes: list[str] = []
    paths = make_plots(study.runs, study.history, study.parent.data.tags, tmp_path, note=notes.append)
    assert [p.name for p in paths] == ["pareto_nll_mi.png", "top_k_curves.png"]
    text = "\n".join(notes)
    assert "fewer than two λ_m values" in text and "no run logged grad_*" in text and "optuna.storage" in text


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_plots_in_paper_formats_with_readable_parameter_names(store, tmp_path, fmt, magic):
    result = run_cli("plots", "--tracking-uri", store["uri"], "--out", str(tmp_path / fmt), "--format", fmt,
                     "--no-log")
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / fmt).iterdir())
    assert len(files) == 6 and all(f.suffix == f".{fmt}" and f.read_bytes().startswith(magic) for f in files)
    if fmt == "svg":
        importances = (tmp_path / fmt / "importances.svg").read_text()
        assert "search.matching" not in importances and "rough ranking" in importances

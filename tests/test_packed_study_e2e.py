"""A packed study end to end (real local Ray, SQLite MLflow, Optuna): 6 proposals in 2 packs of 3,
per-member ASHA, and one pack whose worker process is killed (SIGKILL) after its first report and
is retried from its checkpoint.  A user must not be able to tell its records from an unpacked study's, except for the
``pack`` tag: one MLflow run per member with its own metric history (no step twice), its best
checkpoint and log; one summary row per member; one Optuna trial per member in the right state;
``python -m analysis export`` reads it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_fault_divergence import tiny_spec

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_packed_study_records_each_member_as_a_trial(tmp_path, capsys, no_tracking_uri_env):
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState
    from ray import tune

    from studies.record import Outcome, Tag
    from studies.runner import Options, run_study
    from studies.tracking import child_runs
    from test_studies_cluster import _kill_one_trial_after

    spec = tiny_spec(tmp_path / "packed.yaml", [], num_samples=6, steps=40)
    raw = yaml.safe_load(spec.read_text())
    raw["base"]["preset"] = "coupled-vae"  # every lambda proposal packs with every other
    raw["resources"]["pack"] = 3
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the first pack to report two evaluations loses its worker process (SIGKILL): Tune retries it
    # from its checkpoint of the first
    killed: dict[str, str] = {}
    outcome = run_study(Options(profile=str(spec), root=str(tmp_path / "out"), tracking_uri=uri,
                                study_name="packed", callbacks=(_kill_one_trial_after(uri, 2, killed),)))
    out = capsys.readouterr().out
    assert outcome.exit_code == 0 and not outcome.interrupted, out
    assert killed, "no pack was killed: the retry went unchecked"
    assert "Packs of up to 3 trials, one Ray trial each: about " in out and " GiB of memory per pack (" in out

    # Ray: two pack trials, one of them retried once from its checkpoint
    analysis = tune.ExperimentAnalysis(str(tmp_path / "out" / "ray_results" / "packed"))
    packs = {t.trial_id: t for t in analysis.trials}
    assert len(packs) == 2 and all(t.status == "TERMINATED" for t in packs.values())
    retried = [t for t in packs.values() if t.num_failures == 1]
    assert len(retried) == 1 and "retry" in out

    # summary: one row per member, with the member's own outcome
    rows = {r.trial_id: r for r in outcome.rows}
    assert len(rows) == 6 and all(r.status in ("done", "stopped") for r in rows.values()), rows
    statuses = [r.status for r in rows.values()]
    assert "done" in statuses and "stopped" in statuses, "ASHA stopped no member (or all): nothing checked"
    summary = json.loads((tmp_path / "out" / "packed" / "summary.json").read_text())
    assert summary["counts"]["done"] + summary["counts"]["stopped"] == 6

    # MLflow: one run per member, tagged with its pack, FINISHED with its outcome, and a metric
    # history without any step twice (the retried pack re-ran evaluations after its checkpoint)
    state = json.loads((tmp_path / "out" / "packed" / "study.json").read_text())
    client = MlflowClient(uri)
    runs = {r.data.tags[Tag.TRIAL_ID]: r for r in child_runs(client, state["experiment_id"], state["parent_run_id"])}
    assert set(runs) == set(rows)
    for member_id, row in rows.items():
        run = runs[member_id]
        tags = run.data.tags
        assert tags[Tag.PACK] in packs
        assert run.info.status == "FINISHED" and run.info.run_id == row.run_id
        history = client.get_metric_history(run.info.run_id, "val_nll")
        steps = [int(m.step) for m in history]
        assert len(steps) == len(set(steps)) == row.evaluations, (member_id, steps)
        assert steps == [10 * (i + 1) for i in range(row.evaluations)]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"checkpoint", "train.log", "config.json"} <= artifacts, artifacts
        if row.status == "done":
            assert tags[Tag.OUTCOME] == Outcome.DONE and row.evaluations == 4
        else:
            assert tags[Tag.OUTCOME] == Outcome.STOPPED_EARLY
            match = re.fullmatch(r"ASHA stopped at step (\d+) of 40 \(rung at evaluation (\d) of 4: val_nll "
                                 r"[\d.]+ worse than the rung's cutoff\)", tags[Tag.OUTCOME_REASON])
            assert match and int(match.group(1)) == 10 * row.evaluations == 20, tags[Tag.OUTCOME_REASON]
    retried_members = [m for m, r in runs.items() if r.data.tags[Tag.PACK] == retried[0].trial_id]
    assert killed["trial"] in retried_members, (killed, retried_members)
    assert len(retried_members) == 3
    resumed = [runs[m] for m in retried_members if runs[m].data.tags[Tag.RESUMED_FROM_STEP] != "none"]
    assert resumed, "no member of the retried pack was resumed from its checkpoint"
    for run in resumed:
        step = run.data.tags[Tag.RESUMED_FROM_STEP]
        assert int(step) >= 10
        assert f"train-resumed-at-step-{step}.log" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # Optuna: one trial per member, PRUNED when stopped early, COMPLETE otherwise
    trials = optuna.load_study(study_name="packed", storage=state["optuna_storage"]).get_trials()
    assert len(trials) == 6
    assert sum(t.state == TrialState.PRUNED for t in trials) == statuses.count("stopped")
    assert sum(t.state == TrialState.COMPLETE for t in trials) == statuses.count("done")
    done_values = sorted(r.best["val_nll"] for r in rows.values() if r.status == "done")
    assert sorted(t.value for t in trials if t.state == TrialState.COMPLETE) == pytest.approx(done_values)

    # analysis reads it as any study
    export = subprocess.run([sys.executable, "-m", "analysis", "export", "--experiment", "coupled-vae-studies",
                             "--tracking-uri", uri, "--out", str(tmp_path / "runs.parquet")],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert export.returncode == 0, export.stderr
    assert "6 runs" in export.stdout, export.stdout
    from analysis.runs import read_parquet

    frame = read_parquet(tmp_path / "runs.parquet")
    assert sorted(frame["ray_trial_id"]) == sorted(rows)
    assert sorted(frame["outcome"]) == sorted(runs[m].data.tags[Tag.OUTCOME] for m in rows)


def test_killed_packed_study_resumes_whole_packs_without_duplicate_metrics(tmp_path):
    """SIGKILL the driver (and its local Ray) once a pack has reported its second evaluation, then
    --resume: Tune restores the packs from their checkpoints and the PackSearcher its grouping;
    every member ends with one run, each step logged once, and Optuna holds one finished trial per
    searched member."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState
    from test_study_commands import kill_driver_then_resume

    def at_a_second_pack_evaluation(line: str, seen: list[str]) -> bool:
        if "Packs of up to 3 trials" in line:
            assert "GiB of memory per pack" in line
        return bool(re.search(r"\] eval   \w+-[12]  2/4 ", line))  # a member of a coupled pack, at its second evaluation

    args = ["--num-samples", "5", "--pack", "3", "--set", "train.dynamics_every=0", "--study-name", "killed"]
    _, result = kill_driver_then_resume(tmp_path, args, "killed", at_a_second_pack_evaluation)
    assert result.returncode == 0, result.stdout[-4000:]
    summary = json.loads((tmp_path / "studies_out" / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["trials"]) == 6  # the VAE baseline + 5 proposals
    assert all(t["status"] in ("done", "stopped") for t in summary["trials"]), summary["trials"]

    client = MlflowClient(summary["tracking_uri"])
    experiment = client.get_experiment_by_name("coupled-vae-studies")
    runs = client.search_runs([experiment.experiment_id], "tags.`cvae.role` = 'trial'")
    assert sorted(r.data.tags["ray_trial_id"] for r in runs) == sorted(t["trial_id"] for t in summary["trials"])
    by_id = {t["trial_id"]: t for t in summary["trials"]}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["cvae.pack"]
        steps = [int(m.step) for m in client.get_metric_history(run.info.run_id, "val_nll")]
        assert len(steps) == len(set(steps)) == by_id[run.data.tags["ray_trial_id"]]["evaluations"], steps

    study = optuna.load_study(study_name="killed", storage=summary["optuna_storage"])
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert len(study.trials) == 5, [t.params for t in study.trials]


def test_a_diverging_member_is_its_own_outcome_and_its_pack_goes_on(tmp_path, no_tracking_uri_env):
    from mlflow import MlflowClient

    from studies.record import Outcome, Tag
    from studies.runner import Options, run_study
    from studies.tracking import child_runs

    spec = tiny_spec(tmp_path / "diverge.yaml", [{"coupling.lambda_m": 0.5}, {"coupling.lambda_m": 1e38}], steps=30)
    raw = yaml.safe_load(spec.read_text())
    raw["base"]["preset"] = "coupled-vae"
    raw["resources"]["pack"] = 2
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_study(Options(profile=str(spec), root=str(tmp_path / "out"), tracking_uri=uri, study_name="diverge"))
    assert outcome.exit_code == 0 and not outcome.interrupted
    rows = {r.config["coupling.lambda_m"]: r for r in outcome.rows}
    assert rows[0.5].status == "done" and rows[0.5].evaluations == 3
    diverged = rows[1e38]
    assert diverged.status == "diverged" and diverged.error.startswith("diverged at step ") and not diverged.best
    assert diverged.trial_id.rsplit("-", 1)[0] == rows[0.5].trial_id.rsplit("-", 1)[0]  # one pack
    state = json.loads((tmp_path / "out" / "diverge" / "study.json").read_text())
    runs = {r.data.tags[Tag.TRIAL_ID]: r for r in child_runs(MlflowClient(uri), state["experiment_id"],
                                                            state["parent_run_id"])}
    run = runs[diverged.trial_id]
    assert run.info.status == "FINISHED" and run.data.tags[Tag.OUTCOME] == Outcome.DIVERGED
    assert diverged.error == f"diverged at step {run.data.tags[Tag.DIVERGED_AT_STEP]}: " + \
        diverged.error.split(": ", 1)[1]
    assert "val_nll" not in run.data.metrics  # no number invented for it
    assert runs[rows[0.5].trial_id].data.tags[Tag.OUTCOME] == Outcome.DONE

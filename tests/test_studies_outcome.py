"""The explicit trial outcome (a real tiny study: local Ray, SQLite MLflow).

Every trial run carries ``Tag.OUTCOME``, written by the driver as Tune ends the trial: ``done``
for a trial that trained for train.steps, ``stopped_early`` with the scheduler's reason for one
ASHA stopped; the summary's rows and counts follow the recorded outcome, and each row's metrics
are those at the step the core itself reported as best."""
from __future__ import annotations

import json
import re

import pytest
import yaml
from test_fault_divergence import tiny_spec

pytestmark = pytest.mark.slow


def test_done_and_stopped_trials_carry_their_outcome(tmp_path, no_tracking_uri_env):
    from mlflow import MlflowClient

    from studies.record import Outcome, Tag
    from studies.runner import Options, run_study
    from studies.tracking import child_runs

    # one trial at a time: the order in which results reach ASHA is fixed, so what it stops is too
    spec = tiny_spec(tmp_path / "outcome.yaml", [{"preset": "vae"}], num_samples=4, steps=40, max_concurrent=1)
    coupled = yaml.safe_load(spec.read_text())
    coupled["base"]["preset"] = "coupled-vae"  # Optuna's proposals differ, so ASHA has a worse half to stop
    spec.write_text(yaml.safe_dump(coupled))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_study(Options(profile=str(spec), root=str(tmp_path / "out"), tracking_uri=uri,
                                study_name="outcome"))
    assert outcome.exit_code == 0 and len(outcome.rows) == 5
    state = json.loads((tmp_path / "out" / "outcome" / "study.json").read_text())
    runs = {r.data.tags[Tag.TRIAL_ID]: r
            for r in child_runs(MlflowClient(uri), state["experiment_id"], state["parent_run_id"])}
    assert set(runs) == {r.trial_id for r in outcome.rows}
    seen = set()
    for row in outcome.rows:
        tags = runs[row.trial_id].data.tags
        assert runs[row.trial_id].info.status == "FINISHED"
        seen.add(tags[Tag.OUTCOME])
        if row.status == "done":
            assert tags[Tag.OUTCOME] == Outcome.DONE and Tag.OUTCOME_REASON not in tags
            assert row.evaluations == 4
        else:
            assert row.status == "stopped" and tags[Tag.OUTCOME] == Outcome.STOPPED_EARLY, (row, tags)
            reason = tags[Tag.OUTCOME_REASON]
            match = re.fullmatch(r"ASHA stopped at step (\d+) of 40 \(rung at evaluation (\d) of 4: val_nll "
                                 r"[\d.]+ worse than the rung's cutoff\)", reason)
            assert match and int(match.group(1)) == 10 * row.evaluations == 10 * int(match.group(2)), reason
            assert row.reason == reason
        # the row's metrics are those of the evaluation the core called best
        history = MlflowClient(uri).get_metric_history(runs[row.trial_id].info.run_id, "best_step")
        assert row.best["step"] == max(history, key=lambda m: m.step).value
    assert seen == {Outcome.DONE, Outcome.STOPPED_EARLY}, "ASHA stopped nothing (or everything): nothing checked"
    summary = json.loads((tmp_path / "out" / "outcome" / "summary.json").read_text())
    assert summary["counts"]["stopped"] == sum(r.status == "stopped" for r in outcome.rows) > 0

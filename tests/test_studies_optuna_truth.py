"""Optuna is told what the record says (the study's real Optuna searcher over a persisted SQLite Optuna study,
driven through the study's searcher exactly as Tune drives it; no training, seconds):

* a trial stopped early by the scheduler is PRUNED with the intermediate values it reported;
* a trial that diverged (it also ends early, without an error) is FAIL, its divergence report
  no intermediate value, and a re-proposal of its configuration is told FAIL, not trained;
* a trial that ran its budget is COMPLETE with the objective at its best evaluation, the number
  the summary and MLflow show, not its last report;
* the objectives are named in the Optuna study;
* after a driver died between an experiment snapshot and its next ask, the restored searcher
  adopts the Optuna trial left RUNNING instead of asking the sampler again (no phantom).
The end-to-end version (a real Ray study, SIGKILLed driver, --resume) is in
test_study_commands.py."""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

from studies.searcher import StudyOptunaSearch, StudySearcher
from studies.spaces import lambda_space

optuna.logging.set_verbosity(optuna.logging.WARNING)
EVALUATIONS = 4


def _searchers(storage_url: str, name: str = "truth"):
    inner = StudyOptunaSearch(space=lambda_space, metric="val_nll", mode="min",
                              sampler=optuna.samplers.TPESampler(seed=0), study_name=name,
                              storage=optuna.storages.RDBStorage(storage_url))
    outer = StudySearcher(inner, fixed=[], n_search=3, seeds=[0], metric="val_nll", mode="min",
                          evaluations=EVALUATIONS)
    return inner, outer


def _report(searcher: StudySearcher, trial_id: str, values: list[float]) -> dict:
    """Report like Tune: the report on which the scheduler stops a trial (its ASHA rung, or the
    last one at max_t) goes to the searcher only as the result of on_trial_complete."""
    results = [{"val_nll": value, "training_iteration": i, "step": 10 * i} for i, value in enumerate(values, 1)]
    for result in results[:-1]:
        searcher.on_trial_result(trial_id, result)
    return results[-1]


def test_stopped_trials_are_pruned_and_complete_ones_carry_the_recorded_best(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _, searcher = _searchers(url)
    searcher.suggest("stopped")
    last = _report(searcher, "stopped", [168.9, 150.91])  # ASHA stops it after 2 of 4 reports
    searcher.on_trial_complete("stopped", last)
    searcher.suggest("full")
    last = _report(searcher, "full", [130.0, 120.5, 125.0, 128.0])  # best at report 2, last 128
    searcher.on_trial_complete("full", last)
    searcher.suggest("best-last")
    last = _report(searcher, "best-last", [130.0, 125.0, 124.0, 119.0])  # the stopping report is the best
    searcher.on_trial_complete("best-last", last)

    study = optuna.load_study(study_name="truth", storage=url)
    stopped, full, best_last = study.trials
    assert stopped.state == TrialState.PRUNED
    assert stopped.intermediate_values == {1: 168.9, 2: 150.91}
    assert full.state == TrialState.COMPLETE and full.value == 120.5  # the record's best, not 128
    assert full.intermediate_values == {1: 130.0, 2: 120.5, 3: 125.0, 4: 128.0}
    assert best_last.value == 119.0
    assert study.metric_names == ["val_nll"]


def test_a_diverged_proposal_fails_and_is_not_trained_again(tmp_path):
    from ray.tune.search import Searcher

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    one_config = lambda trial: {"coupling.lambda_m": trial.suggest_categorical("coupling.lambda_m", [1.0])}  # noqa: E731
    inner = StudyOptunaSearch(space=one_config, metric="val_nll", mode="min",
                              sampler=optuna.samplers.TPESampler(seed=0), study_name="truth",
                              storage=optuna.storages.RDBStorage(url))
    searcher = StudySearcher(inner, fixed=[], n_search=2, seeds=[0], metric="val_nll", mode="min",
                             evaluations=EVALUATIONS)
    searcher.suggest("diverged")
    searcher.on_trial_result("diverged", {"val_nll": 168.9, "training_iteration": 1, "step": 10})
    # the trainable's divergence report (studies/trainable.py report_divergence): NaN objectives
    searcher.on_trial_complete("diverged", {"val_nll": float("nan"), "diverged": 1.0, "training_iteration": 2,
                                            "step": 13})
    study = optuna.load_study(study_name="truth", storage=url)
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL and trial.intermediate_values == {1: 168.9}

    # the space's only configuration proposed again is told FAIL at once instead of being trained
    assert searcher.suggest("again") == Searcher.FINISHED
    states = [t.state for t in optuna.load_study(study_name="truth", storage=url).trials]
    assert len(states) > 1 and set(states) == {TrialState.FAIL}


def test_a_restored_searcher_adopts_the_trial_its_dead_driver_left_running(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    inner, searcher = _searchers(url)
    first = searcher.suggest("t0")
    snapshot = tmp_path / "searcher-state.pkl"
    inner.save(str(snapshot))  # Tune's experiment snapshot
    state = searcher.get_state()
    lost = searcher.suggest("t1")  # asked after the snapshot; then the driver is SIGKILLed
    study = optuna.load_study(study_name="truth", storage=url)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.RUNNING]

    restored_inner, restored = _searchers(url)
    restored_inner.restore(str(snapshot))  # what Tuner.restore does: base searcher, then wrappers
    restored.set_state(state)
    again = restored.suggest("t1-after-resume")
    assert again == lost  # the same configuration, from the same Optuna trial
    restored.on_trial_complete("t0", _report(restored, "t0", [130.0, 129.0, 128.0, 127.0]))
    restored.on_trial_complete("t1-after-resume", _report(restored, "t1-after-resume", [131.0, 126.0, 126.5, 127.0]))

    study = optuna.load_study(study_name="truth", storage=url)
    assert len(study.trials) == 2, "the lost ask became a phantom trial"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.value for t in study.trials] == [127.0, 126.0]
    assert study.trials[0].params == {k: v for k, v in first.items() if k != "train.seed" and k in study.trials[0].params}


def test_a_restored_sampler_does_not_draw_a_lost_proposal_again(tmp_path):
    """Tune restores the sampler from its last snapshot; an ask made after it was lost with the
    driver (its Optuna trial is adopted as it is). The next trial must draw what the uninterrupted
    study drew for that trial number, not replay the lost draw (which trained one configuration
    twice with a single-stream TPESampler)."""
    import pickle

    from optuna.distributions import FloatDistribution

    from studies.searcher import PerTrialSeedSampler

    url, space = f"sqlite:///{tmp_path / 'optuna.db'}", {"x": FloatDistribution(0.0, 1.0)}
    straight = optuna.create_study(study_name="straight", storage=url, sampler=PerTrialSeedSampler(0))
    drawn = [straight.ask(space).params["x"] for _ in range(3)]

    sampler = PerTrialSeedSampler(0)
    killed = optuna.create_study(study_name="killed", storage=url, sampler=sampler)
    assert killed.ask(space).params["x"] == drawn[0]
    snapshot = pickle.dumps(sampler)
    lost = killed.ask(space).params["x"]  # asked after the snapshot; the driver dies
    resumed = optuna.load_study(study_name="killed", storage=url, sampler=pickle.loads(snapshot))
    assert resumed.ask(space).params["x"] == drawn[2] != lost

    # the single-stream sampler it replaces replays the lost draw
    plain = optuna.samplers.TPESampler(seed=0)
    replay = optuna.create_study(study_name="replay", storage=url, sampler=plain)
    replay.ask(space)
    snapshot = pickle.dumps(plain)
    lost = replay.ask(space).params["x"]
    resumed = optuna.load_study(study_name="replay", storage=url, sampler=pickle.loads(snapshot))
    assert resumed.ask(space).params["x"] == lost

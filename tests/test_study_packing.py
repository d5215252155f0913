"""Packed studies, fast parts: how the PackSearcher groups proposals into packs and fans a pack's
results out to the study searcher (real StudySearcher, real Optuna on SQLite), the per-member
ASHA rule against Ray's own ASHA bracket, and the spec/flag checks."""
from __future__ import annotations

import pickle
import random

import optuna
import pytest
from optuna.trial import TrialState

from studies.outcomes import AshaRule
from studies.packing import PackKey, PackSearcher
from studies.record import Outcome
from studies.results import OUTCOME, PACK_CONFIG, REASON, TRAINING_ITERATION, member_key, member_results
from studies.searcher import NoSearch, StudyOptunaSearch, StudySearcher
from studies.spaces import SPACES

KEY = PackKey("coupled-vae", "ptb", "quick", {})


def fixed_searcher(fixed):
    return StudySearcher(NoSearch("val_nll", "min"), fixed=fixed, n_search=0, seeds=[0], metric="val_nll",
                         mode="min", evaluations=4)


def members_of(suggestion):
    return [(m["trial_id"], m["config"]) for m in suggestion[PACK_CONFIG]]


def test_proposals_that_share_their_settings_pack_together_and_the_rest_waits():
    fixed = [{"preset": "vae"}, {"coupling.lambda_r": 1.0}, {"coupling.lambda_r": 2.0}, {"model.hidden_dim": 32},
             {"coupling.lambda_m": 0.5}]
    searcher = PackSearcher(fixed_searcher(fixed), 2, KEY)
    a = members_of(searcher.suggest("a"))
    # the VAE baseline has no coupling: it cannot share a pack with the coupled proposals drawn after it
    assert a == [("a-0", {"preset": "vae", "train.seed": 0})]
    b = members_of(searcher.suggest("b"))
    assert [m for m, _ in b] == ["b-0", "b-1"]  # named after the pack they train in
    assert [c["coupling.lambda_r"] for _, c in b] == [1.0, 2.0]
    c = members_of(searcher.suggest("c"))  # a different hidden size: alone; lambda_m 0.5 waits
    assert [(m, cfg.get("model.hidden_dim")) for m, cfg in c] == [("c-0", 32)]
    d = members_of(searcher.suggest("d"))
    assert [(m, cfg.get("coupling.lambda_m")) for m, cfg in d] == [("d-0", 0.5)]
    assert searcher.suggest("e") == PackSearcher.FINISHED
    assert sum(len(v) for v in searcher.packs.values()) == len(fixed)
    # the study searcher knows each proposal under its member id (its seeds, results and Optuna trial)
    assert sorted(searcher.searcher.trial_group) == ["a-0", "b-0", "b-1", "c-0", "d-0"]


def test_the_grouping_survives_a_restore():
    fixed = [{"coupling.lambda_r": float(r)} for r in range(5)]
    searcher = PackSearcher(fixed_searcher(fixed), 2, KEY)
    assert [m for m, _ in members_of(searcher.suggest("a"))] == ["a-0", "a-1"]
    # Tune saves each wrapper's get_state (pickled) and restores it into a fresh chain
    inner_state = pickle.loads(pickle.dumps(searcher.searcher.get_state()))
    state = pickle.loads(pickle.dumps(searcher.get_state()))
    restored = PackSearcher(fixed_searcher(fixed), 2, KEY)
    restored.searcher.set_state(inner_state)
    restored.set_state(state)
    assert restored.packs == {"a": ["a-0", "a-1"]}
    assert [c["coupling.lambda_r"] for _, c in members_of(restored.suggest("b"))] == [2.0, 3.0]
    assert [c["coupling.lambda_r"] for _, c in members_of(restored.suggest("c"))] == [4.0]


def pack_result(evaluations: dict[str, dict], ends: dict[str, dict] | None = None) -> dict:
    result = {"step": 0.0}
    for member_id, metrics in evaluations.items():
        result.update({member_key(member_id, k): v for k, v in metrics.items()})
    for member_id, end in (ends or {}).items():
        result.update({member_key(member_id, k): v for k, v in end.items()})
    return result


def evaluation(n: int, val_nll: float, is_best: bool) -> dict:
    return {"step": 10.0 * n, "val_nll": val_nll, "is_best": float(is_best), TRAINING_ITERATION: n}


def test_optuna_sees_one_trial_per_member_pruned_or_complete_at_its_best(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    inner = StudyOptunaSearch(space=SPACES["lambda"], metric="val_nll", mode="min",
                              sampler=optuna.samplers.TPESampler(seed=0), study_name="packed", storage=storage)
    study_searcher = StudySearcher(inner, fixed=[], n_search=3, seeds=[0], metric="val_nll", mode="min",
                                   evaluations=4)
    searcher = PackSearcher(study_searcher, 3, KEY)
    ids = [m for m, _ in members_of(searcher.suggest("p"))]
    assert ids == ["p-0", "p-1", "p-2"]
    assert searcher.suggest("q") == PackSearcher.FINISHED
    nll = {"p-0": [9.0, 8.0, 7.0, 7.5], "p-1": [9.5, 9.4], "p-2": [8.5, 8.0, 7.9, 7.0]}
    for n in (1, 2):
        ends = {"p-1": {OUTCOME: Outcome.STOPPED_EARLY, REASON: "ASHA stopped at step 20"}} if n == 2 else None
        searcher.on_trial_result("p", pack_result(
            {m: evaluation(n, nll[m][n - 1], nll[m][n - 1] == min(nll[m][:n])) for m in ids}, ends))
    for n in (3, 4):
        ends = {m: {OUTCOME: Outcome.DONE} for m in ("p-0", "p-2")} if n == 4 else None
        searcher.on_trial_result("p", pack_result(
            {m: evaluation(n, nll[m][n - 1], nll[m][n - 1] == min(nll[m][:n])) for m in ("p-0", "p-2")}, ends))
    searcher.on_trial_complete("p", result=pack_result({}), error=False)
    trials = optuna.load_study(study_name="packed", storage=storage).get_trials()
    by_params = {t.number: t for t in trials}
    assert len(trials) == 3
    states = sorted(t.state for t in trials)
    assert states == sorted([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED])
    pruned = next(t for t in trials if t.state == TrialState.PRUNED)
    assert pruned.intermediate_values == {1: 9.5, 2: 9.4}  # each member's own training_iteration
    complete = sorted(t.value for t in by_params.values() if t.state == TrialState.COMPLETE)
    assert complete == [7.0, 7.0]  # p-0 at its best (7.0 at evaluation 3, not its last 7.5), p-2 at 7.0
    assert {len(t.intermediate_values) for t in trials if t.state == TrialState.COMPLETE} == {4}


def test_a_failed_pack_fails_its_unfinished_members_only(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    inner = StudyOptunaSearch(space=SPACES["lambda"], metric="val_nll", mode="min",
                              sampler=optuna.samplers.TPESampler(seed=0), study_name="failed", storage=storage)
    searcher = PackSearcher(StudySearcher(inner, fixed=[], n_search=2, seeds=[0], metric="val_nll", mode="min",
                                          evaluations=4), 2, KEY)
    ids = [m for m, _ in members_of(searcher.suggest("p"))]
    # member 0 is stopped at its second evaluation; the pack fails before member 1 reported anything
    # (as an unpacked trial that errors before its first report)
    searcher.on_trial_result("p", pack_result({ids[0]: evaluation(1, 9.0, True)}))
    searcher.on_trial_result("p", pack_result({ids[0]: evaluation(2, 8.0, True)},
                                              {ids[0]: {OUTCOME: Outcome.STOPPED_EARLY, REASON: "ASHA"}}))
    searcher.on_trial_complete("p", result=None, error=True)
    states = [t.state for t in optuna.load_study(study_name="failed", storage=storage).get_trials()]
    assert states == [TrialState.PRUNED, TrialState.FAIL]


def test_member_results_parse_a_flat_pack_result_and_skip_absent_members():
    result = {"step": 20.0, "member/a-0/val_nll": 5.0, "member/a-0/step": 20.0, "member/a-1/val_nll": float("nan"),
              "member/a-1/outcome": "stopped_early", "member/a-1/reason": "ASHA", "member/a-2/outcome": float("nan")}
    assert member_results(result) == {"a-0": {"val_nll": 5.0, "step": 20.0},
                                      "a-1": {"outcome": "stopped_early", "reason": "ASHA"}}


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


@pytest.mark.parametrize("mode,rf", [("min", 2), ("max", 3), ("min", 4)])
def test_member_asha_decides_as_rays_asha_bracket(mode, rf):
    """Random members reporting in a random interleaving: every decision equals Ray's own
    ``_Bracket.on_result`` (ASHAScheduler's rule) fed the same values."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    rng = random.Random(rf)
    max_t, grace = 16, 2
    ours = AshaRule(grace, rf, max_t, mode, metric="val_nll", steps=160)
    ray_bracket = _Bracket(grace, max_t, rf, 0)
    sign = 1.0 if mode == "max" else -1.0
    progress = {f"m{i}": 0 for i in range(12)}
    stopped, decisions = set(), 0
    while any(n < max_t - 1 and m not in stopped for m, n in progress.items()):
        member = rng.choice([m for m, n in progress.items() if n < max_t - 1 and m not in stopped])
        progress[member] += 1
        n, value = progress[member], rng.uniform(0, 10)
        reason = ours.decide(member, n, 10 * n, value)
        expected = ray_bracket.on_result(_Trial(member), n, sign * value)
        assert (reason is not None) == (expected == TrialScheduler.STOP), (member, n, value)
        if reason:
            stopped.add(member)
            assert reason.startswith(f"ASHA stopped at step {10 * n} of 160 (rung at evaluation {n} of {max_t}: "
                                     f"val_nll {value:.2f} worse than the rung's cutoff)")
        decisions += 1
    assert stopped and len(stopped) < len(progress), "the rule stopped nothing (or everything): nothing checked"


def test_member_asha_keeps_its_rungs_and_answers_a_repeated_question_alike(tmp_path):
    path = tmp_path / "member_asha.json"
    asha = AshaRule(2, 2, 8, "min", steps=80, state_path=str(path))
    assert asha.decide("a", 2, 20, 5.0) is None  # the first value at a rung always continues
    assert asha.decide("b", 2, 20, 4.0) is None
    stop = asha.decide("c", 2, 20, 6.0)  # worse than the median of 5 and 4
    assert stop and "val_nll 6.00" in stop
    again = AshaRule(2, 2, 8, "min", steps=80, state_path=str(path))  # a driver restart
    assert again.decide("c", 2, 20, 6.0) == stop  # a retried pack re-runs the evaluation
    assert again.decide("a", 2, 20, 5.0) is None
    assert again.decide("d", 2, 20, 4.5) is None  # within the best half of 5, 4, 6
    assert again.decide("e", 2, 20, 5.5) is not None


def test_asha_keeps_a_trial_in_the_best_part_of_a_keep_metric_and_remembers_it(tmp_path):
    """scheduler.keep: a trial worse on NLL at a rung continues when its MI is in the rung's best
    half; one worse on both is stopped, with both named in the reason; a restart answers alike."""
    path = tmp_path / "asha.json"
    asha = AshaRule(2, 2, 8, "min", steps=80, state_path=str(path), keep={"val_mi_loo": "max"})
    assert asha.decide("a", 2, 20, 5.0, {"val_mi_loo": 0.1}) is None
    assert asha.decide("b", 2, 20, 4.0, {"val_mi_loo": 0.2}) is None
    assert asha.decide("live", 2, 20, 6.0, {"val_mi_loo": 3.0}) is None  # worse NLL, best MI: kept
    stop = asha.decide("dead", 2, 20, 6.5, {"val_mi_loo": 0.0})  # worse on both
    assert stop and "val_nll 6.50" in stop and "val_mi_loo" in stop
    without_keep = AshaRule(2, 2, 8, "min", steps=80)
    for member, value in (("a", 5.0), ("b", 4.0)):
        without_keep.decide(member, 2, 20, value)
    assert without_keep.decide("live", 2, 20, 6.0) is not None  # what NLL alone decides
    again = AshaRule(2, 2, 8, "min", steps=80, state_path=str(path), keep={"val_mi_loo": "max"})
    assert again.decide("live", 2, 20, 6.0, {"val_mi_loo": 3.0}) is None
    assert again.decide("dead", 2, 20, 6.5, {"val_mi_loo": 0.0}) == stop
    # the keep values recorded before the restart set the cutoff after it: 0.15 (of 0.1, 0.2, 3, 0) is
    # the median, so MI 0.12 is in the worse half, and NLL 7 is too
    assert again.decide("f", 2, 20, 7.0, {"val_mi_loo": 0.12}) is not None


def test_pack_flag_checks(monkeypatch):
    from studies import spaces
    from studies.options import Options, apply_flags
    from studies.spec import SpecError, check_packable, load_spec

    assert load_spec("lambda_sweep").resources.pack == 1  # the default study does not pack
    with pytest.raises(SpecError, match="pack 4: packed training supports neither train.dynamics_every"):
        apply_flags(load_spec("lambda_sweep"), Options(profile="lambda_sweep", pack=4))
    spec = apply_flags(load_spec("lambda_sweep"), Options(profile="lambda_sweep", pack=4,
                                                          overrides=["train.dynamics_every=0"]))
    assert spec.resources.pack == 4
    with pytest.raises(SpecError, match="pack must be >= 1"):
        apply_flags(load_spec("lambda_sweep"), Options(profile="lambda_sweep", pack=0))
    with pytest.raises(SpecError, match=r"pack 2: packed training supports the Gaussian GRU .* got vae/vmf"):
        apply_flags(load_spec("posterior_sweep"), Options(profile="posterior_sweep", pack=2))
    monkeypatch.setitem(spaces.GRIDS, "sizes", lambda: [{"model.hidden_dim": 32}, {"model.hidden_dim": 64}])
    spec.search, spec.grid = "grid", "sizes"
    with pytest.raises(SpecError, match="varies model.hidden_dim, which members of one pack must share"):
        check_packable(spec)


def test_a_member_that_ended_after_the_searcher_snapshot_is_not_told_twice(tmp_path):
    """A killed driver: Tune restores the Optuna searcher from a snapshot taken before a member
    ended; the resumed pack re-reports that member, and the storage keeps its first word."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")

    def searcher():
        return StudyOptunaSearch(space=SPACES["lambda"], metric="val_nll", mode="min",
                                 sampler=optuna.samplers.TPESampler(seed=0), study_name="snap", storage=storage)

    before = searcher()
    before.suggest("m-0")
    before.save(str(tmp_path / "snapshot.pkl"))
    before.on_trial_result("m-0", {"val_nll": 9.0, "training_iteration": 1})
    before.on_trial_complete("m-0", result=None)  # pruned after the snapshot
    restored = searcher()
    restored.restore(str(tmp_path / "snapshot.pkl"))
    restored.on_trial_result("m-0", {"val_nll": 9.0, "training_iteration": 1})
    restored.on_trial_result("m-0", {"val_nll": 8.0, "training_iteration": 2})
    restored.on_trial_complete("m-0", result={"val_nll": 8.0})
    (trial,) = optuna.load_study(study_name="snap", storage=storage).get_trials()
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {1: 9.0}

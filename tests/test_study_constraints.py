"""Feasibility constraints of a study (``constraints: ["val_au >= 1"]`` in a spec, or
``--constraint``): parsing and its one-line errors, the feasibility rule, Optuna's view of it (a
real OptunaSearch over a persisted SQLite Optuna study, driven as Tune drives it), the summary's
ranking and ``Best:`` line, and ``analysis best``'s ranking. No training, seconds; the end-to-end
study is tests/test_study_constraints_e2e.py."""
from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
import yaml

from cvae_core.errors import CvaeError
from cvae_core.metrics.constraints import parse_constraint, violations
from studies.options import Options, apply_flags
from studies.spec import SpecError, load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPEC = {"name": "constrained", "base": {"preset": "coupled-vae", "overrides": {"train.steps": 100,
                                                                                "train.eval_every": 20}},
        "space": "lambda", "grid": "table3"}


def _spec_file(tmp_path, constraints):
    path = tmp_path / "constrained.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "constraints": constraints}))
    return path


def test_a_spec_lists_constraints_and_the_flag_replaces_them(tmp_path):
    from studies.state import spec_from_dict

    spec = load_spec(str(_spec_file(tmp_path, ["val_au >= 1", "val_kl>0.5", " val_nll <  130.5 "])))
    assert [str(c) for c in spec.constraints] == ["val_au >= 1", "val_kl > 0.5", "val_nll < 130.5"]
    assert spec.summary_params("tpe")["constraints"] == "val_au >= 1; val_kl > 0.5; val_nll < 130.5"
    assert spec_from_dict(spec.to_dict()).constraints == spec.constraints  # study.json keeps them for --resume
    flagged = apply_flags(spec, Options(profile="constrained", constraints=["val_mi_loo>=0.25"]))
    assert [str(c) for c in flagged.constraints] == ["val_mi_loo >= 0.25"]
    assert apply_flags(spec, Options(profile="constrained", constraints=["none"])).constraints == []
    assert apply_flags(spec, Options(profile="constrained")).constraints == spec.constraints
    assert load_spec(str(_spec_file(tmp_path, None))).constraints == []


BAD = [
    (["val_auu >= 1"], "constraint 'val_auu >= 1': unknown metric 'val_auu'"),
    (["val_au => 1"], "constraint 'val_au => 1': operator '=>' is not one of >=, <=, >, <"),
    (["val_au = 1"], "constraint 'val_au = 1': operator '=' is not one of"),
    (["val_au >= one"], "constraint 'val_au >= one': bound 'one' is not a number"),
    (["val_au >= nan"], "constraint 'val_au >= nan': bound 'nan' must be a finite number"),
    (["val_kl <= -inf"], "constraint 'val_kl <= -inf': bound '-inf' must be a finite number"),
    (["val_au"], "constraint 'val_au': expected '<metric> <op> <number>'"),
    (["test_au >= 1"], "constraint 'test_au >= 1': metric 'test_au': a trial is judged on its best validation"),
    ([{"val_au": 1}], "constraint {'val_au': 1}: must be a string such as 'val_au >= 1'"),
    (["val_au >= 1", "val_au>=1"], "constraint 'val_au >= 1' is listed twice"),
    ("val_au >= 1", "constraints: must be a list of strings such as"),
]


@pytest.mark.parametrize("constraints, message", BAD)
def test_a_bad_constraint_in_a_spec_is_one_line_naming_the_file_and_the_constraint(tmp_path, constraints, message):
    path = _spec_file(tmp_path, constraints)
    with pytest.raises(SpecError) as caught:
        load_spec(str(path))
    text = str(caught.value)
    assert text.startswith(f"{path}: constraints: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("flag, message", [
    ("val_auu>=1", "--constraint: constraint 'val_auu>=1': unknown metric 'val_auu'"),
    ("val_au>>1", "--constraint: constraint 'val_au>>1': operator '>>' is not one of"),
    ("val_au>=x", "--constraint: constraint 'val_au>=x': bound 'x' is not a number"),
])
def test_a_bad_constraint_flag_stops_the_study_with_one_line_blaming_the_flag(tmp_path, capsys, flag, message):
    from studies.runner import main

    code = main("lambda_sweep", "test", ["--constraint", "val_au >= 1", "--constraint", flag,
                                         "--root", str(tmp_path / "out"),
                                         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()  # stopped before writing


def test_violations_follow_optunas_sign_convention():
    at_least, above = parse_constraint("val_au >= 1"), parse_constraint("val_kl > 0.5")
    at_most, below = parse_constraint("val_nll<=120"), parse_constraint("val_ppl < 300")
    assert at_least.violation({"val_au": 0.0}) == 1.0 and at_least.violation({"val_au": 1.0}) == 0.0
    assert at_least.violation({"val_au": 6.0}) == -5.0
    assert above.violation({"val_kl": 0.75}) == -0.25
    assert 0 < above.violation({"val_kl": 0.5}) < 1e-300  # a strict bound met with equality is broken
    assert at_most.violation({"val_nll": 125.5}) == 5.5 and at_most.violation({"val_nll": 120.0}) == 0.0
    assert 0 < below.violation({"val_ppl": 300.0}) and below.violation({"val_ppl": 250.0}) == -50.0
    for missing in ({}, {"val_au": math.nan}, {"val_au": None}):
        assert at_least.violation(missing) == math.inf  # a metric the trial did not report is never satisfied
    assert violations([at_least, above], {"val_au": 3.0, "val_kl": 0.25}) == {"val_au >= 1": -2.0,
                                                                             "val_kl > 0.5": 0.25}
    with pytest.raises(CvaeError, match="unknown metric"):
        parse_constraint("val_nope >= 1")


# --------------------------------------------------------------------------------------------
# Optuna


def _report(searcher, trial_id: str, evaluations: list[dict]) -> dict:
    """Report like Tune: the last report reaches the searcher as on_trial_complete's result."""
    results = [{**e, "training_iteration": i, "step": 10 * i} for i, e in enumerate(evaluations, 1)]
    for result in results[:-1]:
        searcher.on_trial_result(trial_id, result)
    return results[-1]


def _searchers(url: str, space, n_search: int, constraints: list[str]):
    from studies.searcher import PerTrialSeedSampler, StudyOptunaSearch, StudySearcher

    inner = StudyOptunaSearch(space=space, metric="val_nll", mode="min", sampler=PerTrialSeedSampler(0),
                              study_name="constrained", storage=optuna.storages.RDBStorage(url))
    outer = StudySearcher(inner, fixed=[], n_search=n_search, seeds=[0], metric="val_nll", mode="min",
                          evaluations=2, constraints=tuple(parse_constraint(c) for c in constraints))
    return inner, outer


def test_optuna_trials_carry_the_constraints_of_their_best_evaluation_and_its_best_trial_is_feasible(tmp_path):
    from optuna.trial import TrialState

    from studies.spaces import lambda_space

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _, searcher = _searchers(url, lambda_space, 3, ["val_au >= 1", "val_kl > 0.5"])
    trials = {  # the lowest NLL with a collapsed latent; a live latent; one stopped by the scheduler
        "collapsed": [{"val_nll": 120.0, "val_au": 1.0, "val_kl": 0.9}, {"val_nll": 118.0, "val_au": 0.0, "val_kl": 0.01}],
        "live": [{"val_nll": 130.0, "val_au": 5.0, "val_kl": 1.5}, {"val_nll": 125.0, "val_au": 6.0, "val_kl": 2.0}],
        "stopped": [{"val_nll": 140.0, "val_au": 2.0, "val_kl": 0.5}],
    }
    for trial_id, evaluations in trials.items():
        assert searcher.suggest(trial_id) is not None
        searcher.on_trial_complete(trial_id, _report(searcher, trial_id, evaluations))

    study = optuna.load_study(study_name="constrained", storage=url)
    collapsed, live, stopped = study.trials
    # judged at the best evaluation (the last of "collapsed", whose first one was feasible)
    assert (collapsed.state, collapsed.value) == (TrialState.COMPLETE, 118.0)
    assert collapsed.constraints == {"val_au >= 1": 1.0, "val_kl > 0.5": pytest.approx(0.49)}
    assert (live.state, live.value, live.constraints) == (TrialState.COMPLETE, 125.0,
                                                          {"val_au >= 1": -5.0, "val_kl > 0.5": -1.5})
    assert stopped.state == TrialState.PRUNED  # Optuna's samplers read a pruned trial's constraints too
    assert stopped.constraints["val_au >= 1"] == -1.0 and 0 < stopped.constraints["val_kl > 0.5"] < 1e-300
    assert study.best_trial.number == live.number  # Optuna's own best is the feasible one, not NLL 118


def test_a_proposal_that_already_ran_is_told_its_known_constraints(tmp_path):
    from optuna.trial import TrialState
    from ray.tune.search import Searcher

    from studies.spaces import posterior_space

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _, searcher = _searchers(url, posterior_space, 30, ["val_au >= 1"])  # few configurations: TPE repeats
    trained = 0
    for i in range(30):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        trained += 1
        au = float(config.get("model.n_flows", 0))  # any deterministic function of the configuration
        searcher.on_trial_complete(f"t{i}", _report(searcher, f"t{i}", [{"val_nll": 100.0 + i, "val_au": au}] * 2))
    told = optuna.load_study(study_name="constrained", storage=url).get_trials(states=(TrialState.COMPLETE,))
    assert len(told) > trained  # repeats were told their known result, without training
    for trial in told:
        assert trial.constraints == {"val_au >= 1": 1.0 - trial.params.get("model.n_flows", 0)}


def test_grid_studies_record_constraints_in_optuna(tmp_path):
    from studies.searcher import record_grid_in_optuna
    from studies.spaces import describe, table3_grid
    from studies.state import StudyState
    from studies.summary import TrialRow

    spec = load_spec("lambda_sweep")
    spec.search, spec.grid, spec.seeds, spec.constraints = "grid", "table3", 1, [parse_constraint("val_au >= 2")]
    state = StudyState(study_name="g", spec={}, folder=str(tmp_path), tracking_uri="", experiment_name="",
                       experiment_id="", parent_run_id="", storage_path="", experiment_path="",
                       optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}", code_version="", created="")
    rows = [TrialRow(f"t{i}", describe(cell), {**cell, "train.seed": 0}, 0, "done", 5,
                     {"val_nll": 100.0 + i, "val_au": float(i)}) for i, cell in enumerate(table3_grid())]
    record_grid_in_optuna(spec, state, rows)
    study = optuna.load_study(study_name="g", storage=state.optuna_storage)
    assert [t.constraints for t in study.trials] == [{"val_au >= 2": 2.0 - i} for i in range(len(rows))]
    assert study.best_trial.value == 102.0  # the lowest feasible NLL


# --------------------------------------------------------------------------------------------
# The study summary


def _rows():
    from studies.summary import TrialRow

    return [
        TrialRow("collapsed", "coupled-vae λm=0", {"train.seed": 0}, 0, "done", 4,
                 {"val_nll": 120.0, "val_kl": 0.02, "val_mi_loo": 0.01, "val_au": 0.0, "step": 400.0}),
        TrialRow("vae", "vae", {"preset": "vae", "train.seed": 0}, 0, "done", 4,
                 {"val_nll": 122.0, "val_kl": 0.0, "val_mi_loo": 0.0, "val_au": 0.0, "step": 400.0}),
        TrialRow("live", "coupled-vae eucl λm=6.8", {"train.seed": 0}, 0, "stopped", 2,
                 {"val_nll": 125.0, "val_kl": 5.2, "val_mi_loo": 2.2, "val_au": 16.0, "step": 200.0}),
        TrialRow("crashed", "coupled-vae rq", {"train.seed": 0}, 0, "error", 0, {}),
    ]


def _summary(tmp_path, constraints: list[str]):
    from studies.state import StudyState
    from studies.summary import summarize

    spec = load_spec("lambda_sweep")
    spec.constraints = [parse_constraint(c) for c in constraints]
    state = StudyState(study_name="s", spec={}, folder=str(tmp_path), tracking_uri="t", experiment_name="e",
                       experiment_id="1", parent_run_id="p", storage_path="", experiment_path="x",
                       optuna_storage="o", code_version="", created="")
    return spec, state, summarize(spec, state, _rows(), False, 1.0)


def test_the_summary_ranks_feasible_trials_first_and_its_best_is_feasible(tmp_path):
    from studies.render import best_lines, render_markdown, table_lines

    spec, state, summary = _summary(tmp_path, ["val_au >= 1"])
    lines = table_lines(spec, _rows(), front=set())
    assert "feasible" in lines[0].split()
    assert [line[6:19].strip() for line in lines[2:]] == ["live", "collapsed", "vae", "crashed"]  # trial column
    assert lines[2].split()[:2] == ["1", "live"] and "  yes  " in lines[2]
    assert "  no  " in lines[3] and lines[3].endswith("done  (fails val_au >= 1)")
    assert summary["best"]["trial_id"] == "live" and summary["best_infeasible"] is None
    assert summary["n_feasible"] == 1 and summary["constraints"] == ["val_au >= 1"]
    violated = {t["trial_id"]: t["violated"] for t in summary["trials"]}
    assert violated == {"live": [], "collapsed": ["val_au >= 1"], "vae": ["val_au >= 1"], "crashed": None}
    assert best_lines(summary)[0] == "Best: live (coupled-vae eucl λm=6.8, seed 0), val_nll 125.00 at step 200"
    markdown = render_markdown(spec, state, _rows(), summary)
    assert "Constraints: val_au >= 1 at each trial's best checkpoint." in markdown and "Best: live " in markdown

    _, _, unconstrained = _summary(tmp_path, [])
    assert unconstrained["best"]["trial_id"] == "collapsed" and unconstrained["n_feasible"] == 3
    unconstrained = load_spec("lambda_sweep")
    unconstrained.constraints = []
    assert "feasible" not in table_lines(unconstrained, _rows(), set())[0]


def test_with_no_feasible_trial_there_is_no_best_and_the_summary_says_so(tmp_path, capsys):
    from studies.render import best_lines, print_summary

    spec, state, summary = _summary(tmp_path, ["val_au >= 1", "val_kl >= 99"])
    assert summary["best"] is None and summary["n_feasible"] == 0
    assert summary["best_infeasible"]["trial_id"] == "collapsed"
    assert best_lines(summary)[0] == (
        "Best: none feasible: no trial satisfies val_au >= 1, val_kl >= 99. Best infeasible trial (not a champion): "
        "collapsed (coupled-vae λm=0, seed 0), val_nll 120.00 at step 400 (fails val_au >= 1, val_kl >= 99)")
    print_summary(spec, state, _rows(), summary, interrupted=False)
    out = capsys.readouterr().out
    assert "\nBest: none feasible: no trial satisfies" in out and "Constraints: val_au >= 1, val_kl >= 99" in out


def test_the_pareto_front_and_the_configuration_table_keep_to_feasible_points():
    from studies.render import group_lines
    from studies.spec import Objective
    from studies.summary import group_by_config, pareto_front

    spec = load_spec("lambda_sweep")
    spec.objectives = [Objective("val_nll", "min"), Objective("val_mi_loo", "max")]
    spec.constraints = [parse_constraint("val_au >= 1")]
    points = [(r.trial_id, r.best) for r in _rows()]
    assert pareto_front(spec, points) == {"live"}  # "collapsed" dominates nothing feasible
    groups = group_by_config(_rows(), ("val_au",))
    lines = group_lines(spec, groups, front={"coupled-vae eucl λm=6.8"})
    assert lines[2].split()[1] == "coupled-vae" and "  yes  " in lines[2] and lines[2].endswith("*")
    assert "  no  " in lines[3]


# --------------------------------------------------------------------------------------------
# analysis best


def test_analysis_ranks_feasible_runs_first_judged_at_their_best_evaluation():
    from analysis.best import pareto_front, rank_runs

    runs = pd.DataFrame({"run_id": ["collapsed", "live", "silent", "unfinished"], "dataset": "ptb",
                         "status": ["FINISHED", "FINISHED", "FINISHED", "RUNNING"],
                         "best.val_nll": [118.0, 125.0, 121.0, 100.0], "best.val_mi_loo": [0.1, 2.0, 3.0, 9.0],
                         "best.val_au": [0.0, 6.0, math.nan, 9.0]})
    constraints = (parse_constraint("val_au >= 1"),)
    ranked = rank_runs(runs, "val_nll", constraints=constraints)
    assert list(ranked["run_id"]) == ["live", "collapsed", "silent"]  # a run without val_au is infeasible
    assert list(ranked["violated"]) == [[], ["val_au >= 1"], ["val_au >= 1"]]
    assert list(rank_runs(runs, "val_nll")["run_id"]) == ["collapsed", "silent", "live"]
    assert list(pareto_front(runs, constraints=constraints)["run_id"]) == ["live"]
    assert sorted(pareto_front(runs)["run_id"]) == ["collapsed", "silent"]  # "silent" dominates "live"


def test_the_record_carries_the_constraints_for_analysis():
    from studies.record import Tag, constraints_tag, read_constraints_tag

    constraints = [parse_constraint("val_au >= 1"), parse_constraint("val_kl > 0.5")]
    assert read_constraints_tag({Tag.CONSTRAINTS: constraints_tag(constraints)}) == constraints
    assert read_constraints_tag({}) == []  # a study recorded before constraints existed


"""The study service's search side, without a Ray cluster: spaces, grids, specs, the seed-repeating
searcher and the summary's Pareto front. Fast (no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from ray.tune.search import Searcher

from cvae_core.config import build_config
from studies.summary import pareto_front
from studies.searcher import NoSearch, StudySearcher
from studies.spaces import GRIDS, LAMBDA_M_RANGE, lambda_space, posterior_grid, posterior_space, table3_grid
from studies.spec import SPEC_DIR, Objective, SpecError, load_spec, parse_objectives, parse_spec
from studies.tracking import StudyContext, config_id
from studies.trainable import resolve_trial_config

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

# The paper's Table 3, written out cell by cell: (preset, distance, lambda_r, lambda_m).
PAPER_TABLE3 = {
    ("vae", None, None, None),
    ("coupled-vae", "rq", 1.0, 0.1), ("coupled-vae", "rq", 1.0, 1.0), ("coupled-vae", "rq", 1.0, 5.0),
    ("coupled-vae", "eucl", 1.0, 0.1), ("coupled-vae", "eucl", 1.0, 1.0), ("coupled-vae", "eucl", 1.0, 5.0),
    ("coupled-vae", "rq", 0.0, 0.1), ("coupled-vae", "rq", 0.5, 0.1), ("coupled-vae", "rq", 5.0, 0.1),
}


def _context(**overrides) -> StudyContext:
    return StudyContext(study_name="s", spec_name="s", tracking_uri="sqlite:////tmp/x.db", experiment_name="e",
                        experiment_id="1", parent_run_id="p", preset="coupled-vae", dataset="ptb", scale="quick",
                        overrides=overrides)


def _drain(searcher: Searcher, limit: int = 1000) -> list[dict]:
    configs = []
    for i in range(limit):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            return configs
        assert config is not None
        configs.append(config)
    raise AssertionError("searcher never finished")


def _cell(config: dict) -> tuple:
    return (config["preset"], config.get("coupling.distance"), config.get("coupling.lambda_r"),
            config.get("coupling.lambda_m"))


def test_grid_mode_yields_exactly_the_table3_configurations_for_every_seed():
    assert {_cell(c) for c in table3_grid()} == PAPER_TABLE3
    assert len(table3_grid()) == len(PAPER_TABLE3) == 10  # no duplicate cell

    searcher = StudySearcher(NoSearch("val_nll", "min"), fixed=table3_grid(), n_search=0, seeds=[0, 1, 2],
                             metric="val_nll", mode="min")
    configs = _drain(searcher)
    assert len(configs) == searcher.total_trials == 30
    by_cell: dict[tuple, list[int]] = {}
    for config in configs:
        by_cell.setdefault(_cell(config), []).append(config["train.seed"])
    assert set(by_cell) == PAPER_TABLE3
    assert all(sorted(seeds) == [0, 1, 2] for seeds in by_cell.values())


def test_a_baseline_keeps_its_own_seed_and_runs_once():
    fixed = [{"preset": "vae"}, {"preset": "vae", "train.seed": 1}, {"preset": "vae", "seed": 7}]
    searcher = StudySearcher(NoSearch("val_nll", "min"), fixed=fixed, n_search=0, seeds=[0],
                             metric="val_nll", mode="min")
    configs = _drain(searcher)
    assert [c["train.seed"] for c in configs] == [0, 1, 7]
    assert len(configs) == searcher.total_trials


def test_table3_cells_resolve_to_the_intended_core_configs():
    context = _context()
    for cell in table3_grid():
        config = resolve_trial_config(context, {**cell, "train.seed": 0})
        if cell["preset"] == "vae":
            assert not config.coupling.enabled
            continue
        assert config.coupling.enabled
        assert (config.coupling.distance, config.coupling.lambda_r, config.coupling.lambda_m) == (
            cell["coupling.distance"], cell["coupling.lambda_r"], cell["coupling.lambda_m"])


def test_define_by_run_never_proposes_rq_c_for_the_euclidean_distance():
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=20))
    seen = {"eucl": 0, "rq": 0, "off": 0}
    for i in range(300):
        trial = study.ask()
        constants = lambda_space(trial)
        params = trial.params
        if params["search.matching"] == "off":
            assert constants == {"coupling.lambda_m": 0.0}
            assert not {"coupling.distance", "coupling.rq_c", "coupling.lambda_m"} & set(params)
            seen["off"] += 1
        else:
            assert LAMBDA_M_RANGE[0] <= params["coupling.lambda_m"] <= LAMBDA_M_RANGE[1]
            assert ("coupling.rq_c" in params) == (params["coupling.distance"] == "rq")
            seen[params["coupling.distance"]] += 1
        assert params["coupling.lambda_r"] in [x / 2 for x in range(11)]
        study.tell(trial, float((i * 7919) % 101))  # any objective: TPE must still respect the branches
    assert min(seen.values()) > 20, seen  # every branch was explored


def test_optuna_search_wrapper_keeps_the_conditional_space():
    from ray.tune.search.optuna import OptunaSearch

    inner = OptunaSearch(space=lambda_space, metric="val_nll", mode="min",
                         sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=10))
    searcher = StudySearcher(inner, fixed=[{"preset": "vae"}], n_search=60, seeds=[5], metric="val_nll", mode="min")
    configs = _drain(searcher)
    assert configs[0] == {"preset": "vae", "train.seed": 5}
    assert len(configs) == 61
    for i, config in enumerate(configs[1:], 1):
        if config.get("coupling.distance") == "eucl":
            assert "coupling.rq_c" not in config
        searcher.on_trial_complete(f"t{i}", {"val_nll": 100.0 + config["coupling.lambda_r"]})
    assert any(c.get("coupling.lambda_m") == 0.0 for c in configs[1:])
    assert any(c.get("coupling.distance") == "eucl" for c in configs[1:])
    completed = [t for t in inner._ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(completed) == 60  # every proposal was told back, and only proposals (not the baseline)


def test_posterior_space_family_parameters_only_for_their_family():
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1))
    families = set()
    for _ in range(150):
        trial = study.ask()
        constants = posterior_space(trial)
        params = trial.params
        families.add(params["model.posterior"])
        assert ("model.n_flows" in params) == (params["model.posterior"] == "nf")
        coupled = params["coupling.enabled"]
        assert ("search.matching" in params) == coupled
        assert constants["preset"].startswith("coupled-") == coupled
        config = resolve_trial_config(_context(), {**params, **constants})
        assert config.model.posterior == params["model.posterior"]
        assert config.coupling.enabled == coupled
        study.tell(trial, 1.0)
    assert families == {"gaussian", "vmf", "nf"}
    assert len(posterior_grid()) == 9


class _Recorder(Searcher):
    def __init__(self):
        super().__init__(metric=["val_nll", "val_mi_loo"], mode=["min", "max"])
        self.told = []
        self.n = 0

    def suggest(self, trial_id):
        self.n += 1
        return {"coupling.lambda_m": float(self.n)}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append((trial_id, result, error))


def test_seed_repeats_tell_the_searcher_the_mean_of_every_objective():
    inner = _Recorder()
    searcher = StudySearcher(inner, fixed=[], n_search=2, seeds=[0, 1], metric=["val_nll", "val_mi_loo"],
                             mode=["min", "max"])
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [c["train.seed"] for c in configs] == [0, 1, 0, 1]
    assert configs[0]["coupling.lambda_m"] == configs[1]["coupling.lambda_m"] != configs[2]["coupling.lambda_m"]
    assert searcher.suggest("t4") == Searcher.FINISHED
    searcher.on_trial_complete("t0", {"val_nll": 100.0, "val_mi_loo": 1.0})
    assert inner.told == []  # waits for the second seed
    searcher.on_trial_complete("t1", {"val_nll": 110.0, "val_mi_loo": 3.0})
    assert inner.told == [("t0", {"val_nll": 105.0, "val_mi_loo": 2.0}, False)]
    searcher.on_trial_complete("t2", None, error=True)
    searcher.on_trial_complete("t3", None, error=True)
    assert inner.told[-1] == ("t2", None, True)
    # state survives Tune's save/restore of wrappers (get_state/set_state)
    clone = StudySearcher(_Recorder(), fixed=[], n_search=2, seeds=[0, 1], metric="val_nll", mode="min")
    clone.set_state(searcher.get_state())
    assert clone.groups == searcher.groups and clone.trial_group == searcher.trial_group


def test_every_shipped_spec_is_valid_and_its_baselines_resolve():
    specs = sorted(SPEC_DIR.glob("*.yaml"))
    assert {p.stem for p in specs} >= {"lambda_sweep", "posterior_sweep", "paper-table3", "paper-table1"}
    for path in specs:
        spec = load_spec(str(path))
        assert spec.resources.max_failures >= 1 and spec.resources.max_concurrent_trials >= 1
        assert 2 <= spec.scheduler.grace_period <= spec.evaluations
        context = _context(**spec.overrides)
        context = StudyContext(**{**context.__dict__, "preset": spec.preset, "scale": spec.scale,
                                  "dataset": spec.dataset})
        for cell in spec.baselines + GRIDS[spec.grid]():
            resolve_trial_config(context, cell)


def test_default_study_budget_is_the_documented_one():
    spec = load_spec("lambda_sweep")
    config = build_config(spec.preset, spec.dataset, spec.scale, spec.overrides)
    assert (config.train.steps, config.train.eval_every, spec.evaluations) == (400, 100, 4)
    assert spec.resources.max_concurrent_trials == 2
    # the paper_directions grid over 4 seeds; TPE (--search tpe) adds its proposals to the VAE baseline
    assert spec.search == "grid" and spec.grid == "paper_directions" and spec.seeds == 4
    assert len(GRIDS[spec.grid]()) * spec.seeds == 12 and spec.baselines == [{"preset": "vae"}]
    # ASHA's first rung after the KL weight reaches 1 (step 20 + 300): the 4th, last evaluation
    assert spec.scheduler.grace_after_anneal and spec.scheduler.grace_period == 4
    assert spec.scheduler.keep == ["val_mi_loo"]


def test_grace_period_anneal_follows_the_configuration_and_keep_names_metrics():
    from studies.options import Options, apply_flags

    longer = apply_flags(load_spec("lambda_sweep"), Options(profile="lambda_sweep", overrides=["train.steps=2000"]))
    assert longer.scheduler.grace_period == 4 and longer.evaluations == 20  # rungs at 4, 8, 16
    later = apply_flags(load_spec("lambda_sweep"), Options(profile="lambda_sweep", overrides=[
        "train.steps=2000", "regularizer.anneal_steps=1000"]))
    assert later.scheduler.grace_period == 11  # KL weight 1 at step 1020: the 11th evaluation
    short = apply_flags(load_spec("lambda_sweep"), Options(profile="lambda_sweep", overrides=["train.steps=200"]))
    assert short.scheduler.grace_period == short.evaluations == 2  # no rung before the end


@pytest.mark.parametrize("change, message", [
    ({"surprise": 1}, "unknown key"),
    ({"scheduler": {"grace_period": 1}}, "grace_period must be >= 2"),
    ({"resources": {"max_failures": 0}}, "max_failures must be >= 1"),
    ({"space": "nope"}, "space 'nope' is not one of"),
    ({"base": {"preset": "coupled-vae", "overrides": {"coupling.lambda_q": 1}}}, "coupling.lambda_q"),
    ({"objectives": ["val_kl"]}, "needs a direction"),
    ({"scheduler": {"keep": ["val_mi"]}}, r"scheduler.keep: 'val_mi' is not a metric with a direction"),
    ({"scheduler": {"keep": "val_mi_loo"}}, r"scheduler"),
    ({"scheduler": {"grace_after_anneal": True}}, "unknown key"),
    ({"baselines": [{"preset": "vae", "train.seed": 1}], "budget": {"seeds": 2}},
     r"baseline .* sets its own train.seed and the budget repeats every configuration over 2 seeds"),
])
def test_bad_specs_raise_a_message_naming_the_problem(change, message):
    raw = {"name": "t", "base": {"preset": "coupled-vae", "overrides": {"train.steps": 100, "train.eval_every": 20}},
           "space": "lambda", "grid": "table3"}
    for key, value in change.items():
        raw[key] = value
    with pytest.raises(SpecError, match=message):
        parse_spec(raw, "test.yaml")


def test_objectives_parse_with_default_directions():
    assert parse_objectives("val_nll,val_mi_loo", "x") == [Objective("val_nll", "min"), Objective("val_mi_loo", "max")]
    assert parse_objectives(["val_kl:max"], "x") == [Objective("val_kl", "max")]


def test_trial_config_typos_are_refused_and_search_keys_ignored():
    from cvae_core.errors import CvaeError

    config = resolve_trial_config(_context(), {"search.matching": "off", "coupling.lambda_m": 0.0, "train.seed": 4})
    assert config.coupling.lambda_m == 0.0 and config.train.seed == 4
    with pytest.raises(CvaeError, match="lambda_mm"):
        resolve_trial_config(_context(), {"coupling.lambda_mm": 1.0})


def test_config_id_groups_seeds_of_one_configuration():
    a = resolve_trial_config(_context(), {"coupling.lambda_m": 1.0, "train.seed": 0})
    b = resolve_trial_config(_context(), {"coupling.lambda_m": 1.0, "train.seed": 1})
    c = resolve_trial_config(_context(), {"coupling.lambda_m": 5.0, "train.seed": 0})
    assert config_id(a) == config_id(b) != config_id(c)


def test_pareto_front_keeps_only_non_dominated_points():
    spec = load_spec("lambda_sweep")
    spec.objectives, spec.constraints = [Objective("val_nll", "min"), Objective("val_mi_loo", "max")], []
    points = [("a", {"val_nll": 100.0, "val_mi_loo": 0.1}), ("b", {"val_nll": 101.0, "val_mi_loo": 2.0}),
              ("c", {"val_nll": 102.0, "val_mi_loo": 1.0}), ("d", {"val_nll": math.nan, "val_mi_loo": 9.0})]
    assert pareto_front(spec, points) == {"a", "b"}


def test_cvae_sweep_spec_is_the_table8_grid():
    spec = load_spec("cvae_sweep")
    assert (spec.dataset, spec.search, spec.grid) == ("ptb-pairs", "grid", "table8")
    cells = GRIDS["table8"]()
    assert cells[:2] == [{"preset": "seq2seq"}, {"preset": "cvae"}]
    assert [c["coupling.lambda_m"] for c in cells[2:]] == [0.1, 0.5, 1.0, 2.0]
    assert spec.scheduler.grace_period == spec.evaluations  # every Table 8 row trains to the end


@pytest.mark.slow
def test_tiny_cvae_sweep_runs_end_to_end_and_fills_table8(tmp_path, capsys):
    from analysis.cli import main as analysis_main
    from studies.runner import Options, run_study

    tiny = ["data.train_limit=200", "data.valid_limit=24", "data.max_len=20", "model.embed_dim=16",
            "model.hidden_dim=16", "model.latent_dim=4", "train.steps=6", "train.eval_every=2",
            "train.log_every=2", "train.batch_size=8", "train.val_samples=2", "train.mi_samples=2",
            "train.lr_decay_start=4", "train.lr_decay_every=2", "regularizer.anneal_start=1",
            "regularizer.anneal_steps=4"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_study(Options(profile="cvae_sweep", root=str(tmp_path / "out"), tracking_uri=uri,
                                study_name="tiny-cvae", overrides=tiny))
    assert outcome.exit_code == 0 and len(outcome.rows) == 6
    assert all(r.status == "done" for r in outcome.rows), outcome.rows
    assert all(0 <= r.best["val_dist1"] <= 100 and "val_dist2" in r.best for r in outcome.rows)  # logged by every row
    capsys.readouterr()
    assert analysis_main(["table", "--layout", "table8", "--tracking-uri", uri, "--study", "tiny-cvae"]) == 0
    table = capsys.readouterr().out
    for label in ("GRU", "CVAE", "λ_m=0.1", "λ_m=0.5", "λ_m=1", "λ_m=2"):
        assert label in table, (label, table)


def test_grid_studies_are_recorded_in_optuna_once_per_finished_configuration(tmp_path):
    from studies.searcher import record_grid_in_optuna
    from studies.state import StudyState
    from studies.summary import TrialRow
    from studies.spaces import describe

    spec = load_spec("lambda_sweep")
    spec.search, spec.grid, spec.seeds, spec.constraints = "grid", "table3", 2, []
    state = StudyState(study_name="g", spec={}, folder=str(tmp_path), tracking_uri="", experiment_name="",
                       experiment_id="", parent_run_id="", storage_path="", experiment_path="",
                       optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}", code_version="", created="")
    rows = []
    for i, cell in enumerate(table3_grid()):
        for seed in (0, 1):
            status = "pending" if i == 9 and seed == 1 else "done"
            best = {} if status == "pending" else {"val_nll": 100.0 + i + seed}
            rows.append(TrialRow(f"t{i}-{seed}", describe(cell), {**cell, "train.seed": seed}, seed, status,
                                 5 if best else 0, best))
    record_grid_in_optuna(spec, state, rows)
    record_grid_in_optuna(spec, state, rows)  # idempotent (a resumed study finalizes again)
    study = optuna.load_study(study_name="g", storage=state.optuna_storage)
    assert len(study.trials) == 9  # the cell with an unfinished seed waits for --resume
    assert sorted(t.value for t in study.trials) == [100.5 + i for i in range(9)]
    assert study.best_trial.params == {"preset": "vae"}


def test_summary_tables_rank_trials_and_give_spread_over_seeds(capsys):
    from studies.render import group_lines, table_lines
    from studies.summary import TrialRow, group_by_config

    spec = load_spec("lambda_sweep")
    spec.objectives = [Objective("val_nll", "min"), Objective("val_mi_loo", "max")]
    spec.seeds, spec.constraints = 2, []
    rows = [
        TrialRow("a0", "vae", {"preset": "vae", "train.seed": 0}, 0, "done", 4,
                 {"val_nll": 130.0, "val_kl": 0.0, "val_mi_loo": 0.0, "val_au": 0.0, "step": 400.0}),
        TrialRow("a1", "vae", {"preset": "vae", "train.seed": 1}, 1, "done", 4,
                 {"val_nll": 132.0, "val_kl": 0.0, "val_mi_loo": 0.0, "val_au": 0.0, "step": 400.0}),
        TrialRow("b0", "coupled-vae rq", {"train.seed": 0}, 0, "stopped", 2,
                 {"val_nll": 128.0, "val_kl": 0.5, "val_mi_loo": 0.4, "val_au": 5.0, "step": 200.0}),
        TrialRow("b1", "coupled-vae rq", {"train.seed": 1}, 1, "error", 0, {}),
    ]
    lines = table_lines(spec, rows, front={"b0"})
    body = lines[2:]
    assert [line.split()[1] for line in body[:3]] == ["b0", "a0", "a1"]  # ranked by val NLL
    assert "stopped@2/4 (ASHA)" in body[0] and "*" in body[0]
    assert body[3].split()[0] == "b1" and body[3].rstrip().endswith("error")  # unranked, last
    groups = group_by_config(rows)
    vae = next(g for g in groups if g["label"] == "vae")
    assert vae["n"] == 2 and vae["val_nll"] == 131.0 and math.isclose(vae["val_nll_sd"], math.sqrt(2))
    text = "\n".join(group_lines(spec, groups, front=set()))
    assert "131.00±1.41" in text


def test_a_configuration_that_already_ran_is_not_trained_again():
    from ray.tune.search.optuna import OptunaSearch

    # posterior_space has only a handful of configurations without continuous parameters
    inner = OptunaSearch(space=posterior_space, metric="val_nll", mode="min",
                         sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    searcher = StudySearcher(inner, fixed=[], n_search=40, seeds=[0], metric="val_nll", mode="min")
    seen = []
    for i in range(40):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        seen.append(json.dumps(config, sort_keys=True))
        searcher.on_trial_complete(f"t{i}", {"val_nll": 100.0 + len(config)})
    assert len(seen) == len(set(seen)) > 10  # every trial trains a new configuration
    told = [t for t in inner._ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(told) >= len(seen)  # repeats were told their known result instead


def test_stop_points_are_asha_rungs_and_the_last_evaluation():
    from studies.outcomes import stop_points

    assert stop_points(2, 2, 4) == (2, 4)
    assert stop_points(2, 2, 16) == (2, 4, 8, 16)
    assert stop_points(2, 3, 20) == (2, 6, 18, 20)
    assert stop_points(4, 2, 4) == (4,)


def test_coupling_effects_pair_each_coupled_configuration_with_its_twin_by_seed():
    from studies.effects import coupling_effects, effect_line
    from studies.summary import TrialRow

    def row(name, config, seed, nll, kl, status="done"):
        return TrialRow(f"{name}{seed}", name, {**config, "train.seed": seed}, seed, status, 4,
                        {"val_nll": nll, "val_kl": kl, "val_mi_loo": kl / 2, "val_au": 2 * kl})

    vae = {"preset": "vae"}
    eucl = {"coupling.distance": "eucl", "coupling.lambda_m": 1.0}  # a proposal: the spec's preset
    rows = [row("vae", vae, s, 130 + s, 0.0) for s in (0, 1, 2)]
    rows += [row("eucl", eucl, s, 131 + 2 * s, kl) for s, kl in ((0, 1.5), (1, 2.0), (2, 2.5))]
    rows += [row("eucl", eucl, 3, 120.0, 9.0, status="stopped"),  # no final metrics: left out
             row("vae", {"preset": "vae", "model.latent_dim": 8}, 0, 90.0, 0.0)]  # another twin
    (effect,) = coupling_effects(rows, base_preset="coupled-vae")
    assert effect["label"] == "eucl" and effect["base"] == "vae" and effect["seeds"] == [0, 1, 2]
    kl, nll = effect["val_kl"], effect["val_nll"]
    # differences 1.5, 2, 2.5: mean 2, sd 0.5, t(0.975, 2) = 4.303 -> half width 1.242
    assert kl["n"] == 3 and math.isclose(kl["mean"], 2.0)
    assert math.isclose(kl["low"], 2 - 4.3027 * 0.5 / math.sqrt(3), abs_tol=1e-3) and kl["low"] > 0
    assert math.isclose(nll["mean"], 2.0) and nll["low"] < 0 < nll["high"]  # differences 1, 2, 3: sd 1
    line = effect_line(effect)
    assert line.startswith("eucl − vae: ΔNLL +2.0 [") and "ΔKL +2.00 [+0.76, +3.24]" in line
    assert line.endswith("(3 seeds, paired)")
    assert coupling_effects(rows[:3]) == []  # no coupled configuration, no effect

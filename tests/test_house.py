"""The house rules that a new maintainer relies on, checked on the code itself: no import circle
among the project's modules, no reach into private attributes of Ray, Optuna or MLflow objects,
and the public Optuna behaviour that ``studies/searcher.py`` builds on, pinned for the installed
version (ask/tell by trial number, re-reading a RUNNING trial's parameters, constraints set
before the tell, PRUNED keeping its intermediate values)."""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cvae_core", "studies", "analysis")
# `_replace` is namedtuple's public method; `_normal` is cvae_core's own DiagonalGaussian field,
# read by the KL functions registered beside it.
OWN_UNDERSCORE_NAMES = {"_replace", "_normal"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (REPO / "bench").glob("*.py"):  # scripts: bench/ is sys.path[0], they import each other by bare name
        modules[path.stem] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        # a module's own packages are initialised before it runs: importing through them is no circle
        found |= {t for t in targets if t in modules and t != name and not name.startswith(f"{t}.")}
    return found


def test_no_import_circle_among_the_projects_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    circle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle.extend(trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, trail + [node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if module not in state and visit(module, []):
            break
    assert not circle, " -> ".join(circle)


def test_no_module_reads_a_private_attribute_of_another_librarys_object():
    reach_ins = []
    for package in (*PACKAGES, "mlflow", "bench"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                        and node.attr not in OWN_UNDERSCORE_NAMES):
                    reach_ins.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    assert reach_ins == []


def _space(trial) -> dict:
    trial.suggest_float("lambda_m", 0.01, 10.0, log=True)
    trial.suggest_categorical("distance", ["rq", "eucl"])
    return {"coupling.enabled": True}


def test_optuna_public_behaviour_the_study_searcher_relies_on(tmp_path):
    storage = optuna.storages.get_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="pin", sampler=optuna.samplers.RandomSampler(seed=0))
    asked = study.ask()
    first = _space(asked)
    # a RUNNING trial found by its number through the storage, as after a restored driver
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("pin"), asked.number)
    adopted = optuna.Trial(study, trial_id)
    assert _space(adopted) == first and adopted.params == asked.params and adopted.number == asked.number
    # constraints set before the tell are the finished trial's; a feasible trial is the best one
    adopted.set_constraint("val_au", 1.0)  # > 0: violated
    study.tell(asked.number, 100.0)
    feasible = study.ask()
    _space(feasible)
    feasible.set_constraint("val_au", 0.0)
    study.tell(feasible.number, 120.0)
    assert study.best_trial.number == feasible.number
    # an early-stopped trial: PRUNED with the values it reported
    stopped = study.ask()
    _space(stopped)
    stopped.report(130.0, 1)
    study.tell(stopped.number, None, state=TrialState.PRUNED)
    assert storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("pin"), stopped.number)).intermediate_values == {1: 130.0}


def test_the_study_searcher_pickles_without_its_study_and_adopts_a_lost_proposal(tmp_path):
    from studies.searcher import PerTrialSeedSampler, StudyOptunaSearch

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = StudyOptunaSearch(_space, metric="val_nll", mode="min", sampler=PerTrialSeedSampler(0),
                                 study_name="pickled", storage=url)
    first = searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))
    lost = searcher.suggest("b")  # asked after the snapshot: lost with a killed driver
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.orphans == [1] and restored.trial_numbers == {"a": 0}
    assert restored.suggest("c") == lost and restored.trial_numbers["c"] == 1
    restored.on_trial_complete("a", {"val_nll": 110.0, "training_iteration": 2})
    restored.on_trial_complete("c", None, error=True)
    study = optuna.load_study(study_name="pickled", storage=url)
    assert [(t.number, t.state, t.values) for t in study.get_trials()] == [
        (0, TrialState.COMPLETE, [110.0]), (1, TrialState.FAIL, None)]
    assert first["coupling.enabled"] is True and study.metric_names == ["val_nll"]


@pytest.mark.parametrize("storage_kind", ["url", "object"])
def test_the_study_searcher_accepts_a_url_or_a_storage(tmp_path, storage_kind):
    from studies.searcher import PerTrialSeedSampler, StudyOptunaSearch

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = url if storage_kind == "url" else optuna.storages.RDBStorage(url)
    searcher = StudyOptunaSearch(_space, metric=["val_nll", "val_mi_loo"], mode=["min", "max"],
                                 sampler=PerTrialSeedSampler(0), study_name="s", storage=storage)
    searcher.suggest("a")
    searcher.on_trial_result("a", {"val_nll": 1.0, "val_mi_loo": 2.0, "training_iteration": 1})  # multi: not reported
    searcher.on_trial_complete("a", {"val_nll": 1.0, "val_mi_loo": 2.0})
    (trial,) = optuna.load_study(study_name="s", storage=url).get_trials()
    assert trial.values == [1.0, 2.0] and trial.intermediate_values == {}


def test_the_entry_modules_import_without_the_heavy_libraries():
    """``--help`` and bad input answer before torch, Ray, Optuna, MLflow or pandas load: the
    commands' modules defer them to the functions that need them."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "import analysis.cli, cvae_core.cli, cvae_core.guards, cvae_core.metrics.names, studies.cli, studies.record\n"
             "print(sorted(m for m in ('torch', 'ray', 'optuna', 'mlflow', 'pandas') if m in sys.modules))\n")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "[]\n"

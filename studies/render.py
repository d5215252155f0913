"""Printing a study's results: the ranked table, the per-configuration table, ``summary.md``
and the final lines (with the commands that open the study's runs and analysis)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from .effects import EFFECTS_HEADING, effect_line
from .record import CPU_SECONDS, DASHBOARD_PORT, GPU_SECONDS, cost_line, dashboard_command, hours_text
from .spec import StudySpec
from .state import StudyState
from .summary import TrialRow, broken, finite, oriented, rank

REPO_ROOT = Path(__file__).resolve().parents[1]


def _f(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if finite(value) else "-"


def _hours(cost: dict[str, float], key: str) -> str:
    """A trial's CPU- or GPU-hours for the table ("-" when it logged none)."""
    return hours_text(cost[key] / 3600) if key in cost else "-"


def _status_text(row: TrialRow, evaluations: int) -> str:
    if row.status == "stopped":
        return f"stopped@{row.evaluations}/{evaluations} (ASHA)"
    if row.status == "error":
        return "error"
    if row.status == "diverged":
        return row.error.split(":", 1)[0]  # "diverged at step N"
    return row.status


def _feasible_text(spec: StudySpec, values: dict[str, float]) -> str:
    """The feasible column: yes, no, or blank for a row without an evaluation to judge."""
    return ("no" if broken(spec, values) else "yes") if values else ""


def constraints_note(spec: StudySpec) -> str:
    """The legend of the feasible column ("" for a study without constraints)."""
    if not spec.constraints:
        return ""
    return (f"Constraints: {', '.join(str(c) for c in spec.constraints)} at each trial's best checkpoint. Feasible "
            "trials rank first; an infeasible one (feasible: no) is never the study's best.")


def table_lines(spec: StudySpec, rows: list[TrialRow], front: set[str]) -> list[str]:
    ranked = rank(spec, [r for r in rows if r.best]) + [r for r in rows if not r.best]
    width = max([len("config")] + [len(r.label) for r in ranked])
    mo, constrained = spec.multi_objective, bool(spec.constraints)
    gpu = any(GPU_SECONDS in r.cost for r in rows)
    header = (f"{'rank':>4}  {'trial':<13} {'config':<{width}} {'seed':>4} {'val NLL':>8} {'KL':>6} "
              f"{'MI':>6} {'AU':>4} {'PPL':>7} {'step':>5} {'CPU-h':>7}" + (f" {'GPU-h':>7}" if gpu else "")
              + ("  front" if mo else "")
              + ("  feasible" if constrained else "") + "  status")
    lines = [header, "-" * len(header)]
    for i, r in enumerate(ranked, 1):
        b = r.best
        fails = broken(spec, b) if b else []
        lines.append(
            f"{i if r.best else '':>4}  {r.trial_id:<13} {r.label:<{width}} {r.seed if r.seed is not None else '':>4} "
            f"{_f(b.get('val_nll')):>8} {_f(b.get('val_kl')):>6} {_f(b.get('val_mi_loo')):>6} "
            f"{_f(b.get('val_au'), 0):>4} {_f(b.get('val_ppl'), 1):>7} {int(b['step']) if 'step' in b else '':>5}"
            f" {_hours(r.cost, CPU_SECONDS):>7}" + (f" {_hours(r.cost, GPU_SECONDS):>7}" if gpu else "")
            + (f"  {'*' if r.trial_id in front else '':^5}" if mo else "")
            + (f"  {_feasible_text(spec, b):<8}" if constrained else "") + f"  {_status_text(r, spec.evaluations)}"
            + (f"  (fails {', '.join(fails)})" if fails else ""))
    return lines


def group_lines(spec: StudySpec, groups: list[dict[str, Any]], front: set[str]) -> list[str]:
    """Configurations ranked by their mean of the first objective, feasible means first."""
    first = spec.objectives[0]
    means = {g["label"]: {k: v for k, v in g.items() if k.startswith("val_") and not k.endswith("_sd") and finite(v)}
             for g in groups}
    groups = sorted(groups, key=lambda g: (g.get(first.metric) is None, bool(broken(spec, means[g["label"]])),
                                           oriented(first, g.get(first.metric) or 0)))
    width = max([len("config")] + [len(g["label"]) for g in groups])

    def ms(g, key, digits=2):
        mean, sd = g.get(key), g.get(f"{key}_sd")
        return f"{_f(mean, digits)}±{_f(sd, digits)}" if sd is not None else _f(mean, digits)

    header = (f"{'rank':>4}  {'config':<{width}} {'n':>2} {'val NLL':>13} {'KL':>11} {'MI':>11} {'AU':>7}"
              + ("  feasible" if spec.constraints else ""))
    lines = [header, "-" * len(header)]
    for i, g in enumerate(groups, 1):
        lines.append(f"{i:>4}  {g['label']:<{width}} {g['n']:>2} {ms(g, 'val_nll'):>13} {ms(g, 'val_kl'):>11} "
                     f"{ms(g, 'val_mi_loo'):>11} {ms(g, 'val_au', 1):>7}"
                     + (f"  {_feasible_text(spec, means[g['label']]):<8}" if spec.constraints else "")
                     + ("  *" if spec.multi_objective and g["label"] in front else ""))
    return lines


def best_lines(summary: dict[str, Any]) -> list[str]:
    """The study's best trial and where its checkpoint is; with none feasible, says so and shows
    the best infeasible trial as such (never a champion)."""
    best, label = summary["best"], ""
    if best is None and summary.get("best_infeasible"):
        best = summary["best_infeasible"]
        label = (f"none feasible: no trial satisfies {', '.join(summary['constraints'])}. "
                 "Best infeasible trial (not a champion): ")
    if best is None:
        return []
    fails = f" (fails {', '.join(best['violated'])})" if best.get("violated") else ""
    lines = [f"Best: {label}{best['trial_id']} ({best['label']}, seed {best['seed']}), val_nll "
             f"{_f(best['best'].get('val_nll'))} at step {int(best['best'].get('step', 0))}{fails}"]
    if best["checkpoint"]:
        lines.append(f"  checkpoint (Ray):    {best['checkpoint']}")
    if best["run_id"]:
        lines.append(f"  checkpoint (MLflow): runs:/{best['run_id']}/checkpoint   "
                     "(evaluation-only: weights, config, vocab)")
    return lines


def mlflow_ui_command(tracking_uri: str, experiment_id: str, artifacts: Path) -> str:
    """The line that opens this study's runs: the server's URL, or a command that starts the
    project's server launcher (MLflow's job runner off, one worker: 2 processes) on the local store.
    Absolute paths and this interpreter, so it runs as printed from any folder and shell."""
    if tracking_uri.startswith(("http://", "https://")):
        return experiment_page(tracking_uri, experiment_id)
    return (shlex.join([sys.executable, str(REPO_ROOT / "mlflow" / "server.py"), "--backend-store-uri", tracking_uri,
                        "--artifacts-destination", str(artifacts), "--workers", "1"])
            + f"   # then open {experiment_page('http://127.0.0.1:5000', experiment_id)}")


def experiment_page(server_url: str, experiment_id: str) -> str:
    """The experiment's runs table. The MLflow 3 UI opens on its GenAI (traces) view unless the
    URL asks for the model-training one; the choice is kept in the browser afterwards."""
    return f"{server_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def analysis_command(state: "StudyState") -> str:
    """The documented next step, for this study, runnable as printed from any folder."""
    return shlex.join([sys.executable, "-m", "analysis", "table", "--tracking-uri", state.tracking_uri,
                       "--experiment", state.experiment_name, "--study", state.study_name])


def lineage_lines(state: StudyState) -> list[str]:
    """Where the study's trials came from besides its own first search."""
    lines = []
    if state.warm_start:
        source, _, top = state.warm_start.partition(":")
        lines.append(f"Seeded from study {source} ({top}, --warm-start): its best configurations ran first, "
                     "measured again at this budget")
    if state.extensions:
        lines.append("Extended (--extend) by " + ", then ".join(f"{e['num_samples']} configuration(s)"
                                                             for e in state.extensions))
    return lines


def render_markdown(spec: StudySpec, state: StudyState, rows: list[TrialRow], summary: dict[str, Any]) -> str:
    front = set(summary["pareto_front"])
    out = [f"# Study {state.study_name}", "",
           f"spec `{spec.name}` ({spec.description}), search `{spec.search}`, objectives "
           f"{', '.join(summary['objectives'])}, status **{summary['status']}**, "
           f"{summary['elapsed_s']:.0f} s this session.", "",
           *(f"{line}." for line in lineage_lines(state)), *([""] if lineage_lines(state) else []),
           "Metrics are those of each trial's best checkpoint (lowest validation NLL).", ""]
    if spec.constraints:
        out += [constraints_note(spec), ""]
    out += ["```", *table_lines(spec, rows, front), "```", ""]
    if summary["configurations"]:
        out += ["Per configuration (mean ± sd over seeds):", "", "```"]
        out += group_lines(spec, summary["configurations"], front)
        out += ["```", ""]
    if summary.get("effects"):
        out += [EFFECTS_HEADING + ":", ""] + [f"- {effect_line(e)}" for e in summary["effects"]] + [""]
    best = best_lines(summary)
    if best:
        out += ["```", *best, "```", ""]
    out += [f"- Ray experiment: `{state.experiment_path}`", f"- Optuna storage: `{state.optuna_storage}`",
            f"- MLflow: `{state.tracking_uri}`, parent run `{state.parent_run_id}`", "",
            cost_line(summary["cost"], summary["elapsed_s"]) + ". CPU-hours: the trials' process CPU time; "
            "GPU-hours: wall time x the GPUs each trial held (docs/metrics.md)."]
    return "\n".join(out) + "\n"


def print_summary(spec: StudySpec, state: StudyState, rows: list[TrialRow], summary: dict[str, Any],
                  interrupted: bool, stopped_because: str | None = None) -> None:
    counts = summary["counts"]
    front = set(summary["pareto_front"])
    print()
    print(f"Study {state.study_name} {'INTERRUPTED' if interrupted else 'finished'}: "
          f"{counts['done']} done, {counts['stopped']} stopped early by ASHA, {counts['diverged']} diverged, "
          f"{counts['error']} failed"
          + (f", {counts['interrupted'] + counts['pending']} unfinished" if interrupted else "")
          + f" ({summary['elapsed_s'] / 60:.1f} min this session)")
    for line in lineage_lines(state):
        print(line)
    print(f"Ranked by {spec.objectives[0]} at each trial's best checkpoint (lowest val NLL):")
    for line in table_lines(spec, rows, front):
        print(line)
    if spec.constraints:
        print(constraints_note(spec))
    if summary["configurations"]:
        print("\nPer configuration (mean ± sd over seeds):")
        for line in group_lines(spec, summary["configurations"], front):
            print(line)
    if summary.get("effects"):
        print(f"\n{EFFECTS_HEADING}:")
        for entry in summary["effects"]:
            print(f"  {effect_line(entry)}")
    if spec.multi_objective:
        print(f"\nPareto front over {', '.join(str(o) for o in spec.objectives)}"
              + (" (feasible trials only)" if spec.constraints else "") + ": marked *")
    best = best_lines(summary)
    if best:
        print("", *best, sep="\n")
    print(f"\nSummary:      {Path(state.folder) / 'summary.md'}")
    print(f"Compare runs: {mlflow_ui_command(state.tracking_uri, state.experiment_id, Path(state.folder).parent / 'mlartifacts')}")
    print(f"Analyse:      {analysis_command(state)}")
    if state.optuna_storage != "none":
        print(f"Optuna study: {state.study_name} in {state.optuna_storage}")
        dashboard = dashboard_command(state.optuna_storage)
        if dashboard:  # only with the dashboard extra installed
            print(f"Dashboard:    {shlex.join(dashboard)}   # then open http://127.0.0.1:{DASHBOARD_PORT}/dashboard/")
    print(cost_line(summary["cost"], summary["elapsed_s"]))
    if interrupted:
        if stopped_because:
            print(f"\nStopped: {stopped_because}. Free space, then continue with: {resume_command(spec, state)}")
        else:
            print(f"\nInterrupted. Continue with: {resume_command(spec, state)}")
    sys.stdout.flush()


def resume_command(spec: StudySpec, state: StudyState) -> str:
    """The command that continues this study, runnable as printed from any folder."""
    return shlex.join([sys.executable, str(REPO_ROOT / "studies" / _script_for(spec)), "--resume", state.study_name,
                       "--root", str(Path(state.folder).parent)])


def _script_for(spec: StudySpec) -> str:
    if (Path(__file__).resolve().parent / f"{spec.name}.py").exists():  # e.g. cvae_sweep.py for its spec
        return f"{spec.name}.py"
    return {"lambda": "lambda_sweep.py", "posterior": "posterior_sweep.py"}.get(spec.space, "lambda_sweep.py")

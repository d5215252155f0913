"""PNG figures of a study (matplotlib, Agg backend).

Each ``plot_*`` function writes one or more PNG files into ``out_dir`` and returns their paths;
it returns ``[]`` and reports why through ``note`` when the study lacks what the figure needs
(e.g. no gradient-norm metrics).  :func:`make_plots` runs them all.

  lambda_m_<dataset>.png    validation NLL, KL and MI against λ_m, one line per matching distance
  pareto_nll_mi.png         every trial's validation NLL vs MI, the Pareto front highlighted
  grad_norms.png            gradient norms over training (paper Figure 2), when runs logged them
  importances.png           Optuna parameter importances: PED-ANOVA and fANOVA
  parallel_coordinates.png  Optuna's parallel-coordinates plot of the persisted study
  top_k_curves.png          validation curves of the k best trials
  posterior_means.png       synthetic data: posterior means coloured by true cluster, VAE beside
                            Coupled-VAE (He et al. 2019's figure), from the runs' checkpoints

The synthetic data's posterior-mean plot loads torch and the models inside its function: every
other plot runs without them.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cvae_core.errors import CvaeError  # noqa: E402
from cvae_core.metrics.names import GRAD_KEYS, bare_name, direction, pareto_mask  # noqa: E402
from cvae_core.metrics.names import metric as metric_info  # noqa: E402
from studies.record import read_constraints_tag  # noqa: E402

from .paper import DATASET_LABELS  # noqa: E402
from .runs import BEST_PREFIX, run_label  # noqa: E402
from .selection import broken_constraints, cfg, family_label, family_of, metric_column, ordered_datasets  # noqa: E402
from .store import AnalysisError, recorded_optuna_study  # noqa: E402

DPI = 130
DISTANCE_STYLE = {"rq": ("tab:blue", "o", "RQ kernel"), "eucl": ("tab:orange", "s", "Euclidean")}
GRAD_TITLES = {
    "grad_rec": r"$\|\partial L_{rec}/\partial e\|^2$",
    "grad_rec_coupled": r"$\|\partial L^c_{rec}/\partial e\|^2$",
    "grad_total": r"$\|\partial (L_{rec}+L^c_{rec})/\partial e\|^2$",
    "grad_reg": r"$\|\partial L_{reg}/\partial e\|^2$",
    "dh_de": r"$\|\partial h/\partial e\|_F^2 / \|h\|^2$",
}
Note = Callable[[str], None]
Checkpoint = Callable[[pd.Series], "Path | None"]  # a run's row -> its checkpoint folder (None: it has none)


FORMATS = ("png", "pdf", "svg")

# Optuna parameter names as readers know them (the define-by-run spaces of studies/spaces.py).
PARAM_LABELS = {
    "search.matching": "matching term on (λ_m > 0)", "coupling.lambda_m": "λ_m", "coupling.lambda_r": "λ_r",
    "coupling.distance": "matching distance", "coupling.rq_c": "RQ's C", "model.posterior": "posterior family",
    "coupling.enabled": "coupled", "model.n_flows": "planar flows K",
}
FEW_TRIALS = 20  # below this, importances are rough


def _save(fig, path: Path, fmt: str) -> Path:
    """Save with every label inside the canvas (bbox_inches="tight"), as ``fmt`` (one of FORMATS)."""
    path = path.with_suffix(f".{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _dataset_name(dataset: str) -> str:
    return DATASET_LABELS.get(dataset, dataset)


def _x_scale(ax, values: np.ndarray) -> None:
    ax.margins(x=0.06)  # keep the largest λ off the frame
    positive = values[values > 0]
    if not len(positive):
        return
    if (values == 0).any():
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    elif positive.max() / positive.min() >= 10:
        ax.set_xscale("log")
    ticks = sorted(set(values.tolist()))
    if len(ticks) <= 8 and all(float(f"{t:.2g}") == t for t in ticks):  # grid values, not searched ones
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()


def plot_lambda_m(runs: pd.DataFrame, out_dir: Path, at: str = "best", ref_lambda_r: float = 1.0,
                  note: Note = print, fmt: str = "png") -> list[Path]:
    """Per dataset: val NLL, KL and MI against λ_m, one line per matching distance (mean ± std over
    seeds, individual runs as faint points), the uncoupled base model as a dashed line."""
    coupled = runs[cfg(runs, "coupling.enabled").fillna(False).astype(bool)]
    if not len(coupled) or cfg(coupled, "coupling.lambda_m").astype(float).nunique() < 2:
        note("λ_m plot skipped: the study has fewer than two λ_m values")
        return []
    lr = cfg(coupled, "coupling.lambda_r").astype(float)
    restricted = coupled[np.isclose(lr, ref_lambda_r)]
    # a searched study rarely repeats λ_r: then every coupled run, labelled as such
    on_grid = cfg(restricted, "coupling.lambda_m").astype(float).nunique() >= 2
    subset, lr_text = ((restricted, rf"$\lambda_r$ = {ref_lambda_r:g}") if on_grid
                       else (coupled, r"all $\lambda_r$, each point labelled with its $\lambda_r$"))
    metrics = [("nll", "NLL (nats/sentence)"), ("kl", "KL (nats)"), ("mi_loo", "MI (nats)")]
    paths = []
    for dataset in ordered_datasets(subset["dataset"]):
        mine = subset[subset["dataset"] == dataset]
        if cfg(mine, "coupling.lambda_m").astype(float).nunique() < 2:
            note(f"λ_m plot for {_dataset_name(dataset)} skipped: one λ_m value only")
            continue
        families = sorted({family_of(p) for p in mine["preset"]})
        base = runs[(runs["dataset"] == dataset) & runs["preset"].isin(families)]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
        lms = cfg(mine, "coupling.lambda_m").astype(float).to_numpy()
        for ax, (key, ylabel) in zip(axes, metrics):
            column = metric_column(key, at)
            if column not in mine.columns:
                ax.text(0.5, 0.5, f"val_{key} not logged", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for distance in sorted(set(cfg(mine, "coupling.distance").dropna()), key=lambda d: (d != "rq", d)):
                color, marker, name = DISTANCE_STYLE.get(distance, ("tab:green", "^", distance))
                these = mine[cfg(mine, "coupling.distance") == distance]
                x = cfg(these, "coupling.lambda_m").astype(float)
                if not on_grid:  # points of different λ_r: no line through them
                    ax.scatter(x, these[column], color=color, s=36, marker=marker, label=name)
                    for xi, yi, lr_i in zip(x, these[column], cfg(these, "coupling.lambda_r").astype(float)):
                        ax.annotate(f"{lr_i:.2g}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                                    fontsize=7, color=color)
                    continue
                ax.scatter(x, these[column], color=color, alpha=0.3, s=18, marker=marker)
                grouped = these.groupby(x.to_numpy())[column].agg(["mean", "std", "count"]).sort_index()
                ax.errorbar(grouped.index, grouped["mean"], yerr=grouped["std"].fillna(0), color=color,
                            marker=marker, capsize=3, label=f"{name} (mean ± std)")
            if len(base) and column in base.columns:
                value = base[column].mean()
                if np.isfinite(value):
                    ax.axhline(value, color="0.4", linestyle="--", linewidth=1,
                               label=f"{family_label(families[0], False)} (no coupling)")
            _x_scale(ax, lms)
            ax.set_xlabel(r"$\lambda_m$ (signal-matching weight)")
            ax.set_ylabel(f"validation {ylabel}")
            ax.set_title(rf"{metric_info(key).label} vs $\lambda_m$")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(rf"{_dataset_name(dataset)}: validation metrics against $\lambda_m$ ({lr_text}, "
                     f"{'best' if at == 'best' else 'last'} evaluation of each run)")
        paths.append(_save(fig, out_dir / f"lambda_m_{dataset}.png", fmt))
    return paths


def plot_pareto(runs: pd.DataFrame, out_dir: Path, at: str = "best", note: Note = print,
                fmt: str = "png") -> list[Path]:
    """Validation NLL (lower is better) against MI (higher is better) per dataset; Pareto front marked."""
    x_col, y_col = metric_column("nll", at), metric_column("mi_loo", at)
    if x_col not in runs.columns or y_col not in runs.columns:
        note("Pareto plot skipped: the runs lack val_nll or val_mi_loo")
        return []
    data = runs[runs[x_col].notna() & runs[y_col].notna()]
    if not len(data):
        note("Pareto plot skipped: no run has both val_nll and val_mi_loo")
        return []
    datasets = ordered_datasets(data["dataset"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 5), constrained_layout=True,
                             squeeze=False)
    presets = sorted(set(data["preset"]))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(presets)}
    for ax, dataset in zip(axes[0], datasets):
        mine = data[data["dataset"] == dataset]
        front = np.array(pareto_mask(list(zip(mine[x_col], mine[y_col])), [direction("nll"), direction("mi_loo")]))
        for preset in presets:
            these = mine[mine["preset"] == preset]
            if len(these):
                ax.scatter(these[x_col], these[y_col], color=colors[preset], s=30, alpha=0.75, label=preset)
        best = mine[front].sort_values(x_col)
        ax.step(best[x_col], best[y_col], where="post", color="black", linewidth=1.2, label="Pareto front")
        ax.scatter(best[x_col], best[y_col], facecolors="none", edgecolors="black", s=90, linewidths=1.4)
        middle = (mine[x_col].min() + mine[x_col].max()) / 2
        for _, row in best.head(8).iterrows():
            right = row[x_col] > middle  # label towards the middle so it stays inside the axes
            ax.annotate(run_label(row), (row[x_col], row[y_col]), textcoords="offset points",
                        xytext=(-7 if right else 7, 4), ha="right" if right else "left", fontsize=7)
        ax.margins(x=0.08, y=0.1)
        ax.set_xlabel("validation NLL (nats/sentence, lower is better)")
        ax.set_ylabel("validation MI (nats, higher is better)")
        ax.set_title(f"{_dataset_name(dataset)}: {int(front.sum())} of {len(mine)} trials on the front")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Trade-off between likelihood and latent information (each point: one trial)")
    return [_save(fig, out_dir / "pareto_nll_mi.png", fmt)]


def grad_metrics(history: pd.DataFrame) -> list[str]:
    """Logged metric names that are gradient norms (``grad_rec``, ``val_grad_reg``, ...)."""
    return [name for name in sorted(set(history["metric"])) if bare_name(name) in GRAD_KEYS]


def plot_grad_norms(runs: pd.DataFrame, history: pd.DataFrame, out_dir: Path, note: Note = print,
                    fmt: str = "png") -> list[Path]:
    """Figure 2: each gradient-norm metric over training steps, one line per preset (mean over runs)."""
    names = grad_metrics(history)
    if not names:
        note("gradient-norm plot skipped: no run logged grad_* / dh_de metrics")
        return []
    preset_of = dict(zip(runs["run_id"], runs["preset"]))
    data = history[history["metric"].isin(names)].assign(preset=lambda f: f["run_id"].map(preset_of))
    presets = sorted(set(data["preset"].dropna()))
    styles = dict(zip(presets, ["o", "s", "^", "D", "v", "P", "X"] * 3))
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        bare = bare_name(name)
        for preset in presets:
            curve = data[(data["metric"] == name) & (data["preset"] == preset)].groupby("step")["value"].mean()
            if len(curve):
                ax.plot(curve.index, curve.to_numpy(), marker=styles[preset], markersize=4, label=preset)
        ax.set_title(GRAD_TITLES.get(bare, bare) + ("" if bare == name else f"  ({name.split('_')[0]})"))
        ax.set_xlabel("training step")
        ax.set_ylabel("squared norm (mean over sentences)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Gradient norms w.r.t. the encoding e during training (paper Figure 2)")
    return [_save(fig, out_dir / "grad_norms.png", fmt)]


def load_optuna_study(parent_tags: dict[str, str], note: Note = print):
    """The persisted Optuna study named in the parent run's tags, or None (with a note why)."""
    import optuna

    try:
        storage, name = recorded_optuna_study(parent_tags)
    except AnalysisError as exc:
        note(f"Optuna plots skipped: {exc}")
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception as exc:  # a missing study or an unreachable database: report it, draw the rest
        note(f"Optuna plots skipped: cannot load study {name!r} from {storage}: {type(exc).__name__}: {exc}")
        return None


def _target(study):
    names = getattr(study, "metric_names", None)
    if len(study.directions) == 1:
        return None, (names[0] if names else "objective")
    return (lambda t: t.values[0]), (names[0] if names else "objective 0")


def plot_optuna(parent_tags: dict[str, str], out_dir: Path, note: Note = print, fmt: str = "png") -> list[Path]:
    """Parameter importances (PED-ANOVA and fANOVA) and parallel coordinates of the Optuna study."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    study = load_optuna_study(parent_tags, note)
    if study is None:
        return []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        note(f"Optuna plots skipped: {len(complete)} complete trial(s) in {study.study_name!r}")
        return []
    target, target_name = _target(study)
    paths = []
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, evaluator in (("PED-ANOVA", PedAnovaImportanceEvaluator()),
                                ("fANOVA", FanovaImportanceEvaluator(seed=0))):
            try:
                results[name] = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
            except Exception as exc:  # e.g. parameters that vary in no trial
                note(f"{name} importance skipped: {type(exc).__name__}: {exc}")
    results = {k: v for k, v in results.items() if v}
    if results:
        params = sorted({p for r in results.values() for p in r},
                        key=lambda p: -max(r.get(p, 0.0) for r in results.values()))
        fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 0.5 * len(params) + 2),
                                 constrained_layout=True, squeeze=False)
        for ax, (name, importances) in zip(axes[0], results.items()):
            values = [importances.get(p, 0.0) for p in params][::-1]
            bars = ax.barh([PARAM_LABELS.get(p, p) for p in params[::-1]], values, color="tab:blue")
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
            ax.set_xlim(0, max(1.0, max(values) * 1.15))
            ax.set_xlabel(f"importance for {target_name} (normalised)")
            ax.set_title(name)
            ax.grid(axis="x", alpha=0.3)
        pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
        caveat = (f"\nfrom only {len(complete)} complete trials" + (f" ({pruned} pruned early, left out)" if pruned else "")
                  + ": a rough ranking, not a measurement") if len(complete) < FEW_TRIALS else ""
        fig.suptitle(f"Hyperparameter importances for {target_name}, Optuna study {study.study_name!r} "
                     f"({len(complete)} trials){caveat}")
        paths.append(_save(fig, out_dir / "importances.png", fmt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study, target=target,
                                                                         target_name=target_name)
            fig = ax.figure
            fig.set_size_inches(max(8, 2.0 * (len(study.best_trials[0].params) + 1)), 6)
            for lines in ax.collections:  # Optuna's Blues map draws the worst trials white on white
                if lines.get_array() is not None:
                    lines.set_cmap("viridis")
            ax.set_title("")
            ax.set_xticklabels([PARAM_LABELS.get(t.get_text(), t.get_text()) for t in ax.get_xticklabels()])
            fig.suptitle(f"Parallel coordinates, {len(complete)} trials (colour: {target_name})\n"
                         f"Optuna study {study.study_name!r}")
            fig.tight_layout()
            paths.append(_save(fig, out_dir / "parallel_coordinates.png", fmt))
        except Exception as exc:
            plt.close("all")
            note(f"parallel-coordinates plot skipped: {type(exc).__name__}: {exc}")
    return paths


def plot_top_k(runs: pd.DataFrame, history: pd.DataFrame, out_dir: Path, k: int = 5, metric: str = "val_nll",
               note: Note = print, fmt: str = "png") -> list[Path]:
    """Validation curves (NLL, KL, MI) of the k trials with the best ``metric`` (at their best evaluation)."""
    column = BEST_PREFIX + metric
    if column not in runs.columns or runs[column].notna().sum() == 0:
        note(f"top-k curves skipped: no run logged {metric}")
        return []
    top = runs[runs[column].notna()].sort_values(column, ascending=direction(metric) == "min").head(k)
    panels = [m for m in ("val_nll", "val_kl", "val_mi_loo") if (history["metric"] == m).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), constrained_layout=True, squeeze=False)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(top)))
    for ax, name in zip(axes[0], panels):
        for color, (_, row) in zip(colors, top.iterrows()):
            curve = history[(history["run_id"] == row["run_id"]) & (history["metric"] == name)]
            curve = curve.drop_duplicates("step", keep="last").sort_values("step")
            label = f"{run_label(row)} ({_dataset_name(row['dataset'])})"
            ax.plot(curve["step"], curve["value"], color=color, marker="o", markersize=3, label=label)
            best = curve[curve["step"] == row["best_step"]]
            ax.scatter(best["step"], best["value"], color=color, marker="*", s=120, zorder=3, edgecolors="black")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{name} ({'nats/sentence' if name == 'val_nll' else 'nats'})")
        ax.set_title(name.replace("val_", "validation ").replace("mi_loo", "MI").replace("nll", "NLL")
                     .replace("kl", "KL"))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(f"Validation curves of the {len(top)} best trials by {metric} (★ = best evaluation)")
    return [_save(fig, out_dir / "top_k_curves.png", fmt)]


COMPONENT_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
POSTERIOR_POINTS = 1000  # validation sentences drawn (He et al. draw 500)


def _posterior_panel(ax, points: np.ndarray, component: np.ndarray, title: str, axis_names: tuple[str, str]) -> None:
    from cvae_core.data.synthetic import GeneratorShape

    for k, mean in enumerate(GeneratorShape().means):
        mine = component == k
        ax.scatter(points[mine, 0], points[mine, 1], s=5, alpha=0.6, color=COMPONENT_COLORS[k],
                   label=f"cluster ({mean[0]:+g}, {mean[1]:+g})")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def _two_axes(means: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """A 2-D view of posterior means [N, d]: the means themselves for d = 2, else their first two
    principal components (one dimension padded with 0 for d = 1)."""
    if means.shape[1] == 2:
        return means, (r"$E_q[z_1|x]$", r"$E_q[z_2|x]$")
    if means.shape[1] == 1:
        return np.column_stack([means[:, 0], np.zeros(len(means))]), (r"$E_q[z|x]$", "")
    centred = means - means.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, (r"PC 1 of $E_q[z|x]$", r"PC 2 of $E_q[z|x]$")


def plot_posterior_means(runs: pd.DataFrame, out_dir: Path, checkpoint: Checkpoint | None, at: str = "best",
                         note: Note = print, constraints=(), fmt: str = "png") -> list[Path]:
    """He et al. (2019)'s picture on the synthetic data: the true z of validation sentences and the
    posterior means E_q[z|x] of the best VAE and the best Coupled-VAE run (lowest validation NLL,
    at each run's best checkpoint; among the runs that satisfy the study's ``constraints`` when
    any does, as the study's champion), all coloured by the sentence's true mixture component.
    A collapsed encoder puts every mean at one point; one that recovers z shows the four clusters."""
    data = runs[runs["dataset"] == "synthetic"]
    if not len(data):
        return []  # the figure needs the known answer of the synthetic data
    if checkpoint is None:
        note("posterior-mean plot skipped: no way to fetch the runs' checkpoints was given")
        return []
    from cvae_core.evaluation import load_for_evaluation
    from cvae_core.metrics.likelihood import posterior_means

    column = metric_column("nll", at)
    coupled = cfg(data, "coupling.enabled").fillna(False).astype(bool)
    latent = cfg(data, "model.kind", "vae").fillna("vae") == "vae"
    panels, truth = [], None
    for name, group in (("VAE", data[latent & ~coupled]), ("Coupled-VAE", data[latent & coupled])):
        group = group[group[column].notna()] if column in group.columns else group.iloc[0:0]
        if not len(group):
            note(f"posterior-mean plot: no {name} run with {column}")
            continue
        infeasible = broken_constraints(group, constraints).map(bool)
        row = group.assign(_infeasible=infeasible).sort_values(["_infeasible", column], kind="stable").iloc[0]
        try:
            folder = checkpoint(row)
            if folder is None:
                note(f"posterior-mean plot: {name} run {row['run_id']} has no checkpoint")
                continue
            model, _, _, split = load_for_evaluation(folder, "valid", device="cpu", limit=POSTERIOR_POINTS)
        except CvaeError as exc:
            note(f"posterior-mean plot: {name} run {row['run_id']} skipped: {exc}")
            continue
        truth = split.truth
        metrics = ", ".join(f"{metric_info(key).label} {row[metric_column(key, at)]:.{metric_info(key).decimals}f}"
                            for key in ("kl", "mi_loo", "au", "cluster_probe_acc", "z_probe_r2")
                            if metric_column(key, at) in row.index and pd.notna(row[metric_column(key, at)]))
        panels.append((posterior_means(model, split).numpy(), f"{name}: {run_label(row)}\nvalidation {metrics}"))
    if truth is None:
        note("posterior-mean plot skipped: no VAE or Coupled-VAE checkpoint could be read")
        return []
    component = truth.component.numpy()
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.6 * (1 + len(panels)), 4.4), constrained_layout=True,
                             squeeze=False)
    views = [(truth.z.numpy(), "the true z of each sentence", ("$z_1$", "$z_2$"))]
    for means, title in panels:
        points, names = _two_axes(means)
        views.append((points, title, names))
    # one scale for every panel, as in He et al.'s figure: a collapsed encoder's means are one dot
    limit = 1.05 * max(float(np.abs(view[0]).max()) for view in views)
    for ax, (points, title, names) in zip(axes[0], views):
        _posterior_panel(ax, points, component, title, names)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False, markerscale=3)
    fig.suptitle(f"Synthetic data (He et al. 2019): posterior means of {len(component):,} validation sentences, "
                 "coloured by the true mixture component")
    return [_save(fig, out_dir / "posterior_means.png", fmt)]


def make_plots(runs: pd.DataFrame, history: pd.DataFrame, parent_tags: dict[str, str], out_dir: str | Path,
               at: str = "best", top_k: int = 5, note: Note = print, fmt: str = "png",
               checkpoint: Checkpoint | None = None) -> list[Path]:
    """Every figure the study supports; ``checkpoint`` (a run's row -> its checkpoint folder) lets
    the synthetic data's posterior-mean plot load the models."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    paths += plot_lambda_m(runs, out_dir, at, note=note, fmt=fmt)
    paths += plot_pareto(runs, out_dir, at, note=note, fmt=fmt)
    paths += plot_grad_norms(runs, history, out_dir, note=note, fmt=fmt)
    paths += plot_optuna(parent_tags, out_dir, note=note, fmt=fmt)
    paths += plot_top_k(runs, history, out_dir, top_k, note=note, fmt=fmt)
    paths += plot_posterior_means(runs, out_dir, checkpoint, at, note=note,
                                  constraints=read_constraints_tag(parent_tags), fmt=fmt)
    return paths

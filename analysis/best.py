"""Best trial -> download its checkpoint -> full evaluation -> log it back -> register it.

1. Rank the study's FINISHED trials by ``best.<metric>`` (the metric at the evaluation whose
   checkpoint the trial saved), those that satisfy the study's constraints (``Tag.CONSTRAINTS``
   on its parent run) first; ``--pareto`` lists the val_nll/val_mi_loo front of the feasible
   trials instead.  With no feasible trial the best infeasible one is evaluated, labelled so,
   and not registered unless ``--register`` asks for it.
2. Download the ``checkpoint/`` artifact (works with a remote server's proxied artifacts,
   ``mlflow-artifacts:/`` URIs, as with a local SQLite store).
3. ``cvae_core.evaluation.evaluate_model`` on the test split (the model loaded once): IS-NLL with
   N importance samples, KL, PPL, ELBO, both MI estimators, AU, and BLEU/Dist/gradient norms when
   the model supports them.
4. Log an evaluation run (``Role.EVALUATION``, nested under the source trial run, tag
   ``Tag.SOURCE_RUN_ID``; :mod:`studies.record`) with ``test_*`` metrics and ``evaluation.json``.
5. Log the checkpoint as an MLflow Model (``analysis/champion.py``: a pyfunc whose ``predict``
   gives per-sentence NLL, reconstructions or samples), register it and point the alias
   ``champion`` at it, unless the evaluation was partial (``--limit``, fewer samples than
   the paper's, ...) and ``--register`` was not given: a quick look never moves the champion.
   Every logged number carries its split, sample counts and sentence count (tag
   ``Tag.EVALUATION`` on the evaluation run and the model version).

The core's checkpoint, evaluation and champion code load inside the functions that evaluate
(torch, MLflow's pyfunc): listing and choosing runs does not need them.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cvae_core.errors import CvaeError
from cvae_core.metrics.names import direction, pareto_mask
from cvae_core.runtime import format_duration
from studies.record import PARENT_RUN_ID, Role, Tag, read_constraints_tag

from .runs import Study, dumps, fetch_study, json_safe, run_label
from .selection import broken_by, broken_constraints
from .store import AnalysisError, connect

Progress = Callable[[str], None]


def default_mode(metric: str) -> str:
    """The registry's better direction of ``metric``; an error naming --mode for one it cannot rank."""
    try:
        return direction(metric)
    except CvaeError as exc:
        raise AnalysisError(f"{exc}; or pass --mode min|max") from None


def resolve_metric(runs: pd.DataFrame, metric: str) -> str:
    """``nll`` -> ``val_nll`` when only the prefixed one was logged; a clear error if neither was."""
    for name in (metric, f"val_{metric}"):
        if f"best.{name}" in runs.columns and runs[f"best.{name}"].notna().any():
            return name
    logged = sorted(c[len("best."):] for c in runs.columns if c.startswith("best.") and runs[c].notna().any())
    raise AnalysisError(f"no run logged metric {metric!r}; logged: {', '.join(logged) or 'none'}")


def rank_runs(runs: pd.DataFrame, metric: str = "val_nll", mode: str | None = None,
              statuses: tuple[str, ...] | None = ("FINISHED",), constraints: tuple = ()) -> pd.DataFrame:
    """Runs (FINISHED ones unless ``statuses`` is None) with a value of ``best.<metric>``, best
    first, the runs that satisfy ``constraints`` before those that do not; the column ``violated``
    lists the constraints each run breaks."""
    metric = resolve_metric(runs, metric)
    mode = mode or default_mode(metric)
    column = f"best.{metric}"
    keep = runs["status"].isin(list(statuses)) if statuses is not None else pd.Series(True, index=runs.index)
    candidates = runs[keep & runs[column].notna()].assign(violated=lambda f: broken_constraints(f, constraints))
    if not len(candidates):
        raise AnalysisError(f"no {'/'.join(statuses or ('',))} run has a value of {metric}")
    ranked = candidates.sort_values(column, ascending=(mode == "min"), kind="stable")
    return ranked.sort_values("violated", key=lambda v: v.map(bool), kind="stable")


def pareto_front(runs: pd.DataFrame, objectives: tuple[str, ...] = ("val_nll", "val_mi_loo"),
                 constraints: tuple = ()) -> pd.DataFrame:
    """FINISHED runs on the Pareto front of ``objectives`` (per dataset: NLLs of datasets differ),
    among those that satisfy ``constraints``."""
    columns = [f"best.{resolve_metric(runs, m)}" for m in objectives]
    data = runs[(runs["status"] == "FINISHED")].dropna(subset=columns)
    data = data[~broken_constraints(data, constraints).map(bool).astype(bool)]
    fronts = []
    for _, group in data.groupby("dataset", sort=True):
        mask = pareto_mask(group[columns].to_numpy().tolist(), [direction(m) for m in objectives])
        fronts.append(group[mask].sort_values(columns[0]))
    if not fronts:
        raise AnalysisError("no FINISHED run has all of " + ", ".join(objectives)
                            + (f" and satisfies {', '.join(str(c) for c in constraints)}" if constraints else ""))
    return pd.concat(fronts)


def has_checkpoint(client, run_id: str) -> bool:
    from cvae_core.checkpoint import has_checkpoint_files

    return has_checkpoint_files(a.path for a in client.list_artifacts(run_id, "checkpoint"))


def download_checkpoint(tracking_uri: str, run_id: str, dst: str | Path) -> Path:
    """The run's ``checkpoint/`` artifact as a local directory under ``dst``."""
    import mlflow

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(dst),
                                               tracking_uri=tracking_uri)
    return Path(path)


def evaluation_options(model, config, wanted: dict[str, Any], note: Progress) -> dict[str, Any]:
    """The optional evaluate_model keywords in ``wanted``, less those this model cannot compute."""
    from cvae_core.metrics.dynamics import encoding_module

    options = dict(wanted)
    kind = config.model.kind
    if kind != "vae":
        for flag in ("bleu", "dist"):
            if options.get(flag):
                note(f"{flag}: needs a latent-variable model, this checkpoint has model.kind={kind!r}; skipped")
                options[flag] = False
    if options.get("grad_norms"):
        try:
            encoding_module(model)
        except CvaeError as exc:
            note(f"grad_norms: skipped ({exc})")
            options["grad_norms"] = False
    return options


class Heartbeat:
    """Prints 'still running' with the elapsed time every ``every`` seconds until stopped."""

    def __init__(self, what: str, progress: Progress, every: float = 30.0):
        self.what, self.progress, self.every = what, progress, every
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.progress(f"{self.what}: still running ({format_duration(time.monotonic() - self.t0)})")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def evaluate(checkpoint: Path, *, split: str, n_samples: int, mi_samples: int, seed: int, device: str,
             data_dir: str | None, limit: int, wanted: dict[str, Any],
             progress: Progress) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the checkpoint once, drop the optional metrics it cannot compute, evaluate it.
    -> (result, the optional settings used)."""
    from cvae_core.evaluation import ProgressPrinter, evaluate_model, load_for_evaluation

    model, config, _, data = load_for_evaluation(checkpoint, split, device,
                                                 {"data_dir": data_dir} if data_dir else None, limit)
    options = evaluation_options(model, config, wanted, progress)
    extras = [k for k in ("bleu", "dist", "grad_norms") if options.get(k)]
    what = f"evaluating on {split}" + (f" (first {limit} sentences)" if limit else "")
    progress(f"{what}: IS-NLL/KL/PPL with N={n_samples}, MI with {mi_samples} samples, AU"
             + (f", {', '.join(extras)}" if extras else "") + " (minutes on a CPU for a full split)")
    with Heartbeat(what, progress) as beat:
        result = evaluate_model(model, config, data, checkpoint, n_samples=n_samples, mi_samples=mi_samples,
                                seed=seed, progress=ProgressPrinter(f"{split} likelihood (N={n_samples})",
                                                                    every_s=30.0), **options)
    progress(f"evaluation done in {format_duration(beat.elapsed)}")
    return result, options


def log_evaluation(client, experiment_id: str, source: pd.Series, study: str, result: dict[str, Any],
                   params: dict[str, Any], evaluation: str = "") -> str:
    """An evaluation run nested under the source trial run: ``<split>_*`` metrics + evaluation.json."""
    from mlflow.entities import Metric, Param

    fingerprint = result.get("fingerprint", {})
    split = fingerprint.get("split", params.get("split", "test"))
    tags = {PARENT_RUN_ID: source["run_id"], Tag.ROLE: Role.EVALUATION, Tag.STUDY: study,
            Tag.SOURCE_RUN_ID: source["run_id"], Tag.PRESET: str(source["preset"]),
            Tag.DATASET: str(source["dataset"]), Tag.SEED: str(source["seed"]), Tag.SPLIT: split,
            Tag.DATA_MD5: str(fingerprint.get("md5", "")),
            Tag.EVALUATION: evaluation,
            "mlflow.note.content": f"Evaluation of {source['run_name']} ({source['run_id']}): {evaluation}."}
    partial = "-partial" if "PARTIAL" in evaluation else ""
    run = client.create_run(experiment_id, run_name=f"eval-{source['run_name']}-{split}{partial}", tags=tags)
    now = int(time.time() * 1000)
    metrics = [Metric(f"{split}_{k}", float(v), now, 0) for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, dumps(result), "evaluation.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def register(client, name: str, source: pd.Series, alias: str, evaluation_run_id: str | None,
             result: dict[str, Any], evaluation: str, checkpoint: Path, tracking_uri: str,
             experiment_id: str) -> tuple[int, int | None]:
    """Register the source run's checkpoint as an MLflow Model (reusing a version already made
    from that run) and point ``alias`` at it.  -> (version, previous version under the alias or None)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Coupled-VAE checkpoints (cvae_core checkpoint "
                                                         "directories) chosen by `python -m analysis best`")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
            raise
    previous = None
    try:
        previous = int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        pass
    existing = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{source['run_id']}'")
                if v.source.startswith("models:/")]  # a pyfunc model, not a bare checkpoint folder
    if existing:
        version = int(max(existing, key=lambda v: int(v.version)).version)
    else:
        from .champion import log_champion

        model_uri, model_id = log_champion(source["run_id"], experiment_id, checkpoint, tracking_uri)
        version = int(client.create_model_version(
            name, source=model_uri, run_id=source["run_id"], model_id=model_id,
            description=f"{run_label(source)} on {source['dataset']}, study {source['study']}").version)
    split = result.get("fingerprint", {}).get("split", "test")
    tags = {f"{split}_{k}": f"{result[k]:.4f}" for k in ("nll", "kl", "ppl", "mi_loo", "au")
            if isinstance(result.get(k), (int, float))}
    tags.update({Tag.PRESET: str(source["preset"]), Tag.DATASET: str(source["dataset"]),
                 Tag.STUDY: str(source["study"])})
    if evaluation_run_id:
        tags[Tag.EVALUATION_RUN_ID] = evaluation_run_id
    if evaluation:
        tags[Tag.EVALUATION] = evaluation
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, alias, str(version))
    return version, previous


# The paper's evaluation settings (the `best` defaults); a run with less is a partial evaluation.
FULL_EVALUATION = {"n_samples": 100, "mi_samples": 100, "bleu_samples": 10, "dist_samples": 3200}


def partial_settings(args) -> list[str]:
    """The flags that make this a partial (quick-look) evaluation; empty for a full one."""
    flags = [f"--limit {args.limit}"] if args.limit else []
    flags += [f"--{name.replace('_', '-')} {getattr(args, name)} < {full}" for name, full in FULL_EVALUATION.items()
              if getattr(args, name) < full]
    if args.max_steps:
        flags.append(f"--max-steps {args.max_steps}")
    return flags


def describe_evaluation(result: dict[str, Any], mi_samples: int, partial: list[str]) -> str:
    """What every number of one evaluation rests on: split, sample counts, sentence count."""
    fp = result.get("fingerprint", {})
    text = (f"{fp.get('split', '?')} split, {result.get('n_sentences', fp.get('n_sentences', '?'))} sentences, "
            f"IS-NLL/KL/PPL with N={fp.get('n_samples', '?')}, MI with {mi_samples} samples")
    return text + (f"; PARTIAL ({', '.join(partial)})" if partial else "; full (the paper's settings)")


def format_result(result: dict[str, Any]) -> str:
    lines = []
    for key, value in result.items():
        if key == "fingerprint":
            continue
        text = "–" if value is None else (f"{value}" if isinstance(value, int) else f"{value:.3f}")
        lines.append(f"  {key:<18} {text}")
    fp = result.get("fingerprint", {})
    lines.append(f"  fingerprint        {fp.get('dataset')}/{fp.get('split')} md5 {fp.get('md5')} "
                 f"({fp.get('n_sentences')} sentences), {fp.get('nll_estimator')} N={fp.get('n_samples')}, "
                 f"seed {fp.get('seed')}")
    return "\n".join(lines)


def run_best(args, progress: Progress) -> dict[str, Any] | None:
    say = progress if args.json else print
    study: Study = fetch_study(args.experiment, args.study, args.tracking_uri, progress=progress)
    runs = study.runs
    constraints = tuple(read_constraints_tag(study.parent.data.tags))
    among = f", runs that satisfy {', '.join(str(c) for c in constraints)}" if constraints else ""
    if args.pareto:
        front = pareto_front(runs, constraints=constraints)
        print(f"Pareto front of study {study.name!r} (validation, each run's best evaluation{among}): "
              "val_nll lower, val_mi_loo higher")
        for _, row in front.iterrows():
            print(f"  {row['run_id']}  {row['dataset']:<8} {run_label(row):<40} val_nll {row['best.val_nll']:.2f}  "
                  f"val_mi_loo {row['best.val_mi_loo']:.3f}  val_kl {row.get('best.val_kl', float('nan')):.3f}")
        return None
    client, uri = connect(study.tracking_uri)
    if args.run_id:
        chosen = runs[runs["run_id"] == args.run_id]
        if not len(chosen):
            raise AnalysisError(f"run {args.run_id} is not a trial of study {study.name!r}")
        source, metric = chosen.iloc[0], resolve_metric(runs, args.metric)
    else:
        ranked = rank_runs(runs, args.metric, args.mode, None if args.all_runs else ("FINISHED",), constraints)
        metric = resolve_metric(runs, args.metric)
        source = None
        for _, row in ranked.iterrows():
            if has_checkpoint(client, row["run_id"]):
                source = row
                break
            progress(f"run {row['run_id']} ({run_label(row)}) has no checkpoint/ artifact; trying the next")
        if source is None:
            raise AnalysisError(f"none of the {len(ranked)} ranked runs has a checkpoint/ artifact")
    fails = broken_by(source, constraints)
    if fails and not args.run_id:
        say(f"none feasible: no run with a checkpoint satisfies {', '.join(str(c) for c in constraints)}; "
            "evaluating the best infeasible run")
    say(f"best run by {metric} ({args.mode or default_mode(metric)}{among if not args.run_id else ''}): "
        f"{source['run_id']} {run_label(source)} on {source['dataset']}: {metric} {source[f'best.{metric}']:.3f} "
        f"at step {source['best_step']}" + (f" (INFEASIBLE: fails {', '.join(fails)})" if fails else ""))
    progress(f"downloading checkpoint/ of run {source['run_id']} from {uri}")
    started = time.monotonic()
    checkpoint = download_checkpoint(uri, source["run_id"], args.out or Path("best-checkpoints") / source["run_id"])
    files = [f for f in checkpoint.iterdir() if f.is_file()]
    progress(f"downloaded {len(files)} files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) in "
             f"{time.monotonic() - started:.1f} s to {checkpoint}")
    wanted = {"bleu": args.bleu, "dist": args.dist, "grad_norms": args.grad_norms,
              "bleu_samples": args.bleu_samples, "dist_samples": args.dist_samples, "max_steps": args.max_steps}
    result, options = evaluate(checkpoint, split=args.split, n_samples=args.n_samples, mi_samples=args.mi_samples,
                               seed=args.seed, device=args.device, data_dir=args.data_dir, limit=args.limit,
                               wanted=wanted, progress=progress)
    if args.json:
        print(json.dumps(json_safe(result), indent=2))
    else:
        print(f"{args.split} evaluation of {checkpoint}:")
        print(format_result(result))
    partial = partial_settings(args)
    evaluation = describe_evaluation(result, args.mi_samples, partial)
    say(f"evaluation: {evaluation}")
    eval_run = None
    if not args.no_log:
        params = {"split": args.split, "n_samples": args.n_samples, "mi_samples": args.mi_samples,
                  "seed": args.seed, "limit": args.limit, "n_sentences": result.get("n_sentences"),
                  "partial": bool(partial), "source_run_id": source["run_id"],
                  "selection_metric": metric, "checkpoint_uri": f"{source['artifact_uri']}/checkpoint",
                  **{k: v for k, v in options.items()}}
        eval_run = log_evaluation(client, study.experiment.experiment_id, source, study.name, result, params,
                                  evaluation)
        link = (f": {uri.rstrip('/')}/#/experiments/{study.experiment.experiment_id}/runs/{eval_run}"
                if uri.startswith(("http://", "https://")) else "")
        say(f"logged evaluation run {eval_run} (nested under trial run {source['run_id']}){link}")
    # A quick look (any partial-evaluation flag) or an infeasible run never moves the champion
    # unless asked to.
    if args.register is None and (partial or fails):
        why = f"a partial evaluation ({', '.join(partial)})" if partial else f"an infeasible run ({', '.join(fails)})"
        say(f"not registered: {why} leaves @{args.alias} where it is; pass --register to register it anyway")
    elif args.register is not False:
        version, previous = register(client, args.model_name, source, args.alias, eval_run, result, evaluation,
                                     checkpoint, uri, study.experiment.experiment_id)
        moved = "" if previous in (None, version) else f" (was version {previous})"
        say(f"registered {args.model_name} version {version}; alias @{args.alias} -> version {version}{moved}; "
            f"load with models:/{args.model_name}@{args.alias}")
    return result

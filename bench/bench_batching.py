"""Bucketed vs random training batches: VAE and Coupled-VAE, several seeds, mean ± sd.

    python bench/bench_batching.py                       # quick scale, 3 seeds: 12 runs of ~30 min at 1 thread
    python bench/bench_batching.py --steps 300 --seeds 2 --valid-limit 500    # a reduced budget
    python bench/bench_batching.py --default-study       # the default study's model and budget (minutes)
    python bench/bench_batching.py --results runs/batching   # keep each run's figures; a rerun continues
    python bench/bench_batching.py --results runs/batching --first-seed 2   # a second process, on another core
    python bench/bench_batching.py --smoke    # the smallest settings: checks that it runs (figures meaningless)

For each preset and data.batching (bucket | random) and seed: train on PTB, then report the best
checkpoint's validation NLL, KL and MI (mi_loo) and the run's wall time.  Bucketing changes
each batch's composition (long-sentence batches meet the global clipping norm with larger
summed losses), so it is a modelling choice; this shows what it does to the metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bench_families
from cvae_core.config import build_config
from cvae_core.data import load_corpus
from cvae_core.train import train

METRICS = ("val_nll", "val_kl", "val_mi_loo")
BUDGET_OPTIONS = ("scale", "steps", "valid_limit", "default_study")  # what a saved run must share to be reused
SMOKE = {"presets": ["vae"], "seeds": 1, "steps": 2, "valid_limit": 8, "default_study": True}  # --smoke


def one_run(preset: str, batching: str, seed: int, args) -> dict[str, float]:
    overrides = {**(bench_families.budget(preset) if args.default_study else {}),
                 "data.batching": batching, "train.seed": seed, "train.dynamics_every": 0}
    if args.steps:
        overrides.update({"train.steps": args.steps, "train.eval_every": args.steps})
    if args.valid_limit:
        overrides["data.valid_limit"] = args.valid_limit
    config = build_config(preset, "ptb", args.scale, overrides)
    corpus = load_corpus(config.data, ("train", "valid"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, folder, corpus=corpus, log=lambda _: None)
    figures = {key: result.best_metrics[key] for key in METRICS}
    figures["wall_s"] = time.perf_counter() - start
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["vae", "coupled-vae"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", default="quick")
    parser.add_argument("--steps", type=int, default=0, help="override train.steps (0 = the scale's)")
    parser.add_argument("--valid-limit", type=int, default=0, help="validate on the first N sentences (0 = all)")
    parser.add_argument("--default-study", action="store_true",
                        help="the default study's small model and budget (studies/specs/lambda_sweep.yaml)")
    parser.add_argument("--results", help="folder keeping each run's figures; runs found there are not trained again")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="start at this seed: a second invocation sharing --results takes the later seeds while "
                             "the first works through the earlier ones (it skips what the other saved)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    if not 0 <= args.first_seed < args.seeds:
        parser.error(f"--first-seed must be in [0, --seeds {args.seeds}), got {args.first_seed}")
    budget = "the default study's model and budget" if args.default_study else f"scale {args.scale}"
    config = build_config(args.presets[0], "ptb", args.scale, bench_families.budget(args.presets[0])
                          if args.default_study else {})
    print(f"PTB, {budget}, steps {args.steps or config.train.steps}, seeds {args.first_seed}..{args.seeds - 1}, "
          f"validation {args.valid_limit or config.data.valid_limit or 'all'} sentences, "
          f"{torch.get_num_threads()} torch threads")
    # seed by seed, so that an interrupted benchmark has every preset and batching at the same seeds
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for seed in range(args.first_seed, args.seeds):
        for preset in args.presets:
            for batching in ("bucket", "random"):
                figures = saved_or_run(preset, batching, seed, args)
                runs.setdefault((preset, batching), []).append(figures)
                print(f"  {preset} {batching} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()),
                      flush=True)
    print(f"{'preset':<14} {'batching':<8} " + " ".join(f"{k:>16}" for k in (*METRICS, "wall_s")))
    for (preset, batching), seeds in runs.items():
        cells = []
        for key in (*METRICS, "wall_s"):
            values = [run[key] for run in seeds]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):9.2f} ± {sd:4.2f}")
        print(f"{preset:<14} {batching:<8} " + " ".join(f"{c:>16}" for c in cells), flush=True)


def saved_or_run(preset: str, batching: str, seed: int, args) -> dict[str, float]:
    """One run's figures: read from ``--results`` when an earlier invocation saved them, else
    trained now (and saved there, written atomically)."""
    if not args.results:
        return one_run(preset, batching, seed, args)
    path = Path(args.results) / f"{preset}-{batching}-seed{seed}.json"
    budget = {key: getattr(args, key) for key in BUDGET_OPTIONS}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["budget"] != budget:
            raise SystemExit(f"error: {path} was measured with {saved['budget']}, not {budget}; "
                             "give another --results folder")
        return saved["figures"]
    figures = one_run(preset, batching, seed, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"budget": budget, "figures": figures}, indent=2))
    os.replace(partial, path)
    return figures


if __name__ == "__main__":
    main()

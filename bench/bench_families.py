"""Every Table 1 family, base vs coupled, after one short CPU budget on PTB.

    python bench/bench_families.py                       # all 12 families (24 runs), 2 at a time
    python bench/bench_families.py --families vae vmf-vae --jobs 1
    python bench/bench_families.py --smoke   # the smallest settings: checks that it runs (figures meaningless)

The budget is the default study's (studies/specs/lambda_sweep.yaml, `base.overrides`: 400 steps
over 8,000 PTB sentences, 64-d embeddings and GRUs, 16-d latent, the KL weight annealed from step
20 over 300 steps, validation on 400 sentences), so every family gets the same schedule and the
numbers compare across rows, not with the paper's. Two exceptions keep the shrunken budget
consistent: the CNN decoder gets 64 filters (the GRUs have 64 units), and PreFB's DAE stage is
as long as its VAE run. Each run uses one torch thread; the table reports each run's best
validation evaluation (IS-NLL with 5 samples) and its wall time. ``--steps N`` shortens every run
to N steps, evaluated at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from cvae_core.config import PRESETS

SPEC = Path(__file__).resolve().parents[1] / "studies" / "specs" / "lambda_sweep.yaml"
FAMILIES = [name for name in PRESETS if f"coupled-{name}" in PRESETS and not PRESETS[name].conditional]
METRICS = ("val_nll", "val_kl", "val_ppl", "val_mi_loo", "val_au")
SMOKE = {"families": ["vae"], "steps": 2}  # --smoke


def budget(preset: str, steps: int = 0) -> dict:
    """The default study's base overrides for ``preset`` (``steps``: a shorter run, evaluated at its end)."""
    overrides = dict(yaml.safe_load(SPEC.read_text())["base"]["overrides"])
    if steps:
        overrides.update({"train.steps": steps, "train.eval_every": steps})
    family = PRESETS[preset].settings
    if family.get("model.decoder") == "cnn":
        overrides["model.cnn_filters"] = overrides["model.hidden_dim"]
    if "train.pretrain_steps" in family:
        overrides["train.pretrain_steps"] = overrides["train.steps"]
    return overrides


def run_one(preset: str, out: str, steps: int = 0) -> dict:
    import torch

    from cvae_core.config import build_config
    from cvae_core.train import train

    torch.set_num_threads(1)
    config = build_config(preset, "ptb", "quick", budget(preset, steps))
    started = time.perf_counter()
    run = Path(out) / preset
    shutil.rmtree(run, ignore_errors=True)  # this benchmark's own folder from an earlier run: train() would refuse it
    result = train(config, run, log=lambda text: None)
    best = result.best_metrics
    return {"preset": preset, "seconds": time.perf_counter() - started, "step": best.get("step"),
            **{k: best.get(k) for k in METRICS}}


def cell(row: dict) -> str:
    return f"{row['val_nll']:.2f} ({row['val_kl']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES, metavar="FAMILY",
                        help=f"base presets whose coupled- twin is run too (default: all: {' '.join(FAMILIES)})")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--out", default="bench_out/families", help="run folders and results.jsonl (replaced on each run)")
    parser.add_argument("--steps", type=int, default=0, help="train every run this many steps (0 = the budget's)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before the workers import torch
    presets = [p for family in args.families for p in (family, f"coupled-{family}")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool, open(out / "results.jsonl", "w") as log:
        futures = {preset: pool.submit(run_one, preset, str(out), args.steps) for preset in presets}
        for preset, future in futures.items():
            rows[preset] = future.result()
            log.write(json.dumps(rows[preset]) + "\n")
            log.flush()
            r = rows[preset]
            print(f"[{time.perf_counter() - started:6.0f}s] {preset:<28} val NLL {r['val_nll']:.2f} "
                  f"KL {r['val_kl']:.2f} MI {r['val_mi_loo']:.2f} AU {r['val_au']:.0f} ({r['seconds']:.0f}s)", flush=True)
    print(f"\nPTB, the default study's budget ({SPEC.name}" + (f", {args.steps} steps" if args.steps else "")
          + "); validation, best evaluation of each run.\n")
    print("| family | base NLL (KL) | coupled NLL (KL) | Δ NLL | base MI / AU | coupled MI / AU | base / coupled s |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        base, coupled = rows[family], rows[f"coupled-{family}"]
        print(f"| {PRESETS[family].group} | {cell(base)} | {cell(coupled)} | {coupled['val_nll'] - base['val_nll']:+.2f} "
              f"| {base['val_mi_loo']:.2f} / {base['val_au']:.0f} | {coupled['val_mi_loo']:.2f} / {coupled['val_au']:.0f} "
              f"| {base['seconds']:.0f} / {coupled['seconds']:.0f} |")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s, {args.jobs} runs at a time")


if __name__ == "__main__":
    main()

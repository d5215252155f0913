"""The measurements behind the default study's design (docs/default-study-design.md): train the
VAE and Coupled-VAE cells at the default study's budget over seeds, 2 runs at a time, and print
each cell's mean ± sd and the paired coupled − VAE differences with 95% t-intervals.

    python bench/effect_design.py                    # design A: the default budget (5 cells x 3 seeds)
    python bench/effect_design.py --design later-anneal --design dropout
    python bench/effect_design.py --seeds 0 1 2 3 4 --out effect.jsonl
    python bench/effect_design.py --smoke     # the smallest settings: checks that it runs (figures meaningless)

Each design is the default spec's base overrides plus its own; a run is ``cvae_core.train`` in
its own process (one torch thread), so the numbers equal those of the study's trials.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvae_core.stats import paired_difference, summarize  # noqa: E402

CELLS = {
    "vae": ("vae", {}),
    "rq-0.1": ("coupled-vae", {}),  # the preset: RQ, lambda_r 1, lambda_m 0.1 (Table 1)
    "rq-1": ("coupled-vae", {"coupling.lambda_m": 1.0}),
    "eucl-1": ("coupled-vae", {"coupling.distance": "eucl", "coupling.lambda_m": 1.0}),
    "eucl-7": ("coupled-vae", {"coupling.distance": "eucl", "coupling.lambda_m": 7.0}),
}
DESIGNS = {  # name -> (overrides on top of the default spec's, cells)
    "default": ({}, list(CELLS)),
    "later-anneal": ({"regularizer.anneal_start": 100, "regularizer.anneal_steps": 250}, ["vae", "rq-0.1", "rq-1"]),
    "dropout": ({"model.dropout": 0.5}, ["vae", "rq-0.1", "rq-1"]),
}
METRICS = (("val_nll", 1), ("val_kl", 2), ("val_mi_loo", 2), ("val_au", 1))
SMOKE = {"seeds": [0], "steps": 2}  # --smoke


def run(job: tuple[str, str, int, dict]) -> dict:
    import torch

    from cvae_core.config import build_config
    from cvae_core.train import train

    torch.set_num_threads(1)
    design, cell, seed, overrides = job
    preset, settings = CELLS[cell]
    config = build_config(preset, "ptb", "quick", {**overrides, **settings, "train.seed": seed})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train(config, out, log=lambda text: None)
    return {"design": design, "cell": cell, "seed": seed, "seconds": round(time.perf_counter() - start, 1),
            **{m: result.best_metrics[m] for m, _ in METRICS}}


def report(records: list[dict]) -> None:
    for design in dict.fromkeys(r["design"] for r in records):
        cells: dict[str, dict[int, dict]] = {}
        for r in records:
            if r["design"] == design:
                cells.setdefault(r["cell"], {})[r["seed"]] = r
        print(f"\n{design}: mean ± sd over seeds (best evaluation)")
        for cell, seeds in cells.items():
            stats = [summarize([r[m] for r in seeds.values()]) for m, _ in METRICS]
            print(f"  {cell:<7} n={len(seeds)}  " + "  ".join(
                f"{m[4:]} {s.mean:.{d}f} ± {s.std:.{d}f}" for (m, d), s in zip(METRICS, stats))
                  + f"  ({summarize([r['seconds'] for r in seeds.values()]).mean:.0f} s/run)")
        base = cells.get("vae", {})
        for cell, seeds in cells.items():
            common = sorted(set(seeds) & set(base))
            if cell == "vae" or not common:
                continue
            diffs = [paired_difference([seeds[s][m] for s in common], [base[s][m] for s in common]) for m, _ in METRICS]
            print(f"  {cell} − vae ({len(common)} seeds, paired, 95% t): " + ", ".join(
                f"Δ{m[4:]} {p.mean:+.{d}f} [{p.low:+.{d}f}, {p.high:+.{d}f}]" for (m, d), p in zip(METRICS, diffs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--design", action="append", choices=list(DESIGNS), help="default: default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also append every run's metrics here (JSON lines)")
    parser.add_argument("--steps", type=int, default=0, help="train every run this many steps, evaluated at the end "
                                                             "(0 = the default study's)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    from studies.spec import load_spec

    base = load_spec("lambda_sweep").overrides
    if args.steps:
        base = {**base, "train.steps": args.steps, "train.eval_every": args.steps}
    jobs = [(design, cell, seed, {**base, **DESIGNS[design][0]})
            for design in args.design or ["default"] for cell in DESIGNS[design][1] for seed in args.seeds]
    print(f"{len(jobs)} runs, {args.processes} at a time", flush=True)
    records = []
    with mp.get_context("spawn").Pool(args.processes) as pool:
        for record in pool.imap_unordered(run, jobs):
            records.append(record)
            print(f"  [{len(records)}/{len(jobs)}] {record['design']} {record['cell']} seed {record['seed']}: "
                  + " ".join(f"{m[4:]} {record[m]:.2f}" for m, _ in METRICS) + f" ({record['seconds']} s)", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    report(sorted(records, key=lambda r: (r["design"], list(CELLS).index(r["cell"]), r["seed"])))


if __name__ == "__main__":
    main()

"""Where the time goes: torch.profiler tables (self CPU time) of a training step and of an IS-NLL batch.

    python bench/profile_hotspots.py [--threads 1] [--rows 12] [--n-samples 100] [--smoke]

Paper-size PTB models (bi-GRU 128/direction, decoder GRU 256, embedding 200, 10,002 words):
three trainer steps of the VAE and of the Coupled-VAE on bucketed batches of 32, then one
IS-NLL evaluation of 32 test sentences with N = 100.  The tables say which operators bound a
figure of ``bench/run_all.py``; percentages are robust to a shared machine, absolute times not.
``--smoke``: the smallest settings (N = 2, 3 rows), to check that the script runs.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.profiler import profile

import bench_train
from cvae_core.config import build_config
from cvae_core.data import load_corpus
from cvae_core.metrics.likelihood import evaluate
from cvae_core.models import build_model


SMOKE = {"n_samples": 2, "rows": 3}  # --smoke


def table(prof, rows: int) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--n-samples", type=int, default=100, help="IS-NLL samples per sentence (default 100)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches, setups = bench_train.setup(["vae", "coupled-vae"], steps=4)
    for name, (model, optimizer, objective) in setups.items():
        bench_train.train_steps(model, optimizer, objective, batches[:1])  # warm-up
        with profile() as prof:
            bench_train.train_steps(model, optimizer, objective, batches[1:])
        print(f"\n== training step, {name} (3 steps, {args.threads} threads)\n{table(prof, args.rows)}")
    config = build_config("vae", "ptb", "quick")
    corpus = load_corpus(config.data, ("train", "test"))
    torch.manual_seed(0)
    model = build_model(config, len(corpus.vocab)).eval()
    test = corpus["test"]
    subset = dataclasses.replace(test, examples=test.examples[:: len(test.examples) // 32][:32])
    with profile() as prof:
        evaluate(model, subset, n_samples=args.n_samples, with_mi=False)
    print(f"\n== IS-NLL, 32 PTB test sentences, N = {args.n_samples} ({args.threads} threads)\n"
          f"{table(prof, args.rows)}")


if __name__ == "__main__":
    main()

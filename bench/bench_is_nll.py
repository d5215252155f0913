"""IS-NLL with all samples of a chunk decoded in one batched pass vs one sample at a time.

    python bench/bench_is_nll.py --sentences 128 --n-samples 20
    python bench/bench_is_nll.py --smoke     # the smallest settings: checks that it runs (figures meaningless)

Same model, same sentences, same seeds: the estimates agree; the ratio shows what batching the
samples buys.  The chunk size is what `importance_sampled_nll` picks under its memory budget.
"""
from __future__ import annotations

import argparse
import time

import torch

from cvae_core.config import build_config
from cvae_core.data import load_corpus
from cvae_core.data.batching import eval_batches
from cvae_core.metrics import likelihood
from cvae_core.models import build_model


SMOKE = {"sentences": 8, "n_samples": 2}  # --smoke


def run(model, batches, n_samples: int, budget: int) -> tuple[float, float]:
    likelihood.DECODE_BUDGET_BYTES = budget
    torch.manual_seed(0)
    start = time.perf_counter()
    total = sum(likelihood.importance_sampled_nll(model, b, n_samples)["nll"].sum().item() for b in batches)
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--n-samples", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    config = build_config("vae", "ptb", "quick")
    corpus = load_corpus(config.data, ("train", "test"))
    model = build_model(config, len(corpus.vocab)).eval()
    batches = eval_batches(corpus["test"].examples[: args.sentences], 32)
    default_budget = likelihood.DECODE_BUDGET_BYTES
    run(model, batches[:1], 2, default_budget)  # warm-up
    one_at_a_time, nll_loop = run(model, batches, args.n_samples, 1)
    batched, nll_batched = run(model, batches, args.n_samples, default_budget)
    print(f"{args.sentences} sentences x {args.n_samples} samples")
    print(f"one sample per pass : {one_at_a_time:7.2f} s   mean NLL {nll_loop / args.sentences:.3f}")
    print(f"batched samples     : {batched:7.2f} s   mean NLL {nll_batched / args.sentences:.3f}")
    print(f"speed-up            : {one_at_a_time / batched:7.2f}x")


if __name__ == "__main__":
    main()

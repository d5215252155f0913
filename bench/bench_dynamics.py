"""Cost of ``train.dynamics_every`` (Figure 2's gradient norms during training) against the limit
of 10% of training time, at the default study's budget (studies/specs/lambda_sweep.yaml).

    python bench/bench_dynamics.py            # coupled-vae, the K the default study uses
    python bench/bench_dynamics.py --every 10 --preset vae
    python bench/bench_dynamics.py --smoke    # the smallest settings: checks that it runs (figures meaningless)

Times, in one process and one torch thread, ``--steps`` training steps (forward, backward, clip,
Adam) and ``--measurements`` held-out measurements; the overhead at K is
(time per measurement / K) / (time per training step).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from cvae_core.config import build_config
from cvae_core.data import BucketBatcher, load_corpus, make_batch
from cvae_core.metrics.dynamics import GRAD_BATCH, held_out_gradient_norms
from cvae_core.models import build_model
from cvae_core.objectives import Objective

SPEC = Path(__file__).resolve().parents[1] / "studies" / "specs" / "lambda_sweep.yaml"
LIMIT = 0.10
SMOKE = {"steps": 2, "measurements": 1}  # --smoke


def main() -> None:
    spec = yaml.safe_load(SPEC.read_text())
    overrides = dict(spec["base"]["overrides"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=spec["base"]["preset"])
    parser.add_argument("--every", type=int, default=int(overrides.get("train.dynamics_every", 20)))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--measurements", type=int, default=10)
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(1)
    config = build_config(args.preset, spec["base"]["dataset"], spec["base"]["scale"], overrides)
    corpus = load_corpus(config.data, ("train", "valid"))
    torch.manual_seed(0)
    model = build_model(config, len(corpus.vocab))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    objective = Objective(config)
    batcher = BucketBatcher(corpus["train"].examples, config.train.batch_size, 0)
    order = batcher.order(0)
    held_out = make_batch(corpus["valid"].examples[:GRAD_BATCH])
    model.train()

    def step(i: int) -> None:
        loss, _ = objective(model, model(batcher.batch(order[i % len(order)])), 100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_norm)
        optimizer.step()

    step(0)
    held_out_gradient_norms(model, held_out, 0)  # warm-up
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i + 1)
    per_step = (time.perf_counter() - t0) / args.steps
    t0 = time.perf_counter()
    for _ in range(args.measurements):
        held_out_gradient_norms(model, held_out, 0)
    per_measurement = (time.perf_counter() - t0) / args.measurements
    overhead = per_measurement / args.every / per_step
    print(f"{args.preset}: training step {per_step * 1000:.1f} ms, one measurement {per_measurement * 1000:.1f} ms "
          f"({per_measurement / per_step:.2f} steps)")
    print(f"overhead at train.dynamics_every={args.every}: {overhead:.1%} of training time "
          f"(limit {LIMIT:.0%}): {'OK' if overhead <= LIMIT else 'OVER'}")


if __name__ == "__main__":
    main()

"""Training throughput of a preset against the plain VAE, measured in one process.

    python bench/bench_train.py --presets vae coupled-vae --steps 40
    python bench/bench_train.py --smoke     # the smallest settings: checks that it runs (figures meaningless)

Runs the presets in alternating rounds on the same PTB batches (paper-size model), prints
ms/step and tokens/s per preset, the ratio to the first preset, and the projected wall time of
the `quick` scale (its train.steps; evaluation not included).  The step is the trainer's:
same optimizer, clipping and loss (``bench/run_all.py`` reuses :func:`measure`).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cvae_core.config import build_config
from cvae_core.data import BucketBatcher, load_corpus
from cvae_core.data.batching import POOL_BATCHES
from cvae_core.models import build_model
from cvae_core.objectives import Objective
from cvae_core.train import make_optimizer


SMOKE = {"steps": 1, "rounds": 1}  # --smoke


def setup(presets: list[str], steps: int, batching: str = "bucket", device: torch.device = torch.device("cpu")):
    """-> (``steps`` PTB training batches on ``device``, {preset: (model, optimizer, objective)}):
    paper-size models, seeded alike, the trainer's optimizer and loss."""
    configs = {name: build_config(name, "ptb", "quick", {"data.batching": batching}) for name in presets}
    corpus = load_corpus(configs[presets[0]].data, ("train",))
    batcher = BucketBatcher(corpus["train"].examples, 32, seed=0, pool_batches=POOL_BATCHES[batching])
    order = batcher.order(0)
    batches = [batcher.batch(order[i]).to(device) for i in range(steps)]
    setups = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = build_model(config, len(corpus.vocab)).to(device)
        setups[name] = (model, make_optimizer(model, config), Objective(config))
    return batches, setups


def train_steps(model, optimizer, objective, batches, bf16: bool = False) -> None:
    """The trainer's step (loss, backward, clipping at 30, Adam) over ``batches``; ``bf16``: the
    forward and loss under bf16 autocast, as train.amp runs them."""
    for step, batch in enumerate(batches, 1):
        with torch.autocast(batches[0].inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = objective(model, model(batch), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 30.0)
        optimizer.step()


def measure(presets: list[str], steps: int, rounds: int, batching: str = "bucket",
            device: torch.device = torch.device("cpu"), bf16: bool = False) -> dict[str, dict[str, float]]:
    """-> {preset: {ms_per_step, tokens_per_s, tokens_per_step}} (medians over ``rounds``,
    after one warm-up round), all presets on the same PTB training batches (``bf16``: train.amp)."""
    batches, setups = setup(presets, steps, batching, device)
    tokens = sum(b.n_tokens for b in batches)
    times: dict[str, list[float]] = {name: [] for name in presets}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, (model, optimizer, objective) in setups.items():
            start = time.perf_counter()
            train_steps(model, optimizer, objective, batches, bf16)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index:
                times[name].append(time.perf_counter() - start)
    result = {}
    for name in presets:
        median = statistics.median(times[name])
        result[name] = {"ms_per_step": 1000 * median / steps, "tokens_per_s": tokens / median,
                        "tokens_per_step": tokens / steps}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["vae", "coupled-vae"])
    parser.add_argument("--steps", type=int, default=40, help="steps per round and preset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures = measure(args.presets, args.steps, args.rounds)
    base = figures[args.presets[0]]["ms_per_step"]
    print(f"{args.steps} steps x {args.rounds} rounds, {args.threads} threads, "
          f"{figures[args.presets[0]]['tokens_per_step']:.0f} tokens/step")
    quick_steps = build_config(args.presets[0], "ptb", "quick").train.steps
    print(f"{'preset':<20} {'ms/step':>8} {'tokens/s':>9} {'ratio':>6} {f'quick {quick_steps} steps':>16}")
    for name in args.presets:
        per_step = figures[name]["ms_per_step"] / 1000
        print(f"{name:<20} {per_step * 1000:8.0f} {figures[name]['tokens_per_s']:9.0f} "
              f"{per_step * 1000 / base:6.2f} {per_step * quick_steps / 60:13.1f} min")


if __name__ == "__main__":
    main()

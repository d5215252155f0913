"""Training throughput of K members packed into one model against K separate runs.

    python bench/bench_packing.py [--members 1 2 4 8] [--steps 30] [--threads 1] [--device cpu]

The model is the default study's (``studies/specs/lambda_sweep.yaml``: its base preset and
overrides, a Coupled-VAE); the members differ in lambda_r, lambda_m and the matching distance,
as a lambda study's do.  Each measurement runs in its own child process (so its peak memory is
its own) on the same PTB training batches, after a warm-up of a few steps.  A training step is
the trainer's: forward, the loss, backward, clipping (per member when packed), fused Adam.

Separate runs one after another do the same work per run, so their summed throughput is one
run's tokens/s whatever their number: the "separate" row is measured once.  speedup = packed
summed tokens/s / separate tokens/s.  Peak memory: the child's peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.  Target (issue "Packed trials"): on CPU, K = 8
gives >= 3x the summed throughput of separate runs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from cvae_core.config import Config, build_config
from cvae_core.data import BucketBatcher, load_corpus
from cvae_core.models import build_model
from cvae_core.objectives import Objective
from cvae_core.packed import PackedObjective, pack
from cvae_core.packed import train_step as packed_train_step
from cvae_core.train import make_optimizer
from studies.spec import load_spec

TARGET_K, TARGET_SPEEDUP = 8, 3.0
WARMUP_STEPS = 3
# Loss weights cycled over the members (they change no cost, only what each member learns).
MEMBER_WEIGHTS = [
    {"coupling.lambda_r": 1.0, "coupling.lambda_m": 0.5, "coupling.distance": "rq"},
    {"coupling.lambda_r": 0.5, "coupling.lambda_m": 0.0, "coupling.distance": "eucl"},
    {"coupling.lambda_r": 2.0, "coupling.lambda_m": 3.0, "coupling.distance": "eucl"},
    {"coupling.lambda_r": 1.0, "coupling.lambda_m": 2.4, "coupling.distance": "rq"},
]


def member_configs(members: int) -> list[Config]:
    spec = load_spec("lambda_sweep")
    return [build_config(spec.preset, spec.dataset, spec.scale,
                         {**spec.overrides, **MEMBER_WEIGHTS[k % len(MEMBER_WEIGHTS)], "train.seed": k})
            for k in range(members)]


def measure(mode: str, members: int, steps: int, device: torch.device) -> dict[str, float]:
    """Train ``members`` members (packed, or one standalone model when mode is 'separate') for
    WARMUP_STEPS + ``steps`` steps -> {tokens_per_s (summed over members), ms_per_step, peak_mb}."""
    configs = member_configs(members)
    corpus = load_corpus(configs[0].data, ("train",))
    batcher = BucketBatcher(corpus["train"].examples, configs[0].train.batch_size, seed=0)
    order = batcher.order(0)
    batches = [batcher.batch(order[i % len(order)]).to(device) for i in range(WARMUP_STEPS + steps)]
    models = []
    for k, config in enumerate(configs):
        torch.manual_seed(k)
        models.append(build_model(config, len(corpus.vocab)).to(device))
    if mode == "packed":
        model, objective = pack(models), PackedObjective(configs)
    else:
        model, objective = models[0], Objective(configs[0])
    optimizer = make_optimizer(model, configs[0])

    def train_step(batch, step):
        if mode == "packed":  # the pack's trainer step: per-member clipping
            packed_train_step(model, objective, optimizer, batch, step, configs[0])
            return
        loss, _ = objective(model, model(batch), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), configs[0].train.clip_norm)
        optimizer.step()

    for step, batch in enumerate(batches[:WARMUP_STEPS], 1):
        train_step(batch, step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step, batch in enumerate(batches[WARMUP_STEPS:], WARMUP_STEPS + 1):
        train_step(batch, step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(b.n_tokens for b in batches[WARMUP_STEPS:]) * (members if mode == "packed" else 1)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / steps, "peak_mb": peak_mb}


def in_child(mode: str, members: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", mode, "--members", str(members), "--steps", str(args.steps),
               "--threads", str(args.threads), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"bench child {mode} K={members} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8], help="pack sizes K")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a study trial uses 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=["packed", "separate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.members[0], args.steps, torch.device(args.device))))
        return
    separate = in_child("separate", 1, args)
    print(f"default study's model (lambda_sweep), {args.steps} steps after {WARMUP_STEPS} warm-up, "
          f"{args.threads} thread(s), {args.device}")
    print(f"{'run':<12} {'K':>3} {'ms/step':>8} {'tokens/s (sum)':>15} {'speedup':>8} {'peak MB':>8}")
    print(f"{'separate':<12} {'any':>3} {separate['ms_per_step']:8.0f} {separate['tokens_per_s']:15.0f} "
          f"{1.0:8.2f} {separate['peak_mb']:8.0f}")
    speedups = {}
    for members in args.members:
        packed = in_child("packed", members, args)
        speedups[members] = packed["tokens_per_s"] / separate["tokens_per_s"]
        print(f"{'packed':<12} {members:>3} {packed['ms_per_step']:8.0f} {packed['tokens_per_s']:15.0f} "
              f"{speedups[members]:8.2f} {packed['peak_mb']:8.0f}", flush=True)
    if TARGET_K in speedups:
        verdict = "met" if speedups[TARGET_K] >= TARGET_SPEEDUP else "NOT met"
        print(f"target: K = {TARGET_K} packed >= {TARGET_SPEEDUP:.0f}x the summed tokens/s of separate runs "
              f"(CPU): {speedups[TARGET_K]:.2f}x, {verdict}")


if __name__ == "__main__":
    main()

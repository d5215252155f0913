"""Training throughput of K members packed into one model against K separate runs.

    python bench/bench_packing.py [--model default-study|paper|both] [--members 1 2 4 8 16]
                                  [--steps 30] [--threads 1] [--device cpu|cuda] [--json PATH] [--smoke]

Models: ``default-study`` is the default study's (``studies/specs/lambda_sweep.yaml``: its base
preset and overrides, a small Coupled-VAE); ``paper`` is the paper's PTB Coupled-VAE
(``build_config("coupled-vae", "ptb", "quick")``: its full shapes and 10K-word vocabulary).
Default: the model of the device's target (default-study on CPU, both on CUDA).  The members
differ in lambda_r, lambda_m and the matching distance, as a lambda study's do.  K defaults to
1 2 4 8 16, plus 32 on CUDA.  The device is detected (CUDA if present).  Packed training supports
neither ``train.dynamics_every`` nor ``train.amp``: where the model's config sets them (the default
study's sets ``train.dynamics_every: 10``) every run, packed and separate alike, trains without them,
and the benchmark says so.  ``--smoke``: the smallest settings (K = 2, 1 step; seconds, figures
meaningless), to check that the script runs.

Every measurement runs in its own child process on the same PTB training batches, after a
warm-up of a few steps; a training step is the trainer's (forward, the loss, backward, clipping,
per member when packed, fused Adam).  Three ways to train K members:
  packed        one process training the K members as one model (``cvae_core.packed.train_step``);
  sequential    K single-model runs one after another: each does the same work, so their summed
                tokens/s is one run's whatever K is (measured once per model);
  side by side  K single-model processes started at once (each with --threads threads; on CUDA all
                on the same GPU): they warm up, wait for each other, then train; summed tokens/s =
                all their tokens / (last end - first start).
Speedups are packed summed tokens/s over each of the other two.  Peak memory per process: peak
RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.  Targets (issue "Packed trials"): on
CPU, the default study's model at K = 8 gives >= 3x the summed throughput of separate runs; on
one GPU, the paper model at K = 16 gives >= 5x that of one trial per GPU (runs one after another).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench_train
from cvae_core.config import Config, build_config
from cvae_core.data import BucketBatcher, load_corpus
from cvae_core.models import build_model
from cvae_core.objectives import Objective
from cvae_core.packed import UNSUPPORTED_WHEN_PACKED, PackedObjective, pack
from cvae_core.packed import train_step as packed_train_step
from cvae_core.train import make_optimizer
from studies.spec import load_spec

MODELS = ("default-study", "paper")
# (model, device type, K, speedup, the separate runs it is measured against)
TARGETS = [("default-study", "cpu", 8, 3.0, "sequential"), ("default-study", "cpu", 8, 3.0, "side_by_side"),
           ("paper", "cuda", 16, 5.0, "sequential")]
WARMUP_STEPS = 3
# Loss weights cycled over the members (they change no cost, only what each member learns).
MEMBER_WEIGHTS = [
    {"coupling.lambda_r": 1.0, "coupling.lambda_m": 0.5, "coupling.distance": "rq"},
    {"coupling.lambda_r": 0.5, "coupling.lambda_m": 0.0, "coupling.distance": "eucl"},
    {"coupling.lambda_r": 2.0, "coupling.lambda_m": 3.0, "coupling.distance": "eucl"},
    {"coupling.lambda_r": 1.0, "coupling.lambda_m": 2.4, "coupling.distance": "rq"},
]


SMOKE = {"model": "default-study", "members": [2], "steps": 1}  # --smoke


def model_settings(model: str) -> tuple[str, str, str, dict]:
    """-> (preset, dataset, scale, overrides) of a benchmark model."""
    if model == "paper":
        return "coupled-vae", "ptb", "quick", {}
    spec = load_spec("lambda_sweep")
    return spec.preset, spec.dataset, spec.scale, spec.overrides


def turned_off(model: str) -> dict[str, object]:
    """The model's settings that packed training does not support -> their values in its config;
    every measurement turns them off (UNSUPPORTED_WHEN_PACKED), packed and separate runs alike."""
    flat = build_config(*model_settings(model)).flat()
    return {key: flat[key] for key, off in UNSUPPORTED_WHEN_PACKED.items() if flat[key] != off}


def member_configs(model: str, members: int) -> list[Config]:
    preset, dataset, scale, overrides = model_settings(model)
    return [build_config(preset, dataset, scale, {**overrides, **UNSUPPORTED_WHEN_PACKED,
                                                  **MEMBER_WEIGHTS[k % len(MEMBER_WEIGHTS)], "train.seed": k})
            for k in range(members)]


def measure(model_name: str, packed: bool, members: int, steps: int, device: torch.device,
            wait_for_start: bool = False) -> dict[str, float]:
    """Train ``members`` members packed (or one standalone model) for WARMUP_STEPS + ``steps``
    steps -> {tokens_per_s (summed over members), ms_per_step, peak_mb, tokens, start, end}
    (start/end: wall-clock seconds of the timed steps).  ``wait_for_start``: after the warm-up,
    print "ready" and wait for a line on stdin (so side-by-side processes start timing together)."""
    configs = member_configs(model_name, members)
    corpus = load_corpus(configs[0].data, ("train",))
    batcher = BucketBatcher(corpus["train"].examples, configs[0].train.batch_size, seed=0)
    order = batcher.order(0)
    batches = [batcher.batch(order[i % len(order)]).to(device) for i in range(WARMUP_STEPS + steps)]
    models = []
    for k, config in enumerate(configs):
        torch.manual_seed(k)
        models.append(build_model(config, len(corpus.vocab)).to(device))
    model = pack(models) if packed else models[0]
    optimizer = make_optimizer(model, configs[0])
    objective = PackedObjective(configs) if packed else Objective(configs[0])

    def train(some_batches):
        if not packed:  # the trainer's step, as bench_train measures it
            bench_train.train_steps(model, optimizer, objective, some_batches)
            return
        for step, batch in enumerate(some_batches, 1):
            packed_train_step(model, objective, optimizer, batch, step, configs[0])

    train(batches[:WARMUP_STEPS])
    if device.type == "cuda":
        torch.cuda.synchronize()
    if wait_for_start:
        print("ready", flush=True)
        sys.stdin.readline()
    start, clock = time.time(), time.perf_counter()
    train(batches[WARMUP_STEPS:])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, end = time.perf_counter() - clock, time.time()
    tokens = sum(b.n_tokens for b in batches[WARMUP_STEPS:]) * (members if packed else 1)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / steps, "peak_mb": peak_mb,
            "tokens": tokens, "start": start, "end": end}


def child_command(model: str, mode: str, members: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, __file__, "--child", mode, "--model", model, "--members", str(members),
            "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]


def result_of(process: subprocess.Popen, what: str) -> dict[str, float]:
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"bench child ({what}) failed:\n{err.strip()}")
    return json.loads(out.strip().splitlines()[-1])


def in_child(model: str, mode: str, members: int, args: argparse.Namespace) -> dict[str, float]:
    process = subprocess.Popen(child_command(model, mode, members, args), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return result_of(process, f"{model} {mode} K={members}")


def side_by_side(model: str, members: int, args: argparse.Namespace) -> dict[str, float]:
    """K single-model processes at once; timing starts when all have warmed up.
    -> {tokens_per_s (summed), ms_per_step (mean over processes), peak_mb (largest process)}"""
    processes = [subprocess.Popen(child_command(model, "side-by-side", 1, args), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(members)]
    try:
        for process in processes:  # every process warmed up before any starts timing
            if process.stdout.readline().strip() != "ready":
                process.wait()
                raise SystemExit(f"bench child ({model} side by side) failed:\n{process.stderr.read().strip()}")
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [result_of(process, f"{model} side by side, K={members}") for process in processes]
    finally:  # none left waiting if one failed
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"tokens_per_s": sum(r["tokens"] for r in results) / seconds,
            "ms_per_step": sum(r["ms_per_step"] for r in results) / members,
            "peak_mb": max(r["peak_mb"] for r in results)}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"CUDA: {torch.cuda.get_device_name(torch.device(device))}"
    cpu_info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpu_info.read_text().splitlines()
             if line.startswith("model name")] if cpu_info.exists() else []
    return f"CPU: {names[0] if names else 'unknown'}, {os.cpu_count()} cores"


def bench_model(model: str, args: argparse.Namespace) -> dict:
    """Measure and print one model's table -> its figures (for --json and the targets)."""
    off = turned_off(model)
    if off:
        print(f"\n{model} model: packed training supports neither train.dynamics_every nor train.amp, so every run "
              "here (packed and separate) trains with " + ", ".join(
                  f"{key} {UNSUPPORTED_WHEN_PACKED[key]} (its config: {value})" for key, value in off.items()))
    sequential = in_child(model, "separate", 1, args)
    print(f"\n{model} model: separate runs one after another (any K): {sequential['tokens_per_s']:,.0f} tokens/s, "
          f"{sequential['ms_per_step']:,.0f} ms/step, peak {sequential['peak_mb']:,.0f} MB")
    print(f"{'K':>3} {'packed tok/s':>13} {'sequential':>11} {'side by side':>13} {'x seq':>6} {'x sbs':>6} "
          f"{'packed MB':>10} {'sbs MB/proc':>12}")
    rows = []
    for members in args.members:
        packed = in_child(model, "packed", members, args)
        beside = side_by_side(model, members, args)
        row = {"members": members, "packed": packed, "side_by_side": beside,
               "speedup_vs_sequential": packed["tokens_per_s"] / sequential["tokens_per_s"],
               "speedup_vs_side_by_side": packed["tokens_per_s"] / beside["tokens_per_s"]}
        rows.append(row)
        print(f"{members:>3} {packed['tokens_per_s']:13,.0f} {sequential['tokens_per_s']:11,.0f} "
              f"{beside['tokens_per_s']:13,.0f} {row['speedup_vs_sequential']:6.2f} "
              f"{row['speedup_vs_side_by_side']:6.2f} {packed['peak_mb']:10,.0f} {beside['peak_mb']:12,.0f}",
              flush=True)
    return {"sequential": sequential, "rows": rows, "turned_off": off}


def verdicts(figures: dict[str, dict], device_type: str) -> list[dict]:
    """The targets this run can judge (its device, models and K) -> met / not met each."""
    judged = []
    for model, target_device, members, limit, against in TARGETS:
        rows = [r for r in figures.get(model, {}).get("rows", []) if r["members"] == members]
        if target_device != device_type or not rows:
            continue
        speedup = rows[0][f"speedup_vs_{against}"]
        judged.append({"model": model, "device": target_device, "members": members, "against": against,
                       "limit": limit, "speedup": speedup, "met": speedup >= limit})
    return judged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODELS, "both"],
                        help="default: default-study on CPU, both on CUDA (the targets' models)")
    parser.add_argument("--members", type=int, nargs="+", help="pack sizes K (default 1 2 4 8 16, and 32 on CUDA)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (a study trial uses 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child", choices=["packed", "separate", "side-by-side"], help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.members is not None and min(args.members) < 1:
        parser.error(f"--members: pack sizes must be >= 1, got {args.members}")
    if args.steps < 1 or args.threads < 1:
        parser.error(f"--steps and --threads must be >= 1, got {args.steps} and {args.threads}")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist")
    torch.set_num_threads(args.threads)
    device_type = torch.device(args.device).type
    if args.child:
        figures = measure(args.model, args.child == "packed", args.members[0], args.steps, torch.device(args.device),
                          wait_for_start=args.child == "side-by-side")
        print(json.dumps(figures))
        return
    model = args.model or ("both" if device_type == "cuda" else "default-study")
    models = MODELS if model == "both" else (model,)
    args.members = args.members or [1, 2, 4, 8, 16] + ([32] if device_type == "cuda" else [])
    print(f"packed vs separate training, {device_name(args.device)}; {args.steps} timed steps after "
          f"{WARMUP_STEPS} warm-up, {args.threads} thread(s) per process; tokens/s summed over the K members")
    figures = {model: bench_model(model, args) for model in models}
    judged = verdicts(figures, device_type)
    print()
    for target in judged:
        print(f"target: {target['model']} model, K = {target['members']}, packed >= {target['limit']:.0f}x the "
              f"separate runs {target['against'].replace('_', ' ')} ({target['device']}): "
              f"{target['speedup']:.2f}x, {'met' if target['met'] else 'NOT met'}")
    if not judged:
        print("no target applies to this run's device, models and K")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(args.device), "steps": args.steps,
                                         "threads": args.threads, "models": figures, "targets": judged}, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()

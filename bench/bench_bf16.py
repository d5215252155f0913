"""What bf16 does to the numbers: IS-NLL of a trained model in fp32 and under bf16 autocast, and a
short training run's validation NLL/KL/MI with train.amp off and on.

    python bench/bench_bf16.py [--checkpoint runs/x/checkpoints/best] [--steps 1500] [--sentences 500]
                               [--n-samples 100] [--train-steps 300]
    python bench/bench_bf16.py --smoke     # the smallest settings: checks that it runs

Evaluation: the model of ``--checkpoint``, or the VAE trained here in fp32 for ``--steps`` steps
(PTB, ``quick`` scale: 1,500 steps is the whole quick schedule), evaluated on the first
``--sentences`` PTB test sentences with ``--n-samples`` importance samples, once in fp32 and once
with the whole evaluation under bf16 autocast, same seeds: the difference is bf16's alone.  Runs on
any device; without bf16 matrix units bf16 is emulated (slow, same numbers).
Training: ``--train-steps`` steps of the VAE from the same seed with train.amp false and true,
each evaluated in fp32 as training always evaluates.  train.amp refuses devices without bf16
matrix units, and then this part says so instead of running.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from cvae_core.checkpoint import load_model
from cvae_core.config import build_config
from cvae_core.data import load_corpus
from cvae_core.errors import CvaeError
from cvae_core.metrics.likelihood import evaluate
from cvae_core.runtime import bf16_autocast, bf16_matmul_units, resolve_device
from cvae_core.train import train

SMOKE = {"steps": 2, "sentences": 4, "n_samples": 2, "train_steps": 2}  # --smoke


def trained_vae(steps: int, out: Path, device: str, log) -> Path:
    config = build_config("vae", "ptb", "quick", {"train.steps": steps, "train.eval_every": steps,
                                                   "train.device": device, "train.dynamics_every": 0})
    train(config, out, log=log)
    return out / "checkpoints" / "best"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained model (default: train the VAE here)")
    parser.add_argument("--steps", type=int, default=1500, help="fp32 training steps when no --checkpoint")
    parser.add_argument("--sentences", type=int, default=500, help="PTB test sentences evaluated")
    parser.add_argument("--n-samples", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=300, help="steps of each training run (0: skip)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    device = resolve_device(args.device)
    quiet = lambda text: None  # noqa: E731 - the training logs are not this benchmark's figures
    units = bf16_matmul_units(device)
    print(f"device {device}: bf16 matrix units {'yes' if units else 'no (bf16 emulated: slow, same numbers)'}")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or trained_vae(args.steps, Path(scratch) / "vae", str(device), quiet)
        model, config, vocab = load_model(checkpoint, device)
        test = load_corpus(dataclasses.replace(config.data, train_limit=0, valid_limit=0), ("test",),
                           vocab=vocab)["test"].head(args.sentences)
        print(f"evaluation: {checkpoint if args.checkpoint else f'the VAE trained here, {args.steps} fp32 steps'}; "
              f"{len(test.examples)} PTB test sentences, N = {args.n_samples}")
        results = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                results[name] = evaluate(model, test, n_samples=args.n_samples, mi_samples=args.n_samples)
            results[name]["seconds"] = time.perf_counter() - start
        print(f"{'':<6} {'NLL':>9} {'KL':>8} {'MI':>8} {'AU':>4} {'seconds':>8}")
        for name, r in results.items():
            print(f"{name:<6} {r['nll']:9.3f} {r['kl']:8.3f} {r['mi_loo']:8.3f} {r['au']:4d} {r['seconds']:8.1f}")
        difference = {key: results["bf16"][key] - results["fp32"][key] for key in ("nll", "kl", "mi_loo")}
        print(f"bf16 - fp32: NLL {difference['nll']:+.4f}, KL {difference['kl']:+.4f}, MI {difference['mi_loo']:+.4f} "
              "nats per sentence")
        if not args.train_steps:
            return
        try:
            bf16_autocast(device, enabled=True)  # the check train.amp makes, before any training
        except CvaeError as error:
            print(f"training with train.amp=true: not run: {error}")
            return
        runs = {}
        for amp in (False, True):
            config = build_config("vae", "ptb", "quick", {
                "train.steps": args.train_steps, "train.eval_every": args.train_steps, "train.amp": amp,
                "train.device": str(device), "train.dynamics_every": 0})
            runs[amp] = train(config, Path(scratch) / f"amp-{amp}", log=quiet).last_metrics
        print(f"training {args.train_steps} steps (VAE, PTB), validation in fp32:")
        for amp, metrics in runs.items():
            print(f"train.amp={str(amp).lower():<5} NLL {metrics['val_nll']:.3f} KL {metrics['val_kl']:.3f} "
                  f"MI {metrics['val_mi_loo']:.3f}")
        print("amp - fp32: " + ", ".join(f"{key} {runs[True][key] - runs[False][key]:+.4f}"
                                          for key in ("val_nll", "val_kl", "val_mi_loo")))


if __name__ == "__main__":
    main()

"""The ``cvae`` command: presets, train, evaluate."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .config import FIELDS, PRESETS, SCALES, build_config, parse_assignments
from .errors import CvaeError


def _presets(args: argparse.Namespace) -> None:
    if args.keys:
        for key, (_, _, ftype) in FIELDS.items():
            print(f"{key}  ({ftype.__name__})")
        return
    group = None
    for preset in PRESETS.values():
        if preset.group != group:
            group = preset.group
            print(f"\n{group}")
        print(f"  {preset.name:<24} {preset.description}")


def _train(args: argparse.Namespace) -> None:
    from .train import train

    overrides = parse_assignments(args.set or [])
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
    config = build_config(args.preset, args.dataset, args.scale, overrides)
    out = Path(args.out or f"runs/{args.preset}-{args.dataset}-{args.scale}-seed{config.train.seed}")
    result = train(config, out, resume=args.resume)
    if result.best_checkpoint:
        best = result.best_metrics
        summary = ", ".join(f"{k[4:]} {best[k]:.2f}" for k in ("val_nll", "val_kl", "val_ppl", "val_rec")
                            if k in best)
        print(f"\nbest checkpoint: {result.best_checkpoint} (step {int(best.get('step', 0))}: {summary})")
        print(f"evaluate it:     cvae evaluate {out / 'checkpoints' / 'best'} --split test --n-samples 100 --json")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_checkpoint

    overrides = {"data_dir": args.data_dir} if args.data_dir else None
    result = evaluate_checkpoint(args.checkpoint, split=args.split, n_samples=args.n_samples,
                                 mi_samples=args.mi_samples, seed=args.seed, device=args.device,
                                 data_overrides=overrides, limit=args.limit)
    if args.json:
        print(json.dumps(_json_safe(result), indent=2))
        return
    for key, value in result.items():
        if key != "fingerprint":
            print(f"{key:<12} {value if value is None or isinstance(value, int) else f'{value:.3f}'}")
    print("fingerprint  " + json.dumps(result["fingerprint"]))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cvae", description="Coupled-VAE: train and evaluate text VAEs.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named presets (Table 1 rows and their coupled twins)")
    p.add_argument("--keys", action="store_true", help="list every config key --set accepts")
    p.set_defaults(func=_presets)

    p = sub.add_parser("train", help="train a model")
    p.add_argument("--preset", default="coupled-vae", help="see `cvae presets`")
    p.add_argument("--dataset", default="ptb", help="ptb | yelp13 | yahoo | text")
    p.add_argument("--scale", default="quick", choices=SCALES, help="quick (CPU minutes) or paper (60K steps)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--data-dir", help="folder with train.txt, valid.txt, test.txt (not needed for PTB)")
    p.add_argument("--out", help="output folder (default runs/<preset>-<dataset>-<scale>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (IS-NLL, KL, PPL, ELBO, MI, AU)")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/.../checkpoints/best")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--n-samples", type=int, default=100, help="importance samples per sentence (paper: 100)")
    p.add_argument("--mi-samples", type=int, default=100, help="z samples per sentence for MI (paper: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N sentences only")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", help="read the split from this folder instead of the recorded path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_evaluate)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except CvaeError as exc:
        print(f"cvae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvae: interrupted (resume a training run with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

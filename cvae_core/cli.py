"""The ``cvae`` command: presets, train, evaluate, generate.

Each command imports what it runs inside its function: ``cvae --help`` and a bad flag answer
before torch loads."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import FIELDS, PRESETS, SCALES, build_config, check_device, parse_assignments
from .errors import CvaeError, OneLineArgumentParser, argument_type, check_counts
from .guards import check_writable

device_flag = argument_type(check_device)


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
    from .train import latest_checkpoint, train

    overrides = parse_assignments(args.set or [])
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
    if args.pack:
        _train_pack(args, overrides)
        return
    config = build_config(args.preset, args.dataset, args.scale, overrides)
    out = Path(args.out or f"runs/{args.preset}-{args.dataset}-{args.scale}-seed{config.train.seed}")
    check_writable(out, "--out")
    # train(resume=True) starts afresh where there is nothing to resume (a PreFB stage relies on
    # that); a user who asks to continue a run means one that exists
    if args.resume and not latest_checkpoint(out).exists():
        raise CvaeError(f"--resume: no checkpoint to continue from in {out} (no {latest_checkpoint(out)}); "
                        "check --out, or drop --resume to start a new run")
    result = train(config, out, resume=args.resume)
    if result.best_checkpoint:
        best = result.best_metrics
        summary = ", ".join(f"{k[4:]} {best[k]:.2f}" for k in ("val_nll", "val_kl", "val_ppl", "val_rec")
                            if k in best)
        print(f"\nbest checkpoint: {result.best_checkpoint} (step {int(best.get('step', 0))}: {summary})")
        print(f"evaluate it:     cvae evaluate {out / 'checkpoints' / 'best'} --split test --n-samples 100 --json")


def _train_pack(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """``--pack KEY=V1,V2,...``: one member per value, trained as one pack into <out>/member-<k>."""
    from .packed import train_pack

    if args.resume:
        raise CvaeError("--resume does not apply to --pack (a pack starts afresh)")
    key, _, values = args.pack.partition("=")
    members = [value.strip() for value in values.split(",") if value.strip()]
    if not key.strip() or len(members) < 2:
        raise CvaeError(f"--pack expects KEY=V1,V2,... with two or more values, got {args.pack!r}")
    configs = [build_config(args.preset, args.dataset, args.scale, {**overrides, key.strip(): value})
               for value in members]
    out = Path(args.out or f"runs/{args.preset}-{args.dataset}-{args.scale}-pack")
    check_writable(out, "--out")
    ends = train_pack(configs, [out / f"member-{k}" for k in range(len(configs))])
    print()
    for end, value in zip(ends, members):
        best = end.result.best_metrics
        summary = f"best val_nll {best['val_nll']:.2f} at step {end.result.best_step}" if best else "no evaluation"
        print(f"member {end.member} ({key.strip()}={value}): {end.outcome}, {summary}, {end.result.output_dir}")


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation import NON_NEGATIVE_COUNTS, POSITIVE_COUNTS, ProgressPrinter, evaluate_checkpoint
    from .runtime import json_safe

    check_counts(args, positive=POSITIVE_COUNTS, non_negative=NON_NEGATIVE_COUNTS)
    overrides = {"data_dir": args.data_dir} if args.data_dir else None
    result = evaluate_checkpoint(args.checkpoint, split=args.split, n_samples=args.n_samples,
                                 mi_samples=args.mi_samples, seed=args.seed, device=args.device,
                                 data_overrides=overrides, limit=args.limit, bleu=args.bleu, dist=args.dist,
                                 grad_norms=args.grad_norms, bleu_samples=args.bleu_samples,
                                 dist_samples=args.dist_samples, max_steps=args.max_steps,
                                 progress=ProgressPrinter(f"{args.split} likelihood (N={args.n_samples})"))
    if args.json:
        print(json.dumps(json_safe(result), indent=2))
        return
    width = max(12, *(len(key) + 1 for key in result))  # the synthetic data's metric names are longer
    for key, value in result.items():
        if key != "fingerprint":
            print(f"{key:<{width}} {value if value is None or isinstance(value, int) else f'{value:.3f}'}")
    print(f"{'fingerprint':<{width}} " + json.dumps(result["fingerprint"]))


def _generate(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .data.batching import make_batch
    from .evaluation import load_for_evaluation
    from .generate import interpolate, reconstruct, sample_prior
    from .runtime import resolve_device, seeded

    check_counts(args, positive=("n",), non_negative=("max_steps", "steps"))
    if args.mode == "prior":
        model, config, vocab = load_model(args.checkpoint, resolve_device(args.device))
        examples: list[list[int]] = []
    else:
        overrides = {"data_dir": args.data_dir} if args.data_dir else None
        limit = 2 * args.n if args.mode == "interpolate" else args.n
        model, config, vocab, data = load_for_evaluation(args.checkpoint, args.split, args.device, overrides, limit)
        examples = data.examples
    if model.kind != "vae":
        raise CvaeError(f"generate needs a latent-variable model (model.kind=vae), got {model.kind!r}")
    steps = args.max_steps or config.data.max_len
    words = lambda ids: " ".join(vocab.decode(ids))  # noqa: E731
    chunk = 32
    with seeded(args.seed, next(model.parameters()).device):
        if args.mode == "prior":
            for ids in sample_prior(model, args.n, batch_size=chunk, max_steps=steps):
                print(words(ids))
        elif args.mode == "reconstruct":
            for start in range(0, len(examples), chunk):
                inputs = examples[start : start + chunk]
                for sentence, decodes in zip(inputs, reconstruct(model, make_batch(inputs), 1, steps)):
                    print(f"> {words(sentence)}\n< {words(decodes[0])}\n")
        else:
            pairs = list(zip(examples[0::2], examples[1::2]))
            if not pairs:
                raise CvaeError(f"--mode interpolate needs at least 2 sentences in the {args.split} split")
            for start in range(0, len(pairs), chunk):
                firsts, seconds = map(list, zip(*pairs[start : start + chunk]))
                paths = interpolate(model, make_batch(firsts), make_batch(seconds), args.steps, steps)
                for a, b, path in zip(firsts, seconds, paths):
                    print(f"A {words(a)}")
                    for ids in path:
                        print(f"  {words(ids)}")
                    print(f"B {words(b)}\n")


def _respond(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .data.batching import Pair, make_batch
    from .data.pairs import tokenize_utterance
    from .generate import respond
    from .runtime import resolve_device, seeded

    check_counts(args, positive=("n",), non_negative=("max_steps",))
    model, config, vocab = load_model(args.checkpoint, resolve_device(args.device))
    words = tokenize_utterance(args.post)
    if not words:
        raise CvaeError(f"the post {args.post!r} has no words")
    batch = make_batch([Pair(vocab.encode(words[: config.data.max_len]), [])])
    with seeded(args.seed, next(model.parameters()).device):
        (responses,) = respond(model, batch, args.n, args.max_steps or config.data.max_len)
    print(f"> {' '.join(vocab.decode(vocab.encode(words)))}")
    for ids in responses:
        print(f"< {' '.join(vocab.decode(ids))}")


def parser() -> argparse.ArgumentParser:
    top = OneLineArgumentParser(prog="cvae", description="Coupled-VAE: train and evaluate text VAEs.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named presets (Table 1 rows and their coupled twins)")
    p.add_argument("--keys", action="store_true", help="list every config key --set accepts")
    p.set_defaults(func=_presets)

    p = sub.add_parser("train", help="train a model")
    p.add_argument("--preset", default="coupled-vae", help="see `cvae presets`")
    p.add_argument("--dataset", default="ptb",
                   help="ptb | yelp13 | yahoo | text | synthetic (He et al. 2019, generated); dialogue presets: "
                        "ptb-pairs | swda | pairs")
    p.add_argument("--scale", default="quick", choices=SCALES, help="quick (CPU minutes) or paper (60K steps)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--data-dir", help="folder with train.txt, valid.txt, test.txt (swda: .jsonl, pairs: .tsv; "
                                      "not needed for ptb and ptb-pairs; synthetic: its cache folder)")
    p.add_argument("--out", help="output folder (default runs/<preset>-<dataset>-<scale>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    p.add_argument("--pack", metavar="KEY=V1,V2,...",
                   help="train one member per value as one packed model (Gaussian GRU VAEs; loss weights, KL "
                        "schedule or seed), into <out>/member-<k>")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (IS-NLL, KL, PPL, ELBO, MI, AU; "
                                        "optionally BLEU, Dist, gradient norms)")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/.../checkpoints/best")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--n-samples", type=int, default=100, help="importance samples per sentence (paper: 100)")
    p.add_argument("--mi-samples", type=int, default=100, help="z samples per sentence for MI (paper: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N sentences only")
    p.add_argument("--device", default="auto", type=device_flag, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data-dir", help="read the split from this folder instead of the recorded path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--bleu", action="store_true",
                   help="add bleu1/bleu2: reconstruction BLEU (100*BP*p_n, corpus level) of greedy decodes, "
                        "and sacrebleu's standard cumulative BLEU as sacrebleu")
    p.add_argument("--bleu-samples", type=int, default=10, help="posterior samples per sentence for --bleu (paper: 10)")
    p.add_argument("--dist", action="store_true", help="add dist1/dist2 (percent) of greedy prior samples")
    p.add_argument("--dist-samples", type=int, default=3200, help="prior samples for --dist (paper: 3200)")
    p.add_argument("--grad-norms", action="store_true",
                   help="add grad_rec, grad_rec_coupled, grad_total, grad_reg, dh_de (mean squared norms, Table 5)")
    p.add_argument("--max-steps", type=int, default=0, help="greedy decoding steps (0 = data.max_len, 200)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("generate", help="print greedy decodes: prior samples, reconstructions, interpolations")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/.../checkpoints/best")
    p.add_argument("--n", type=int, default=10, help="sentences (prior), inputs (reconstruct) or pairs (interpolate)")
    p.add_argument("--mode", default="prior", choices=("prior", "reconstruct", "interpolate"))
    p.add_argument("--split", default="test", choices=("train", "valid", "test"),
                   help="where reconstruct/interpolate read their inputs (the first --n sentences, or pairs)")
    p.add_argument("--steps", type=int, default=5, help="interior points of an interpolation (paper: 5)")
    p.add_argument("--max-steps", type=int, default=0, help="greedy decoding steps (0 = data.max_len, 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", type=device_flag, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data-dir", help="read the split from this folder instead of the recorded path")
    p.set_defaults(func=_generate)

    p = sub.add_parser("respond", help="print greedy responses of a dialogue model (seq2seq, cvae, coupled-cvae) "
                                       "to a post")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/.../checkpoints/best")
    p.add_argument("post", help="the post, plain text (lower-cased and tokenised like the training data)")
    p.add_argument("--n", type=int, default=5, help="responses, each from its own z ~ p(z|post)")
    p.add_argument("--max-steps", type=int, default=0, help="greedy decoding steps (0 = data.max_len, 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", type=device_flag, help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_respond)
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
    except BrokenPipeError:  # the reader went away (`cvae evaluate --json | head`): not an error of ours
        # Python flushes stdout again at exit; pointing it at /dev/null keeps that flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())

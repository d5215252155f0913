"""Every throughput figure of the project in one table, against this machine's measured limit.

    python bench/run_all.py [--json PATH] [--quick | --smoke] [--skip-study | --only-study]

Rows: training tokens/s (VAE, Coupled-VAE; PTB paper configuration, bucketed batches), IS-NLL
sentences/s (N = 100, PTB test sentences) and its projected whole-test-set time, MI seconds
(whole PTB test set, N = 100), peak RSS of training and of evaluation (each measured in its own
child process), the analytic FLOPs it assumes and the dense fp32 matmul rate measured in this
run.  limit = matmul rate / FLOPs per unit; ratio = achieved / limit (JSON fields *_ratio).
Where the device has bf16 matrix units (CUDA, or a CPU with AMX/AVX512-BF16) the bf16 rows follow
(train.amp, and IS-NLL under bf16 autocast) with their speed-up over fp32; elsewhere one line says
why they are left out.
Study overhead (bench/bench_study.py): the default study's VAE trial run directly vs as a
one-trial study (local Ray, SQLite MLflow; Ray start-up and study set-up reported apart), and two
1-CPU trials at once vs one 2-CPU trial (summed training tokens/s).
Runs unchanged on CUDA (``--device cuda``).  Models are freshly initialised: throughput does not
depend on the weights for the Gaussian posterior.  ``--smoke``: the smallest sizes, to check that
every row is computed (seconds for the throughput rows, a few minutes with the study rows; figures
meaningless).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from cvae_core.config import build_config
from cvae_core.data import load_corpus
from cvae_core.metrics.likelihood import evaluate, latent_metrics
from cvae_core.models import build_model
from cvae_core.runtime import bf16_matmul_units

BENCH = Path(__file__).resolve().parent


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(m: int, k: int, n: int, device: torch.device, seconds: float = 1.0,
                dtype: torch.dtype = torch.float32) -> float:
    """Best sustained GFLOP/s of [m, k] @ [k, n] in ``dtype`` (fp32 unless said) over repeats
    filling ~``seconds``."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    a @ b
    best, spent = 0.0, 0.0
    while spent < seconds:
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, 2 * m * k * n / elapsed / 1e9)
    return best


def gru_flops(input_dim: int, hidden_dim: int) -> int:
    """Multiply-adds x2 of one GRU step: input and recurrent projections of the three gates."""
    return 2 * 3 * hidden_dim * (input_dim + hidden_dim)


def flops_per_token(config, vocab_size: int, words_per_token: float) -> dict[str, float]:
    """Analytic forward FLOPs (matmuls only) per decoded target token, and per encoded word.

    decoder: GRU on [embedding; h] + projection 2H->embed + output embed->V;
    encoder: two GRU directions on the embedding; training = 3x forward (backward = 2x)."""
    m = config.model
    decoder_hidden = 2 * m.hidden_dim
    decoder = (gru_flops(2 * m.embed_dim, decoder_hidden) + 2 * decoder_hidden * m.embed_dim
               + 2 * m.embed_dim * vocab_size)
    encoder = 2 * gru_flops(m.embed_dim, m.hidden_dim)
    decoders = 2 if config.coupling.enabled else 1
    return {"decoder_forward": decoder, "encoder_forward_per_word": encoder,
            "train": 3 * (decoders * decoder + encoder * words_per_token)}


def part_train(args) -> dict:
    import bench_train

    figures = bench_train.measure(["vae", "coupled-vae"], args.train_steps, args.train_rounds,
                                  device=torch.device(args.device), bf16=args.bf16)
    return {"vae": figures["vae"], "coupled": figures["coupled-vae"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def part_eval(args) -> dict:
    device = torch.device(args.device)
    config = build_config("vae", "ptb", "quick")
    corpus = load_corpus(config.data, ("train", "test"))
    torch.manual_seed(0)
    model = build_model(config, len(corpus.vocab)).to(device).eval()
    test = corpus["test"]
    # every k-th sentence: the subset has the test set's length distribution
    step = max(1, len(test.examples) // args.is_sentences)
    subset = dataclasses.replace(test, examples=test.examples[::step][: args.is_sentences])
    subset_tokens = subset.n_tokens
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with precision:
        warm_up = dataclasses.replace(subset, examples=subset.examples[:8])
        evaluate(model, warm_up, n_samples=2, with_mi=False)
        _synchronize(device)
        start = time.perf_counter()
        result = evaluate(model, subset, n_samples=args.n_samples, with_mi=False)
        _synchronize(device)
    is_seconds = time.perf_counter() - start
    if args.bf16:  # the bf16 rows need the IS-NLL rate only
        return {"is_sentences": len(subset.examples), "is_seconds": is_seconds, "is_nll": result["nll"]}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        latent_metrics(model, test, args.n_samples)
    _synchronize(device)
    mi_seconds = time.perf_counter() - start
    return {"is_sentences": len(subset.examples), "is_tokens_per_sentence": subset_tokens / len(subset.examples),
            "is_seconds": is_seconds, "is_nll": result["nll"],
            "test_sentences": len(test.examples), "test_tokens": test.n_tokens, "vocab_size": len(corpus.vocab),
            "words_per_token": 1 - len(test.examples) / test.n_tokens,
            "mi_seconds": mi_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def part_study(args) -> dict:
    import bench_study

    if args.part == "direct":
        return bench_study.run_direct(args.study_steps, cpus=2)
    trials, cpus = (1, 2) if args.part == "study-one" else (2, 1)
    return bench_study.run_study_timed(args.study_steps, trials=trials, cpus=cpus)


def run_part(name: str, argv: list[str]) -> dict:
    """One part in a child process, so its peak RSS is its own."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--part", name, *argv],
                          check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


QUICK = {"is_sentences": 32, "train_steps": 6, "train_rounds": 1, "study_steps": 20}
SMOKE = {"is_sentences": 4, "train_steps": 1, "train_rounds": 1, "study_steps": 2, "n_samples": 2}  # --smoke
DEFAULTS = {"is_sentences": 200, "train_steps": 20, "train_rounds": 2, "study_steps": 100}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true",
                       help="reduced sizes (" + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                            + "); explicit flags still win")
    sizes.add_argument("--smoke", action="store_true",
                       help=f"smallest settings {SMOKE}, explicit flags still win: checks that the script runs")
    parser.add_argument("--is-sentences", type=int, help=f"PTB test sentences for the IS-NLL rate "
                                                          f"(default {DEFAULTS['is_sentences']})")
    parser.add_argument("--n-samples", type=int, default=100, help="IS and MI samples per sentence")
    parser.add_argument("--train-steps", type=int, help=f"training steps per round and model "
                                                        f"(default {DEFAULTS['train_steps']})")
    parser.add_argument("--train-rounds", type=int, help=f"default {DEFAULTS['train_rounds']}")
    parser.add_argument("--study-steps", type=int, help=f"training steps of the study-overhead run "
                                                        f"(default {DEFAULTS['study_steps']})")
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument("--skip-study", action="store_true", help="leave out the study-overhead rows")
    rows.add_argument("--only-study", action="store_true", help="only the study-overhead rows")
    parser.add_argument("--part", choices=("train", "eval", "direct", "study-one", "study-two"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # a part under bf16 autocast
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else default)
    if args.study_steps < 2:  # two evaluations, every study_steps // 2 steps
        parser.error(f"--study-steps must be at least 2, got {args.study_steps}")
    sys.path.insert(0, str(BENCH))
    sys.path.insert(1, str(BENCH.parent))  # `studies` from this checkout
    if args.part:
        parts = {"train": part_train, "eval": part_eval}
        print(json.dumps(parts.get(args.part, part_study)(args)))
        return
    child_argv = [f"--device={args.device}", f"--is-sentences={args.is_sentences}",
                  f"--n-samples={args.n_samples}", f"--train-steps={args.train_steps}",
                  f"--train-rounds={args.train_rounds}", f"--study-steps={args.study_steps}"]
    started = time.perf_counter()
    figures = {} if args.only_study else throughput_figures(args, child_argv)
    if not args.skip_study:
        figures.update(study_figures(args, child_argv))
    figures["bench_seconds"] = time.perf_counter() - started
    print(f"(benchmark took {figures['bench_seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def study_figures(args, child_argv: list[str]) -> dict:
    """The study-overhead rows (see bench/bench_study.py), printed; -> their JSON fields."""
    import bench_study

    direct = run_part("direct", child_argv)
    one = run_part("study-one", child_argv)
    two = run_part("study-two", child_argv)
    cost = bench_study.overhead(direct["seconds"], one["trials_s"])
    fixed_s = one["start_s"] + one["end_s"]
    figures = {
        "study_steps": args.study_steps,
        "study_direct_run_s": direct["seconds"], "study_trial_s": one["trials_s"],
        "study_trial_start_s": one["start_s"], "study_trial_run_s": one["run_s"], "study_trial_end_s": one["end_s"],
        "study_trial_fixed_s": fixed_s, "study_trial_s_for_limit": fixed_s / bench_study.OVERHEAD_LIMIT,
        "study_ray_start_s": one["ray_start_s"], "study_setup_s": one["setup_s"],
        "study_overhead_fraction": cost["fraction"], "study_overhead_limit": bench_study.OVERHEAD_LIMIT,
        "study_overhead_ratio": cost["ratio"],
        "study_direct_tokens_per_s": direct["tokens_per_s"], "study_trial_tokens_per_s": one["tokens_per_s"][0],
        "study_two_1cpu_tokens_per_s": sum(two["tokens_per_s"]),
        "study_two_1cpu_trials_s": two["trials_s"],
        "study_two_1cpu_per_one_2cpu_throughput": sum(two["tokens_per_s"]) / one["tokens_per_s"][0],
    }
    print(f"Study overhead: the default study's VAE trial (studies/specs/lambda_sweep.yaml), {args.study_steps} "
          "steps, 2 evaluations; local Ray, SQLite MLflow; 2 torch threads unless said")
    print(f"{'figure':<44} {'achieved':>10} {'limit':>10} {'ratio':>6}")
    print(f"{'direct cvae_core.train, s':<44} {direct['seconds']:10.1f}")
    print(f"{'one-trial study, per-trial time, s':<44} {one['trials_s']:10.1f}")
    print(f"{'  start-up: process, imports, MLflow run, s':<44} {one['start_s']:10.1f}")
    print(f"{'  training, evaluations, logging, s':<44} {one['run_s']:10.1f}")
    print(f"{'  after the last evaluation, s':<44} {one['end_s']:10.1f}")
    print(f"{'study overhead per trial':<44} {cost['fraction']:10.1%} {bench_study.OVERHEAD_LIMIT:10.0%} "
          f"{cost['ratio']:6.2f}")
    print(f"{'trial length at which start-up + end = 5%, s':<44} {figures['study_trial_s_for_limit']:10.0f}")
    print(f"{'Ray start-up (once per study), s':<44} {one['ray_start_s']:10.1f}")
    print(f"{'study set-up (once per study), s':<44} {one['setup_s']:10.1f}")
    print(f"{'training tokens/s: direct / in the trial':<44} {direct['tokens_per_s']:10,.0f} "
          f"{one['tokens_per_s'][0]:10,.0f}")
    print(f"{'tokens/s: two 1-CPU trials (sum) / one 2-CPU':<44} {sum(two['tokens_per_s']):10,.0f} "
          f"{one['tokens_per_s'][0]:10,.0f} {figures['study_two_1cpu_per_one_2cpu_throughput']:6.2f}")
    print("(per-trial time: the study's elapsed_s, from the Tuner's start to the summary written, so trial "
          "process start-up, MLflow logging and result collection count as overhead; ratio = overhead / limit, "
          "<= 1 meets the target; tokens/s are the trials' own training-only figures logged to MLflow)")
    return figures


def bf16_figures(args, child_argv: list[str], fp32: dict) -> dict:
    """The bf16 rows (train.amp; IS-NLL under bf16 autocast) where the device has bf16 matrix
    units, printed beside the fp32 ones; elsewhere one line saying why they are left out."""
    device = torch.device(args.device)
    rates = {"square_1024": matmul_rate(1024, 1024, 1024, device, dtype=torch.bfloat16),
             "output_projection": matmul_rate(2048, 200, 10002, device, dtype=torch.bfloat16)}
    figures = {"bf16_matmul_gflops": rates, "bf16_units": bf16_matmul_units(device)}
    if not figures["bf16_units"]:
        print(f"bf16: no rows, {fp32['machine']} has no bf16 matrix units (bf16 square matmul "
              f"{rates['square_1024']:.1f} GFLOP/s against fp32 {fp32['limit_gflops']:.1f}); train.amp refuses to "
              "run here")
        return figures
    evaluation = run_part("eval", [*child_argv, "--bf16"])
    training = run_part("train", [*child_argv, "--bf16"])
    figures.update({
        "train_vae_tokens_per_s_bf16": training["vae"]["tokens_per_s"],
        "train_coupled_tokens_per_s_bf16": training["coupled"]["tokens_per_s"],
        "is_nll_sentences_per_s_bf16": evaluation["is_sentences"] / evaluation["is_seconds"],
        "is_nll_bf16": evaluation["is_nll"],
    })
    print("bf16 matmul GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    print(f"{'bf16 (train.amp; IS-NLL under autocast)':<34} {'achieved':>10} {'fp32':>10} {'speed-up':>8}")
    for name, bf16, base in [
            ("training VAE, tokens/s", figures["train_vae_tokens_per_s_bf16"], fp32["train_vae_tokens_per_s"]),
            ("training Coupled-VAE, tokens/s", figures["train_coupled_tokens_per_s_bf16"],
             fp32["train_coupled_tokens_per_s"]),
            (f"IS-NLL N={args.n_samples}, sentences/s", figures["is_nll_sentences_per_s_bf16"],
             fp32["is_nll_sentences_per_s"])]:
        print(f"{name:<34} {bf16:10,.1f} {base:10,.1f} {bf16 / base:7.2f}x")
    print(f"IS-NLL of the untrained model: fp32 {fp32['is_nll']:.3f}, bf16 {figures['is_nll_bf16']:.3f} "
          "(bench/bench_bf16.py measures a trained one)")
    return figures


def throughput_figures(args, child_argv: list[str]) -> dict:
    """The training / evaluation rows, printed; -> their JSON fields."""
    device = torch.device(args.device)
    rates = {"square_1024": matmul_rate(1024, 1024, 1024, device),
             "input_projection": matmul_rate(3200, 400, 768, device),
             "output_projection": matmul_rate(2048, 200, 10002, device)}
    rate = max(rates["square_1024"], rates["input_projection"])  # the machine's dense fp32 rate
    evaluation = run_part("eval", child_argv)
    training = run_part("train", child_argv)
    config = build_config("vae", "ptb", "quick")
    coupled_config = build_config("coupled-vae", "ptb", "quick")
    words_per_token = evaluation["words_per_token"]
    vae_flops = flops_per_token(config, evaluation["vocab_size"], words_per_token)
    coupled_flops = flops_per_token(coupled_config, evaluation["vocab_size"], words_per_token)
    # IS-NLL per sentence: N decoder passes over its tokens (+ one encoder pass, negligible)
    is_flops = args.n_samples * evaluation["is_tokens_per_sentence"] * vae_flops["decoder_forward"]
    is_rate = evaluation["is_sentences"] / evaluation["is_seconds"]
    figures = {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": machine_name(device),
        "matmul_gflops": rates, "limit_gflops": rate,
        "flops_per_token_train_vae": vae_flops["train"], "flops_per_token_train_coupled": coupled_flops["train"],
        "flops_per_sentence_is_nll": is_flops,
        "train_vae_tokens_per_s": training["vae"]["tokens_per_s"],
        "train_coupled_tokens_per_s": training["coupled"]["tokens_per_s"],
        "train_vae_ratio": training["vae"]["tokens_per_s"] * vae_flops["train"] / (rate * 1e9),
        "train_coupled_ratio": training["coupled"]["tokens_per_s"] * coupled_flops["train"] / (rate * 1e9),
        "coupled_per_vae_step": training["coupled"]["ms_per_step"] / training["vae"]["ms_per_step"],
        "is_nll_sentences_per_s": is_rate,
        "is_nll_ratio": is_rate * is_flops / (rate * 1e9),
        "is_nll_test_set_minutes": evaluation["test_sentences"] / is_rate / 60,
        "mi_seconds": evaluation["mi_seconds"],
        "peak_rss_train_mb": training["peak_rss_mb"], "peak_rss_eval_mb": evaluation["peak_rss_mb"],
        "is_nll": evaluation["is_nll"],
    }
    print(f"{figures['machine']} ({figures['device']}), {figures['threads']} threads, torch {figures['torch']}")
    print("matmul fp32 GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
          + f" -> limit rate {rate:.1f}")
    print(f"FLOPs assumed (matmuls): train VAE {vae_flops['train'] / 1e6:.1f} M/token, Coupled "
          f"{coupled_flops['train'] / 1e6:.1f} M/token (3x forward); IS-NLL {is_flops / 1e9:.2f} G/sentence "
          f"(N={args.n_samples} x {evaluation['is_tokens_per_sentence']:.1f} tokens x "
          f"{vae_flops['decoder_forward'] / 1e6:.2f} M)")
    rows = [
        ("training VAE, tokens/s", figures["train_vae_tokens_per_s"], rate * 1e9 / vae_flops["train"],
         figures["train_vae_ratio"]),
        ("training Coupled-VAE, tokens/s", figures["train_coupled_tokens_per_s"],
         rate * 1e9 / coupled_flops["train"], figures["train_coupled_ratio"]),
        (f"IS-NLL N={args.n_samples}, sentences/s", is_rate, rate * 1e9 / is_flops, figures["is_nll_ratio"]),
    ]
    print(f"{'figure':<34} {'achieved':>10} {'limit':>10} {'ratio':>6}")
    for name, achieved, limit, ratio in rows:
        print(f"{name:<34} {achieved:10,.1f} {limit:10,.1f} {ratio:6.0%}")
    print(f"{'Coupled / VAE time per step':<34} {figures['coupled_per_vae_step']:10.2f}")
    print(f"{'IS-NLL whole PTB test set, min':<34} {figures['is_nll_test_set_minutes']:10.1f}")
    print(f"{'MI (PTB test, N=100), s':<34} {figures['mi_seconds']:10.1f}")
    print(f"{'peak RSS training, MB':<34} {figures['peak_rss_train_mb']:10,.0f}")
    print(f"{'peak RSS evaluation, MB':<34} {figures['peak_rss_eval_mb']:10,.0f}")
    figures.update(bf16_figures(args, child_argv, figures))
    return figures


if __name__ == "__main__":
    main()

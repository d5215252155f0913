"""The output layer with its log-softmax: the plain way against the fused one, in one process.

    python bench/bench_output_layer.py [--rows 1200] [--vocab 10002] [--threads N] [--repeats 10]
    python bench/bench_output_layer.py --smoke     # the smallest settings: checks that it runs

Rows [R, 200] through the 200 -> V output layer to log p(gold) per row, as a decoder call does:
training (forward + backward) as ``cross_entropy(linear(x), gold)`` against
``cvae_core.modules.output_layer`` (one reused buffer: logits, softmax, then the logits' gradient
in place), with and without its buffer kept between calls; evaluation (no autograd, 256-row tiles)
both ways.  Also what a fresh full-vocabulary tensor costs against refilling a kept one (page
faults on first touch).  Figures: best of ``--repeats`` in ms, and GFLOP/s of the matmuls against
the square fp32 matmul rate measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cvae_core.modules.output_layer import OUTPUT_TILE_ROWS, output_token_log_likelihood, release_kept_buffers

SMOKE = {"rows": 64, "vocab": 500, "repeats": 2}  # --smoke


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def plain(rows, weight, bias, gold):
    return -nn.functional.cross_entropy(nn.functional.linear(rows, weight, bias), gold, reduction="none")


def plain_tiled(rows, weight, bias, gold):
    return torch.cat([plain(rows[s: s + OUTPUT_TILE_ROWS], weight, bias, gold[s: s + OUTPUT_TILE_ROWS])
                      for s in range(0, rows.shape[0], OUTPUT_TILE_ROWS)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1200, help="positions per call (a training batch: ~1,200)")
    parser.add_argument("--vocab", type=int, default=10002)
    parser.add_argument("--features", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest settings {SMOKE}, explicit flags still win: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    r, f, v = args.rows, args.features, args.vocab
    rows = torch.randn(r, f, requires_grad=True)
    weight = (0.1 * torch.randn(v, f)).requires_grad_()
    bias = torch.zeros(v, requires_grad=True)
    gold = torch.randint(0, v, (r,))
    square = torch.randn(1024, 1024)
    square_rate = 2 * 1024 ** 3 / best_ms(lambda: square @ square, args.repeats) * 1e-6

    def train(fn):
        def step():
            rows.grad = weight.grad = bias.grad = None
            fn(rows, weight, bias, gold).sum().backward()
        return step

    def fresh_buffers(rows, weight, bias, gold):
        release_kept_buffers()  # as if no buffer were kept between calls
        return output_token_log_likelihood(rows, weight, bias, gold)

    train_flops, eval_flops = 3 * 2 * r * f * v, 2 * r * f * v
    detached = (rows.detach(), weight.detach(), bias.detach(), gold)
    figures = [
        ("training, plain linear + cross_entropy", best_ms(train(plain), args.repeats), train_flops),
        ("training, fused, fresh buffer each call", best_ms(train(fresh_buffers), args.repeats), train_flops),
        ("training, fused, buffer kept", best_ms(train(output_token_log_likelihood), args.repeats), train_flops),
    ]
    with torch.no_grad():
        assert torch.allclose(plain(*detached), output_token_log_likelihood(*detached), rtol=1e-5, atol=1e-4)
        figures += [
            ("evaluation tiles, plain", best_ms(lambda: plain_tiled(*detached), args.repeats), eval_flops),
            ("evaluation tiles, fused", best_ms(lambda: output_token_log_likelihood(*detached), args.repeats),
             eval_flops),
        ]
    kept = torch.empty(r, v)
    fresh_ms = best_ms(lambda: torch.empty(r, v).fill_(1.0), args.repeats)
    refill_ms = best_ms(lambda: kept.fill_(1.0), args.repeats)
    print(f"output layer [{r}, {f}] x [{f}, {v}], {args.threads} threads, best of {args.repeats}; "
          f"square fp32 matmul {square_rate:.1f} GFLOP/s")
    print(f"{'':<42} {'ms':>8} {'GFLOP/s':>8} {'of square':>9}")
    for name, ms, flops in figures:
        rate = flops / ms * 1e-6
        print(f"{name:<42} {ms:8.2f} {rate:8.1f} {rate / square_rate:9.0%}")
    print(f"training speed-up, fused (kept) / plain: {figures[0][1] / figures[2][1]:.2f}x; "
          f"evaluation: {figures[3][1] / figures[4][1]:.2f}x")
    print(f"a fresh [{r}, {v}] fp32 tensor filled: {fresh_ms:.2f} ms; a kept one refilled: {refill_ms:.2f} ms")


if __name__ == "__main__":
    main()

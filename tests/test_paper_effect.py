"""The paper's effect as a test: at a small budget on real PTB, the VAE's posterior collapses at
every seed while the Coupled-VAE (Euclidean matching, λ_m = 1, λ_r = 1) keeps a latent: its KL,
MI and active units exceed the VAE's at every seed, by more than the seeds' spread.

The budget is the default study's model and data settings (studies/specs/lambda_sweep.yaml) cut
to 200 steps over 4,000 sentences with the KL weight at 1 from step 110 (docs/default-study-design.md
has the full-budget numbers). Measured on 2026-12-06 (3 seeds): VAE KL 0.001-0.009, MI
0.005-0.007, AU 0; Coupled-VAE KL 1.10-3.32, MI 0.78-1.77, AU 9-14. With the coupling losses
switched off (λ_r = λ_m = 0) the same run gives KL 0.000-0.007, MI 0.000-0.011, AU 0, and this
test fails.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from cvae_core.config import build_config
from cvae_core.train import train
from studies.spec import load_spec

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
BUDGET = {"train.steps": 200, "train.eval_every": 100, "train.lr_decay_start": 150, "train.dynamics_every": 0,
          "regularizer.anneal_start": 10, "regularizer.anneal_steps": 100,
          "data.train_limit": 4000, "data.valid_limit": 200}
COUPLED = {"coupling.distance": "eucl", "coupling.lambda_m": 1.0, "coupling.lambda_r": 1.0}


def _final_metrics(preset: str, settings: dict, seed: int, out) -> dict[str, float]:
    overrides = {**load_spec("lambda_sweep").overrides, **BUDGET, **settings, "train.seed": seed}
    torch.set_num_threads(1)
    result = train(build_config(preset, "ptb", "quick", overrides), out, log=lambda text: None)
    return result.last_metrics


def test_coupling_keeps_a_latent_where_the_vae_collapses(tmp_path):
    vae = [_final_metrics("vae", {}, seed, tmp_path / f"vae-{seed}") for seed in SEEDS]
    coupled = [_final_metrics("coupled-vae", COUPLED, seed, tmp_path / f"coupled-{seed}") for seed in SEEDS]
    for metric in ("val_kl", "val_mi_loo", "val_au"):
        base, ours = [m[metric] for m in vae], [m[metric] for m in coupled]
        spread = 3 * statistics.stdev(base)  # how far the VAE moves across seeds when nothing changes
        assert min(ours) > max(base) + spread, (metric, base, ours)
        assert all(c > b for c, b in zip(ours, base)), (metric, base, ours)  # paired by seed
    assert max(m["val_au"] for m in vae) == 0  # the collapse the coupling has to prevent

#!/usr/bin/env python
"""The main study: coupling's effect on the latent (studies/specs/lambda_sweep.yaml).

    python studies/lambda_sweep.py                  # VAE vs Coupled-VAE, 3 seeds, small PTB, local Ray + SQLite
    python studies/lambda_sweep.py --search tpe --seeds 1   # Optuna TPE over λ_r, λ_m, distance (+ the VAE)
    python studies/lambda_sweep.py --profile paper-table3 --address auto --tracking-uri http://HEAD:5000
    python studies/lambda_sweep.py --resume         # continue the latest interrupted study
"""
import from_checkout  # noqa: F401  (first: the repository root on sys.path, this folder off it)
from studies.cli import run_script

run_script(__file__)

#!/usr/bin/env python
"""Coupling's effect on the latent, and the λ_r × λ_m × distance axes of the paper's Table 3.

    python studies/lambda_sweep.py                  # VAE vs Coupled-VAE, 3 seeds, small PTB, local Ray + SQLite
    python studies/lambda_sweep.py --search tpe --seeds 1   # Optuna TPE over λ_r, λ_m, distance (+ the VAE)
    python studies/lambda_sweep.py --profile paper-table3 --address auto --tracking-uri http://HEAD:5000
    python studies/lambda_sweep.py --resume         # continue the latest interrupted study
"""
import sys
from pathlib import Path

# Run from a checkout: import `studies` from the repository root, and keep this folder off
# sys.path so that studies/spec.py & co. never shadow a library's top-level module.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from studies.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("lambda_sweep", __doc__, prog="studies/lambda_sweep.py"))

#!/usr/bin/env python
"""Posterior family (Gaussian, vMF, planar flows) × coupled or not (the paper's Tables 1 and 4).

    python studies/posterior_sweep.py                  # small PTB study on a local Ray, SQLite MLflow
    python studies/posterior_sweep.py --search grid    # each family: base, coupled, coupled with λ_m = 0
    python studies/posterior_sweep.py --profile paper-table1 --address auto
    python studies/posterior_sweep.py --resume
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from studies.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("posterior_sweep", __doc__, prog="studies/posterior_sweep.py"))

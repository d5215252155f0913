#!/usr/bin/env python
"""Posterior family × coupled or not (studies/specs/posterior_sweep.yaml; the paper's Tables 1 and 4).

    python studies/posterior_sweep.py --search grid    # each family: base, coupled, coupled with λ_m = 0
    python studies/posterior_sweep.py --profile paper-table1 --address auto
"""
import from_checkout  # noqa: F401  (first: the repository root on sys.path, this folder off it)
from studies.cli import run_script

run_script(__file__)

#!/usr/bin/env python
"""Dialogue generation (studies/specs/cvae_sweep.yaml; the paper's Table 8).

    python studies/cvae_sweep.py --dataset swda --data-dir DIR    # Switchboard (train/valid/test.jsonl)
    python -m analysis table --layout table8                      # the study as Table 8
"""
import from_checkout  # noqa: F401  (first: the repository root on sys.path, this folder off it)
from studies.cli import run_script

run_script(__file__)

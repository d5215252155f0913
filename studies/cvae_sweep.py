#!/usr/bin/env python
"""Dialogue generation (the paper's Table 8): seq2seq, CVAE and Coupled-CVAE over λ_m.

    python studies/cvae_sweep.py                                  # small ptb-pairs study, local Ray, SQLite MLflow
    python studies/cvae_sweep.py --dataset swda --data-dir DIR    # Switchboard (train/valid/test.jsonl)
    python studies/cvae_sweep.py --search tpe                     # Optuna over λ_m, λ_r, distance (+ baselines)
    python -m analysis table --layout table8                      # the study as Table 8
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
    sys.exit(main("cvae_sweep", __doc__, prog="studies/cvae_sweep.py"))

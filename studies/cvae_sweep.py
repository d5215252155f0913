#!/usr/bin/env python
"""Coupled-CVAE λ_m sweep on Switchboard (the paper's Table 8): not available yet.

The conditional CVAE (post/response encoders, prior network p(z|y)) is not in cvae_core yet.
Once it is, this becomes a spec (studies/specs/cvae_sweep.yaml, λ_m ∈ {0.1, 0.5, 1, 2}) run by
studies/runner.py like the other sweeps.
"""
import sys

MESSAGE = ("cvae_sweep.py: the conditional Coupled-CVAE (Table 8) does not exist in cvae_core yet, "
           "so there is nothing to sweep; use lambda_sweep.py or posterior_sweep.py")

if __name__ == "__main__":
    print(MESSAGE, file=sys.stderr)
    sys.exit(2)

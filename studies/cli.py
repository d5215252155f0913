"""The ``cvae-study`` console script: ``cvae-study NAME [options]`` runs the study
``python studies/NAME.py [options]`` runs, through the same driver (``studies.runner.main``)
with the same options and the script's own description."""
from __future__ import annotations

import importlib
import sys

from .runner import main as run_script

STUDIES = ("lambda_sweep", "posterior_sweep", "cvae_sweep")  # the scripts under studies/


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: cvae-study {{{','.join(STUDIES)}}} [options]  (cvae-study NAME --help lists the options)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in STUDIES:
        got = f"unknown study {argv[0]!r}" if argv else "no study named"
        print(f"error: {got}; choose one of {', '.join(STUDIES)} (cvae-study NAME [options])", file=sys.stderr)
        return 2
    name = argv[0]
    script = importlib.import_module(f"studies.{name}")  # for its description (module docstring)
    return run_script(name, script.__doc__, argv[1:], prog=f"cvae-study {name}")

"""``cvae-study NAME [options]``: every ``studies/specs/NAME.yaml`` is a study kind, run by the
one driver (``studies.runner.main``) with the spec's description as the help text. The scripts
``python studies/NAME.py`` are the same command under the name this README uses."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from .runner import main as run_study_command
from .spec import SPEC_DIR


def study_names(spec_dir: Path = SPEC_DIR) -> list[str]:
    """The study kinds: one per spec file, so a new kind is one YAML file."""
    return sorted(p.stem for p in spec_dir.glob("*.yaml"))


def help_text(name: str, prog: str) -> str:
    description = (yaml.safe_load((SPEC_DIR / f"{name}.yaml").read_text(encoding="utf-8")) or {}).get("description", "")
    return (f"{description}\n\n"
            f"    {prog}                  # the spec {SPEC_DIR.name}/{name}.yaml as written: local Ray, SQLite MLflow\n"
            f"    {prog} --search tpe     # Optuna TPE over the spec's search space (plus its baselines)\n"
            f"    {prog} --address auto   # on a running Ray cluster\n"
            f"    {prog} --resume         # continue the latest interrupted study")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = study_names()
    usage = f"usage: cvae-study {{{','.join(names)}}} [options]  (cvae-study NAME --help lists the options)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in names:
        got = f"unknown study {argv[0]!r}" if argv else "no study named"
        print(f"error: {got}; choose one of {', '.join(names)} (cvae-study NAME [options])", file=sys.stderr)
        return 2
    name = argv[0]
    prog = prog or f"cvae-study {name}"
    return run_study_command(name, help_text(name, prog), argv[1:], prog=prog)


def run_script(script: str) -> None:
    """The body of ``studies/NAME.py``: ``cvae-study NAME`` under the script's own name."""
    path = Path(script)
    sys.exit(main([path.stem, *sys.argv[1:]], prog=f"studies/{path.name}"))

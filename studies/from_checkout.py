"""Imported first by the scripts ``studies/NAME.py``: run from a checkout, they import the
``studies`` package from the repository root, and this folder leaves ``sys.path`` so that
``studies/spec.py`` & co. never shadow a library's top-level module of the same name."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

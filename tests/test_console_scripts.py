"""The console scripts ``cvae-study`` and ``cvae-analysis`` (pyproject.toml) are the study
scripts and ``python -m analysis`` under other names: same driver, same options, same errors."""
from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from studies.cli import main, study_names

REPO = Path(__file__).resolve().parents[1]


def test_every_study_script_is_a_cvae_study_name_and_nothing_else():
    scripts = {p.stem for p in (REPO / "studies").glob("*_sweep.py")}
    assert scripts == {"lambda_sweep", "posterior_sweep", "cvae_sweep"}
    assert study_names() == sorted(p.stem for p in (REPO / "studies" / "specs").glob("*.yaml"))
    assert scripts < set(study_names())


def test_a_study_kind_is_one_spec_file(tmp_path):
    assert study_names(tmp_path) == []
    (tmp_path / "my_study.yaml").write_text("name: my_study\n")
    assert study_names(tmp_path) == ["my_study"]


def test_the_scripts_point_at_the_entry_functions():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cvae-study"] == "studies.cli:main" and scripts["cvae-analysis"] == "analysis.cli:main"
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_cvae_analysis_is_python_m_analysis(capsys):
    from analysis.cli import main as cvae_analysis

    with pytest.raises(SystemExit) as exit_:
        cvae_analysis(["table", "--help"])
    assert exit_.value.code == 0
    module = subprocess.run([sys.executable, "-m", "analysis", "table", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert module.returncode == 0 and module.stdout == capsys.readouterr().out
    assert "--tracking-uri" in module.stdout


def test_cvae_analysis_usage_names_the_console_script():
    """Installed by pip install -e (the README's setup line): its usage lines say what the user typed."""
    script = Path(sys.executable).parent / "cvae-analysis"
    shown = subprocess.run([str(script), "table", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: cvae-analysis table") and "python -m analysis" not in shown.stdout


@pytest.mark.parametrize("argv, problem", [([], "no study named"), (["lambda"], "unknown study 'lambda'"),
                                           (["--profile", "lambda_sweep"], "unknown study '--profile'")])
def test_a_bad_study_name_is_one_line_listing_the_valid_ones(argv, problem, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    valid = ", ".join(study_names())
    assert "lambda_sweep" in valid and "synthetic_effect" in valid
    assert err == f"error: {problem}; choose one of {valid} (cvae-study NAME [options])\n"


def test_help_names_the_study_and_its_description(capsys):
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: cvae-study {" + ",".join(study_names()) + "}")
    with pytest.raises(SystemExit) as exit_:
        main(["posterior_sweep", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: cvae-study posterior_sweep") and "Posterior family (Gaussian, vMF" in out
    assert "--num-samples" in out and "--tracking-uri" in out


def test_cvae_study_and_the_script_fail_alike_on_the_same_options(tmp_path, capsys):
    """Same driver: an unknown spec stops both with the same one-line error, before Ray starts."""
    options = ["--profile", "no_such_spec", "--root", str(tmp_path / "out"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["cvae_sweep", *options]) == 2
    ours = capsys.readouterr().err
    script = subprocess.run([sys.executable, str(REPO / "studies" / "cvae_sweep.py"), *options],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert script.returncode == 2 and script.stderr == ours
    assert ours.startswith("error: ") and "no_such_spec" in ours and ours.count("\n") == 1

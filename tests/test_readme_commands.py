"""Every command of the README and of the docs pages that show commands, copied from the page at
test time and run as written, in a bash shell after the README's own `source .venv/bin/activate`,
in a scratch folder laid out like a fresh clone.  Which test runs which page's commands:
`test_every_command_on_a_page_is_run_by_a_test` (a new page or section with commands fails it).

`cvae` training commands get `--set` flags that shrink the model and the budget (evaluations a
`--limit`); the placeholders `DIR` and `/data/yahoo` become folders cut from ../shared/data, and
`...` the flags `--preset coupled-vae`; the development commands run with `--collect-only` (pytest)
or `--smoke` (benchmarks).

Study commands get extra flags that shrink the budget (the README's text comes first, unchanged);
`best` gets flags for a quick evaluation. The MLflow UI command is started on a free loopback
port (its launcher reads CVAE_MLFLOW_PORT), asked for /health and the study's experiment, and
stopped by its process group.
The cluster commands need AWS: offline, each `ray` subcommand and every flag the README passes it
are checked against the installed CLI's help, and the sweep's flags against its own parser."""
from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from processes import env_without_mlflow, kill_group
from test_study_commands import serve_mlflow_ui

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
TINY = {
    "data.train_limit": 200, "data.valid_limit": 30, "model.embed_dim": 16, "model.hidden_dim": 16,
    "model.latent_dim": 4, "model.dropout": 0.0, "train.batch_size": 8, "train.steps": 20, "train.eval_every": 10,
    "train.log_every": 10, "train.val_samples": 2, "train.mi_samples": 2, "regularizer.anneal_start": 2,
    "regularizer.anneal_steps": 10, "train.lr_decay_start": 15, "train.lr_decay_every": 5,
}
SMALL_STUDY = " ".join(f"--set {k}={v}" for k, v in TINY.items()) + " --num-samples 1 --max-concurrent 2"
QUICK_BEST = "--limit 20 --n-samples 2 --mi-samples 2 --no-bleu --no-dist --no-grad-norms"


def section(text: str, heading: str) -> str:
    """From `heading` to the next heading of the same or a higher level (outside code blocks)."""
    level = len(heading.split(" ", 1)[0])
    lines, out, fenced = text.splitlines(), [], False
    start = lines.index(heading)
    for line in lines[start + 1:]:
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= level and line[hashes:hashes + 1] == " ":
            break
        out.append(line)
    return "\n".join([heading, *out]) + "\n"


def commands(markdown: str) -> list[str]:
    """Commands of ```bash blocks (comments dropped) and `$ ` lines of ```console blocks."""
    out = []
    for kind, body in re.findall(r"```(bash|console)\n(.*?)```", markdown, re.S):
        for line in body.splitlines():
            if kind == "console":
                if line.startswith("$ "):
                    out.append(line[2:].strip())
                continue
            line = line.split("  #", 1)[0].split("# ", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                out.append(line)
    return out


README = (REPO / "README.md").read_text()
STUDIES = section(README, "## Studies")
CLUSTER = section(STUDIES, "### On a cluster")
AFTER = section(README, "## After a study")
CVAE = section(README, "## The `cvae` command")
DEVELOPMENT = section(README, "## Development")
SETUP = README.split("\n## ", 1)[0]  # the two commands above the first section
DOCS = REPO / "docs"
SHARED_DATA = REPO.parent / "shared" / "data"


def test_every_command_on_a_page_is_run_by_a_test():
    """The README's commands lie in the sections the tests here run (the two set-up commands are
    .ci/run's), and the docs pages that show commands are the ones these tests read."""
    covered = [*commands(SETUP), *commands(CVAE), *commands(STUDIES), *commands(AFTER), *commands(DEVELOPMENT)]
    assert sorted(commands(README)) == sorted(covered)
    assert commands(SETUP) == ['python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && '
                               ".venv/bin/python studies/lambda_sweep.py",
                               'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/pytest']
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci[-3:] == ["python3 -m venv .venv", '.venv/bin/pip install --quiet -e ".[dev]"', ".venv/bin/pytest"]
    # docs/cluster.md repeats the README's cluster commands, which the offline test below checks
    assert commands((DOCS / "cluster.md").read_text()) == commands(CLUSTER)
    with_commands = sorted(page.name for page in DOCS.glob("*.md") if commands(page.read_text()))
    assert with_commands == ["after-a-study.md", "cluster.md", "study-life.md"]
    page = commands((DOCS / "after-a-study.md").read_text())
    # the other two run in the tests whose studies the page shows: test_analysis_compare.py
    # (as written) and test_dashboard.py (on a free port, the study named)
    assert [c for c in page if c not in commands(AFTER)] == ["python -m analysis dashboard --port 8137",
                                                            "python -m analysis compare screen full"]


def cut_data(root: Path) -> dict[str, Path]:
    """The folders the README's placeholders stand for, cut from ../shared/data (the shared
    splits have no training file: each training file is its validation split)."""
    folders = {}
    for name, suffix in (("yahoo", ".txt"), ("swda", ".jsonl")):
        folder = root / f"data-{name}"
        folder.mkdir(exist_ok=True)
        valid = (SHARED_DATA / name / f"valid{suffix}").read_text(encoding="utf-8")
        for split in ("train", "valid"):
            (folder / f"{split}{suffix}").write_text(valid, encoding="utf-8")
        (folder / f"test{suffix}").write_text((SHARED_DATA / name / f"test{suffix}").read_text(encoding="utf-8"),
                                              encoding="utf-8")
        folders[name] = folder
    return folders


TINY_RUN = " ".join(f"--set {k}={v}" for k, v in TINY.items())


@pytest.mark.slow
def test_every_cvae_command_of_the_readme_runs_as_written(checkout):
    """The `cvae` section (with the dialogue part) in order: presets, training at both scales and
    on the Yahoo and Switchboard layouts, an interrupted run continued with --resume, evaluation
    of its best checkpoint, the conditional model's evaluation and responses."""
    data = cut_data(checkout)
    listed = commands(CVAE)
    resume = next(c for c in listed if "--resume" in c)
    for command in listed:
        runnable = (command.replace("/data/yahoo", str(data["yahoo"])).replace("--data-dir DIR", f"--data-dir {data['swda']}")
                    .replace("cvae train ...", "cvae train --preset coupled-vae"))
        if runnable.startswith("cvae train"):
            runnable = f"{runnable} {TINY_RUN}"
        if runnable.startswith("cvae evaluate"):  # the first 100 sentences, fewer prior samples for --dist
            runnable += " --limit 100" + (" --dist-samples 200" if "--dist" in runnable else "")
        if command == resume:
            # an interrupted run to continue: the same command without --resume, stopped with
            # Ctrl-C (SIGINT) after its first evaluation
            first = runnable.replace(" --resume", "")
            proc = subprocess.Popen(["bash", "-c", f"source .venv/bin/activate && exec {first}"], cwd=checkout,
                                    env=env_without_mlflow(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "eval step 10 " in line:
                    proc.send_signal(signal.SIGINT)
                    break
            rest = proc.communicate(timeout=300)[0]
            assert proc.returncode != 0, "".join(lines) + rest
            kill_group(proc)
        result = bash(runnable, checkout)
        assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}"
        if command == resume:
            assert re.search(r"resumed from step-0*10 at step 10 ", result.stdout), result.stdout[-2000:]
        if "--json" in command:  # one indented JSON object, printed last
            assert json.loads(result.stdout[result.stdout.index("{"):])["nll"] > 0, result.stdout[-2000:]


@pytest.mark.slow
def test_every_development_command_of_the_readme_runs(checkout):
    """pytest as written plus --collect-only (the suite cannot run inside itself): both marker
    selections are accepted and the second leaves the slow tests out; every benchmark as written
    plus --smoke (its smallest settings)."""
    collected = {}
    for command in commands(DEVELOPMENT):
        if command.startswith(".venv/bin/pytest"):
            result = bash(f"cd {REPO} && {command} --collect-only -q", checkout, timeout_s=600)  # writes nothing
            assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}"
            collected[command] = int(re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", result.stdout).group(1))
        else:
            assert command.startswith(".venv/bin/python bench/"), command
            result = bash(f"{command} --smoke", checkout)  # what it writes stays in the scratch folder
            assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}"
    whole, fast = (collected[c] for c in commands(DEVELOPMENT)[:2])
    assert 0 < fast < whole, collected


def test_the_sections_hold_the_commands_this_test_runs():
    local = [c for c in commands(STUDIES) if c not in commands(CLUSTER)]
    assert local[0] == "source .venv/bin/activate"
    assert any(c.startswith("python studies/lambda_sweep.py") for c in local)
    assert any(c.startswith("python mlflow/server.py") for c in local)
    assert commands(CLUSTER)[:3] == ['.venv/bin/pip install -e ".[cluster]"',
                                     "RAY_AUTH_MODE=token ray get-auth-token --generate", "ray up -y ray_cluster.yaml"]
    assert [c.split()[3] for c in commands(AFTER)] == ["export", "table", "reproduce", "plots", "best", "best"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A folder shaped like a fresh clone after the setup line: the project's files and `.venv`."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("studies", "analysis", "cvae_core", "mlflow", "bench", "ray_cluster.yaml", "pyproject.toml",
                 "README.md"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(VENV)
    return root


def bash(command: str, cwd: Path, timeout_s: int = 900, **env: str) -> subprocess.CompletedProcess:
    """`command` exactly as written, after the README's activation line."""
    full = env_without_mlflow(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), **env)
    return subprocess.run(["bash", "-c", f"source .venv/bin/activate && {command}"], cwd=cwd, env=full, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)


def shrink(command: str) -> str:
    if command.startswith(("python studies/", "python ~/cvae/studies/")):
        return f"{command} {SMALL_STUDY}"
    if command.startswith("python -m analysis best") and "--pareto" not in command:
        return f"{command} {QUICK_BEST}"
    return command


@pytest.mark.slow
def test_every_study_and_analysis_command_of_the_readme_runs_as_written(checkout):
    local = [c for c in commands(STUDIES) if c not in commands(CLUSTER) and c != "source .venv/bin/activate"]
    studies = [c for c in local if c.startswith("python studies/")]
    resume = [c for c in studies if "--resume" in c]
    server = [c for c in local if c.startswith("python mlflow/server.py")]
    assert len(resume) == 1 and len(server) == 1 and len(studies) + len(server) == len(local), local

    # --resume needs an interrupted study: the first other study is stopped with Ctrl-C (SIGINT)
    # after its first evaluation, then the README's --resume line continues it
    ordered = [c for c in studies if c not in resume and c != "python studies/lambda_sweep.py"]
    first = ordered.pop(0)
    env = env_without_mlflow(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(["bash", "-c", f"source .venv/bin/activate && exec {shrink(first)}"], cwd=checkout,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.match(r"^\[\s*\d+:\d\d\] eval ", line):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, "".join(lines) + rest
    kill_group(proc)
    for command in [resume[0], *ordered, "python studies/lambda_sweep.py"]:  # the default last: analysed below
        result = bash(shrink(command), checkout)
        assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}"
        assert "finished:" in result.stdout, result.stdout[-2000:]

    serve_mlflow_ui(f"source .venv/bin/activate && exec {server[0]}", checkout)

    for command in commands(AFTER):
        result = bash(shrink(command), checkout)
        assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}"
    assert (checkout / "runs.parquet").is_file() and (checkout / "reproduction.md").is_file()


def _ray_help(subcommand: str) -> str:
    result = subprocess.run([str(VENV / "bin" / "ray"), subcommand, "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_cluster_command_of_the_readme_is_accepted_offline(checkout):
    from studies.runner import build_parser
    from studies.spec import load_spec

    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for command in commands(CLUSTER):
        words = shlex.split(command.replace("$CVAE_HEAD_IP", "10.0.0.1"))
        if words[0] == ".venv/bin/pip":  # the extra exists, pins boto3, and what it pins imports here
            assert words[1:] == ["install", "-e", ".[cluster]"] and any(r.startswith("boto3==") for r in extras["cluster"])
            subprocess.run([sys.executable, "-c", "import boto3, ray.autoscaler._private.aws.node_provider"],
                           check=True, timeout=120)
            continue
        while "=" in words[0] and words[0].split("=", 1)[0].isupper():
            words = words[1:]  # VAR=value prefixes
        if words[0] == "ray":
            sub, rest = words[1], words[2:]
            text = _ray_help(sub)
            script = next((i for i, w in enumerate(rest) if w.endswith(".py")), len(rest))
            for flag in (w for w in rest[:script] if w.startswith("-")):
                assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", text, re.M), (command, flag)
            for path in (w for w in rest[:script + 1] if w.endswith((".yaml", ".py"))):
                assert (checkout / path).is_file(), (command, path)
            sweep_args = rest[script + 1:]
        else:
            assert words[0] == "python" and words[1] == "~/cvae/studies/lambda_sweep.py", command
            sweep_args = words[2:]
        if sweep_args:
            args = build_parser("lambda_sweep.py", "lambda_sweep", "").parse_args(sweep_args)
            load_spec(args.profile)


STUDY_LIFE = (REPO / "docs" / "study-life.md").read_text()


@pytest.mark.slow
def test_the_study_life_page_runs_as_written(checkout):
    """docs/study-life.md's sequence: the default study as a screen, a larger study warm-started
    from it, an extension, a comparison; each command as written (studies at a tiny budget)."""
    sequence = commands(STUDY_LIFE)
    assert sequence[0] == "source .venv/bin/activate"
    kinds = [c.split()[1] if c.startswith("python studies/") else c.split()[3] for c in sequence[1:]]
    assert kinds == ["studies/lambda_sweep.py"] * 3 + ["compare"], sequence
    for command in sequence[1:]:
        result = bash(shrink(command), checkout)
        assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}"
        if command.startswith("python studies/"):
            assert "finished:" in result.stdout and "Cost: " in result.stdout, result.stdout[-2000:]
    assert "Seeded from study screen (top=2" in (checkout / "studies_out" / "larger" / "summary.md").read_text()
    assert (checkout / "analysis-compare" / "screen-vs-larger" / "fronts.png").is_file()

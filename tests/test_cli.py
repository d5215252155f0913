"""The `cvae` command end to end, and its one-line errors for bad input."""
import json
import subprocess
import sys

import pytest

from cvae_core.cli import main
from conftest import TINY


def _tiny_args(data_dir):
    sets = [f"--set={k}={v}" for k, v in {**TINY, "train.steps": 10}.items()]
    return ["--dataset", "text", "--data-dir", str(data_dir), *sets]


def test_train_then_evaluate_prints_the_documented_json(tiny_data_dir, tmp_path, capsys):
    assert main(["train", "--preset", "coupled-vae", *_tiny_args(tiny_data_dir), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "best checkpoint:" in out and "eval step 10" in out
    ckpt = tmp_path / "run" / "checkpoints" / "best"
    assert main(["evaluate", str(ckpt), "--split", "test", "--n-samples", "3", "--mi-samples", "3", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # progress goes to stderr: stdout is the JSON alone
    assert "[evaluate] test likelihood (N=3): 60/60 sentences (100%)" in captured.err
    keys = {"nll", "kl", "ppl", "elbo", "mi_loo", "mi_batch", "au", "n_sentences", "n_tokens", "fingerprint", "rec"}
    assert set(result) == keys
    assert result["n_sentences"] == 60 and result["nll"] > result["kl"] > 0
    fp = result["fingerprint"]
    assert fp["split"] == "test" and fp["n_samples"] == 3 and fp["mi_samples"] == 3 and len(fp["md5"]) == 32


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("lm", "dae", "vae", "coupled-vae", "beta-vae", "coupled-beta-vae"):
        assert f"  {name} " in out


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cvae_core.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--set", "model.latent_size=3"], "unknown config key 'model.latent_size'"),
    (["train", "--set", "train.steps=many"], "config key 'train.steps' needs a int, got 'many'"),
    (["train", "--set", "train.steps=2.5"], "config key 'train.steps' needs a int"),
    (["train", "--set", "lambda_m=-1"], "coupling.lambda_m must be >= 0, got -1.0"),
    (["train", "--set", "coupling.distance=cosine"], "coupling.distance='cosine' is not one of rq, eucl"),
    (["train", "--set", "noequals"], "--set expects key=value"),
    (["train", "--dataset", "yahoo"], "needs data.data_dir=DIR"),
    (["evaluate", "/nonexistent/ckpt"], "checkpoint not found"),
])
def test_bad_input_gives_one_line_error_and_nonzero_exit(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvae: error: ") and message in lines[0], proc.stderr


def test_bad_data_files_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("train", "valid", "test"):
        (tmp_path / "empty" / f"{name}.txt").write_text("\n")
    (tmp_path / "binary").mkdir()
    for name in ("train", "valid", "test"):
        (tmp_path / "binary" / f"{name}.txt").write_bytes(b"ok\n\xff\xfe bad\n")
    cases = [(tmp_path / "empty", "is empty"), (tmp_path / "binary", "line 2 is not valid UTF-8"),
             (tmp_path / "missing", "data file not found")]
    for folder, message in cases:
        proc = _run("train", "--dataset", "text", "--data-dir", str(folder))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr


def test_corrupted_checkpoint_via_cli(tiny_data_dir, tmp_path):
    assert main(["train", "--preset", "vae", *_tiny_args(tiny_data_dir), "--out", str(tmp_path / "run")]) == 0
    ckpt = (tmp_path / "run" / "checkpoints" / "best").resolve()
    (ckpt / "weights.pt").write_bytes(b"garbage")
    proc = _run("evaluate", str(ckpt))
    assert proc.returncode == 2 and "corrupted: weights.pt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_reader_that_goes_away_is_not_a_traceback():
    """`cvae presets | head -1`: the pipe closes before cvae writes; it exits quietly, as a shell tool does."""
    proc = subprocess.Popen([sys.executable, "-m", "cvae_core.cli", "presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipeError" not in err, err

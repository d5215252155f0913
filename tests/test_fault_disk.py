"""Fault scenario: the disk fills up (a small tmpfs, mounted for the test; root only) between two
checkpoints. Writing the next checkpoint fails with one clear error naming its path, no partial
checkpoint is left, the previous one stays intact and loadable, and once space is freed the run
resumes from it and finishes."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cvae_core.checkpoint import load_checkpoint
from cvae_core.errors import CvaeError
from cvae_core.train import train


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(small_disk, tiny_config):
    config = tiny_config("coupled-vae", **{"train.steps": 20, "train.eval_every": 10})
    out = small_disk / "run"
    filled: list[Path] = []

    def fill_after_first_checkpoint(metrics, checkpoint):
        if not filled:
            filled.append(_fill(small_disk))

    with pytest.raises(CvaeError) as error:
        train(config, out, callbacks=[fill_after_first_checkpoint], log=lambda text: None)
    message = str(error.value)
    assert message.startswith(f"cannot write checkpoint {out / 'checkpoints' / 'step-0000020'}: No space left")
    assert "\n" not in message
    ckpt_root = out / "checkpoints"
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["best", "latest", "step-0000010"]  # no partial one
    assert (ckpt_root / "latest").resolve().name == "step-0000010"
    assert load_checkpoint(ckpt_root / "latest").state["step"] == 10

    filled[0].unlink()
    result = train(config, out, resume=True, log=lambda text: None)
    assert result.steps == 20 and [int(m["step"]) for m in result.history] == [10, 20]

"""Fault scenario: the disk fills up (a small tmpfs, mounted for the test; root only).

* In the core, between two checkpoints: writing the next checkpoint fails with one clear error
  naming its path, no partial checkpoint is left, the previous one stays intact and loadable,
  and once space is freed the run resumes from it and finishes.
* Under a study (real local Ray, SQLite MLflow): the driver stops the study as Ctrl-C would,
  before Ray's own writes fail, says why and how to continue; once space is freed, ``--resume``
  finishes every trial into its own MLflow run with a gap-free history."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from cvae_core.checkpoint import load_checkpoint
from cvae_core.errors import CvaeError
from cvae_core.train import train


@contextlib.contextmanager
def _tmpfs(mount_point: Path, size: str):
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    with _tmpfs(tmp_path / "small_disk", "8m") as mount_point:
        yield mount_point


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


def _leave_free_once_a_checkpoint_exists(disk: Path, free_mb: int, filled: list[Path], stop: threading.Event):
    """Once Tune has stored a trial checkpoint, take all but ``free_mb`` of the disk."""
    while not stop.is_set():
        if any(disk.rglob("checkpoint_0*")):
            filler = disk / "filler"
            with open(filler, "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(disk).free - free_mb * 1024**2)
            filled.append(filler)
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_a_study_on_a_filling_disk_stops_resumably_and_resume_finishes_it(tmp_path, capsys):
    from mlflow import MlflowClient
    from test_fault_divergence import tiny_spec

    from studies.record import Tag
    from studies.runner import EXIT_DISK_FULL, Options, run_study
    from studies.tracking import child_runs

    spec = tiny_spec(tmp_path / "disk.yaml", [{"preset": "vae"}, {"preset": "vae", "train.seed": 1}], steps=60)
    # ASHA never stops a trial here (its only rung is the last evaluation): which of two concurrent
    # trials reaches a rung first is a race, and this test is about both finishing after the resume
    raw = yaml.safe_load(spec.read_text())
    raw["scheduler"]["grace_period"] = 6
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with _tmpfs(tmp_path / "disk", "160m") as disk:
        root = disk / "out"
        filled: list[Path] = []
        stop = threading.Event()
        filler = threading.Thread(target=_leave_free_once_a_checkpoint_exists, args=(disk, 40, filled, stop),
                                  daemon=True)
        filler.start()
        try:
            first = run_study(Options(profile=str(spec), root=str(root), tracking_uri=uri, study_name="disk",
                                      min_free_mb=100))
        finally:
            stop.set()
            filler.join(timeout=10)
        out = capsys.readouterr().out
        assert filled, "the disk was never filled: " + out[-2000:]
        assert first.exit_code == EXIT_DISK_FULL and first.interrupted, out[-3000:]
        assert f"Stopped: {root} has " in out and "MB free (a study stops below --min-free-mb 100)" in out, out[-1500:]
        assert "Free space, then continue with: " in out and "--resume disk" in out
        state = json.loads((root / "disk" / "study.json").read_text())
        assert state["status"] == "interrupted" and not list((root / "disk").glob("*.tmp"))
        for path in (root / "ray_results" / "disk").glob("experiment_state-*.json"):
            json.loads(path.read_text())  # complete, so that --resume can read it

        # a resume on the still-full disk is refused in one line, before anything starts
        from studies.options import StudyError

        with pytest.raises(StudyError, match=r"^not enough disk space: .* MB free"):
            run_study(Options(profile=str(spec), root=str(root), tracking_uri=uri, resume="disk", min_free_mb=100))

        filled[0].unlink()
        second = run_study(Options(profile=str(spec), root=str(root), tracking_uri=uri, resume="disk",
                                   min_free_mb=100))
        out = capsys.readouterr().out
        assert second.exit_code == 0 and not second.interrupted, out[-3000:]
        assert sorted(r.status for r in second.rows) == ["done", "done"], second.rows

    client = MlflowClient(uri)
    runs = child_runs(client, state["experiment_id"], state["parent_run_id"])
    assert len(runs) == 2 and len({r.data.tags[Tag.TRIAL_ID] for r in runs}) == 2
    assert any(r.data.tags[Tag.RESUMED_FROM_STEP] != "none" for r in runs)  # continued, not restarted
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_nll")]
        assert steps == [10, 20, 30, 40, 50, 60], steps

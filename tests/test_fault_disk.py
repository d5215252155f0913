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
from pathlib import Path

import pytest
import yaml
from ray import tune

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


def _fill(folder: Path, name: str = "filler") -> Path:
    filler = folder / name
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


class FillAtFirstCheckpoint(tune.Callback):
    """A Tune callback (the study runs it before its disk guard) that, when Tune reports the study's
    first trial checkpoint, takes all but ``free_mb`` of the disk: the fault comes at an event the
    study exposes, not after a wait. ``done`` (a file outside the disk) makes it fill once only,
    also when ``--resume`` restores the callback with the rest of Tune's run config."""

    def __init__(self, disk: Path, free_mb: int, done: Path):
        self.disk, self.free_mb, self.done = disk, free_mb, done

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.done.exists():
            return
        with open(self.disk / "filler", "wb") as handle:
            free = shutil.disk_usage(self.disk).free - self.free_mb * 1024**2
            if free > 0:
                os.posix_fallocate(handle.fileno(), 0, free)
        if self.free_mb == 0:
            _fill(self.disk, "filler-rest")  # what fallocate's rounding left
        self.done.touch()


def _study_spec(tmp_path: Path) -> Path:
    from test_fault_divergence import tiny_spec

    spec = tiny_spec(tmp_path / "disk.yaml", [{"preset": "vae"}, {"preset": "vae", "train.seed": 1}], steps=60)
    # ASHA never stops a trial here (its only rung is the last evaluation): which of two concurrent
    # trials reaches a rung first is a race, and this test is about both finishing after the resume
    raw = yaml.safe_load(spec.read_text())
    raw["scheduler"]["grace_period"] = 6
    spec.write_text(yaml.safe_dump(raw))
    return spec


@pytest.mark.slow
@pytest.mark.parametrize("free_mb", [40, 0], ids=["below-the-limit", "filled-at-once"])
def test_a_study_on_a_filling_disk_stops_resumably_and_resume_finishes_it(tmp_path, capsys, free_mb):
    from mlflow import MlflowClient

    from studies.options import StudyError
    from studies.record import Tag
    from studies.runner import EXIT_DISK_FULL, Options, run_study
    from studies.tracking import child_runs

    spec = _study_spec(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with _tmpfs(tmp_path / "disk", "160m") as disk:
        root = disk / "out"
        filler = FillAtFirstCheckpoint(disk, free_mb, done=tmp_path / "filled")
        first = run_study(Options(profile=str(spec), root=str(root), tracking_uri=uri, study_name="disk",
                                  min_free_mb=100, callbacks=(filler,)))
        out, err = capsys.readouterr()
        assert (tmp_path / "filled").exists(), "the disk was never filled: " + out[-2000:]
        assert first.exit_code == EXIT_DISK_FULL and first.interrupted, out[-3000:]
        assert f"Stopped: {root} has " in out and "MB free (a study stops below --min-free-mb 100)" in out, out[-1500:]
        assert "Free space, then continue with: " in out and "--resume disk" in out
        assert "Traceback" not in out + err and "Tuner.restore" not in out + err, err[-3000:]
        state = json.loads((root / "disk" / "study.json").read_text())
        assert state["status"] == "interrupted" and not list((root / "disk").glob("*.tmp"))
        for path in (root / "ray_results" / "disk").glob("experiment_state-*.json"):
            json.loads(path.read_text())  # complete, so that --resume can read it

        # a resume on the still-full disk is refused in one line, before anything starts
        with pytest.raises(StudyError, match=r"^not enough disk space: .* MB free"):
            run_study(Options(profile=str(spec), root=str(root), tracking_uri=uri, resume="disk", min_free_mb=100))

        for path in disk.glob("filler*"):
            path.unlink()
        second = run_study(Options(profile=str(spec), root=str(root), tracking_uri=uri, resume="disk",
                                   min_free_mb=100))
        out = capsys.readouterr().out
        assert second.exit_code == 0 and not second.interrupted, out[-3000:]
        assert sorted(r.status for r in second.rows) == ["done", "done"], second.rows
        assert sorted(r.seed for r in second.rows) == [0, 1]  # the baselines' own seeds
        assert not list(disk.rglob(".disk_reserve*"))  # the space set aside is given back at the end

    client = MlflowClient(uri)
    runs = child_runs(client, state["experiment_id"], state["parent_run_id"])
    assert len(runs) == 2 and len({r.data.tags[Tag.TRIAL_ID] for r in runs}) == 2
    assert any(r.data.tags[Tag.RESUMED_FROM_STEP] != "none" for r in runs)  # continued, not restarted
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_nll")]
        assert steps == [10, 20, 30, 40, 50, 60], steps

"""The training loop's divergence check: found on the device every step, read at log lines."""
import pytest
import torch

from cvae_core.errors import Diverged
from cvae_core.objectives import Objective
from cvae_core.train import train


def test_a_non_finite_loss_names_its_first_step_and_writes_no_checkpoint(tiny_config, tmp_path, monkeypatch):
    original = Objective.__call__

    def loss_nan_from_step_7(self, model, output, step):
        loss, parts = original(self, model, output, step)
        return (loss * torch.nan if step >= 7 else loss), parts

    monkeypatch.setattr(Objective, "__call__", loss_nan_from_step_7)
    config = tiny_config("coupled-vae", **{"train.steps": 30, "train.log_every": 10, "train.eval_every": 20})
    lines = []
    with pytest.raises(Diverged, match=r"^diverged at step 7: loss is nan \(coupled-vae\)"):
        train(config, tmp_path / "run", log=lines.append)
    # read at the first log line after it (step 10), before any evaluation could use NaN weights
    assert not any(line.startswith(("step 10/", "eval step")) for line in lines), lines
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_a_run_that_stays_finite_is_not_stopped(tiny_config, tmp_path):
    config = tiny_config("vae", **{"train.steps": 12, "train.log_every": 5, "train.eval_every": 12})
    result = train(config, tmp_path / "run", log=lambda _: None)
    assert result.steps == 12 and result.history[-1]["step"] == 12.0

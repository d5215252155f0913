"""The checkpoint and preset questions the study service and the analysis ask the core."""
import json
import math
import shutil

import pytest
import torch

from cvae_core import (PRESETS, StopTraining, build_config, checkpoint_step, is_checkpoint, load_checkpoint,
                       preset_coupling, read_config, train)
from cvae_core.checkpoint import TrainState, has_checkpoint_files, read_state
from cvae_core.config import DATASETS
from cvae_core.errors import CvaeError


def _quiet(_):
    pass


def _stop(metrics, path):
    raise StopTraining


def _without_timing(history):
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in history]


def test_resume_from_a_foreign_checkpoint_dir_equals_resume_true(tiny_config, tmp_path):
    config = tiny_config("coupled-vae", **{"train.steps": 30, "train.eval_every": 10})
    train(config, tmp_path / "first", callbacks=[_stop], log=_quiet)
    # a copy outside any run tree, as Ray hands back a trial checkpoint on a retry
    foreign = tmp_path / "ray" / "checkpoint_000000"
    shutil.copytree(tmp_path / "first" / "checkpoints" / "latest", foreign)
    shutil.copytree(tmp_path / "first", tmp_path / "second", symlinks=True)
    lines = []
    by_path = train(config, tmp_path / "fresh", resume_from=foreign, log=lines.append)
    by_flag = train(config, tmp_path / "second", resume=True, log=_quiet)
    assert any("resumed from step-0000010 at step 10" in line for line in lines)
    assert by_path.steps == by_flag.steps == 30
    assert _without_timing(by_path.history) == _without_timing(by_flag.history)
    assert by_path.history[1]["train_loss"] == by_flag.history[1]["train_loss"]  # the next steps' loss
    wa = load_checkpoint(tmp_path / "fresh" / "checkpoints" / "latest").weights
    wb = load_checkpoint(tmp_path / "second" / "checkpoints" / "latest").weights
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert by_path.best_checkpoint is not None and is_checkpoint(by_path.best_checkpoint)
    assert foreign.is_dir() and checkpoint_step(foreign) == 10  # the source is copied, never moved


def test_resume_from_replaces_a_stale_tree(tiny_config, tmp_path):
    """A retry on the same node: the run's own tree is further on than the checkpoint handed back."""
    config = tiny_config("vae", **{"train.steps": 20, "train.eval_every": 10})
    foreign = tmp_path / "handed-back"

    def keep_the_first(metrics, path):
        if not foreign.exists():
            shutil.copytree(path, foreign)

    train(config, tmp_path / "run", callbacks=[keep_the_first], log=_quiet)
    result = train(config, tmp_path / "run", resume_from=foreign, log=_quiet)
    assert result.steps == 20 and [m["step"] for m in result.history] == [10.0, 20.0]
    assert checkpoint_step(tmp_path / "run" / "checkpoints" / "latest") == 20


def test_resume_from_refuses_a_directory_that_is_no_checkpoint(tiny_config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CvaeError, match="not a checkpoint directory"):
        train(tiny_config("vae", **{"train.steps": 10}), tmp_path / "run", resume_from=tmp_path / "empty",
              log=_quiet)
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_is_checkpoint_read_config_and_step(tiny_config, tmp_path):
    config = tiny_config("vae", **{"train.steps": 10, "coupling.lambda_m": 0.3})
    train(config, tmp_path / "run", log=_quiet)
    ckpt = tmp_path / "run" / "checkpoints" / "latest"
    assert is_checkpoint(ckpt)
    assert read_config(ckpt) == config
    assert checkpoint_step(ckpt) == 10
    assert has_checkpoint_files(p.name for p in ckpt.iterdir())
    assert not is_checkpoint(tmp_path / "missing")
    assert not is_checkpoint(tmp_path / "run")  # the run directory, not a checkpoint
    assert not is_checkpoint(ckpt / "weights.pt")  # a file
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "weights.pt").unlink()
    assert not is_checkpoint(broken)
    assert not has_checkpoint_files(p.name for p in broken.iterdir())
    (broken / "weights.pt").write_bytes(b"")
    (broken / "manifest.json").write_text("{not json")
    assert not is_checkpoint(broken)
    with pytest.raises(CvaeError, match="not a checkpoint directory"):
        read_config(broken)


def test_read_config_names_a_bad_config(tiny_config, tmp_path):
    train(tiny_config("vae", **{"train.steps": 10}), tmp_path / "run", log=_quiet)
    ckpt = tmp_path / "bad"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "latest", ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["coupling"]["distance"] = "manhattan"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CvaeError, match=r"checkpoint .*bad.*coupling.distance"):
        read_config(ckpt)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_coupling_equals_the_built_configs(preset, tmp_path):
    runs_on = 0
    for dataset in DATASETS:
        try:
            built = build_config(preset, dataset, "quick", {"data.data_dir": str(tmp_path)})
        except CvaeError:  # a preset that does not run on this dataset (a dialogue model on PTB, ...)
            with pytest.raises(CvaeError, match=f"preset '{preset}' does not run on dataset '{dataset}'"):
                preset_coupling(preset, dataset)
            continue
        runs_on += 1
        assert preset_coupling(preset, dataset) == built.coupling, (preset, dataset)
    assert runs_on >= 3


def test_preset_coupling_values_and_errors():
    assert preset_coupling("coupled-vmf-vae", "yahoo").lambda_m == 5.0
    assert preset_coupling("coupled-vmf-vae", "text").lambda_m == 7.5  # PTB's, like build_config
    assert not preset_coupling("vae", "ptb").enabled
    with pytest.raises(CvaeError, match="unknown preset 'nope'"):
        preset_coupling("nope", "ptb")
    with pytest.raises(CvaeError, match="unknown dataset 'mnist'"):
        preset_coupling("vae", "mnist")


def test_every_evaluation_says_which_is_the_best(tiny_config, tmp_path):
    from cvae_core.metrics.names import BEST_STEP, IS_BEST, best_key, selection_metric

    for preset in ("vae", "dae"):
        config = tiny_config(preset, **{"train.steps": 30, "train.eval_every": 10})
        result = train(config, tmp_path / preset, log=_quiet)
        key = selection_metric(config.model.kind)
        assert key == ("val_rec" if preset == "dae" else "val_nll") == result.selection_metric
        lowest = min(result.history, key=lambda m: m[key])
        assert result.best_step == lowest["step"] == result.history[-1][BEST_STEP]
        assert result.history[-1][best_key(config.model.kind)] == lowest[key]
        assert [m[IS_BEST] for m in result.history] == [
            float(m[key] < min([math.inf] + [p[key] for p in result.history[:i]]))
            for i, m in enumerate(result.history)]
        assert read_state(result.best_checkpoint).step == result.best_step


def test_an_old_state_json_still_reads():
    """state.json as written before the loop state was typed: no history, no Lagging keys."""
    old = {"step": 40, "epoch": 2, "batch_index": 7, "best_value": 101.5, "best_step": 30,
           "metrics": {"step": 40.0}}
    state = TrainState.from_json(old)
    assert (state.step, state.epoch, state.batch_index, state.best_value, state.best_step) == (40, 2, 7, 101.5, 30)
    assert state.history == [] and state.aggressive is None and state.previous_mi is None
    lagging = TrainState.from_json({**old, "history": [{"step": 40.0}], "aggressive": False, "previous_mi": 0.9})
    assert lagging.aggressive is False and lagging.previous_mi == 0.9
    assert lagging.to_json()["metrics"] == {"step": 40.0} and "aggressive" not in state.to_json()

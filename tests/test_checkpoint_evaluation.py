"""Evaluation-only checkpoints (what a study uploads to MLflow): no optimizer or RNG state,
loadable like a full checkpoint, refused for resuming with a clear one-line error."""
import json
import shutil

import pytest
import torch

from cvae_core import is_checkpoint, load_checkpoint, load_model, read_config, read_state, train
from cvae_core.checkpoint import (EVALUATION_FILES, MANIFEST, export_for_evaluation, has_checkpoint_files,
                                  install_checkpoint, is_resumable)
from cvae_core.errors import CvaeError


def _quiet(_):
    pass


@pytest.fixture
def full(tiny_config, tmp_path):
    """A full checkpoint from a short real run (Adam: optimizer.pt holds two moments per weight)."""
    config = tiny_config("coupled-vae", **{"train.steps": 10})
    return train(config, tmp_path / "run", log=_quiet).best_checkpoint


def _bytes(directory):
    return sum(p.stat().st_size for p in directory.iterdir())


def test_export_holds_exactly_the_evaluation_files_and_loads_like_the_full_one(full, tmp_path):
    exported = export_for_evaluation(full, tmp_path / "eval")
    assert sorted(p.name for p in exported.iterdir()) == sorted([*EVALUATION_FILES, MANIFEST])
    assert sorted(json.loads((exported / MANIFEST).read_text())) == sorted(EVALUATION_FILES)
    assert is_checkpoint(exported) and has_checkpoint_files(p.name for p in exported.iterdir())
    assert is_resumable(full) and not is_resumable(exported)
    assert read_config(exported) == read_config(full) and read_state(exported).step == read_state(full).step == 10
    data = load_checkpoint(exported)
    assert data.optimizer is None and data.rng is None and not data.resumable
    assert load_checkpoint(full).resumable
    model, config, vocab = load_model(exported)
    reference, _, reference_vocab = load_model(full)
    assert config == read_config(full) and vocab.itos == reference_vocab.itos
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    # optimizer.pt (Adam's two moments) and rng.pt were most of the bytes
    assert _bytes(exported) < 0.45 * _bytes(full)
    assert export_for_evaluation(exported, tmp_path / "again").is_dir()  # an evaluation-only source too
    assert not list(tmp_path.glob(".tmp-*"))


def test_resuming_from_an_evaluation_only_checkpoint_says_where_the_full_one_is(full, tiny_config, tmp_path):
    exported = export_for_evaluation(full, tmp_path / "eval")
    config = tiny_config("coupled-vae", **{"train.steps": 20})
    with pytest.raises(CvaeError, match=r"evaluation-only .*cannot resume training.*Ray's results folder") as info:
        train(config, tmp_path / "resumed", resume_from=exported, log=_quiet)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # nothing installed
    with pytest.raises(CvaeError, match="evaluation-only"):
        install_checkpoint(exported, tmp_path / "tree")


def test_a_full_checkpoint_missing_a_listed_resume_file_is_incomplete(full, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    (broken / "optimizer.pt").unlink()  # still listed in its manifest
    assert not is_checkpoint(broken)
    with pytest.raises(CvaeError, match="incomplete: optimizer.pt is missing"):
        load_checkpoint(broken)
    with pytest.raises(CvaeError, match="not a checkpoint directory"):
        read_state(broken)


def test_files_the_manifest_does_not_list_are_ignored_and_listed_ones_checked(full, tmp_path):
    exported = export_for_evaluation(full, tmp_path / "eval")
    # an MLflow checkpoint/ folder that a full upload of an older version filled first keeps its
    # optimizer.pt and rng.pt when an evaluation-only copy replaces the rest file by file
    for name in ("optimizer.pt", "rng.pt"):
        shutil.copyfile(full / name, exported / name)
    assert not is_resumable(exported) and load_checkpoint(exported).optimizer is None
    (exported / "weights.pt").unlink()
    assert not is_checkpoint(exported)
    with pytest.raises(CvaeError, match="incomplete: weights.pt is missing"):
        load_checkpoint(exported)


def test_export_refuses_a_corrupted_source_and_an_existing_target_leaving_nothing(full, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(full, source)
    weights = source / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CvaeError, match="corrupted: weights.pt does not match its checksum"):
        export_for_evaluation(source, tmp_path / "eval")
    assert not (tmp_path / "eval").exists() and not list(tmp_path.glob(".tmp-*"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(CvaeError, match="already exists"):
        export_for_evaluation(full, tmp_path / "taken")
    with pytest.raises(CvaeError, match="checkpoint not found"):
        export_for_evaluation(tmp_path / "nowhere", tmp_path / "eval")

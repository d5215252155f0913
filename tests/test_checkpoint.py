"""Checkpoint round trip, atomic layout, safe loading, and exact resume on CPU."""
import json

import pytest
import torch

from cvae_core.checkpoint import load_checkpoint, load_model
from cvae_core.errors import CvaeError
from cvae_core.train import StopTraining, learning_rate, train


def _quiet(_):
    pass


def test_checkpoint_round_trip(tiny_config, tmp_path):
    config = tiny_config("coupled-vae", **{"train.steps": 10})
    result = train(config, tmp_path / "run", log=_quiet)
    best = tmp_path / "run" / "checkpoints" / "best"
    assert best.is_symlink() and result.best_checkpoint == best.resolve()
    names = sorted(p.name for p in result.best_checkpoint.iterdir())
    assert names == ["config.json", "manifest.json", "optimizer.pt", "rng.pt", "state.json", "vocab.json", "weights.pt"]
    model, loaded_config, vocab = load_model(best)
    assert loaded_config.to_dict() == config.to_dict()
    data = load_checkpoint(best)
    assert data.state["step"] == 10 and data.state["batch_index"] > 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, data.weights[name])
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # nothing half-written left


def test_corrupted_checkpoint_is_refused_with_a_clear_error(tiny_config, tmp_path):
    train(tiny_config("vae", **{"train.steps": 10}), tmp_path / "run", log=_quiet)
    ckpt = (tmp_path / "run" / "checkpoints" / "best").resolve()
    weights = ckpt / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CvaeError, match="corrupted: weights.pt does not match its checksum"):
        load_checkpoint(ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CvaeError, match="manifest.json is missing"):
        load_checkpoint(ckpt)
    with pytest.raises(CvaeError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_pickled_code_in_a_checkpoint_is_not_executed(tiny_config, tmp_path):
    """weights_only=True: a checkpoint whose manifest was forged still cannot run code."""
    import hashlib
    import os

    train(tiny_config("vae", **{"train.steps": 10}), tmp_path / "run", log=_quiet)
    ckpt = (tmp_path / "run" / "checkpoints" / "best").resolve()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, ckpt / "rng.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["rng.pt"] = hashlib.sha256((ckpt / "rng.pt").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CvaeError, match="cannot be read"):
        load_checkpoint(ckpt)
    assert not (tmp_path / "pwned").exists()


def test_resume_reproduces_the_uninterrupted_run(tiny_config, tmp_path):
    config = tiny_config("coupled-vae", **{"train.steps": 30, "train.eval_every": 10, "model.dropout": 0.2})
    straight = train(config, tmp_path / "straight", log=_quiet)

    def stop_at_first_eval(metrics, path):
        raise StopTraining

    interrupted = train(config, tmp_path / "resumed", callbacks=[stop_at_first_eval], log=_quiet)
    assert interrupted.steps == 10
    resumed = train(config, tmp_path / "resumed", resume=True, log=_quiet)
    assert resumed.steps == 30
    a = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in straight.history]
    b = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in resumed.history]
    assert a == b  # identical metrics at steps 10, 20, 30, to the last bit
    wa = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest").weights
    wb = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest").weights
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_different_config(tiny_config, tmp_path):
    train(tiny_config("vae", **{"train.steps": 10}), tmp_path / "run", log=_quiet)
    with pytest.raises(CvaeError, match="differs in coupling.lambda_m"):
        train(tiny_config("vae", **{"train.steps": 20, "coupling.lambda_m": 5.0}), tmp_path / "run",
              resume=True, log=_quiet)


def test_learning_rate_schedule_halves_every_2k_after_30k():
    from cvae_core.config import build_config

    config = build_config("vae", "ptb", "paper")
    assert learning_rate(config, 1) == 1e-3
    assert learning_rate(config, 32000) == 1e-3  # first halving happens after step 32K
    assert learning_rate(config, 32001) == 5e-4
    assert learning_rate(config, 60000) == pytest.approx(1e-3 * 0.5**14)
    assert learning_rate(config, 60001) == pytest.approx(1e-3 * 0.5**15)  # 15 halvings by 60K

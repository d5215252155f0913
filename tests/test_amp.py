"""bf16 autocast (train.amp) on CUDA and on CPUs with bf16 matrix units; a machine without them
refuses it in one line, before loading data (emulated bf16 is many times slower than fp32)."""
import pytest
import torch

from cvae_core.data import load_corpus
from cvae_core.data.batching import make_batch
from cvae_core.errors import CvaeError
from cvae_core.models import build_model
from cvae_core.objectives import Objective
from cvae_core.runtime import bf16_autocast, bf16_matmul_units
from cvae_core.train import train

CPU = torch.device("cpu")


def test_train_with_amp_runs_where_the_cpu_has_bf16_units_and_is_refused_where_not(tiny_config, tmp_path):
    config = tiny_config(**{"train.amp": True, "train.device": "cpu"})
    if bf16_matmul_units(CPU):
        result = train(config, tmp_path / "run")
        assert result.steps == config.train.steps
        assert all(torch.isfinite(torch.tensor(result.last_metrics[key])) for key in ("val_nll", "val_kl"))
    else:
        with pytest.raises(CvaeError, match=r"^train.amp=true needs bf16 matrix units, which this CPU \(no "
                                            r"amx_bf16 or avx512_bf16 flag\) lacks"):
            train(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()  # nothing written


def test_without_amp_the_context_changes_nothing():
    with bf16_autocast(CPU, enabled=False):
        assert not torch.is_autocast_enabled("cpu")


def test_a_training_step_under_bf16_autocast_is_close_to_fp32(tiny_config):
    """What train.amp runs: forward and loss under autocast (emulated here if the CPU lacks the
    units), the loss fp32 and within bf16 rounding of the fp32 loss, finite fp32 gradients."""
    config = tiny_config("coupled-vae")
    corpus = load_corpus(config.data, ("train",))
    batch = make_batch(corpus["train"].examples[:8])
    torch.manual_seed(0)
    model = build_model(config, len(corpus.vocab))
    objective = Objective(config)
    torch.manual_seed(1)  # the same posterior noise in both passes
    fp32_loss, _ = objective(model, model(batch), 50)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = objective(model, model(batch), 50)
    assert loss.dtype == torch.float32
    assert loss.item() != fp32_loss.item()  # the matmuls did run in bf16
    assert abs(loss.item() - fp32_loss.item()) < 0.02 * abs(fp32_loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

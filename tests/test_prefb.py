"""PreFB: the DAE stage, what it initialises, re-entrance, and its one-line errors."""
import shutil

import pytest
import torch

from cvae_core.checkpoint import load_checkpoint
from cvae_core.data import load_corpus
from cvae_core.errors import CvaeError
from cvae_core.models import build_model
from cvae_core.prefb import pretraining_config
from cvae_core.train import train


def test_pretraining_config_is_a_dae_with_the_same_sizes(tiny_config):
    config = tiny_config("coupled-prefb-vae", **{"train.pretrain_steps": 7})
    dae = pretraining_config(config)
    assert dae.model.kind == "dae" and not dae.coupling.enabled and dae.train.steps == 7
    assert dae.train.pretrain_steps == 0 and dae.data == config.data
    assert (dae.model.embed_dim, dae.model.hidden_dim, dae.model.latent_dim) == (16, 16, 4)


def test_dae_initialises_embedding_encoder_and_mean_head_only(tiny_config, tmp_path):
    dae_config = tiny_config("dae", **{"train.steps": 4, "train.eval_every": 4})
    dae_run = train(dae_config, tmp_path / "dae", log=lambda _: None)
    dae = load_checkpoint(dae_run.best_checkpoint).weights
    config = tiny_config("coupled-prefb-vae", **{"train.pretrain_steps": 0})
    corpus = load_corpus(config.data, ("train",))
    model = build_model(config, len(corpus.vocab))
    fresh = {name: p.detach().clone() for name, p in model.named_parameters()}
    copied = model.base.init_encoder_from_dae(dae)
    assert torch.equal(model.base.embedding.weight, dae["embedding.weight"])
    assert torch.equal(model.base.encoder.gru.weight_hh_l0_reverse, dae["encoder.gru.weight_hh_l0_reverse"])
    assert torch.equal(model.base.head.mean.weight, dae["code.weight"])
    assert len(copied) == 1 + 8 + 2  # embedding, both GRU directions (4 tensors each), code layer
    for name, p in model.named_parameters():
        if name.startswith(("base.head.log_std", "base.signal", "base.decoder.gru", "twin_")):
            assert torch.equal(p, fresh[name]), name  # coupled: only the stochastic mean head is initialised


def test_one_command_pretrains_then_trains_and_reuses_a_finished_stage(tiny_config, tmp_path):
    config = tiny_config("prefb-vae", **{"train.pretrain_steps": 6, "train.steps": 6, "train.eval_every": 6})
    lines = []
    first = train(config, tmp_path / "a", log=lines.append)
    assert (tmp_path / "a" / "pretrain" / "checkpoints" / "best").exists()
    assert any(line.startswith("[pretrain] eval step 6") for line in lines)
    assert any("PreFB stage 2" in line for line in lines)
    # a second run that finds the finished stage reuses it (no pretraining steps) and is identical
    shutil.copytree(tmp_path / "a" / "pretrain", tmp_path / "b" / "pretrain", symlinks=True)
    lines = []
    second = train(config, tmp_path / "b", log=lines.append)
    assert not any(line.startswith("[pretrain] eval step") for line in lines)
    strip = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in first.history]
    assert strip == [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in second.history]


def test_init_from_names_a_dae_checkpoint(tiny_config, tmp_path):
    vae_run = train(tiny_config("vae", **{"train.steps": 2, "train.eval_every": 2}), tmp_path / "vae",
                    log=lambda _: None)
    config = tiny_config("prefb-vae", **{"train.init_from": str(vae_run.best_checkpoint), "train.steps": 2})
    with pytest.raises(CvaeError, match="is a 'vae' checkpoint; PreFB needs a DAE"):
        train(config, tmp_path / "run", log=lambda _: None)
    dae_run = train(tiny_config("dae", **{"train.steps": 2, "train.eval_every": 2, "model.latent_dim": 6}),
                    tmp_path / "dae", log=lambda _: None)
    config = tiny_config("prefb-vae", **{"train.init_from": str(dae_run.best_checkpoint), "train.steps": 2})
    with pytest.raises(CvaeError, match=r"code.weight has shape \(6, 32\), this model needs \(4, 32\)"):
        train(config, tmp_path / "run2", log=lambda _: None)


def test_pretraining_needs_a_gaussian_vae(tiny_config):
    with pytest.raises(CvaeError, match="PreFB encoder pretraining"):
        tiny_config("vae", **{"train.pretrain_steps": 5, "model.posterior": "vmf"})

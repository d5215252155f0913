"""Lagging-VAE: encoder-only inner updates, the stopping rules, the MI switch, exact resume."""
import importlib

import pytest
import torch

from cvae_core.checkpoint import load_checkpoint
from cvae_core.data import load_corpus, make_batch
from cvae_core.errors import CvaeError
from cvae_core.models import build_model
from cvae_core.objectives import Objective
from cvae_core.lagging import aggressive_encoder_updates, parameter_groups
from cvae_core.train import StopTraining, train


train_module = importlib.import_module("cvae_core.train")  # the module, not the function cvae_core.train


def _quiet(_):
    pass


@pytest.fixture
def setup(tiny_config):
    def make(preset="coupled-lagging-vae", **overrides):
        config = tiny_config(preset, **overrides)
        corpus = load_corpus(config.data, ("train",))
        model = build_model(config, len(corpus.vocab))
        optimizer = torch.optim.Adam(parameter_groups(model, config), lr=1e-2)
        batches = [make_batch(corpus["train"].examples[i : i + 8]) for i in range(0, 80, 8)]
        return config, model, optimizer, batches

    return make


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_two_groups_split_inference_network_from_the_rest(setup):
    config, model, optimizer, _ = setup()
    encoder_side, decoder_side = (group["params"] for group in optimizer.param_groups)
    ids = [id(p) for p in encoder_side + decoder_side]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # each parameter once
    assert any(p is model.base.encoder.gru.weight_ih_l0 for p in encoder_side)
    assert any(p is model.twin_head.mean.weight for p in encoder_side)
    assert any(p is model.base.embedding.weight for p in decoder_side)  # shared with the decoders


def test_inner_loop_updates_the_encoder_only(setup):
    config, model, optimizer, batches = setup(**{"train.aggressive_max_inner": 6, "train.aggressive_window": 3})
    before = _snapshot(model)
    draws = iter(batches[1:])
    inner = aggressive_encoder_updates(model, Objective(config), optimizer, batches[0], lambda: next(draws), 5, config)
    assert 3 <= inner <= 6
    encoder_names = {name for name, p in model.named_parameters()
                     if any(p is q for q in optimizer.param_groups[0]["params"])}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= encoder_names
    assert "base.encoder.gru.weight_hh_l0" in changed and "base.head.mean.weight" in changed
    assert all(p.requires_grad for p in model.parameters())  # the decoder side is unfrozen afterwards


def test_inner_loop_stops_when_the_window_loss_rises(setup):
    config, model, optimizer, batches = setup(**{"train.aggressive_max_inner": 50, "train.aggressive_window": 2})
    real = Objective(config)
    scripted = iter([5.0, 5.0, 4.0, 4.0, 3.0, 3.5, 9.0, 9.0] + [1.0] * 50)

    def objective(model, output, step):  # the real graph, with a scripted value
        loss, parts = real(model, output, step)
        return loss * 0.0 + next(scripted), parts

    calls = []

    def fresh():
        calls.append(1)
        return batches[0]

    # windows of 2: 10 -> 8 -> 6.5 -> 18 (rose): stop after the 8th update
    assert aggressive_encoder_updates(model, objective, optimizer, batches[0], fresh, 1, config) == 8
    assert len(calls) == 7
    config.train.aggressive_max_inner = 3
    assert aggressive_encoder_updates(model, real, optimizer, batches[0], fresh, 1, config) == 3


def test_aggressive_phase_ends_when_validation_mi_stops_rising(tiny_config, tmp_path, monkeypatch):
    config = tiny_config("lagging-vae", **{"train.steps": 15, "train.eval_every": 5,
                                           "train.aggressive_max_inner": 4, "train.aggressive_window": 2})
    mi = iter([1.0, 0.5, 0.9])

    def fake_evaluate(model, split, **kwargs):
        return {"nll": 50.0, "kl": 1.0, "ppl": 9.0, "elbo": -51.0, "rec": 49.0, "mi_loo": 1.0,
                "mi_batch": next(mi), "au": 1}

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    lines = []
    result = train(config, tmp_path, log=lines.append)
    history = result.history
    assert [m["aggressive"] for m in history] == [1.0, 0.0, 0.0]
    assert history[0]["train_inner_steps"] >= 2 and history[1]["train_inner_steps"] >= 2
    assert history[2]["train_inner_steps"] == 0.0  # no inner updates after the switch
    assert any("aggressive phase over" in line for line in lines)
    state = load_checkpoint(tmp_path / "checkpoints" / "latest").state
    assert state["aggressive"] is False and state["previous_mi"] == 0.9


def test_resume_reproduces_the_uninterrupted_aggressive_run(tiny_config, tmp_path):
    config = tiny_config("coupled-lagging-vae", **{"train.steps": 12, "train.eval_every": 6, "model.dropout": 0.2,
                                                   "train.aggressive_max_inner": 4, "train.aggressive_window": 2})
    straight = train(config, tmp_path / "straight", log=_quiet)

    def stop(metrics, path):
        raise StopTraining

    assert train(config, tmp_path / "resumed", callbacks=[stop], log=_quiet).steps == 6
    resumed = train(config, tmp_path / "resumed", resume=True, log=_quiet)
    strip = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in straight.history]
    assert strip == [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in resumed.history]
    wa = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest").weights
    wb = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest").weights
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_aggressive_needs_a_latent_model(tiny_config):
    with pytest.raises(CvaeError, match="train.aggressive .* needs model.kind=vae"):
        tiny_config("dae", **{"train.aggressive": True})
    assert tiny_config("vae", **{"train.aggressive": True, "model.posterior": "vmf"}).train.aggressive

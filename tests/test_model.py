"""Shapes, the loss against a hand computation, gradient routing of the coupling wrapper."""
import math

import pytest
import torch

from cvae_core.data import load_corpus, make_batch
from cvae_core.models import CoupledVAE, build_model
from cvae_core.objectives import RQ_SCALES, Objective, matching_loss


@pytest.fixture
def setup(tiny_config):
    config = tiny_config("coupled-vae")
    corpus = load_corpus(config.data, ("train",))
    model = build_model(config, len(corpus.vocab))
    batch = make_batch(corpus["train"].examples[:5])
    return config, corpus, model, batch


def test_shapes(setup):
    config, corpus, model, batch = setup
    d, hidden, embed = config.model.latent_dim, config.model.hidden_dim, config.model.embed_dim
    e = model.encode(batch)
    assert e.shape == (5, 2 * hidden)
    posterior = model.posterior(batch)
    assert posterior.rsample().shape == (5, d)
    sample = posterior.rsample_with_log_prob((3,))
    assert sample.z.shape == (3, 5, d) and sample.log_q.shape == (3, 5)
    assert model.log_px_given_z(batch, sample.z).shape == (3, 5)
    assert model.log_px_given_z(batch, sample.z[0]).shape == (5,)
    out = model(batch)
    assert out.rec.shape == out.rec_coupled.shape == (5,)
    assert out.h.shape == out.h_coupled.shape == (5, embed)
    logits = model.base.decoder.logits(batch.inputs, out.h)
    assert logits.shape == (5, batch.inputs.shape[1], len(corpus.vocab))


def test_matching_distances_known_values():
    h = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    hc = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert matching_loss(h, hc, "eucl", 64.0).tolist() == [25.0, 0.0]
    expected = -sum(s * 64 / (s * 64 + 25.0) for s in RQ_SCALES)
    rq = matching_loss(h, hc, "rq", 64.0)
    assert rq[0].item() == pytest.approx(expected, rel=1e-6)
    assert rq[1].item() == pytest.approx(-7.0)  # D = 0: each of the 7 scales contributes -1
    assert expected == pytest.approx(-(6.4 / 31.4 + 12.8 / 37.8 + 32 / 57 + 64 / 89 + 128 / 153 + 320 / 345 + 640 / 665))


def test_loss_matches_hand_computation(setup):
    config, corpus, model, batch = setup
    model.eval()  # no dropout: the forward pass is a pure function of the drawn z
    torch.manual_seed(3)
    out = model(batch)
    step = 7
    loss, parts = Objective(config)(model, out, step)
    # reconstruction by hand: summed token cross-entropy over non-pad targets, batch mean
    logits = model.base.decoder.logits(batch.inputs, out.h)
    logp = logits.log_softmax(-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    mask = batch.targets != 0
    rec = -(logp * mask).sum(-1)
    assert torch.allclose(rec, out.rec, atol=1e-4)
    mu, sigma = out.posterior.loc, out.posterior.scale
    kl = (0.5 * (mu**2 + sigma**2 - 1) - sigma.log()).sum(-1)
    d2 = ((out.h - out.h_coupled) ** 2).sum(-1)
    c = 2 * config.model.latent_dim
    match = -sum(s * c / (s * c + d2) for s in RQ_SCALES)
    kl_weight = min(max((step - 2) / 10, 0.0), 1.0)
    expected = rec.mean() + kl_weight * kl.mean() + 1.0 * out.rec_coupled.mean() + 0.1 * match.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert parts["match"].item() == pytest.approx(match.mean().item(), rel=1e-5)


def _grads_after(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _nonzero(grad):
    return grad is not None and grad.abs().sum().item() > 0


def test_match_loss_sends_no_gradient_into_the_deterministic_path(setup):
    config, _, model, batch = setup
    out = model(batch)
    grads = _grads_after(model, matching_loss(out.h, out.h_coupled, "rq", 8.0).mean())
    twin = [n for n in grads if n.startswith(("twin_head", "twin_signal", "twin_decoder"))]
    assert twin and not any(_nonzero(grads[n]) for n in twin)
    assert _nonzero(grads["base.signal.net.0.weight"]) and _nonzero(grads["base.head.mean.weight"])
    assert _nonzero(grads["base.encoder.gru.weight_ih_l0"])


def test_coupled_reconstruction_trains_the_shared_encoder_not_the_stochastic_path(setup):
    config, _, model, batch = setup
    out = model(batch)
    grads = _grads_after(model, out.rec_coupled.mean())
    assert _nonzero(grads["base.encoder.gru.weight_ih_l0"]) and _nonzero(grads["base.embedding.weight"])
    assert _nonzero(grads["twin_head.mean.weight"]) and _nonzero(grads["twin_decoder.output.weight"])
    # the twin code is the posterior mean: its log-std head never gets a gradient
    assert not _nonzero(grads["twin_head.log_std.weight"])
    assert not any(_nonzero(grads[n]) for n in grads if n.startswith(("base.head", "base.signal", "base.decoder.gru")))


def test_each_parameter_is_optimised_once(setup):
    config, _, model, _ = setup
    assert isinstance(model, CoupledVAE)
    # the embedding is shared by the encoder and both decoders, yet is one parameter
    assert model.base.decoder.embedding is model.twin_decoder.embedding is model.base.embedding
    optimizer = torch.optim.Adam(model.parameters())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len({id(p) for p in params})
    assert sum(p is model.base.embedding.weight for p in params) == 1
    unique = {id(p): p for m in model.modules() for p in m.parameters(recurse=False)}
    assert len(params) == len(unique)


def test_lm_and_dae_build_and_give_finite_losses(tiny_config):
    for preset in ("lm", "dae"):
        config = tiny_config(preset)
        corpus = load_corpus(config.data, ("train",))
        model = build_model(config, len(corpus.vocab))
        out = model(make_batch(corpus["train"].examples[:4]))
        assert out.rec.shape == (4,) and torch.isfinite(out.rec).all()
        # an untrained model is near uniform over the vocabulary
        per_token = out.rec.sum().item() / make_batch(corpus["train"].examples[:4]).n_tokens
        assert abs(per_token - math.log(len(corpus.vocab))) < 2.0

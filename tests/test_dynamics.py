"""Gradient norms of Table 5: per-example squared norms against a direct autograd computation
on one sentence, the coupled/uncoupled/DAE variants, and clear errors elsewhere."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from cvae_core.data import load_corpus
from cvae_core.data.batching import make_batch
from cvae_core.errors import CvaeError
from cvae_core.metrics.dynamics import (DYNAMICS_KEYS, GRAD_KEYS, batch_gradient_norms, encoding_module,
                                       gradient_norms, held_out_gradient_norms)
from cvae_core.models import build_model
from cvae_core.modules.posteriors import DiagonalGaussian


@pytest.fixture
def build(tiny_config):
    def make(preset, **overrides):
        config = tiny_config(preset, **overrides)
        corpus = load_corpus(config.data, ("train", "test"))
        torch.manual_seed(0)
        return build_model(config, len(corpus.vocab)), corpus["test"]

    return make


@pytest.fixture
def fixed_noise(monkeypatch):
    """z = mean + 0.5·std for every sentence, so a batch and a single sentence see the same z."""
    def rsample(self, sample_shape=torch.Size()):
        return self.loc + 0.5 * self.scale

    monkeypatch.setattr(DiagonalGaussian, "rsample", rsample)


def direct_norms(model, sentence):
    """The five quantities for ONE sentence, with e made a leaf tensor (batch of 1)."""
    leaf = {}

    def make_leaf(module, inputs, output):
        leaf["e"] = output.detach().requires_grad_(True)
        return leaf["e"]

    handle = encoding_module(model).register_forward_hook(make_leaf)
    out = model(make_batch([sentence]))
    handle.remove()
    e = leaf["e"]

    def grad(y):
        return torch.autograd.grad(y, e, retain_graph=True)[0]

    result = {"grad_rec": grad(out.rec.sum()).pow(2).sum().item()}
    if out.rec_coupled is not None:
        result["grad_rec_coupled"] = grad(out.rec_coupled.sum()).pow(2).sum().item()
        result["grad_total"] = grad(out.rec.sum() + out.rec_coupled.sum()).pow(2).sum().item()
    if out.posterior is not None:
        standard = Normal(torch.zeros_like(out.posterior.loc), torch.ones_like(out.posterior.loc))
        reg = kl_divergence(Normal(out.posterior.loc, out.posterior.scale), standard).sum()
        result["grad_reg"] = grad(reg).pow(2).sum().item()
    jacobian = torch.stack([grad(out.h[0, k]) for k in range(out.h.shape[1])])  # [E, 1, 2H]
    result["dh_de"] = (jacobian.pow(2).sum() / out.h.pow(2).sum()).item()
    return result


def test_per_example_norms_equal_a_direct_computation_on_one_sentence(build, fixed_noise):
    model, test = build("coupled-vae")
    model.train()  # TINY has dropout 0, so train mode is deterministic here
    sentences = test.examples[:4]
    norms = batch_gradient_norms(model, make_batch(sentences))
    assert set(norms) == set(GRAD_KEYS) and all(norms[k].shape == (4,) for k in GRAD_KEYS)
    for i, sentence in enumerate(sentences):
        expected = direct_norms(model, sentence)
        for key in GRAD_KEYS:
            assert norms[key][i].item() == pytest.approx(expected[key], rel=1e-4, abs=1e-9), (key, i)
    # sanity of the numbers themselves: positive, and the total is NOT the sum of the two squares
    assert (norms["grad_rec"] > 0).all() and (norms["grad_rec_coupled"] > 0).all() and (norms["dh_de"] > 0).all()
    assert not torch.allclose(norms["grad_total"], norms["grad_rec"] + norms["grad_rec_coupled"])


def test_uncoupled_vae_has_no_coupled_gradient_and_total_equals_rec(build, fixed_noise):
    model, test = build("vae")
    model.train()
    norms = batch_gradient_norms(model, make_batch(test.examples[:3]))
    assert norms["grad_rec_coupled"] is None
    assert torch.equal(norms["grad_total"], norms["grad_rec"])
    expected = direct_norms(model, test.examples[1])
    assert norms["grad_reg"][1].item() == pytest.approx(expected["grad_reg"], rel=1e-4)
    assert norms["dh_de"][1].item() == pytest.approx(expected["dh_de"], rel=1e-4)


def test_dae_has_no_regulariser_gradient(build):
    model, test = build("dae")
    model.train()
    norms = batch_gradient_norms(model, make_batch(test.examples[:3]))
    assert norms["grad_reg"] is None and norms["grad_rec_coupled"] is None
    expected = direct_norms(model, test.examples[2])
    assert norms["grad_rec"][2].item() == pytest.approx(expected["grad_rec"], rel=1e-4)
    assert norms["dh_de"][2].item() == pytest.approx(expected["dh_de"], rel=1e-4)


def test_jacobian_loop_fallback_matches_the_vectorised_pass(build, fixed_noise, monkeypatch):
    model, test = build("vae")
    model.train()
    batch = make_batch(test.examples[:3])
    vectorised = batch_gradient_norms(model, batch)["dh_de"]
    original = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("vmap unsupported (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    assert torch.allclose(batch_gradient_norms(model, batch)["dh_de"], vectorised, rtol=1e-5)


def test_gradient_norms_average_over_the_split_and_leave_the_model_alone(build):
    model, test = build("coupled-vae", **{"model.dropout": 0.2})
    test.examples = test.examples[:20]
    model.eval()
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    result = gradient_norms(model, test, batch_size=16, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert set(result) == set(GRAD_KEYS) and all(result[k] > 0 for k in GRAD_KEYS)
    assert gradient_norms(model, test, batch_size=16, seed=0) == result  # seeded dropout and z
    assert gradient_norms(model, test, batch_size=16, seed=1) != result  # train mode: dropout on, z sampled
    # the split mean is the per-sentence mean over both batches (16 + 4), same RNG stream
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.train()
        parts = [batch_gradient_norms(model, make_batch(test.examples[s : s + 16])) for s in (0, 16)]
        model.eval()
    mean = torch.cat([p["grad_rec"] for p in parts]).double().mean().item()
    assert result["grad_rec"] == pytest.approx(mean, rel=1e-9)


@pytest.mark.parametrize("preset,overrides,message", [
    ("lm", {}, "model.kind='lm'"),
    ("vae", {"model.posterior": "vmf"}, "model.posterior='vmf'"),
    ("vae", {"model.posterior": "nf"}, "model.posterior='nf'"),
])
def test_unsupported_models_raise_a_clear_error(build, preset, overrides, message):
    model, test = build(preset, **overrides)
    with pytest.raises(CvaeError, match=message):
        gradient_norms(model, test)


def test_held_out_dynamics_norms_equal_a_direct_computation(build, fixed_noise):
    model, test = build("coupled-vae")
    sentences = test.examples[:5]
    norms = held_out_gradient_norms(model, make_batch(sentences), seed=0)
    assert set(norms) == set(DYNAMICS_KEYS)
    direct = [direct_norms(model, sentence) for sentence in sentences]
    for key in DYNAMICS_KEYS:
        assert norms[key] == pytest.approx(sum(d[key] for d in direct) / len(direct), rel=1e-4), key


def test_training_dynamics_are_logged_and_leave_the_trajectory_unchanged(tiny_config, tmp_path):
    from cvae_core.checkpoint import load_checkpoint
    from cvae_core.train import train

    runs = {}
    for every in (0, 3):
        # dropout on, so a measurement that consumed the training RNG would change the run
        config = tiny_config("coupled-vae", **{"train.dynamics_every": every, "model.dropout": 0.2})
        result = train(config, tmp_path / f"every{every}", log=lambda _: None)
        runs[every] = (result, load_checkpoint(result.output_dir / "checkpoints" / "latest").weights)
    (plain, plain_weights), (measured, measured_weights) = runs[0], runs[3]
    for before, after in zip(plain.history, measured.history):
        for key in ("train_loss", "train_rec", "train_kl", "val_nll", "val_kl"):
            assert before[key] == after[key], key
    assert all(torch.equal(plain_weights[k], measured_weights[k]) for k in plain_weights)
    logged = measured.history[0]
    assert all(logged[f"train_{key}"] > 0 for key in DYNAMICS_KEYS)
    assert "train_grad_total" not in plain.history[0]


def test_training_dynamics_refuse_models_the_norms_do_not_cover():
    from cvae_core.config import build_config

    with pytest.raises(CvaeError, match="train.dynamics_every .* needs a DAE or a Gaussian VAE"):
        build_config("vmf-vae", "ptb", "quick", {"train.dynamics_every": 10})
    with pytest.raises(CvaeError, match="model.kind=cvae"):
        build_config("coupled-cvae", "ptb-pairs", "quick", {"train.dynamics_every": 10})
    assert build_config("dae", "ptb", "quick", {"train.dynamics_every": 10}).train.dynamics_every == 10


def test_figure2_plot_draws_the_training_dynamics_metrics(tmp_path):
    import pandas as pd

    from analysis.plots import grad_metrics, plot_grad_norms

    runs = pd.DataFrame({"run_id": ["a", "b"], "preset": ["vae", "coupled-vae"]})
    rows = [(run, f"train_{key}", step, value * step)
            for run, value in (("a", 1.0), ("b", 2.0)) for key in DYNAMICS_KEYS for step in (100, 200)]
    rows += [("a", "train_grad_norm", 100, 5.0), ("a", "val_nll", 100, 90.0)]
    history = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])
    assert grad_metrics(history) == ["train_dh_de", "train_grad_reg", "train_grad_total"]
    (path,) = plot_grad_norms(runs, history, tmp_path, note=lambda _: None)
    assert path.name == "grad_norms.png" and path.stat().st_size > 1000

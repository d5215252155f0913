"""IS-NLL/ELBO relations, PPL token counting, the two MI estimators on known posteriors, AU."""
import math
import types

import pytest
import torch

from cvae_core.config import DataConfig
from cvae_core.data import load_corpus
from cvae_core.data.batching import eval_batches
from cvae_core.metrics import active_units, importance_sampled_nll, mi_estimates, perplexity
from cvae_core.metrics.likelihood import evaluate
from cvae_core.models import build_model
from cvae_core.modules.posteriors import DiagonalGaussian
from cvae_core.train import train


def test_ptb_test_split_counts_82430_tokens():
    corpus = load_corpus(DataConfig(dataset="ptb"), ("test",))
    test = corpus["test"]
    assert len(test.examples) == 3761
    assert test.n_tokens == 82430  # 78,669 words + 3,761 end-of-sentence tokens
    assert test.md5 == "8b80168b89c18661a38ef683c0dc3721"
    assert perplexity(3761 * 103.6, test.n_tokens) == pytest.approx(112.9, abs=0.1)  # Table 1 VAE row


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir):
    from cvae_core.config import build_config
    from conftest import TINY

    config = build_config("vae", "text", "quick", {**TINY, "data.data_dir": str(tiny_data_dir),
                                                   "train.steps": 60, "train.eval_every": 60})
    out = tmp_path_factory.mktemp("trained")
    train(config, out, log=lambda _: None)
    from cvae_core.checkpoint import load_model

    model, config, vocab = load_model(out / "checkpoints" / "best")
    corpus = load_corpus(config.data, ("test",), vocab=vocab)
    return model, corpus["test"]


class LinearGaussianModel:
    """p(z) = N(0, 1), p(x|z) = N(z, s^2): log p(x) = log N(x; 0, 1 + s^2) is known exactly.

    The proposal q(z|x) is deliberately off (shifted mean, inflated variance), so the IS bound
    has a clear gap to close as N grows."""

    vocab_size = 1

    def __init__(self, x: torch.Tensor, s: float = 0.5):
        self.x, self.s = x, s

    def prior(self, batch=None):
        return torch.distributions.Independent(torch.distributions.Normal(torch.zeros(1), torch.ones(1)), 1)

    def posterior(self, batch):
        var = self.s**2 / (1 + self.s**2)
        loc = self.x / (1 + self.s**2) + 0.3
        return DiagonalGaussian(loc.unsqueeze(-1), torch.full((len(self.x), 1), math.sqrt(3 * var)))

    def log_px_given_z(self, batch, z):
        return torch.distributions.Normal(z.squeeze(-1), self.s).log_prob(self.x)

    def exact_nll(self):
        return -torch.distributions.Normal(0.0, math.sqrt(1 + self.s**2)).log_prob(self.x)


def test_is_nll_is_below_negative_elbo_and_converges_to_the_exact_nll():
    x = torch.linspace(-3, 3, 400)
    model = LinearGaussianModel(x)
    batch = types.SimpleNamespace(inputs=torch.zeros(len(x), 1))
    exact = model.exact_nll().mean().item()
    means = {}
    for n in (1, 10, 100, 2000):
        torch.manual_seed(0)
        parts = importance_sampled_nll(model, batch, n)
        if n == 1:  # one sample: the IS estimate is exactly -ELBO
            assert torch.allclose(parts["nll"], -parts["elbo"], atol=1e-5)
        assert parts["nll"].mean() <= -parts["elbo"].mean()
        means[n] = parts["nll"].mean().item()
    assert means[1] > means[10] > means[100] > means[2000] > exact - 0.01
    assert means[1] - exact > 0.1  # the proposal is poor: a real gap to close
    assert means[2000] == pytest.approx(exact, abs=0.01)


def test_kl_is_monte_carlo_of_log_q_minus_log_p(trained):
    model, test = trained
    batch = eval_batches(test.examples, 16)[0]
    torch.manual_seed(0)
    mc = importance_sampled_nll(model, batch, 400)["kl"]
    posterior = model.posterior(batch)
    analytic = posterior.kl_per_dim().sum(-1)
    assert torch.allclose(mc, analytic, atol=0.3 + 0.05 * analytic.abs().max().item())


def test_evaluate_reports_every_key_finite(trained):
    model, test = trained
    result = evaluate(model, test, n_samples=5, mi_samples=5)
    for key in ("nll", "kl", "ppl", "elbo", "mi_loo", "mi_batch", "au"):
        assert math.isfinite(result[key]), key
    assert result["n_tokens"] == test.n_tokens
    assert result["ppl"] == pytest.approx(math.exp(result["nll"] * result["n_sentences"] / test.n_tokens))
    again = evaluate(model, test, n_samples=5, mi_samples=5)
    assert again["nll"] == result["nll"]  # its own seeded stream: reproducible


def test_mi_estimators_on_a_hand_built_posterior():
    # Two 1-d sentences with q(z|x1) = N(-a, 1), q(z|x2) = N(a, 1).
    a = 4.0
    posterior = DiagonalGaussian(torch.tensor([[-a], [a]]), torch.ones(2, 1))
    torch.manual_seed(0)
    mi_loo, mi_batch = mi_estimates(posterior, 20000)
    # leave-one-out: E[log q(z|x1) - log q(z|x2)] = KL(N(-a,1) || N(a,1)) = (2a)^2 / 2 = 32
    assert mi_loo.tolist() == pytest.approx([32.0, 32.0], rel=0.02)
    # self included: log 2 - E[log(1 + q(z|x2)/q(z|x1))] -> log 2 for well separated posteriors
    assert mi_batch.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-3)
    # identical posteriors carry no information
    same = DiagonalGaussian(torch.zeros(3, 2), torch.ones(3, 2))
    mi_loo, mi_batch = mi_estimates(same, 2000)
    assert mi_loo.abs().max() < 1e-5 and mi_batch.abs().max() < 1e-5


def test_mi_batch_is_capped_by_log_batch_size():
    posterior = DiagonalGaussian(torch.linspace(-50, 50, 7).unsqueeze(-1), torch.ones(7, 1))
    _, mi_batch = mi_estimates(posterior, 100)
    assert mi_batch.max().item() <= math.log(7) + 1e-6
    assert mi_batch.min().item() == pytest.approx(math.log(7), abs=1e-3)


def test_active_units_counts_dimensions_with_varying_means():
    means = torch.zeros(100, 4)
    means[:, 0] = torch.linspace(-1, 1, 100)  # variance ~ 0.34 > 0.01
    means[:, 1] = torch.linspace(-0.1, 0.1, 100)  # variance ~ 0.0034 < 0.01
    assert active_units(means) == 1
    assert active_units(means, threshold=0.001) == 2


def test_lm_nll_is_exact(tiny_config, tiny_data_dir):
    config = tiny_config("lm")
    corpus = load_corpus(config.data, ("train", "test"))
    model = build_model(config, len(corpus.vocab)).eval()
    result = evaluate(model, corpus["test"])
    batch_total = sum(-model.log_px(b).sum().item() for b in eval_batches(corpus["test"].examples, 32))
    assert result["nll"] == pytest.approx(batch_total / len(corpus["test"].examples), rel=1e-6)
    assert result["kl"] is None and result["mi_loo"] is None

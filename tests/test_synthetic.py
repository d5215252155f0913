"""He et al. (2019)'s synthetic data: the generator, its exact likelihood, the cache, and the
metrics that compare a model with the known answer (true NLL, latent recovery)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from cvae_core.config import build_config
from cvae_core.data import load_corpus
from cvae_core.data import synthetic
from cvae_core.data.synthetic import GeneratorShape, SyntheticLM, exact_nll
from cvae_core.data.vocab import UNK
from cvae_core.errors import CvaeError
from cvae_core.metrics.names import metric
from cvae_core.metrics.recovery import TRUTH_KEYS, latent_recovery

TINY_SIZES = {"train": 64, "valid": 8, "test": 8}
TINY_TRAINING = {"train.steps": 4, "train.eval_every": 4, "train.log_every": 4, "train.val_samples": 4,
                 "train.mi_samples": 4}


def _quiet(_):
    pass


def all_sentences(vocab: int, length: int) -> torch.Tensor:
    """Every sentence of ``length`` words over ``vocab`` words -> [vocab^length, length]."""
    return torch.cartesian_prod(*([torch.arange(vocab)] * length)).reshape(-1, length)


def grid_nll(lm: SyntheticLM, x: torch.Tensor, step: float, reach: float) -> torch.Tensor:
    """-log p(x) by a plain float64 Riemann sum on a uniform grid over [-reach, reach]^d: the brute force."""
    d = lm.shape.latent_dim
    axis = torch.arange(-round(reach / step), round(reach / step) + 1, dtype=torch.float64) * step
    z = torch.cartesian_prod(*([axis] * d)).reshape(-1, d)
    out = []
    for sentence in x:
        log_joint = torch.cat([lm.log_px_given_z(sentence.expand(len(c), -1), c) + lm.log_prior(c)
                               for c in z.split(200_000)])
        out.append(-(torch.logsumexp(log_joint, 0) + d * math.log(step)))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# The exact likelihood against brute force on generators small enough to enumerate

@pytest.mark.parametrize("shape, step, reach", [
    (GeneratorShape(vocab=3, embed=4, hidden=5, length=4, means=((-2.0,), (2.0,))), 0.002, 12.0),
    # W2 ~ U(-20, 20): posteriors as sharp as the real generator's, so the lattice step is halved
    (GeneratorShape(vocab=3, embed=4, hidden=5, length=4, w2_scale=20.0), 0.05, 7.0),
], ids=["1-D latent", "2-D latent, sharp posteriors"])
def test_exact_nll_sums_to_one_and_matches_a_fine_grid(shape, step, reach):
    lm = SyntheticLM(seed=3, shape=shape)
    x = all_sentences(shape.vocab, shape.length)  # 81 sentences
    exact = exact_nll(lm, x)
    assert (exact.check <= synthetic.TOLERANCE).all()
    total = torch.exp(-exact.nll).sum().item()
    assert total == pytest.approx(1.0, abs=1e-4)  # a distribution over every sentence of this length
    # the brute force on the hardest sentences (those whose lattice step was halved) and a few others
    rows = torch.cat([(exact.step < synthetic.STEP).nonzero()[:6, 0], torch.arange(0, 81, 20)])
    brute = grid_nll(lm, x[rows], step, reach)
    assert (exact.nll[rows] - brute).abs().max().item() < 0.01
    if shape.latent_dim == 2:
        assert (exact.step < synthetic.STEP).sum() >= 6


def test_the_sampler_draws_from_the_likelihood_it_reports():
    shape = GeneratorShape(vocab=3, embed=4, hidden=5, length=4, means=((-2.0,), (2.0,)))
    lm = SyntheticLM(seed=3, shape=shape)
    x, z, component = lm.sample(20_000, torch.Generator().manual_seed(5))
    index = (x * torch.tensor([27, 9, 3, 1])).sum(1)  # row of the sentence in all_sentences order
    observed = torch.bincount(index, minlength=81).double()
    expected = torch.exp(-exact_nll(lm, all_sentences(3, 4)).nll) * len(x)
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 80 + 5 * math.sqrt(2 * 80)  # 80 degrees of freedom: mean 80, sd 12.6
    assert torch.bincount(component).tolist() == pytest.approx([10_000, 10_000], rel=0.05)
    assert (z[component == 1].mean() - 2.0).abs() < 0.05


def test_importance_sampling_of_the_real_generator_agrees_with_the_quadrature():
    """An independent estimate on the 1,000-word generator: -log mean_k p(x, z_k) / q(z_k) with
    2,000 draws from a defensive mixture around the true posterior mean (q = N(m, 0.25²) + N(m, 1))."""
    lm = SyntheticLM()
    x, _, _ = lm.sample(20, torch.Generator().manual_seed(11))
    exact = exact_nll(lm, x)
    draws = torch.Generator().manual_seed(0)
    estimates = []
    for sentence, mean in zip(x, exact.posterior_mean):
        sd = torch.where(torch.rand(2000, generator=draws) < 0.5, 1.0, 0.25).double()[:, None]
        z = mean + sd * torch.randn(2000, 2, generator=draws, dtype=torch.float64)
        log_q = torch.logsumexp(torch.stack([math.log(0.5) + torch.distributions.Normal(mean, s).log_prob(z).sum(-1)
                                             for s in (1.0, 0.25)]), 0)
        log_w = lm.log_px_given_z(sentence.expand(len(z), -1), z) + lm.log_prior(z) - log_q
        estimates.append(-(torch.logsumexp(log_w, 0) - math.log(len(z))))
    difference = torch.stack(estimates) - exact.nll
    assert difference.abs().max().item() < 0.2  # one sentence's Monte Carlo noise
    assert abs(difference.mean().item()) < 0.03  # over 20 sentences: ~0.006 of noise


@pytest.mark.slow
def test_exact_nll_of_the_real_generator_matches_a_fine_grid():
    lm = SyntheticLM()
    x, _, _ = lm.sample(14, torch.Generator().manual_seed(7))
    x = x[[13]]  # a sentence whose posterior has secondary modes (the lattice step is halved)
    exact = exact_nll(lm, x)
    brute = grid_nll(lm, x, 0.05, 7.0)  # 281 x 281 nodes; 0.025 moves it by 6e-4
    assert (exact.check <= synthetic.TOLERANCE).all()
    assert (exact.nll - brute).abs().max().item() < 0.01


# ---------------------------------------------------------------------------------------------
# Generation, cache, corpus

SEED = synthetic.SYNTHETIC_SEED


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A cache root holding the tiny splits (TINY_SIZES) of the default seed, generated once; the
    sizes stay patched for the module's tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "SPLIT_SIZES", TINY_SIZES)
        root = tmp_path_factory.mktemp("synthetic")
        synthetic.ensure_cache(root, SEED)
        yield root


def test_generation_is_deterministic_in_its_seed(tmp_path):
    sizes = {"train": 20, "valid": 2, "test": 2}
    folders = [synthetic.ensure_cache(tmp_path / name, seed, sizes) for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    manifests = [synthetic.read_manifest(folder)["files"] for folder in folders]
    assert manifests[0] == manifests[1]  # every byte: text, z, clusters, true NLL
    assert manifests[0]["train.txt"] != manifests[2]["train.txt"]
    assert manifests[0]["test.txt"] != manifests[2]["test.txt"]


def test_the_corpus_carries_the_truth_and_the_whole_vocabulary(tiny_cache):
    config = build_config("vae", "synthetic", "quick", {"data.data_dir": str(tiny_cache), "data.valid_limit": 5})
    corpus = load_corpus(config.data)
    assert len(corpus.vocab) == 4 + 1000  # the specials and every generator word, seen in training or not
    train, valid = corpus["train"], corpus["valid"]
    assert len(train.examples) == 64 and all(len(s) == 10 for s in train.examples)
    assert not any(UNK in s for s in train.examples + valid.examples)
    assert len(valid.examples) == len(valid.truth.z) == len(valid.truth.nll) == 5  # valid_limit cuts both
    assert train.truth.nll is None and train.truth.z.shape == (64, 2)
    assert (valid.truth.nll > 10).all() and (valid.truth.nll_check <= synthetic.TOLERANCE).all()
    assert corpus["train"].md5 == synthetic.read_split(tiny_cache, SEED, "train")[1]


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "valid.txt").write_text("w1 w2\n"), r"valid.txt does not match its md5"),
    (lambda f: (f / "truth.npz").write_bytes(b"not numpy"), r"truth.npz does not match its md5"),
    (lambda f: (f / "manifest.json").write_text("{"), r"manifest.json is not the manifest JSON"),
    (lambda f: (f / "test.txt").unlink(), r"test.txt is missing"),
    (lambda f: (f / "manifest.json").unlink(), r"has no manifest.json"),
], ids=["edited text", "damaged truth", "bad manifest", "missing split", "interrupted"])
def test_a_damaged_cache_is_a_one_line_error(tmp_path, tiny_cache, damage, message):
    folder = synthetic.cache_folder(tmp_path, SEED)
    shutil.copytree(synthetic.cache_folder(tiny_cache, SEED), folder)
    damage(folder)
    with pytest.raises(CvaeError, match=message) as error:
        synthetic.read_split(tmp_path, SEED, "valid")
    assert "\n" not in str(error.value) and "delete the folder" in str(error.value)


def test_an_unwritable_cache_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = build_config("vae", "synthetic", "quick", {"data.data_dir": str(blocker / "cache")})
    with pytest.raises(CvaeError, match="cannot create the synthetic data cache"):
        load_corpus(config.data)


@pytest.mark.parametrize("override, message", [
    ({"data.min_count": 2}, "data.min_count=2 does not apply to dataset synthetic"),
    ({"data.max_len": 9}, "data.max_len=9 would cut the synthetic sentences"),
    ({"data.test_path": "x.txt"}, "data.test_path=x.txt is not used by dataset synthetic"),
    ({"data.synthetic_seed": -1}, "data.synthetic_seed must be >= 0"),
])
def test_settings_that_would_change_the_answer_are_refused(override, message):
    with pytest.raises(CvaeError, match=message):
        build_config("vae", "synthetic", "quick", override)


def test_dataset_defaults_are_he_et_al_sized():
    config = build_config("coupled-vae", "synthetic", "quick")
    assert (config.model.latent_dim, config.model.embed_dim, 2 * config.model.hidden_dim) == (2, 50, 50)
    assert config.train.batch_size == 16 and config.data.synthetic_seed == 19950927


# ---------------------------------------------------------------------------------------------
# Metrics against the known answer

def _mixture(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    lm = SyntheticLM(shape=GeneratorShape(vocab=3, embed=2, hidden=2, length=2))
    _, z, component = lm.sample(n, torch.Generator().manual_seed(seed))
    return z, component


def test_latent_recovery_of_a_perfect_and_of_collapsed_encoders():
    z, component = _mixture(2000)
    perfect = latent_recovery(torch.stack([3 * z[:, 1] - 1, z[:, 0] + z[:, 1]], 1), z, component)  # affine in z
    assert perfect["z_probe_r2"] == pytest.approx(1.0, abs=1e-6)
    assert 0.93 < perfect["cluster_probe_acc"] < 0.98  # the four Gaussians overlap: ~0.955 at best
    assert 1.1 < perfect["cluster_probe_mi"] < math.log(4)
    collapsed = latent_recovery(torch.full((2000, 2), 0.3), z, component)
    assert collapsed["z_probe_r2"] == pytest.approx(0.0, abs=0.01)
    assert abs(collapsed["cluster_probe_mi"]) < 0.01
    assert collapsed["cluster_probe_acc"] < 0.3
    # a collapsed posterior's code: means that differ by a thousandth of z under unit noise
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    sampled = latent_recovery(1e-3 * z + noise, z, component)
    assert sampled["z_probe_r2"] < 0.01 and sampled["cluster_probe_acc"] < 0.3 and sampled["cluster_probe_mi"] < 0.01
    noisy = latent_recovery(z + 2 * noise, z, component)
    assert 0.1 < noisy["z_probe_r2"] < perfect["z_probe_r2"] and noisy["cluster_probe_mi"] < perfect["cluster_probe_mi"]


def test_every_truth_metric_is_registered():
    for key in TRUTH_KEYS:
        assert metric(f"val_{key}").name == key and metric(f"test_{key}").label
    assert metric("val_nll_gap").direction == "min" and metric("test_cluster_probe_mi").direction == "max"
    assert metric("true_nll").direction == ""  # a property of the data, never ranked


def test_training_and_evaluation_report_the_truth(tmp_path, tiny_cache):
    from cvae_core.evaluation import evaluate_checkpoint
    from cvae_core.train import train

    config = build_config("coupled-vae", "synthetic", "quick", {"data.data_dir": str(tiny_cache), **TINY_TRAINING})
    result = train(config, tmp_path / "run", log=_quiet)
    logged = result.last_metrics
    for key in TRUTH_KEYS:
        assert math.isfinite(logged[f"val_{key}"]), key
    assert logged["val_nll_gap"] == pytest.approx(logged["val_nll"] - logged["val_true_nll"])
    evaluated = evaluate_checkpoint(result.best_checkpoint, "test", n_samples=4, mi_samples=4)
    for key in TRUTH_KEYS:
        assert math.isfinite(evaluated[key]), key
    fingerprint = evaluated["fingerprint"]
    assert fingerprint["dataset"] == "synthetic" and fingerprint["synthetic_seed"] == 19950927
    assert fingerprint["md5"] == synthetic.read_split(tiny_cache, SEED, "test")[1]
    assert fingerprint["true_nll_check_max"] <= synthetic.TOLERANCE
    limited = evaluate_checkpoint(result.best_checkpoint, "test", n_samples=4, mi_samples=4, limit=6)
    assert limited["n_sentences"] == 6 and limited["true_nll"] != evaluated["true_nll"]  # the truth is cut too


def test_posterior_mean_plot_shows_the_vae_beside_the_coupled_vae(tmp_path, tiny_cache):
    import pandas as pd

    from analysis.plots import plot_posterior_means
    from cvae_core.train import train

    rows, folders = [], {}
    for preset, nll in (("vae", 60.0), ("coupled-vae", 61.0)):
        config = build_config(preset, "synthetic", "quick", {"data.data_dir": str(tiny_cache), **TINY_TRAINING})
        folders[preset] = train(config, tmp_path / preset, log=_quiet).best_checkpoint
        rows.append({"run_id": preset, "preset": preset, "dataset": "synthetic", "seed": 0,
                     "config.coupling.enabled": preset.startswith("coupled"), "config.model.kind": "vae",
                     "best.val_nll": nll, "best.val_kl": 0.5, "best.val_cluster_probe_acc": 0.3})
    rows.append({**rows[0], "run_id": "worse vae", "best.val_nll": 70.0})  # not the best VAE: not drawn
    runs = pd.DataFrame(rows)
    asked, notes = [], []

    def checkpoint(row):
        asked.append(row["run_id"])
        return folders[row["run_id"]]

    (path,) = plot_posterior_means(runs, tmp_path / "plots", checkpoint, note=notes.append)
    assert path.name == "posterior_means.png" and path.read_bytes().startswith(b"\x89PNG") and not notes
    assert asked == ["vae", "coupled-vae"]
    assert plot_posterior_means(runs.assign(dataset="ptb"), tmp_path, checkpoint, note=notes.append) == []
    assert not notes  # a study on other data has no known answer: nothing to say
    assert plot_posterior_means(runs, tmp_path, None, note=notes.append) == [] and "checkpoints" in notes[0]


# ---------------------------------------------------------------------------------------------
# Cross-entropy >= entropy: a trained model's test NLL is not below the generator's

def test_a_trained_model_does_not_beat_the_true_likelihood(tmp_path, monkeypatch):
    from cvae_core.data.batching import eval_batches
    from cvae_core.evaluation import load_for_evaluation
    from cvae_core.metrics.likelihood import importance_sampled_nll
    from cvae_core.train import train

    monkeypatch.setattr(synthetic, "SPLIT_SIZES", {"train": 4000, "valid": 40, "test": 120})
    config = build_config("vae", "synthetic", "quick", {
        "data.data_dir": str(tmp_path), "train.steps": 500, "train.eval_every": 250, "train.log_every": 250,
        "regularizer.anneal_start": 0, "regularizer.anneal_steps": 250, "model.dropout": 0.0})
    result = train(config, tmp_path / "run", log=_quiet)
    model, _, _, test = load_for_evaluation(result.best_checkpoint, "test", device="cpu")
    torch.manual_seed(0)
    nll = torch.cat([importance_sampled_nll(model, batch, 50)["nll"] for batch in eval_batches(test.examples, 40)])
    excess = nll.double() - test.truth.nll  # per sentence: the model's -log q(x) minus the true -log p(x)
    standard_error = excess.std().item() / math.sqrt(len(excess))
    assert excess.mean().item() > -3 * standard_error
    assert excess.mean().item() < 40  # and it learnt something: an untrained model is ~45 nats above (500 steps: ~16)

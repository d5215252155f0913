"""BLEU-1/2 (BP × modified precision, corpus level, percent), Dist-n, and their use on models
and through `cvae evaluate --bleu --dist --grad-norms`."""
import json
import math

import pytest
import torch

import cvae_core.metrics.text as text_metrics
from cvae_core.checkpoint import load_model
from cvae_core.cli import main
from cvae_core.data import load_corpus
from cvae_core.evaluation import evaluate_checkpoint
from cvae_core.errors import CvaeError
from cvae_core.generate import sample_prior
from cvae_core.metrics.text import (bleu_precisions, bleu_statistics, distinct_n, prior_diversity,
                                    prior_samples, reconstruction_bleu)
from cvae_core.runtime import seeded
from cvae_core.train import train
from conftest import TINY


def toks(sentence: str) -> list[str]:
    return sentence.split()


def test_bleu_on_a_hand_computed_pair():
    # unigrams: the×2, cat, on, mat match (5 of 6); bigrams: "the cat", "on the", "the mat" (3 of 5)
    scores = bleu_precisions([toks("the cat sat on the mat")], [toks("the cat is on the mat")])
    assert scores == pytest.approx({"bleu1": 100 * 5 / 6, "bleu2": 60.0})
    cumulative_bleu2 = 100 * math.sqrt(5 / 6 * 3 / 5)  # 70.7: what we must NOT report
    assert abs(scores["bleu2"] - cumulative_bleu2) > 10


def test_bleu_clips_repeated_ngrams_to_the_reference_count():
    scores = bleu_precisions([toks("the the the the")], [toks("the cat")])
    assert scores == pytest.approx({"bleu1": 25.0, "bleu2": 0.0})  # c = 4 > r = 2: no penalty


def test_bleu_brevity_penalty_uses_summed_lengths():
    scores = bleu_precisions([toks("the cat")], [toks("the cat sat on the mat")])
    assert scores["bleu1"] == pytest.approx(100 * math.exp(1 - 6 / 2))  # 13.53: p1 = p2 = 1
    assert scores["bleu2"] == pytest.approx(100 * math.exp(-2))
    # corpus level: one short and one long hypothesis balance out (c = r = 8 -> BP = 1)
    stats = bleu_statistics([toks("a b"), toks("c d e f g h")], [toks("a b c d"), toks("c d e f")])
    assert (stats.hypothesis_length, stats.reference_length, stats.brevity_penalty) == (8, 8, 1.0)
    assert stats.matches == [6, 4] and stats.totals == [8, 6]


def test_bleu_pools_counts_over_the_corpus_instead_of_averaging_sentences():
    scores = bleu_precisions([toks("a b"), toks("c d e f")], [toks("a b"), toks("x y z w")])
    assert scores == pytest.approx({"bleu1": 100 * 2 / 6, "bleu2": 100 * 1 / 4})  # not (100 + 0) / 2


def test_bleu_edge_cases():
    assert bleu_precisions([[], []], [toks("a b"), toks("c")]) == {"bleu1": 0.0, "bleu2": 0.0}
    assert bleu_precisions([[3, 4, 5]], [[3, 4, 5]], max_n=3) == pytest.approx({"bleu1": 100.0, "bleu2": 100.0,
                                                                                 "bleu3": 100.0})
    assert bleu_precisions([toks("A b")], [toks("a b")])["bleu1"] == pytest.approx(50.0)  # case-sensitive
    with pytest.raises(CvaeError, match="one reference per hypothesis"):
        bleu_precisions([toks("a")], [])


def test_sacrebleu_standard_bleu_is_reported_under_its_own_name():
    import sacrebleu

    hyps, refs = [toks("the cat sat on the mat"), [1, 2, 3]], [toks("the cat is on the mat"), [1, 2, 4]]
    expected = sacrebleu.corpus_bleu(["the cat sat on the mat", "1 2 3"], [["the cat is on the mat", "1 2 4"]],
                                     tokenize="none").score
    assert text_metrics.sacrebleu_score(hyps, refs) == pytest.approx(expected)
    assert text_metrics.sacrebleu_score([toks("a b c d")], [toks("a b c d")]) == pytest.approx(100.0)
    # cumulative 4-gram BLEU is a different number from the paper's BLEU-1/2
    assert expected < bleu_precisions(hyps, refs)["bleu2"]


def test_distinct_n_pools_ngrams_within_sentences():
    sentences = [toks("a b"), toks("a b"), toks("b")]
    assert distinct_n(sentences, 1) == pytest.approx(100 * 2 / 5)
    # bigrams (a b), (a b) only: 1 distinct of 2.  Joining the sentences would give 3 of 4.
    assert distinct_n(sentences, 2) == pytest.approx(50.0)
    assert distinct_n([toks("x y z")], 2) == 100.0 and distinct_n([[], ["a"]], 2) == 0.0


def test_reconstruction_bleu_pairs_every_decode_with_its_own_input(tiny_config, monkeypatch):
    config = tiny_config("vae")
    corpus = load_corpus(config.data, ("train", "test"))
    model = build_model_for(config, corpus)
    test = corpus["test"]
    test.examples = test.examples[:40]  # two batches of 32 + 8: pairing must survive batching

    def drop_last_word(model, batch, n_samples, max_steps):
        return [[batch.words[i, : n - 1].tolist()] * n_samples for i, n in enumerate(batch.lengths.tolist())]

    monkeypatch.setattr(text_metrics, "reconstruct", drop_last_word)
    scores = reconstruction_bleu(model, test, n_samples=3)
    ref_len = 3 * sum(len(x) for x in test.examples)
    hyp_len = 3 * sum(len(x) - 1 for x in test.examples)
    assert scores["bleu_pairs"] == 120
    assert scores["bleu1"] == pytest.approx(100 * math.exp(1 - ref_len / hyp_len))  # p1 = p2 = 1
    assert scores["bleu2"] == pytest.approx(scores["bleu1"])


def build_model_for(config, corpus):
    from cvae_core.models import build_model

    torch.manual_seed(0)
    return build_model(config, len(corpus.vocab))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_data_dir):
    from cvae_core.config import build_config

    config = build_config("coupled-vae", "text", "quick", {**TINY, "data.data_dir": str(tiny_data_dir)})
    out = tmp_path_factory.mktemp("text_metrics")
    train(config, out, log=lambda _: None)
    return out / "checkpoints" / "best"


def test_reconstruction_bleu_and_prior_diversity_on_a_trained_model(checkpoint):
    model, config, vocab = load_model(checkpoint)
    test = load_corpus(config.data, ("test",), vocab=vocab)["test"]
    test.examples = test.examples[:12]
    torch.manual_seed(7)
    expected_next = torch.rand(2)
    torch.manual_seed(7)
    scores = reconstruction_bleu(model, test, n_samples=10, seed=0, max_steps=30)
    assert torch.equal(torch.rand(2), expected_next)  # own RNG stream
    assert scores["bleu_pairs"] == 120 and 0.0 <= scores["bleu2"] <= scores["bleu1"] <= 100.0
    assert reconstruction_bleu(model, test, n_samples=10, seed=0, max_steps=30) == scores
    diversity = prior_diversity(model, n=40, batch_size=16, seed=3, max_steps=30)
    samples = prior_samples(model, 40, batch_size=16, seed=3, max_steps=30)
    with seeded(3):
        assert sample_prior(model, 40, batch_size=16, max_steps=30) == samples
    assert len(samples) == 40
    assert diversity == {"dist1": distinct_n(samples, 1), "dist2": distinct_n(samples, 2)}
    assert 0.0 < diversity["dist1"] <= 100.0


def test_evaluate_checkpoint_adds_the_requested_metrics_and_their_settings(checkpoint):
    plain = evaluate_checkpoint(checkpoint, n_samples=2, mi_samples=2, limit=8)
    assert "bleu1" not in plain and "dist_samples" not in plain["fingerprint"]
    result = evaluate_checkpoint(checkpoint, n_samples=2, mi_samples=2, limit=8, bleu=True, dist=True,
                                 grad_norms=True, bleu_samples=2, dist_samples=16, max_steps=20)
    extra = {"bleu1", "bleu2", "sacrebleu", "dist1", "dist2", "grad_rec", "grad_rec_coupled", "grad_total", "grad_reg", "dh_de"}
    assert set(result) == set(plain) | extra
    assert all(result[key] == plain[key] for key in ("nll", "kl", "mi_loo", "au"))  # same seed, same numbers
    fp = result["fingerprint"]
    assert (fp["bleu_samples"], fp["bleu_pairs"], fp["dist_samples"], fp["grad_batch_size"], fp["max_steps"]) == \
        (2, 16, 16, 16, 20)
    assert result["grad_rec_coupled"] > 0 and result["grad_reg"] > 0


def test_cli_evaluate_flags_print_the_new_keys(checkpoint, capsys):
    args = ["evaluate", str(checkpoint), "--n-samples", "2", "--mi-samples", "2", "--limit", "6", "--json",
            "--bleu", "--bleu-samples", "2", "--dist", "--dist-samples", "8", "--grad-norms", "--max-steps", "15"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("bleu1", "bleu2", "dist1", "dist2", "grad_rec", "grad_rec_coupled", "grad_total", "grad_reg",
                "dh_de"):
        assert isinstance(result[key], float), key
    assert result["fingerprint"]["dist_samples"] == 8 and result["fingerprint"]["bleu_samples"] == 2


def test_bleu_and_dist_refuse_models_without_a_latent_code(tiny_data_dir, tmp_path):
    from cvae_core.config import build_config

    config = build_config("lm", "text", "quick", {**TINY, "data.data_dir": str(tiny_data_dir), "train.steps": 2,
                                                  "train.eval_every": 2})
    train(config, tmp_path, log=lambda _: None)
    with pytest.raises(CvaeError, match="need a latent-variable model"):
        evaluate_checkpoint(tmp_path / "checkpoints" / "best", n_samples=1, mi_samples=1, limit=4, dist=True)

"""Evaluation results do not depend on how sentences are grouped: per-sentence sample streams,
length-sorted batches, chunked samples, and the decoder's output layer at real positions only."""
import dataclasses

import pytest
import torch

from cvae_core.data import load_corpus
from cvae_core.data.batching import eval_batches, length_sorted_batches
from cvae_core.metrics import likelihood
from cvae_core.metrics.likelihood import evaluate
from cvae_core.models import build_model
from cvae_core.modules import output_layer
from cvae_core.modules.networks import sequence_log_likelihood


@pytest.fixture(scope="module")
def model_and_split(tiny_data_dir):
    from cvae_core.config import build_config
    from conftest import TINY

    config = build_config("vae", "text", "quick", {**TINY, "data.data_dir": str(tiny_data_dir)})
    corpus = load_corpus(config.data, ("train", "test"))
    torch.manual_seed(0)
    return build_model(config, len(corpus.vocab)).eval(), corpus["test"]


def test_same_nll_kl_mi_for_any_batch_size_and_chunk_size(model_and_split, monkeypatch):
    model, split = model_and_split
    reference = evaluate(model, split, n_samples=6, mi_samples=5, batch_size=32)
    assert reference["nll"] > reference["kl"] > 0
    runs = [evaluate(model, split, n_samples=6, mi_samples=5, batch_size=size) for size in (1, 7)]
    # two chunk sizes: all 6 samples decoded at once (above) and one sample per chunk
    monkeypatch.setattr(likelihood, "DECODE_BUDGET_BYTES", 1)
    runs.append(evaluate(model, split, n_samples=6, mi_samples=5, batch_size=32))
    for result in runs:
        for key in ("nll", "kl", "elbo", "rec", "mi_loo", "mi_batch", "ppl"):
            assert result[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-5), key
        assert result["au"] == reference["au"]


def test_another_seed_gives_other_samples(model_and_split):
    model, split = model_and_split
    a = evaluate(model, split, n_samples=3, mi_samples=3, seed=0)
    b = evaluate(model, split, n_samples=3, mi_samples=3, seed=1)
    assert a["kl"] != b["kl"] and a["mi_batch"] != b["mi_batch"]
    assert a["nll"] == pytest.approx(b["nll"], rel=0.05)  # Monte-Carlo noise only


def test_length_sorted_batches_cover_each_sentence_once_with_little_padding(model_and_split):
    _, split = model_and_split
    groups = length_sorted_batches(split.examples, 7)
    seen = sorted(i for indices, _ in groups for i in indices)
    assert seen == list(range(len(split.examples)))
    for indices, batch in groups:
        assert batch.lengths.tolist() == [len(split.examples[i]) for i in indices]
    def padding(batches):
        return 1 - sum(b.n_tokens for b in batches) / sum(b.targets.numel() for b in batches)
    assert padding([b for _, b in groups]) < padding(eval_batches(split.examples, 7)) / 2


def test_output_layer_at_real_positions_matches_full_log_softmax(model_and_split, monkeypatch):
    model, split = model_and_split
    batch = eval_batches(split.examples, 16)[0]
    decoder, h = model.decoder, torch.randn(16, model.signal.net[-1].out_features)
    full = sequence_log_likelihood(decoder.logits(batch.inputs, h), batch.targets)
    with torch.no_grad():
        monkeypatch.setattr(output_layer, "OUTPUT_TILE_ROWS", 5)  # many tiles, a ragged last one
        tiled = decoder.log_likelihood(batch.inputs, batch.targets, h)
    trained = decoder.log_likelihood(batch.inputs, batch.targets, h)  # autograd path
    assert torch.allclose(tiled, full, rtol=1e-5, atol=1e-4)
    assert torch.allclose(trained, full, rtol=1e-5, atol=1e-4)
    trained.sum().backward()
    assert decoder.output.weight.grad.abs().sum() > 0

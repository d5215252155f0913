"""Greedy decoding: cutting at <eos>, early stopping that changes nothing, reconstruction,
prior samples, interpolation, and the `cvae generate` command."""
import math

import pytest
import torch
from torch import nn

from cvae_core.cli import main
from cvae_core.data import load_corpus
from cvae_core.data.batching import make_batch
from cvae_core.data.vocab import BOS, EOS, UNK
from cvae_core.errors import CvaeError
from cvae_core.generate import decode_codes, greedy_ids, interpolate, reconstruct, sample_prior, strip_eos
from cvae_core.models import build_model
from cvae_core.modules.networks import GRUDecoder
from cvae_core.runtime import seeded
from conftest import TINY

WORD = 4  # the one word the timer decoder emits before <eos>


def timer_decoder(clock: float = 0.9, embed_dim: int = 4, vocab_size: int = 8) -> GRUDecoder:
    """A hand-wired GRUDecoder whose rows stop at different, known steps.

    Hidden unit 0 is a clock: update gate ``clock`` and candidate 1, so s0 = 1 - clock^(t+1)
    after t GRU steps.  Unit 1 holds tanh(h[0]) (update gate 0).  The <eos> logit 10·tanh(10·(s0 + s1/2 -
    0.45)) beats the word's logit 1 once s0 passes a threshold set by h[0]: rows with a larger
    h[0] stop earlier.
    """
    decoder = GRUDecoder(nn.Embedding(vocab_size, embed_dim), hidden_dim=2, dropout=0.0).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        gru = decoder.gru  # gate rows: reset 0:2, update 2:4, candidate 4:6
        gru.bias_ih_l0[2] = math.log(clock / (1.0 - clock))  # update gate of the clock
        gru.bias_ih_l0[3] = -30.0  # unit 1 takes its candidate every step
        gru.bias_ih_l0[4] = 30.0  # clock candidate = 1
        gru.weight_ih_l0[5, embed_dim] = 1.0  # unit 1 candidate = tanh(h[0]) (h is the 2nd input half)
        decoder.project.weight[0, 0], decoder.project.weight[0, 1], decoder.project.bias[0] = 10.0, 5.0, -4.5
        decoder.output.weight[EOS, 0] = 10.0
        decoder.output.bias[WORD] = 1.0
    return decoder


def first_eos(row: list[int]) -> int | None:
    return row.index(EOS) if EOS in row else None


def test_strip_eos_cuts_at_the_first_eos_and_documents_the_authors_quirk():
    assert strip_eos([5, 6, EOS, 7, EOS]) == [5, 6]
    assert strip_eos([5, 6, 7]) == [5, 6, 7]  # never ended: everything is kept
    assert strip_eos([EOS, 5]) == []  # our choice: an empty sentence
    assert strip_eos([EOS, 5], empty_as_eos=True) == [EOS]  # the authors' output "<eos>"
    assert strip_eos([5, EOS], empty_as_eos=True) == [5]


def test_timer_decoder_rows_end_at_different_steps():
    decoder = timer_decoder()
    h = torch.zeros(9, 4)
    h[:, 0] = torch.linspace(-2.0, 2.0, 9)
    full = decoder.greedy(h, BOS, 200).tolist()
    ends = [first_eos(row) for row in full]
    assert all(end is not None for end in ends)
    assert ends == sorted(ends, reverse=True) and len(set(ends)) >= 5  # larger h[0] -> earlier stop
    assert max(ends) < 40 and min(ends) == 0  # one row is empty: <eos> straight away
    assert all(row[:end] == [WORD] * end for row, end in zip(full, ends))


def test_early_stopping_gives_the_same_sentences_in_far_fewer_steps():
    decoder = timer_decoder()
    h = torch.zeros(9, 4)
    h[:, 0] = torch.linspace(-2.0, 2.0, 9)
    calls = []
    handle = decoder.gru.register_forward_hook(lambda *args: calls.append(1))
    fast = greedy_ids(decoder, h, max_steps=200)
    handle.remove()
    full = decoder.greedy(h, BOS, 200)
    longest = max(first_eos(row) for row in full.tolist())
    assert fast.shape == (9, longest + 1)  # stopped at the step where the last row emitted <eos>
    assert len(calls) == 1 + longest + 1  # the [h; h] step plus one call per decoded token
    assert [strip_eos(r) for r in fast.tolist()] == [strip_eos(r) for r in full.tolist()]
    assert torch.equal(fast, full[:, : fast.shape[1]])


def test_early_stopping_is_exact_on_random_decoders_that_never_stop():
    torch.manual_seed(3)
    decoder = GRUDecoder(nn.Embedding(12, 6), 10, 0.0).eval()
    h = torch.randn(7, 6) * 3
    fast, full = greedy_ids(decoder, h, max_steps=60), decoder.greedy(h, BOS, 60)
    assert [strip_eos(r) for r in fast.tolist()] == [strip_eos(r) for r in full.tolist()]
    assert UNK not in full.tolist()[0]


@pytest.fixture
def tiny_model(tiny_config):
    config = tiny_config("coupled-vae")
    corpus = load_corpus(config.data, ("train", "test"))
    torch.manual_seed(0)
    return build_model(config, len(corpus.vocab)), corpus


def test_reconstruct_decodes_n_samples_per_sentence(tiny_model):
    model, corpus = tiny_model
    batch = make_batch(corpus["test"].examples[:3])
    model.train()
    with seeded(1):
        out = reconstruct(model, batch, n_samples=4, max_steps=12)
    assert model.training  # the caller's mode is restored
    assert len(out) == 3 and all(len(samples) == 4 for samples in out)
    assert all(len(ids) <= 12 and UNK not in ids for samples in out for ids in samples)
    with seeded(1):
        assert reconstruct(model, batch, n_samples=4, max_steps=12) == out  # seeded -> reproducible
    # sample k of sentence i is the decode of z[k, i]: redo it by hand with the same RNG stream
    with seeded(1):
        z = model.base.eval().posterior(batch).rsample_with_log_prob((4,)).z
    assert decode_codes(model, z[2, 1:2], max_steps=12)[0] == out[1][2]


def test_sample_prior_returns_n_sentences_in_batches(tiny_model):
    model, _ = tiny_model
    with seeded(0):
        sentences = sample_prior(model, 5, batch_size=2, max_steps=7)
    with seeded(0):
        z = torch.cat([model.prior().sample((2,)), model.prior().sample((2,)), model.prior().sample((1,))])
    assert len(sentences) == 5 and sentences == decode_codes(model, z, max_steps=7)


def test_interpolation_has_both_endpoints_and_seven_points(tiny_model):
    model, corpus = tiny_model
    a, b = make_batch(corpus["test"].examples[:2]), make_batch(corpus["test"].examples[2:4])
    paths = interpolate(model, a, b, steps=5, max_steps=15)
    assert len(paths) == 2 and all(len(path) == 7 for path in paths)
    model.eval()
    mean_a, mean_b = model.posterior(a).mean, model.posterior(b).mean
    assert paths[0][0] == decode_codes(model, mean_a[:1], 15)[0]
    assert paths[1][-1] == decode_codes(model, mean_b[1:], 15)[0]
    midpoint = decode_codes(model, (0.5 * mean_a + 0.5 * mean_b)[1:], 15)[0]
    assert paths[1][3] == midpoint  # k = 3 of 6
    same = interpolate(model, a, a, steps=5, max_steps=15)
    assert all(path == [path[0]] * 7 for path in same)


def test_generation_refuses_models_without_a_latent_code(tiny_config):
    lm = build_model(tiny_config("lm"), 50)
    with pytest.raises(CvaeError, match="model.kind='lm'"):
        sample_prior(lm, 2)


def test_cli_generate_prints_prior_samples_reconstructions_and_interpolations(tiny_data_dir, tmp_path, capsys):
    sets = [f"--set={k}={v}" for k, v in {**TINY, "train.steps": 10}.items()]
    out = tmp_path / "run"
    assert main(["train", "--preset", "coupled-vae", "--dataset", "text", "--data-dir", str(tiny_data_dir),
                 *sets, "--out", str(out)]) == 0
    ckpt = str(out / "checkpoints" / "best")
    capsys.readouterr()
    assert main(["generate", ckpt, "--n", "3", "--max-steps", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(0 < len(line.split()) <= 8 for line in lines)
    assert main(["generate", ckpt, "--n", "3", "--max-steps", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == lines  # seeded
    assert main(["generate", ckpt, "--mode", "reconstruct", "--n", "2", "--max-steps", "8"]) == 0
    text = capsys.readouterr().out
    test_lines = (tiny_data_dir / "test.txt").read_text().splitlines()
    assert text.count("\n> ") + text.startswith("> ") == 2 and text.count("\n< ") == 2
    assert text.startswith("> " + " ".join(test_lines[0].split()[:4]))  # the first test sentence (OOV -> <unk>)
    assert main(["generate", ckpt, "--mode", "interpolate", "--n", "1", "--max-steps", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9 and lines[0].startswith("A ") and lines[-1].startswith("B ")


def test_cnn_decoder_early_stopping_matches_the_full_run():
    from cvae_core.modules.cnn_decoder import CNNDecoder

    h = torch.randn(10, 6, generator=torch.Generator().manual_seed(5)) * 3
    for eos_bias, expect_all_done in ((1.0, False), (6.0, True)):
        torch.manual_seed(5)
        decoder = CNNDecoder(nn.Embedding(12, 6), 8, "small", 0.0).eval()
        with torch.no_grad():
            decoder.output.bias[EOS] += eos_bias
        full, fast = decoder.greedy(h, BOS, 40), greedy_ids(decoder, h, max_steps=40)
        assert [strip_eos(r) for r in fast.tolist()] == [strip_eos(r) for r in full.tolist()]
        ends = [first_eos(row) for row in full.tolist()]
        assert all(e is not None for e in ends) == expect_all_done
        # decoding stops as soon as every row has ended, and runs to max_steps otherwise
        assert fast.shape[1] == (max(ends) + 1 if expect_all_done else 40)

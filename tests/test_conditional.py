"""Dialogue (Table 8): post/response pairs, the seq2seq / CVAE / Coupled-CVAE presets, the
conditional likelihood contract, response diversity and `cvae respond`."""
import json
import math

import pytest
import torch

from conftest import SHARED_DATA
from cvae_core.checkpoint import load_model
from cvae_core.cli import main
from cvae_core.config import PRESETS, build_config
from cvae_core.data import load_corpus
from cvae_core.data.batching import Pair, make_batch
from cvae_core.data.pairs import dialogue_pairs, parse_swda, parse_tsv, tokenize_utterance
from cvae_core.errors import CvaeError
from cvae_core.evaluation import evaluate_checkpoint
from cvae_core.metrics.likelihood import importance_sampled_nll
from cvae_core.models.conditional import ConditionalVAE
from cvae_core.models.text_vae import CoupledVAE
from cvae_core.train import train

SWDA = SHARED_DATA / "swda"
DIALOGUE_PRESETS = [name for name, preset in PRESETS.items() if preset.conditional]
SLICE = {
    "data.train_limit": 300, "data.valid_limit": 40, "data.max_len": 30,
    "model.embed_dim": 16, "model.hidden_dim": 16, "model.latent_dim": 4,
    "train.steps": 50, "train.eval_every": 50, "train.log_every": 50, "train.batch_size": 8,
    "train.val_samples": 3, "train.mi_samples": 3,
}


def dialogue_line(*texts):
    return json.dumps({"utts": [["A" if i % 2 == 0 else "B", t, ["statement", [0.0]]] for i, t in enumerate(texts)]})


def test_tokeniser_lower_cases_and_splits_words_from_punctuation():
    assert tokenize_utterance("I don't know, Bob...  OK?") == ["i", "don", "'", "t", "know", ",", "bob", "...", "ok", "?"]
    assert tokenize_utterance("  ") == []


def test_pairs_follow_the_last_utterance_rule():
    utts = [["hi"], ["hello", "there"], ["how", "are", "you"], ["fine"]]
    # utterance t-1 -> t for t = 1 .. n-2: "fine" (the last utterance) is never a response
    assert dialogue_pairs(utts) == [(["hi"], ["hello", "there"]), (["hello", "there"], ["how", "are", "you"])]
    assert dialogue_pairs(utts[:2]) == []
    lines = [dialogue_line("Hi!", "Hello there.", "How are you?", "Fine."), "", dialogue_line("Yes", "No", "Maybe")]
    assert parse_swda(lines, "d.jsonl") == [
        (["hi", "!"], ["hello", "there", "."]), (["hello", "there", "."], ["how", "are", "you", "?"]),
        (["yes"], ["no"])]


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:2: not a JSON object"),
    ('{"topic": 1}', "d.jsonl:2: the dialogue has no 'utts' list"),
    (dialogue_line("alone"), "d.jsonl:2: a dialogue needs at least 2 utterances, this one has 1"),
])
def test_bad_dialogue_lines_name_file_and_line(line, message):
    with pytest.raises(CvaeError, match="^" + message):
        parse_swda([dialogue_line("a", "b", "c"), line], "d.jsonl")


@pytest.mark.parametrize("line, message", [
    ("no tab here", "p.tsv:2: no tab"), ("a post\t  ", "p.tsv:2: empty response"),
    ("a\tb\tc", "p.tsv:2: more than one tab")])
def test_bad_tsv_lines_name_file_and_line(line, message):
    with pytest.raises(CvaeError, match="^" + message):
        parse_tsv(["Hello?\tHi.", line], "p.tsv")


def test_tsv_pairs_load_with_a_shared_vocabulary(tmp_path):
    for split, text in (("train", "hi there\thello you\nhello you\thi\n"), ("valid", "hi\tyou\n"), ("test", "x\ty\n")):
        (tmp_path / f"{split}.tsv").write_text(text)
    config = build_config("cvae", "pairs", "quick", {"data.data_dir": str(tmp_path)})
    corpus = load_corpus(config.data)
    vocab = corpus.vocab
    assert vocab.itos[4:] == ["hi", "there", "hello", "you"]  # posts and responses, first appearance
    assert corpus["train"].examples[1] == Pair(vocab.encode(["hello", "you"]), vocab.encode(["hi"]))
    assert corpus["test"].examples == [Pair([3], [3])]  # unknown words
    assert corpus["train"].n_tokens == (2 + 1) + (1 + 1)  # response words + <eos>
    (tmp_path / "valid.tsv").write_text("hi\tyou\nbroken line\n")
    with pytest.raises(CvaeError, match="valid.tsv:2: no tab"):
        load_corpus(config.data)


def test_pair_batches_carry_the_post():
    batch = make_batch([Pair([5, 6, 7], [8]), Pair([9], [10, 11])])
    assert batch.post_words.tolist() == [[5, 6, 7], [9, 0, 0]] and batch.post_lengths.tolist() == [3, 1]
    assert batch.words.tolist() == [[8, 0], [10, 11]] and batch.targets.tolist() == [[8, 2, 0], [10, 11, 2]]


@pytest.mark.skipif(not SWDA.is_dir(), reason="../shared/data/swda (the real Switchboard files) is not beside the project")
def test_real_switchboard_files_give_the_published_pair_counts():
    config = build_config("cvae", "swda", "paper", {"data.data_dir": str(SWDA), "data.train_path": str(SWDA / "valid.jsonl")})
    corpus = load_corpus(config.data)
    assert len(corpus["valid"].examples) == 5105 and len(corpus["test"].examples) == 5419
    assert config.data.min_count == 5
    counts = {}
    for pair in corpus["train"].examples:
        for w in pair.post + pair.response:
            counts[w] = counts.get(w, 0) + 1
    assert 3 in counts  # rare words are <unk>
    assert corpus["valid"].md5 == "d3964e58472ba305dc290ac7f26bcef5"


def test_dialogue_presets_need_pair_data_and_vice_versa():
    with pytest.raises(CvaeError, match="model.kind=cvae and data.dataset=ptb do not fit"):
        build_config("cvae", "ptb", "quick")
    with pytest.raises(CvaeError, match="model.kind=vae and data.dataset=ptb-pairs do not fit"):
        build_config("vae", "ptb-pairs", "quick")
    with pytest.raises(CvaeError, match="data.dataset=swda needs data.data_dir=DIR \\(with train.jsonl"):
        build_config("cvae", "swda", "quick")
    coupled = build_config("coupled-cvae", "ptb-pairs", "paper").coupling
    assert (coupled.enabled, coupled.lambda_r, coupled.distance, coupled.lambda_m) == (True, 1.0, "rq", 0.1)


def tiny_cvae(coupled=False):
    config = build_config("coupled-cvae" if coupled else "cvae", "ptb-pairs", "quick", SLICE)
    model = ConditionalVAE(config.model, 20)
    return CoupledVAE(model, config.model) if coupled else model


def test_conditional_kl_matches_two_gaussians_by_hand():
    torch.manual_seed(0)
    model = tiny_cvae().eval()
    batch = make_batch([Pair([4, 5, 6], [7, 8]), Pair([9], [10, 11, 12])])
    q, p = model.posterior(batch), model.prior(batch)
    mu_q, s_q, mu_p, s_p = q.loc, q.scale, p.loc, p.scale
    by_hand = (torch.log(s_p / s_q) + (s_q**2 + (mu_q - mu_p) ** 2) / (2 * s_p**2) - 0.5).sum(-1)
    output = model(batch)
    assert torch.allclose(output.posterior.regularizer(output.prior, output.sample), by_hand, atol=1e-5)
    # the Monte-Carlo KL of the one IS routine estimates the same number
    estimate = importance_sampled_nll(model, batch, 20000)["kl"]
    assert torch.allclose(estimate, by_hand, atol=0.05)


def test_coupled_cvae_shares_encoders_and_post_signal_and_owns_its_twin():
    model = tiny_cvae(coupled=True)
    batch = make_batch([Pair([4, 5, 6], [7, 8]), Pair([9], [10, 11, 12])])
    out = model(batch)
    assert out.h.shape == out.h_coupled.shape == (2, 16)
    # h^c = twin_signal(mu^c) + Linear(e_y): the post signal is the base's, so it gets gradient from rec^c
    out.rec_coupled.sum().backward()
    assert model.base.post_signal.weight.grad.abs().sum() > 0 and model.base.post_encoder.gru.weight_ih_l0.grad is not None
    assert model.base.signal.net[0].weight.grad is None  # the stochastic signal network is not on that path
    assert model.twin_head.mean.in_features == 2 * model.base.encoder.out_dim


@pytest.fixture(scope="module")
def pairs_slice():
    return load_corpus(build_config("cvae", "ptb-pairs", "quick", SLICE).data, ("train", "valid"))


@pytest.mark.parametrize("name", DIALOGUE_PRESETS)
def test_dialogue_preset_trains_saves_reloads_and_evaluates(name, pairs_slice, tmp_path):
    config = build_config(name, "ptb-pairs", "quick", SLICE)
    result = train(config, tmp_path, corpus=pairs_slice, log=lambda _: None)
    assert result.steps == 50 and result.best_checkpoint is not None
    assert 0 < result.best_metrics["val_dist1"] <= 100 and 0 <= result.best_metrics["val_dist2"] <= 100
    model, loaded, _ = load_model(tmp_path / "checkpoints" / "best")
    assert loaded.to_dict() == config.to_dict()
    scores = evaluate_checkpoint(tmp_path / "checkpoints" / "best", split="valid", n_samples=3, mi_samples=3,
                                 limit=40, dist=True, max_steps=10)
    assert scores["nll"] == pytest.approx(result.best_metrics["val_nll"], rel=1e-5)  # the reload is the model
    assert math.isfinite(scores["ppl"]) and 0 < scores["dist1"] <= 100 and 0 <= scores["dist2"] <= 100
    assert scores["ppl"] == pytest.approx(math.exp(scores["nll"] * 40 / pairs_slice["valid"].n_tokens), rel=1e-6)
    if config.model.kind == "cvae":
        assert scores["kl"] > 0 and scores["nll"] <= -scores["elbo"] + 1e-3
    else:
        assert scores["kl"] is None  # exact NLL, no latent


def test_cvae_respond_prints_several_responses(pairs_slice, tmp_path, capsys):
    config = build_config("cvae", "ptb-pairs", "quick", {**SLICE, "train.steps": 5, "train.eval_every": 5})
    train(config, tmp_path, corpus=pairs_slice, log=lambda _: None)
    assert main(["respond", str(tmp_path / "checkpoints" / "best"), "the company said", "--n", "3",
                 "--max-steps", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "> the company said" and len(lines) == 4 and all(line.startswith("< ") for line in lines[1:])
    assert main(["respond", str(tmp_path / "checkpoints" / "best"), "  "]) == 2
    assert "has no words" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "checkpoints" / "best"), "--mode", "reconstruct", "--n", "2"]) == 2
    assert "dialogue model" in capsys.readouterr().err

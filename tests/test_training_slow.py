"""A few hundred real training steps on a PTB slice: the validation NLL must drop well below
that of an untrained GRU-LM on the same sentences."""
import pytest

from cvae_core.config import build_config
from cvae_core.data import load_corpus
from cvae_core.metrics.likelihood import evaluate
from cvae_core.models import build_model
from cvae_core.train import train


@pytest.mark.slow
def test_coupled_vae_learns_on_a_ptb_slice(tmp_path):
    overrides = {"data.train_limit": 4000, "data.valid_limit": 300, "model.embed_dim": 64, "model.hidden_dim": 64,
                 "train.steps": 300, "train.eval_every": 150, "train.log_every": 100}
    config = build_config("coupled-vae", "ptb", "quick", overrides)
    corpus = load_corpus(config.data, ("train", "valid"))
    lm_config = build_config("lm", "ptb", "quick", overrides)
    untrained_lm = evaluate(build_model(lm_config, len(corpus.vocab)), corpus["valid"])["nll"]
    result = train(config, tmp_path, corpus=corpus, log=lambda _: None)
    last = result.history[-1]
    # an untrained LM is near-uniform over 10K words (~ 9.2 nats per token); after 300 steps the
    # model must have learnt word frequencies and more: at least 20% fewer nats per sentence
    assert last["val_nll"] < 0.8 * untrained_lm, (last["val_nll"], untrained_lm)
    assert result.best_metrics["val_nll"] <= last["val_nll"]

"""The dilated causal CNN decoder: shapes, causality, greedy decoding, any posterior, coupling."""
import pytest
import torch
from torch import nn

from cvae_core.data import load_corpus, make_batch
from cvae_core.data.vocab import BOS, UNK
from cvae_core.models import CoupledVAE, build_model
from cvae_core.modules.cnn_decoder import DILATIONS, CNNDecoder
from cvae_core.modules.networks import sequence_log_likelihood
from cvae_core.objectives import Objective


def _decoder(dilations="medium", vocab=50, embed=6, filters=8):
    torch.manual_seed(0)
    return CNNDecoder(nn.Embedding(vocab, embed), filters, dilations, dropout=0.2)


def test_shapes_and_log_likelihood():
    decoder = _decoder()
    inputs = torch.randint(4, 50, (3, 7))
    inputs[:, 0] = BOS
    targets = torch.randint(4, 50, (3, 7))
    h = torch.randn(3, 6)
    decoder.eval()
    logits = decoder.logits(inputs, h)
    assert logits.shape == (3, 7, 50)
    assert torch.allclose(decoder.log_likelihood(inputs, targets, h), sequence_log_likelihood(logits, targets))


def test_dilation_sets_and_receptive_field():
    assert DILATIONS["medium"] == (1, 2, 4, 8, 16) and DILATIONS["large"] == (1, 2, 4, 8, 16) * 2
    assert _decoder("medium").receptive_field == 1 + 2 * 31
    assert _decoder("large").receptive_field == 1 + 4 * 31
    assert len(_decoder([1, 2]).blocks) == 2
    with pytest.raises(ValueError, match="unknown CNN dilation set"):
        _decoder("huge")


def test_causal_every_position_sees_only_the_past_and_the_signal():
    decoder = _decoder().eval()
    inputs = torch.randint(4, 50, (2, 10))
    h = torch.randn(2, 6)
    base = decoder.logits(inputs, h)
    changed = inputs.clone()
    changed[:, 6:] = torch.randint(4, 50, (2, 4))
    after = decoder.logits(changed, h)
    assert torch.equal(base[:, :6], after[:, :6])  # outputs before the change are untouched
    assert not torch.allclose(base[:, 6:], after[:, 6:])
    assert not torch.allclose(base[:, 0], decoder.logits(inputs, torch.randn(2, 6))[:, 0])  # h reaches position 0


def test_greedy_matches_stepwise_argmax_and_masks_unk():
    decoder = _decoder().eval()
    with torch.no_grad():
        decoder.output.bias[UNK] = 100.0  # <unk> would win every step if it were not masked
    h = torch.randn(3, 6)
    ids = decoder.greedy(h, BOS, 5)
    assert ids.shape == (3, 5) and not (ids == UNK).any()
    prefix = torch.cat([torch.full((3, 1), BOS), ids], dim=1)
    logits = decoder.logits(prefix[:, :-1], h)
    logits[..., UNK] = float("-inf")
    assert torch.equal(logits.argmax(-1), ids)  # the fed-back tokens are the argmax of each step


@pytest.mark.parametrize("posterior", ["gaussian", "vmf", "power_spherical", "nf"])
def test_cnn_decoder_under_every_posterior_and_the_coupling_wrapper(tiny_config, posterior):
    config = tiny_config("coupled-cnn-vae", **{"model.posterior": posterior, "model.cnn_filters": 8,
                                               "model.cnn_dilations": "small"})
    corpus = load_corpus(config.data, ("train",))
    model = build_model(config, len(corpus.vocab))
    assert isinstance(model, CoupledVAE)
    assert isinstance(model.base.decoder, CNNDecoder) and isinstance(model.twin_decoder, CNNDecoder)
    assert model.twin_decoder.embedding is model.base.embedding
    batch = make_batch(corpus["train"].examples[:4])
    loss, parts = Objective(config)(model, model(batch), step=5)
    loss.backward()
    assert torch.isfinite(loss) and model.twin_decoder.output.weight.grad is not None
    model.eval()
    z = model.posterior(batch).rsample()
    assert model.base.decoder.greedy(model.base.signal(z), BOS, 4).shape == (4, 4)

"""The fused output layer (cvae_core/modules/output_layer.py) computes what linear + cross_entropy
compute, values and gradients, with and without autograd, with and without a member dimension."""
import pytest
import torch
from torch import nn

from cvae_core.modules import output_layer
from cvae_core.modules.output_layer import output_token_log_likelihood


def reference(rows, weight, bias, gold):
    """-cross_entropy(linear(rows), gold) per row, the plain way; members along dim 0 if any."""
    if rows.dim() == 2:
        return -nn.functional.cross_entropy(nn.functional.linear(rows, weight, bias), gold, reduction="none")
    return torch.stack([reference(r, w, b, gold) for r, w, b in zip(rows, weight, bias)])


def leaves(members, rows=37, features=12, vocab=53, scale=3.0):
    generator = torch.Generator().manual_seed(members or 0)
    lead = () if members is None else (members,)
    rows_ = torch.randn(*lead, rows, features, generator=generator)
    weight = scale * torch.randn(*lead, vocab, features, generator=generator)
    bias = torch.randn(*lead, vocab, generator=generator)
    gold = torch.randint(0, vocab, (rows,), generator=generator)
    return rows_, weight, bias, gold


@pytest.mark.parametrize("members", [None, 3])
def test_values_and_gradients_match_linear_plus_cross_entropy(members):
    tensors = leaves(members)
    fused_leaves = [t.clone().requires_grad_() for t in tensors[:3]]
    plain_leaves = [t.clone().requires_grad_() for t in tensors[:3]]
    weights_out = torch.randn(tensors[0].shape[:-1])  # a non-uniform upstream gradient
    fused = output_token_log_likelihood(*fused_leaves, tensors[3])
    plain = reference(*plain_leaves, tensors[3])
    assert fused.shape == plain.shape
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5)
    (fused * weights_out).sum().backward()
    (plain * weights_out).sum().backward()
    for mine, theirs in zip(fused_leaves, plain_leaves):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("members", [None, 2])
def test_tiles_without_autograd_give_the_same_values(members, monkeypatch):
    rows, weight, bias, gold = leaves(members, rows=23)
    monkeypatch.setattr(output_layer, "OUTPUT_TILE_ROWS", 5)  # five tiles, the last one ragged
    with torch.no_grad():
        tiled = output_token_log_likelihood(rows, weight, bias, gold)
    assert torch.allclose(tiled, reference(rows, weight, bias, gold), rtol=1e-5, atol=1e-5)


def test_large_logits_stay_finite_and_exact():
    """The max is subtracted before exp: logits in the hundreds give log p as log_softmax does."""
    rows, weight, bias, gold = leaves(None, scale=60.0)
    fused = output_token_log_likelihood(rows, weight, bias, gold)
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused, reference(rows, weight, bias, gold), rtol=1e-5, atol=1e-3)


def test_float64_inputs_are_computed_in_float64():
    rows, weight, bias, gold = (t.double() if t.is_floating_point() else t for t in leaves(None))
    fused = output_token_log_likelihood(rows.requires_grad_(), weight, bias, gold)
    assert fused.dtype == torch.float64
    assert torch.allclose(fused, reference(rows, weight, bias, gold), rtol=1e-12, atol=1e-12)


def test_a_second_backward_through_the_same_graph_gives_the_same_gradients():
    """retain_graph (Figure 2's gradient norms take several gradients of one forward pass): the
    first backward consumes the buffer, a later one computes the softmax again."""
    rows, weight, bias, gold = leaves(None)
    rows.requires_grad_()
    upstream = torch.randn(rows.shape[0])
    log_p = output_token_log_likelihood(rows, weight, bias, gold)
    (first,) = torch.autograd.grad((log_p * upstream).sum(), rows, retain_graph=True)
    _ = output_token_log_likelihood(rows, 2 * weight, bias, gold).sum()  # another forward reuses the buffer
    (second,) = torch.autograd.grad((log_p * upstream).sum(), rows)
    assert torch.equal(first, second)


def test_a_buffer_from_an_evaluation_under_inference_mode_serves_training_afterwards():
    """Evaluation runs under torch.inference_mode; the buffer it leaves in the pool must be an
    ordinary tensor, or the next training step's in-place writes would be refused."""
    rows, weight, bias, gold = leaves(None)
    with torch.inference_mode():
        evaluated = output_token_log_likelihood(rows, weight, bias, gold)
    weight.requires_grad_()
    trained = output_token_log_likelihood(rows, weight, bias, gold)
    trained.sum().backward()
    assert torch.allclose(trained.detach(), evaluated, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(weight.grad).all()


def test_under_bfloat16_autocast_the_matmul_is_bfloat16_and_the_result_fp32():
    rows, weight, bias, gold = leaves(None)
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = output_token_log_likelihood(rows, weight, bias, gold)
    assert fused.dtype == torch.float32
    logits = nn.functional.linear(rows.bfloat16(), weight.detach().bfloat16(), bias.bfloat16()).float()
    plain = -nn.functional.cross_entropy(logits, gold, reduction="none")  # what linear under autocast gives
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(fused, reference(rows, weight.detach(), bias, gold), rtol=1e-6, atol=1e-6)
    fused.sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()

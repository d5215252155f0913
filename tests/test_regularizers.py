"""Free bits, the WAE objective and the annealing caps as the Objective assembles them."""
import pytest
import torch

from cvae_core.data import load_corpus, make_batch
from cvae_core.models import build_model
from cvae_core.objectives import Objective, free_bits_kl, imq_mmd


def test_free_bits_clamp_per_example_and_per_dimension():
    kl = torch.tensor([[0.0, 0.1, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0]])
    # 6 nats over d = 4 -> each dimension counts at least 1.5 nats
    assert free_bits_kl(kl, 6.0).tolist() == [1.5 + 1.5 + 1.5 + 2.0, 6.0]
    # with d = 32 the floor is the authors' 0.1875 nats per dimension
    assert free_bits_kl(torch.zeros(1, 32), 6.0).item() == pytest.approx(6.0)
    assert free_bits_kl(torch.full((1, 32), 0.2), 6.0).item() == pytest.approx(6.4)


def _parts(tiny_config, preset, step, **overrides):
    config = tiny_config(preset, **overrides)
    corpus = load_corpus(config.data, ("train",))
    model = build_model(config, len(corpus.vocab)).eval()
    batch = make_batch(corpus["train"].examples[:6])
    torch.manual_seed(0)
    out = model(batch)
    return config, model, out, Objective(config)(model, out, step)


def test_free_bits_objective_is_annealed_and_clamped(tiny_config):
    config, model, out, (loss, parts) = _parts(tiny_config, "prefb-vae", step=7, **{"train.pretrain_steps": 0})
    weight = min(max((7 - config.regularizer.anneal_start) / config.regularizer.anneal_steps, 0.0), 1.0)
    assert 0 < weight < 1
    kl_per_dim = out.posterior.kl_per_dim()
    floor = 6.0 / config.model.latent_dim
    expected = out.rec.mean() + weight * kl_per_dim.clamp(min=floor).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl_per_dim.sum(-1).mean().item(), rel=1e-5)  # logged unclamped


def test_wae_objective_adds_ten_times_mmd_unannealed_and_caps_kl_at_0_8(tiny_config):
    config, model, out, (loss, parts) = _parts(tiny_config, "wae", step=1)
    assert config.regularizer.kl_cap == 0.8 and config.regularizer.mmd_weight == 10.0
    assert Objective(config).kl_weight(1) == 0.0 and Objective(config).kl_weight(10**6) == 0.8
    # at step 1 the KL weight is 0, but the MMD term is on from the start
    assert loss.item() == pytest.approx((out.rec.mean() + 10.0 * parts["mmd"]).item(), rel=1e-5)


def test_wae_nf_matches_the_flowed_sample(tiny_config):
    config = tiny_config("wae-nf")
    corpus = load_corpus(config.data, ("train",))
    model = build_model(config, len(corpus.vocab)).eval()
    torch.manual_seed(0)
    out = model(make_batch(corpus["train"].examples[:6]))
    rng = torch.get_rng_state()
    loss, parts = Objective(config)(model, out, 1)
    assert config.model.posterior == "nf" and "mmd" in parts
    # the prior draw the objective made, drawn again from the same generator state
    torch.set_rng_state(rng)
    z, base = out.sample.z, out.sample.base
    prior_draw = out.prior.sample((z.shape[0],)).to(z)
    assert not torch.equal(z, base)
    # the MMD is the one of the flowed sample zK, not of the base sample z0
    assert parts["mmd"].item() == pytest.approx(imq_mmd(z, prior_draw, z.shape[-1]).item(), rel=1e-6)
    assert parts["mmd"].item() != pytest.approx(imq_mmd(base, prior_draw, z.shape[-1]).item(), rel=1e-3)


def test_cyclic_preset_schedule(tiny_config):
    config = tiny_config("cycann-vae", **{"regularizer.anneal_start": 0, "regularizer.anneal_steps": 40})
    objective = Objective(config)
    # 4 cycles of 10 steps, ramping over the first 5 of each
    # step 40 = s0 + S starts a fifth cycle in the authors' schedule (their `>`); the cap holds after it
    assert [objective.kl_weight(t) for t in (0, 2, 5, 9, 10, 12, 40, 41, 50)] == [
        0.0, 0.4, 1.0, 1.0, 0.0, 0.4, 0.0, 1.0, 1.0]

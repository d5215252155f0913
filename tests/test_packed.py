"""Packed training: each member of a pack computes exactly what its standalone model computes
(loss, gradients, clipping, Adam steps), and packing is a lossless round trip of ordinary weights."""
import pytest
import torch

from cvae_core.data import load_corpus, make_batch
from cvae_core.errors import CvaeError
from cvae_core.models import build_model
from cvae_core.objectives import Objective
from cvae_core.packed import PackedObjective, check_pack_configs, clip_grad_norm_per_member, pack, unpack
from cvae_core.train import make_optimizer

# Three coupled members with different weights: RQ with the default C, Eucl without matching
# (lambda_m = 0), RQ with its own C; their KL schedules differ too.
COUPLED_MEMBERS = [
    {"coupling.lambda_r": 1.0, "coupling.lambda_m": 0.5, "coupling.distance": "rq"},
    {"coupling.lambda_r": 0.3, "coupling.lambda_m": 0.0, "coupling.distance": "eucl",
     "regularizer.anneal_start": 0, "regularizer.anneal_steps": 4},
    {"coupling.lambda_r": 2.0, "coupling.lambda_m": 3.0, "coupling.distance": "rq", "coupling.rq_c": 3.0,
     "regularizer.kl_cap": 0.5},
]
EUCL_MEMBER = {"coupling.lambda_r": 0.7, "coupling.lambda_m": 1.5, "coupling.distance": "eucl"}
STEP = 5  # every member's KL weight is nonzero here, and they differ


def setup_members(tiny_config, preset, members, n_sentences=7, **shared):
    configs = [tiny_config(preset, **shared, **{"train.seed": k, **m}) for k, m in enumerate(members)]
    corpus = load_corpus(configs[0].data, ("train",))
    models = []
    for k, config in enumerate(configs):
        torch.manual_seed(10 + k)  # independently initialised members
        models.append(build_model(config, len(corpus.vocab)))
    # Sentences of different lengths, so the encoder's per-sentence last states matter.
    batch = make_batch(corpus["train"].examples[3 : 3 + n_sentences])
    assert len(set(batch.lengths.tolist())) > 2
    return configs, models, batch


def standalone_step(model, config, batch, seed, step=STEP):
    """The trainer's loss and gradients for one model, its posterior noise drawn after seeding."""
    torch.manual_seed(seed)
    loss, parts = Objective(config)(model, model(batch), step)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), parts


def member_noise(seeds, batch_size, latent_dim):
    """The standard-normal draws each standalone model's rsample makes after seeding."""
    noise = []
    for seed in seeds:
        torch.manual_seed(seed)
        noise.append(torch.empty(batch_size, latent_dim).normal_())
    return torch.stack(noise)


def assert_close_to(actual, expected):
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def assert_member_gradients(packed, models):
    for name, parameter in packed.named_parameters():
        for k, model in enumerate(models):
            expected = model.get_parameter(name).grad
            if expected is None:  # e.g. the twin's unused log-std layer
                assert parameter.grad is None or not parameter.grad[k].any(), name
            else:
                assert_close_to(parameter.grad[k], expected)


@pytest.mark.parametrize("preset,members", [("coupled-vae", COUPLED_MEMBERS + [EUCL_MEMBER]),
                                            ("vae", [{}, {"regularizer.kl_cap": 0.3}])])
def test_member_loss_and_gradients_equal_standalone(tiny_config, preset, members):
    configs, models, batch = setup_members(tiny_config, preset, members)
    packed = pack(models)
    seeds = [100 + k for k in range(len(models))]
    expected = [standalone_step(m, c, batch, s) for m, c, s in zip(models, configs, seeds)]

    objective = PackedObjective(configs)
    output = packed(batch, member_noise(seeds, len(batch.lengths), configs[0].model.latent_dim))
    loss, parts = objective(output, STEP)
    loss.backward()

    for k, (member_loss, member_parts) in enumerate(expected):
        assert_close_to(parts["loss"][k], member_loss)
        for name, value in member_parts.items():
            assert_close_to(parts[name][k], value.detach())
    assert_close_to(loss, sum(member_loss for member_loss, _ in expected))
    assert_member_gradients(packed, models)


def test_pack_unpack_round_trip_is_exact(tiny_config):
    configs, models, _ = setup_members(tiny_config, "coupled-vae", COUPLED_MEMBERS)
    states = unpack(pack(models))
    for config, model, state in zip(configs, models, states):
        ordinary = model.state_dict()
        assert list(state) == list(ordinary)  # same keys, shared-embedding aliases included
        assert all(torch.equal(state[name], ordinary[name]) for name in ordinary)
        fresh = build_model(config, model.vocab_size)
        fresh.load_state_dict(state, strict=True)


def test_per_member_clipping_equals_standalone(tiny_config):
    configs, models, batch = setup_members(tiny_config, "coupled-vae", COUPLED_MEMBERS)
    packed = pack(models)
    seeds = [7, 8, 9]
    for model, config, seed in zip(models, configs, seeds):
        standalone_step(model, config, batch, seed)
    loss, _ = PackedObjective(configs)(packed(batch, member_noise(seeds, len(batch.lengths), 4)), STEP)
    loss.backward()
    unclipped = [torch.nn.utils.get_total_norm([p.grad for p in m.parameters() if p.grad is not None])
                 for m in models]
    max_norm = float(sorted(unclipped)[1])  # the largest member is clipped, the smallest is not
    expected_norms = torch.stack([torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm) for m in models])

    norms = clip_grad_norm_per_member(packed.parameters(), max_norm)

    assert_close_to(norms, expected_norms)
    assert_member_gradients(packed, models)


def test_training_steps_packed_equal_standalone(tiny_config):
    """Forward, backward, per-member clipping, one fused Adam over the stacked weights: after a
    few steps every member's weights equal its standalone run's (K Adams)."""
    configs, models, batch = setup_members(tiny_config, "coupled-vae", COUPLED_MEMBERS, **{"train.clip_norm": 5.0})
    packed = pack(models)
    objective = PackedObjective(configs)
    optimizer = make_optimizer(packed, configs[0])
    optimizers = [make_optimizer(m, c) for m, c in zip(models, configs)]
    initial = [{n: t.clone() for n, t in m.state_dict().items()} for m in models]
    for step in range(1, 4):
        seeds = [1000 * step + k for k in range(len(models))]
        for model, config, opt, seed in zip(models, configs, optimizers, seeds):
            standalone_step(model, config, batch, seed, step)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_norm)
            opt.step()
        loss, _ = objective(packed(batch, member_noise(seeds, len(batch.lengths), 4)), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_per_member(packed.parameters(), configs[0].train.clip_norm)
        optimizer.step()
    for state, model, before in zip(unpack(packed), models, initial):
        for name, tensor in model.state_dict().items():
            assert_close_to(state[name], tensor)
        assert not torch.allclose(state["base.decoder.output.weight"], before["base.decoder.output.weight"])


def test_eval_mode_matches_with_dropout(tiny_config):
    """With dropout configured, eval mode (no dropout) still matches member by member."""
    configs, models, batch = setup_members(tiny_config, "coupled-vae", COUPLED_MEMBERS[:2], **{"model.dropout": 0.3})
    packed = pack(models).eval()
    seeds = [3, 4]
    for model in models:
        model.eval()
    expected = [standalone_step(m, c, batch, s)[0] for m, c, s in zip(models, configs, seeds)]
    _, parts = PackedObjective(configs)(packed(batch, member_noise(seeds, len(batch.lengths), 4)), STEP)
    assert_close_to(parts["loss"], torch.stack(expected))


def test_unpackable_members_are_refused(tiny_config):
    configs, models, _ = setup_members(tiny_config, "coupled-vae", COUPLED_MEMBERS[:1])
    wider = build_model(tiny_config("coupled-vae", **{"model.hidden_dim": 8}), models[0].vocab_size)
    with pytest.raises(CvaeError, match="identical shapes"):
        pack([models[0], wider])
    plain = build_model(tiny_config("vae"), models[0].vocab_size)
    with pytest.raises(CvaeError, match="members coupled or all uncoupled"):
        pack([models[0], plain])
    with pytest.raises(CvaeError, match="train.batch_size"):
        check_pack_configs([configs[0], tiny_config("coupled-vae", **{"train.batch_size": 4})])
    with pytest.raises(CvaeError, match="Gaussian GRU"):
        check_pack_configs([tiny_config("coupled-vae", **{"model.posterior": "vmf"})])


@torch.no_grad()
def test_dropout_training_mode_matches_standalone_in_expectation(tiny_config):
    """Dropout masks cannot be drawn identically, so with dropout on (training mode) each member's
    mean loss over many masks and posterior draws must equal its standalone model's mean
    (within 4 standard errors of the difference)."""
    configs, models, batch = setup_members(tiny_config, "coupled-vae", COUPLED_MEMBERS[:2], **{"model.dropout": 0.3})
    packed = pack(models).train()
    objective = PackedObjective(configs)
    draws = 150
    packed_losses = torch.stack([objective(packed(batch), STEP)[1]["loss"] for _ in range(draws)])  # [N, K]
    for k, (model, config) in enumerate(zip(models, configs)):
        model.train()
        alone = torch.stack([Objective(config)(model, model(batch), STEP)[0] for _ in range(draws)])
        difference = packed_losses[:, k].mean() - alone.mean()
        standard_error = (packed_losses[:, k].var() / draws + alone.var() / draws).sqrt()
        assert packed_losses[:, k].std() > 0 and alone.std() > 0  # the masks really vary
        assert abs(float(difference)) < 4 * float(standard_error), (k, float(difference), float(standard_error))

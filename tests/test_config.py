"""Presets, scales, overrides and schedules."""
import pytest

from cvae_core.config import PRESETS, build_config
from cvae_core.errors import CvaeError
from cvae_core.objectives import cyclic_kl_weight, linear_kl_weight


def test_paper_scale_follows_the_authors_schedule():
    config = build_config("coupled-vae", "ptb", "paper")
    t = config.train
    assert (t.steps, t.batch_size, t.lr, t.clip_norm, t.eval_every, t.val_samples) == (60000, 32, 1e-3, 30.0, 1000, 10)
    assert (t.lr_decay_start, t.lr_decay_every) == (30000, 2000)
    assert (config.regularizer.anneal_start, config.regularizer.anneal_steps) == (2000, 40000)
    assert (config.model.embed_dim, config.model.hidden_dim, config.model.latent_dim) == (200, 128, 32)
    assert config.coupling.enabled and config.coupling.lambda_m == 0.1 and config.coupling.lambda_r == 1.0
    assert config.rq_c == 64.0
    assert build_config("vae", "yelp13", "paper", {"data.data_dir": "/x"}).regularizer.anneal_start == 1000
    assert build_config("vae", "yahoo", "paper", {"data.data_dir": "/x"}).model.hidden_dim == 256


def test_quick_scale_is_the_same_shape_compressed():
    config = build_config("coupled-vae", "ptb", "quick")
    t, r = config.train, config.regularizer
    assert t.steps == 1500 and t.lr_decay_start == 750 and t.lr_decay_every == 50
    assert r.anneal_steps == 1000 and r.anneal_start == 50
    assert t.lr_decay_start / t.steps == 30000 / 60000


def test_overrides_bare_and_dotted_keys():
    config = build_config("vae", "ptb", "quick", {"lambda_m": "2.5", "model.latent_dim": "16", "amp": "true"})
    assert config.coupling.lambda_m == 2.5 and config.model.latent_dim == 16 and config.train.amp is True
    with pytest.raises(CvaeError, match="ambiguous config key 'steps'|unknown config key"):
        build_config("vae", "ptb", "quick", {"steps_total": 1})


def test_every_preset_builds_for_ptb():
    for name, preset in PRESETS.items():
        assert build_config(name, "ptb-pairs" if preset.conditional else "ptb", "quick").preset == name


def test_linear_and_cyclic_schedules_at_chosen_steps():
    assert linear_kl_weight(2000, 2000, 40000, 1.0) == 0.0
    assert linear_kl_weight(22000, 2000, 40000, 1.0) == 0.5
    assert linear_kl_weight(60000, 2000, 40000, 0.8) == 0.8  # capped (beta / WAE)
    # M = 4 cycles of 10K steps over [2K, 42K], ramp over the first half of each cycle
    assert cyclic_kl_weight(1999, 2000, 40000, 4, 0.5) == 0.0
    assert cyclic_kl_weight(4500, 2000, 40000, 4, 0.5) == 0.5
    assert cyclic_kl_weight(9000, 2000, 40000, 4, 0.5) == 1.0
    assert cyclic_kl_weight(12000, 2000, 40000, 4, 0.5) == 0.0  # second cycle restarts
    assert cyclic_kl_weight(50000, 2000, 40000, 4, 0.5) == 1.0


def test_cyclic_annealing_boundary_is_the_authors():
    # s0 + S is the start of a (fifth) cycle in the authors' schedule; the cap holds only after it
    assert cyclic_kl_weight(42000, 2000, 40000, 4, 0.5) == 0.0
    assert cyclic_kl_weight(42001, 2000, 40000, 4, 0.5) == 1.0
    assert cyclic_kl_weight(41999, 2000, 40000, 4, 0.5) == 1.0  # end of the fourth cycle's plateau

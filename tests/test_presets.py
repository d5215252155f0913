"""Every preset (Table 1 rows and their coupled twins) builds, trains on a PTB slice, saves,
reloads and evaluates through the shared metric code; per-dataset settings of notes section 8."""
import math

import pytest

from cvae_core.checkpoint import load_model
from cvae_core.cli import main
from cvae_core.config import PRESETS, build_config
from cvae_core.data import load_corpus
from cvae_core.errors import CvaeError
from cvae_core.metrics.likelihood import evaluate
from cvae_core.train import train

TABLE_1 = ["vae", "beta-vae", "beta1.2-vae", "vmf-vae", "cnn-vae", "wae", "vae-nf", "wae-nf", "cycann-vae",
           "prefb-vae", "lagging-vae"]
BEYOND_THE_PAPER = ["power-spherical-vae"]
DIALOGUE = ["seq2seq", "cvae", "coupled-cvae"]  # trained on pairs: tests/test_conditional.py
TEXT_PRESETS = [name for name, preset in PRESETS.items() if not preset.conditional]

# tiny sizes, 50 steps on the first 300 PTB sentences, validation on 40
SLICE = {
    "data.train_limit": 300, "data.valid_limit": 40, "data.max_len": 30,
    "model.embed_dim": 16, "model.hidden_dim": 16, "model.latent_dim": 4, "model.cnn_filters": 16,
    "train.steps": 50, "train.eval_every": 50, "train.log_every": 50, "train.batch_size": 8,
    "train.val_samples": 3, "train.mi_samples": 3,
    "train.aggressive_max_inner": 4, "train.aggressive_window": 2,
}


@pytest.fixture(scope="module")
def ptb_slice():
    return load_corpus(build_config("vae", "ptb", "quick", SLICE).data, ("train", "valid"))


def test_registry_has_every_table_1_row_and_its_coupled_twin():
    names = list(PRESETS)
    assert names[:2] == ["lm", "dae"]
    expected = []
    for base in TABLE_1 + BEYOND_THE_PAPER:
        expected += [base, f"coupled-{base}"]
    assert names[2:] == expected + DIALOGUE  # Table 1 order, each twin right after its base; then Table 8
    for base in TABLE_1:
        assert PRESETS[base].group == PRESETS[f"coupled-{base}"].group


def test_cvae_presets_shows_the_groups_in_table_order(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(f"\n  {name} ") for name in PRESETS]
    assert positions == sorted(positions)
    assert out.index("\nCNN-VAE\n") < out.index("\n  cnn-vae ") < out.index("\n  coupled-cnn-vae ")
    assert out.index("\nbeyond the paper") > out.index("\n  coupled-lagging-vae ")


@pytest.mark.parametrize("name", TEXT_PRESETS)
def test_preset_trains_saves_reloads_and_evaluates(name, ptb_slice, tmp_path):
    overrides = dict(SLICE)
    if build_config(name, "ptb", "quick").train.pretrain_steps:
        overrides["train.pretrain_steps"] = 10
    config = build_config(name, "ptb", "quick", overrides)
    result = train(config, tmp_path, corpus=ptb_slice, log=lambda _: None)
    assert result.steps == 50 and result.best_checkpoint is not None
    model, loaded, _ = load_model(tmp_path / "checkpoints" / "best")
    assert loaded.to_dict() == config.to_dict()
    scores = evaluate(model, ptb_slice["valid"], n_samples=3, mi_samples=3, seed=config.train.seed)
    if config.model.kind == "dae":
        assert math.isfinite(scores["rec"])
        assert scores["rec"] == pytest.approx(result.best_metrics["val_rec"], rel=1e-5)
        return
    assert scores["nll"] == pytest.approx(result.best_metrics["val_nll"], rel=1e-5)  # the reload is the model
    keys = ("nll", "ppl") if config.model.kind == "lm" else ("nll", "kl", "ppl", "elbo", "rec", "mi_loo", "mi_batch")
    for key in keys:
        assert math.isfinite(scores[key]), (key, scores[key])
    if config.model.kind == "vae":
        assert 0 <= scores["au"] <= config.model.latent_dim
        assert scores["nll"] <= -scores["elbo"] + 1e-3


def _lambda_m(name, dataset):
    return build_config(name, dataset, "paper", {"data.data_dir": "/x"}).coupling.lambda_m


def test_per_dataset_settings_of_notes_section_8():
    assert [_lambda_m("coupled-vmf-vae", ds) for ds in ("ptb", "yelp13", "yahoo")] == [7.5, 7.0, 5.0]
    assert [_lambda_m("coupled-cnn-vae", ds) for ds in ("ptb", "yelp13", "yahoo")] == [0.0, 0.1, 0.1]
    assert [_lambda_m("coupled-cycann-vae", ds) for ds in ("ptb", "yelp13", "yahoo")] == [0.1, 1.0, 1.0]
    assert [_lambda_m(f"coupled-{n}", "yahoo") for n in ("vae", "wae", "vae-nf", "wae-nf", "prefb-vae")] == [0.1] * 5
    cnn = {ds: build_config("cnn-vae", ds, "paper", {"data.data_dir": "/x"}).model
           for ds in ("ptb", "yelp13", "yahoo")}
    assert [(m.cnn_dilations, m.cnn_filters) for m in cnn.values()] == [("medium", 256), ("large", 128), ("large", 256)]
    starts = {name: [build_config(name, ds, "paper", {"data.data_dir": "/x"}).regularizer.anneal_start
                     for ds in ("ptb", "yelp13", "yahoo")] for name in ("vae", "vmf-vae", "cycann-vae", "wae-nf")}
    assert starts == {"vae": [2000, 1000, 1000], "vmf-vae": [2000, 2000, 2000], "cycann-vae": [2000, 1000, 1000],
                      "wae-nf": [2000, 2000, 2000]}
    for name in TEXT_PRESETS:
        config = build_config(name, "ptb", "paper")
        if config.coupling.enabled:
            assert config.coupling.lambda_r == 1.0 and config.coupling.distance == "rq"


def test_family_settings():
    wae = build_config("coupled-wae-nf", "ptb", "paper")
    assert (wae.model.posterior, wae.regularizer.kind, wae.regularizer.mmd_weight, wae.regularizer.kl_cap) == (
        "nf", "mmd", 10.0, 0.8)
    prefb = build_config("prefb-vae", "ptb", "paper")
    assert (prefb.regularizer.kind, prefb.regularizer.free_bits, prefb.train.pretrain_steps) == ("free_bits", 6.0, 60000)
    assert build_config("prefb-vae", "ptb", "quick").train.pretrain_steps == 1500  # compressed like the schedule
    cyc = build_config("cycann-vae", "ptb", "paper").regularizer
    assert (cyc.schedule, cyc.cycles, cyc.cycle_ratio) == ("cyclic", 4, 0.5)
    assert build_config("lagging-vae", "ptb", "quick").train.aggressive
    assert build_config("vmf-vae", "ptb", "quick").model.vmf_sampler == "exact"
    assert [build_config(n, "ptb", "paper").regularizer.kl_cap for n in ("vae", "beta-vae", "beta1.2-vae")] == [
        1.0, 0.8, 1.2]


@pytest.mark.parametrize("posterior", ["gaussian", "vmf", "nf", "power_spherical"])
@pytest.mark.parametrize("regularizer", ["kl", "free_bits", "mmd"])
def test_study_space_posterior_by_regularizer(posterior, regularizer):
    """The study service sets these as plain values: a valid pair builds, an invalid one is a
    one-line CvaeError naming both values."""
    valid = {"kl": True, "free_bits": posterior == "gaussian", "mmd": posterior in ("gaussian", "nf")}[regularizer]
    overrides = {"model.posterior": posterior, "regularizer.kind": regularizer}
    if valid:
        for preset in ("vae", "coupled-vae"):
            config = build_config(preset, "ptb", "quick", overrides)
            assert (config.model.posterior, config.regularizer.kind) == (posterior, regularizer)
    else:
        with pytest.raises(CvaeError) as error:
            build_config("coupled-vae", "ptb", "quick", overrides)
        message = str(error.value)
        assert "\n" not in message and f"regularizer.kind={regularizer}" in message and posterior in message

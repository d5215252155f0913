"""The scales (the paper's schedule and its CPU-sized compression), the named presets (one per
row of the paper's Table 1 and its coupled twin, the dialogue models) and :func:`build_config`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import CvaeError
from .overrides import apply_overrides, coerce
from .schema import CONDITIONAL_KINDS, DATASETS, FIELDS, PAIR_DATASETS, Config, CouplingConfig, flatten, resolve_key
from .validation import validate


# ---------------------------------------------------------------------------------------------
# Scales: the paper's schedule, and the same shape compressed for a CPU.

def paper_scale(config: Config) -> None:
    """The authors' schedule: 60K steps, eval every 1K, LR halving every 2K after 30K."""
    t = config.train
    t.steps, t.eval_every, t.lr_decay_start, t.lr_decay_every, t.log_every = 60000, 1000, 30000, 2000, 100
    t.val_samples, t.mi_samples = 10, 10
    config.regularizer.anneal_steps = 40000


# Quick scale = the paper's schedule compressed 40x on the step axis (1.5K steps, LR halving every
# 50 steps after 750, annealing from step 50 over 1,000 steps), full training data, validation on
# the first 1,000 sentences every 500 steps. Sized so that a coupled model trains in minutes on a
# laptop CPU (the README gives the timings); compressing less buys nothing: at 30x the last 500
# steps ran at LR < 4e-6 and moved validation NLL by 0.01 nats.
QUICK_FACTOR = 40


def quick_scale(config: Config) -> None:
    t = config.train
    t.steps, t.eval_every = 60000 // QUICK_FACTOR, 500
    t.lr_decay_start, t.lr_decay_every = 30000 // QUICK_FACTOR, round(2000 / QUICK_FACTOR)
    t.log_every, t.val_samples, t.mi_samples = 50, 10, 10
    config.regularizer.anneal_start = round(2000 / QUICK_FACTOR)
    config.regularizer.anneal_steps = round(40000 / QUICK_FACTOR)
    config.data.valid_limit = 1000


SCALE_SETTERS: dict[str, Callable[[Config], None]] = {"paper": paper_scale, "quick": quick_scale}


# ---------------------------------------------------------------------------------------------
# Presets: one per row of the paper's Table 1 (and its coupled twin), in the table's order.

@dataclass(frozen=True)
class Preset:
    name: str
    group: str  # the Table 1 block it belongs to
    description: str
    settings: dict[str, Any]
    # dataset -> settings applied on top (the authors' per-dataset values); step counts are in paper steps
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        """A dialogue preset: it trains on post/response pairs (ptb-pairs, swda, pairs)."""
        return self.settings.get("model.kind") in CONDITIONAL_KINDS


PRESETS: dict[str, Preset] = {}
PAPER_DATASETS = ("ptb", "yelp13", "yahoo")
# Keys given in paper steps by presets; the quick scale divides them by QUICK_FACTOR.
PAPER_STEP_KEYS = ("regularizer.anneal_start", "train.pretrain_steps")


def register_preset(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    PRESETS[preset.name] = preset
    return preset


def register_pair(name: str, group: str, description: str, settings: dict[str, Any] | None = None,
                  per_dataset: dict[str, dict[str, Any]] | None = None,
                  lambda_m: tuple[float, float, float] = (0.1, 0.1, 0.1),
                  coupled_extra: dict[str, Any] | None = None) -> None:
    """Register a base preset and its ``coupled-`` twin.

    ``lambda_m`` is the twin's matching weight for PTB / Yelp-13 / Yahoo (the authors' values); the
    twin always uses lambda_r = 1 and the RQ distance, as the authors' coupled models do.
    """
    settings, per_dataset = settings or {}, per_dataset or {}
    register_preset(Preset(name, group, description, settings, per_dataset))
    coupled_per_dataset = {ds: {**per_dataset.get(ds, {}), "coupling.lambda_m": lm}
                           for ds, lm in zip(PAPER_DATASETS, lambda_m)}
    shown = "/".join(f"{lm:g}" for lm in lambda_m)
    register_preset(Preset(
        f"coupled-{name}", group,
        f"{name} + deterministic coupled twin (lambda_r 1, RQ, lambda_m {shown} on PTB/Yelp/Yahoo)",
        {**settings, "coupling.enabled": True, "coupling.lambda_r": 1.0, "coupling.distance": "rq",
         **(coupled_extra or {})},
        coupled_per_dataset,
    ))


def _per_dataset(ptb: dict[str, Any], yelp13: dict[str, Any], yahoo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"ptb": ptb, "yelp13": yelp13, "yahoo": yahoo}


def _starts(ptb: int, yelp: int, yahoo: int) -> dict[str, dict[str, Any]]:
    """KL annealing start s0 per dataset, in paper steps (the authors' values, which differ from the
    paper's appendix for some models)."""
    return _per_dataset(*({"regularizer.anneal_start": s} for s in (ptb, yelp, yahoo)))


register_preset(Preset("lm", "baselines", "GRU language model (exact NLL)", {"model.kind": "lm"}))
register_preset(Preset("dae", "baselines", "deterministic autoencoder (reconstruction only; selected by val_rec)",
                       {"model.kind": "dae"}))
register_pair("vae", "VAE", "Gaussian VAE, linear KL annealing", {}, _starts(2000, 1000, 1000))
register_pair("beta-vae", "beta(0.8)-VAE", "beta-VAE, KL annealing capped at beta=0.8",
              {"regularizer.kl_cap": 0.8}, _starts(2000, 1000, 1000))
register_pair("beta1.2-vae", "beta(1.2)-VAE", "beta-VAE, KL annealing capped at beta=1.2",
              {"regularizer.kl_cap": 1.2}, _starts(2000, 1000, 1000))
register_pair("vmf-vae", "vMF-VAE",
              "von Mises-Fisher posterior, uniform prior, learnt kappa (exact Wood sampler; "
              "model.vmf_sampler=authors for the authors' biased b-blend)",
              {"model.posterior": "vmf"}, _starts(2000, 2000, 2000), lambda_m=(7.5, 7.0, 5.0))
register_pair("cnn-vae", "CNN-VAE",
              "Gaussian VAE with a dilated causal CNN decoder (PTB medium F=256, Yelp/Yahoo large F=128/256)",
              {"model.decoder": "cnn"},
              _per_dataset(
                  {"regularizer.anneal_start": 2000, "model.cnn_dilations": "medium", "model.cnn_filters": 256},
                  {"regularizer.anneal_start": 2000, "model.cnn_dilations": "large", "model.cnn_filters": 128},
                  {"regularizer.anneal_start": 2000, "model.cnn_dilations": "large", "model.cnn_filters": 256}),
              lambda_m=(0.0, 0.1, 0.1))
register_pair("wae", "WAE", "Wasserstein AE: 10 x IMQ-MMD to the prior + KL annealed to a cap of 0.8",
              {"regularizer.kind": "mmd", "regularizer.mmd_weight": 10.0, "regularizer.kl_cap": 0.8},
              _starts(2000, 2000, 2000))
register_pair("vae-nf", "VAE-NF", "Gaussian (Linear+BatchNorm) base and 3 global planar flows",
              {"model.posterior": "nf", "model.n_flows": 3}, _starts(2000, 2000, 2000))
register_pair("wae-nf", "WAE-NF", "WAE (10 x IMQ-MMD, KL cap 0.8) with the VAE-NF posterior",
              {"model.posterior": "nf", "model.n_flows": 3, "regularizer.kind": "mmd",
               "regularizer.mmd_weight": 10.0, "regularizer.kl_cap": 0.8}, _starts(2000, 2000, 2000))
register_pair("cycann-vae", "CycAnn-VAE", "Gaussian VAE, cyclic KL annealing (M=4 cycles, R=0.5)",
              {"regularizer.schedule": "cyclic", "regularizer.cycles": 4, "regularizer.cycle_ratio": 0.5},
              _starts(2000, 1000, 1000), lambda_m=(0.1, 1.0, 1.0))
register_pair("prefb-vae", "PreFB-VAE",
              "DAE-pretrained encoder (a DAE stage as long as the VAE run, in <out>/pretrain) + "
              "free bits 6 nats (0.1875/dim, per example)",
              {"regularizer.kind": "free_bits", "regularizer.free_bits": 6.0, "train.pretrain_steps": 60000},
              _starts(2000, 1000, 1000))
register_pair("lagging-vae", "Lagging-VAE",
              "Gaussian VAE with aggressive encoder updates until val MI stops rising (He et al. 2019; "
              "the paper's GRU setup, not He et al.'s LSTM/SGD)",
              {"train.aggressive": True}, _starts(2000, 1000, 1000))
register_pair("power-spherical-vae", "beyond the paper: Power Spherical-VAE",
              "Power Spherical posterior (De Cao & Aziz 2020), uniform prior; vMF's lambda_m",
              {"model.posterior": "power_spherical"}, _starts(2000, 2000, 2000), lambda_m=(7.5, 7.0, 5.0))

# Table 8: dialogue generation (post -> response). Linear KL annealing from s0 = 2000 over 40K
# steps as for PTB; the coupled twin uses RQ and lambda_r = 1, and the paper sweeps lambda_m over
# 0.1, 0.5, 1 and 2 (--set coupling.lambda_m=...; studies/cvae_sweep.py runs all four).
CVAE_LAMBDA_M = (0.1, 0.5, 1.0, 2.0)
register_preset(Preset("seq2seq", "dialogue (Table 8)", "GRU encoder-decoder: post -> response (exact NLL)",
                       {"model.kind": "seq2seq"}))
register_preset(Preset("cvae", "dialogue (Table 8)",
                       "CVAE: prior net p(z|post), posterior q(z|response, post), signal toInit(z) + Linear(post)",
                       {"model.kind": "cvae"}))
register_preset(Preset("coupled-cvae", "dialogue (Table 8)",
                       "CVAE + deterministic coupled twin (lambda_r 1, RQ, lambda_m 0.1; the paper also "
                       "reports 0.5, 1, 2)",
                       {"model.kind": "cvae", "coupling.enabled": True, "coupling.lambda_r": 1.0,
                        "coupling.distance": "rq", "coupling.lambda_m": CVAE_LAMBDA_M[0]}))


DATASET_SIZES = {  # GRU hidden size per direction of the bidirectional encoder (the paper's 128 / 256)
    "ptb": {"model.hidden_dim": 128},
    "yelp13": {"model.hidden_dim": 256},
    "yahoo": {"model.hidden_dim": 256},
    "text": {},
    "ptb-pairs": {"model.hidden_dim": 128},
    # Switchboard: the authors' vocabulary keeps words seen at least 5 times in the training pairs
    "swda": {"model.hidden_dim": 128, "data.min_count": 5},
    "pairs": {"model.hidden_dim": 128},
    # He et al.'s synthetic data: their model is an LSTM encoder and decoder of 50 units, embedding
    # 50, a 2-D z (so posterior means can be drawn), batch 16. Ours: a bi-GRU encoder of 2 x 25 and
    # a GRU decoder of 2 x 25 = 50 units, the same embedding, z and batch.
    "synthetic": {"model.embed_dim": 50, "model.hidden_dim": 25, "model.latent_dim": 2, "train.batch_size": 16},
}


def _in_scale(settings: dict[str, Any], scale: str) -> dict[str, Any]:
    """Preset step counts are paper steps; the quick scale compresses them like the schedule."""
    if scale != "quick":
        return dict(settings)
    return {key: round(value / QUICK_FACTOR) if key in PAPER_STEP_KEYS else value for key, value in settings.items()}


def build_config(preset: str = "vae", dataset: str = "ptb", scale: str = "quick",
                 overrides: dict[str, Any] | None = None) -> Config:
    """scale defaults -> preset -> per-dataset settings -> overrides, validated.

    A dataset without its own preset settings (``text``) takes PTB's.
    """
    if preset not in PRESETS:
        raise CvaeError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    if scale not in SCALE_SETTERS:
        raise CvaeError(f"unknown scale {scale!r}; choose from: {', '.join(SCALE_SETTERS)}")
    if dataset not in DATASETS:
        raise CvaeError(f"unknown dataset {dataset!r}; choose from: {', '.join(DATASETS)}")
    config = Config(preset=preset, scale=scale)
    config.data.dataset = dataset
    SCALE_SETTERS[scale](config)
    apply_overrides(config, DATASET_SIZES[dataset])
    apply_overrides(config, _preset_settings(preset, dataset, scale))
    apply_overrides(config, overrides or {})
    validate(config)
    return config



def _preset_settings(preset: str, dataset: str, scale: str) -> dict[str, Any]:
    """The preset's settings with its per-dataset ones on top (PTB's for a dataset it does not name)."""
    spec = PRESETS[preset]
    per_dataset = spec.per_dataset.get(dataset, spec.per_dataset.get("ptb", {}))
    return {**_in_scale(spec.settings, scale), **_in_scale(per_dataset, scale)}


def preset_coupling(preset: str, dataset: str = "ptb") -> CouplingConfig:
    """The coupling settings (enabled, lambda_r, lambda_m, distance, rq_c) ``preset`` uses on
    ``dataset``, equal to ``build_config(preset, dataset).coupling`` but without building a
    Config (no data paths needed).  Unknown preset or dataset, or a preset that does not run on
    ``dataset`` (a dialogue model on sentences, or the reverse): a one-line CvaeError."""
    if preset not in PRESETS:
        raise CvaeError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    if dataset not in DATASETS:
        raise CvaeError(f"unknown dataset {dataset!r}; choose from: {', '.join(DATASETS)}")
    if PRESETS[preset].conditional != (dataset in PAIR_DATASETS):
        raise CvaeError(f"preset {preset!r} does not run on dataset {dataset!r}: the dialogue presets read "
                        f"post/response pairs ({', '.join(PAIR_DATASETS)}), the others read sentences")
    coupling = CouplingConfig()
    for key, value in _preset_settings(preset, dataset, "paper").items():  # coupling keys are scale-free
        section, name, ftype = FIELDS[resolve_key(key)]
        if section == "coupling":
            setattr(coupling, name, coerce(key, value, ftype))
    return coupling


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A Config from its saved nested dict (a checkpoint's config.json), validated."""
    config = Config()
    apply_overrides(config, flatten(raw))
    validate(config)
    return config

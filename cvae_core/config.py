"""Typed configuration, named presets and ``key=value`` overrides.

A :class:`Config` is built as ``scale defaults -> preset -> per-dataset preset settings ->
user overrides``.  Every override is validated against the dataclass schema (unknown keys and
ill-typed values raise :class:`CvaeError` naming the key).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, get_type_hints

from .errors import CvaeError

DATASETS = ("ptb", "yelp13", "yahoo", "text")
MODEL_KINDS = ("lm", "dae", "vae")
POSTERIORS = ("gaussian", "vmf", "power_spherical", "nf")
DECODERS = ("gru", "cnn")
REGULARIZERS = ("kl", "free_bits", "mmd")
SCHEDULES = ("linear", "cyclic")
DISTANCES = ("rq", "eucl")
SCALES = ("quick", "paper")


@dataclass
class DataConfig:
    dataset: str = "ptb"
    # Folder with train.txt/valid.txt/test.txt (Yelp-13, Yahoo, plain text); PTB needs none.
    data_dir: str = ""
    train_path: str = ""  # overrides data_dir/train.txt
    valid_path: str = ""
    test_path: str = ""
    max_len: int = 200
    min_count: int = 1
    train_limit: int = 0  # use only the first N training examples (0 = all)
    valid_limit: int = 0  # validate on the first N examples (0 = all)


@dataclass
class ModelConfig:
    kind: str = "vae"  # lm | dae | vae
    posterior: str = "gaussian"
    decoder: str = "gru"
    embed_dim: int = 200
    hidden_dim: int = 128  # per direction of the bi-GRU encoder; the GRU decoder has 2x
    latent_dim: int = 32
    dropout: float = 0.2
    n_flows: int = 3
    cnn_dilations: str = "medium"  # small | medium | large
    cnn_filters: int = 256


@dataclass
class CouplingConfig:
    enabled: bool = False
    lambda_r: float = 1.0
    lambda_m: float = 0.1
    distance: str = "rq"
    rq_c: float = 0.0  # 0 = 2 * latent_dim, the authors' value


@dataclass
class RegularizerConfig:
    kind: str = "kl"  # kl | free_bits | mmd
    kl_cap: float = 1.0  # beta of beta-VAE, 0.8 for WAE
    schedule: str = "linear"
    anneal_start: int = 2000
    anneal_steps: int = 40000
    cycles: int = 4
    cycle_ratio: float = 0.5
    mmd_weight: float = 10.0
    free_bits: float = 6.0  # total nats, clamped per dimension at free_bits / latent_dim


@dataclass
class TrainConfig:
    steps: int = 60000
    batch_size: int = 32
    lr: float = 1e-3
    clip_norm: float = 30.0
    lr_decay_start: int = 30000  # halve the LR every lr_decay_every steps after this step
    lr_decay_every: int = 2000
    eval_every: int = 1000
    val_samples: int = 10  # importance samples for validation IS-NLL
    mi_samples: int = 10  # z samples per sentence for validation MI
    log_every: int = 100
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bfloat16 autocast on CUDA
    keep_last: int = 1  # step checkpoints kept besides the best


@dataclass
class Config:
    preset: str = "vae"
    scale: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        config = cls()
        apply_overrides(config, flatten(raw))
        validate(config)
        return config

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    @property
    def rq_c(self) -> float:
        return self.coupling.rq_c or 2.0 * self.model.latent_dim


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"latent_dim": 32}} -> {"model.latent_dim": 32}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _fields() -> dict[str, tuple[str, str, type]]:
    """dotted name -> (section, field, type) for every settable field."""
    table: dict[str, tuple[str, str, type]] = {}
    for name, hint in get_type_hints(Config).items():
        if dataclasses.is_dataclass(hint):
            for fname, ftype in get_type_hints(hint).items():
                table[f"{name}.{fname}"] = (name, fname, ftype)
        else:
            table[name] = ("", name, hint)
    return table


FIELDS = _fields()


def resolve_key(key: str) -> str:
    """Accept ``coupling.lambda_m`` or the bare ``lambda_m`` when it names one field only."""
    if key in FIELDS:
        return key
    matches = [name for name in FIELDS if name.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CvaeError(f"ambiguous config key {key!r}: say one of {', '.join(sorted(matches))}")
    raise CvaeError(f"unknown config key {key!r} (see `cvae presets --keys` for the schema)")


def _coerce(key: str, value: Any, ftype: type) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            if ftype is bool:
                if text.lower() in ("true", "1", "yes"):
                    return True
                if text.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            if ftype is int:
                as_float = float(text)
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            if ftype is float:
                return float(text)
            return text
        except ValueError:
            raise CvaeError(f"config key {key!r} needs a {ftype.__name__}, got {value!r}") from None
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ftype is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, ftype) or (ftype is not bool and isinstance(value, bool)):
        raise CvaeError(f"config key {key!r} needs a {ftype.__name__}, got {value!r}")
    return value


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    for raw_key, value in overrides.items():
        key = resolve_key(raw_key)
        section, fname, ftype = FIELDS[key]
        target = getattr(config, section) if section else config
        setattr(target, fname, _coerce(key, value, ftype))
    return config


def parse_assignments(items: list[str]) -> dict[str, str]:
    """["coupling.lambda_m=1", ...] -> {"coupling.lambda_m": "1"}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise CvaeError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CvaeError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def validate(config: Config) -> None:
    """Raise CvaeError for values outside their allowed range or set."""
    _check_choice("scale", config.scale, SCALES)
    _check_choice("data.dataset", config.data.dataset, DATASETS)
    _check_choice("model.kind", config.model.kind, MODEL_KINDS)
    _check_choice("model.posterior", config.model.posterior, POSTERIORS)
    _check_choice("model.decoder", config.model.decoder, DECODERS)
    _check_choice("model.cnn_dilations", config.model.cnn_dilations, ("small", "medium", "large"))
    _check_choice("regularizer.kind", config.regularizer.kind, REGULARIZERS)
    _check_choice("regularizer.schedule", config.regularizer.schedule, SCHEDULES)
    _check_choice("coupling.distance", config.coupling.distance, DISTANCES)
    non_negative = {
        "coupling.lambda_r": config.coupling.lambda_r,
        "coupling.lambda_m": config.coupling.lambda_m,
        "coupling.rq_c": config.coupling.rq_c,
        "regularizer.kl_cap": config.regularizer.kl_cap,
        "regularizer.mmd_weight": config.regularizer.mmd_weight,
        "regularizer.free_bits": config.regularizer.free_bits,
        "regularizer.anneal_start": config.regularizer.anneal_start,
        "model.dropout": config.model.dropout,
        "train.clip_norm": config.train.clip_norm,
        "data.train_limit": config.data.train_limit,
        "data.valid_limit": config.data.valid_limit,
        "train.keep_last": config.train.keep_last,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise CvaeError(f"{key} must be >= 0, got {value}")
    positive = {
        "model.embed_dim": config.model.embed_dim,
        "model.hidden_dim": config.model.hidden_dim,
        "model.latent_dim": config.model.latent_dim,
        "data.max_len": config.data.max_len,
        "data.min_count": config.data.min_count,
        "train.steps": config.train.steps,
        "train.batch_size": config.train.batch_size,
        "train.lr": config.train.lr,
        "train.eval_every": config.train.eval_every,
        "train.val_samples": config.train.val_samples,
        "train.mi_samples": config.train.mi_samples,
        "train.log_every": config.train.log_every,
        "train.lr_decay_every": config.train.lr_decay_every,
        "regularizer.anneal_steps": config.regularizer.anneal_steps,
        "regularizer.cycles": config.regularizer.cycles,
    }
    for key, value in positive.items():
        if value <= 0:
            raise CvaeError(f"{key} must be > 0, got {value}")
    if not 0 < config.regularizer.cycle_ratio <= 1:
        raise CvaeError(f"regularizer.cycle_ratio must be in (0, 1], got {config.regularizer.cycle_ratio}")
    if config.model.dropout >= 1:
        raise CvaeError(f"model.dropout must be < 1, got {config.model.dropout}")
    if config.coupling.enabled and config.model.kind != "vae":
        raise CvaeError(f"coupling needs model.kind=vae, got {config.model.kind!r}")
    if config.regularizer.kind == "free_bits" and config.model.posterior != "gaussian":
        raise CvaeError("regularizer.kind=free_bits needs model.posterior=gaussian (per-dimension KL)")
    if config.model.posterior in ("vmf", "power_spherical") and config.regularizer.kind == "mmd":
        raise CvaeError("regularizer.kind=mmd is defined for Gaussian-prior posteriors (gaussian, nf)")
    if config.data.dataset in ("yelp13", "yahoo", "text") and not (config.data.data_dir or config.data.train_path):
        raise CvaeError(
            f"data.dataset={config.data.dataset} needs data.data_dir=DIR (with train.txt, valid.txt, test.txt)"
            " or data.train_path/valid_path/test_path"
        )


# ---------------------------------------------------------------------------------------------
# Scales: the paper's schedule, and the same shape compressed for a CPU.

def paper_scale(config: Config) -> None:
    """Section 5 of the implementation notes: 60K steps, eval every 1K, LR halving after 30K."""
    t = config.train
    t.steps, t.eval_every, t.lr_decay_start, t.lr_decay_every, t.log_every = 60000, 1000, 30000, 2000, 100
    t.val_samples, t.mi_samples = 10, 10
    config.regularizer.anneal_steps = 40000


# Quick scale = the paper's schedule compressed 30x on the step axis (2K steps, LR halving every
# 67 steps after 1K, annealing from step 67 over 1,333 steps), full training data, validation on
# the first 1,000 sentences every 500 steps. Sized so that a coupled model finishes in under
# 15 min on 2 CPU cores (bench/ measures it).
QUICK_FACTOR = 30


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
# Presets: one per row of the paper's Table 1 (and its coupled twin).

@dataclass(frozen=True)
class Preset:
    name: str
    group: str  # the Table 1 block it belongs to
    description: str
    settings: dict[str, Any]
    # dataset -> settings applied on top (notes section 8); anneal_start is in paper steps
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    PRESETS[preset.name] = preset
    return preset


def register_pair(name: str, group: str, description: str, settings: dict[str, Any],
                  per_dataset: dict[str, dict[str, Any]], coupled_lambda_m: dict[str, float],
                  coupled_extra: dict[str, Any] | None = None) -> None:
    """Register a base preset and its ``coupled-`` twin (lambda_m per dataset, notes section 8)."""
    register_preset(Preset(name, group, description, settings, per_dataset))
    coupled_per_dataset = {
        ds: {**per_dataset.get(ds, {}), "coupling.lambda_m": lm} for ds, lm in coupled_lambda_m.items()
    }
    register_preset(Preset(
        f"coupled-{name}", group, f"{description}, coupled with a deterministic twin",
        {**settings, "coupling.enabled": True, **(coupled_extra or {})}, coupled_per_dataset,
    ))


def _starts(ptb: int, yelp: int, yahoo: int) -> dict[str, dict[str, Any]]:
    return {"ptb": {"regularizer.anneal_start": ptb}, "yelp13": {"regularizer.anneal_start": yelp},
            "yahoo": {"regularizer.anneal_start": yahoo}}


register_preset(Preset("lm", "baselines", "GRU language model (exact NLL)", {"model.kind": "lm"}))
register_preset(Preset("dae", "baselines", "deterministic autoencoder (reconstruction only)", {"model.kind": "dae"}))
register_pair("vae", "VAE", "Gaussian VAE, linear KL annealing", {}, _starts(2000, 1000, 1000),
              {"ptb": 0.1, "yelp13": 0.1, "yahoo": 0.1})
register_pair("beta-vae", "beta(0.8)-VAE", "beta-VAE, KL annealing capped at beta=0.8",
              {"regularizer.kl_cap": 0.8}, _starts(2000, 1000, 1000), {"ptb": 0.1, "yelp13": 0.1, "yahoo": 0.1})
register_pair("beta1.2-vae", "beta(1.2)-VAE", "beta-VAE, KL annealing capped at beta=1.2",
              {"regularizer.kl_cap": 1.2}, _starts(2000, 1000, 1000), {"ptb": 0.1, "yelp13": 0.1, "yahoo": 0.1})


DATASET_SIZES = {  # hidden size per direction (notes section 8)
    "ptb": {"model.hidden_dim": 128},
    "yelp13": {"model.hidden_dim": 256},
    "yahoo": {"model.hidden_dim": 256},
    "text": {},
}


def build_config(preset: str = "vae", dataset: str = "ptb", scale: str = "quick",
                 overrides: dict[str, Any] | None = None) -> Config:
    """scale defaults -> preset -> per-dataset settings -> overrides, validated."""
    if preset not in PRESETS:
        raise CvaeError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    if scale not in SCALE_SETTERS:
        raise CvaeError(f"unknown scale {scale!r}; choose from: {', '.join(SCALE_SETTERS)}")
    if dataset not in DATASETS:
        raise CvaeError(f"unknown dataset {dataset!r}; choose from: {', '.join(DATASETS)}")
    config = Config(preset=preset, scale=scale)
    config.data.dataset = dataset
    SCALE_SETTERS[scale](config)
    spec = PRESETS[preset]
    apply_overrides(config, DATASET_SIZES[dataset])
    apply_overrides(config, spec.settings)
    dataset_settings = dict(spec.per_dataset.get(dataset, spec.per_dataset.get("ptb", {})))
    if "regularizer.anneal_start" in dataset_settings and scale == "quick":
        dataset_settings["regularizer.anneal_start"] = round(dataset_settings["regularizer.anneal_start"] / QUICK_FACTOR)
    apply_overrides(config, dataset_settings)
    apply_overrides(config, overrides or {})
    validate(config)
    return config

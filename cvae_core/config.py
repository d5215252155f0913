"""Typed configuration, named presets and ``key=value`` overrides.

A :class:`Config` is built as ``scale defaults -> preset -> per-dataset preset settings ->
user overrides``.  Every override is validated against the dataclass schema (unknown keys and
ill-typed values raise :class:`CvaeError` naming the key).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, get_type_hints

from .errors import CvaeError

DATASETS = ("ptb", "yelp13", "yahoo", "text", "ptb-pairs", "swda", "pairs", "synthetic")
PAIR_DATASETS = ("ptb-pairs", "swda", "pairs")  # post/response pairs, for the conditional models
MODEL_KINDS = ("lm", "dae", "vae", "seq2seq", "cvae")
CONDITIONAL_KINDS = ("seq2seq", "cvae")
POSTERIORS = ("gaussian", "vmf", "power_spherical", "nf")
DECODERS = ("gru", "cnn")
REGULARIZERS = ("kl", "free_bits", "mmd")
SCHEDULES = ("linear", "cyclic")
DISTANCES = ("rq", "eucl")
VMF_SAMPLERS = ("exact", "authors")
SCALES = ("quick", "paper")
DEVICE_NAMES = "auto, cpu, cuda, cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# The bound on every integer setting: far above any this model needs (the paper trains 60,000
# steps; its largest sizes are in the hundreds), far below what a typo such as steps=10**20 asks.
MAX_INTEGER = 10**9
SYNTHETIC_SEED = 19950927  # He et al.'s generate.py default
SYNTHETIC_LENGTH = 10  # words per sentence of their synthetic data


@dataclass
class DataConfig:
    dataset: str = "ptb"
    # Folder with train.txt/valid.txt/test.txt (Yelp-13, Yahoo, plain text); PTB needs none. For
    # synthetic: the cache folder its generated data is kept in (default ~/.cache/cvae/synthetic).
    data_dir: str = ""
    train_path: str = ""  # overrides data_dir/train.txt
    valid_path: str = ""
    test_path: str = ""
    max_len: int = 200
    min_count: int = 1
    train_limit: int = 0  # use only the first N training examples (0 = all)
    valid_limit: int = 0  # validate on the first N examples (0 = all)
    # Training batches: "bucket" = sentences of similar length (pools of 50 batches sorted by
    # length: about 4% padding, so little compute is spent on it); "random" = i.i.d. shuffled
    # batches, as the authors train.
    batching: str = "bucket"
    # He et al. (2019)'s synthetic data is generated from this seed (theirs by default)
    synthetic_seed: int = SYNTHETIC_SEED


@dataclass
class ModelConfig:
    kind: str = "vae"  # lm | dae | vae | seq2seq | cvae (the last two read post/response pairs)
    posterior: str = "gaussian"
    decoder: str = "gru"
    embed_dim: int = 200
    hidden_dim: int = 128  # per direction of the bi-GRU encoder; the GRU decoder has 2x
    latent_dim: int = 32
    dropout: float = 0.2
    n_flows: int = 3
    cnn_dilations: str = "medium"  # small | medium | large
    cnn_filters: int = 256
    # Wood's envelope parameter b of the vMF sampler: exact, or the authors' blend (biased for d=32)
    vmf_sampler: str = "exact"


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
    # Lagging-VAE (He et al. 2019): aggressive inference-network updates until validation MI
    # (mi_batch) stops rising. Per training step: encoder-only updates on fresh batches, at most
    # aggressive_max_inner, stopped when the per-token loss of a window of aggressive_window inner
    # steps is higher than the previous window's; then one decoder-side update.
    aggressive: bool = False
    aggressive_max_inner: int = 100
    aggressive_window: int = 15
    # PreFB (Li et al. 2019): initialise the embedding, the encoder GRU and the posterior mean head
    # from a DAE. init_from names a DAE checkpoint; otherwise pretrain_steps > 0 first trains a DAE
    # for that many steps into <output_dir>/pretrain (reused if already finished).
    pretrain_steps: int = 0
    init_from: str = ""
    # Figure 2: every K steps, the gradient norms w.r.t. the encoding on a fixed batch of 16
    # validation sentences, logged at each evaluation as train_grad_total / train_grad_reg /
    # train_dh_de (means of the measurements since the previous evaluation). 0 = off.
    dynamics_every: int = 0


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


BATCHINGS = ("bucket", "random")


def check_device(name: str, where: str = "device") -> str:
    """``name`` if it is a device this package runs on (auto, cpu, cuda, cuda:N), else a CvaeError
    naming ``where`` it came from (a config key or a flag)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise CvaeError(f"{where} {name!r} is not one of {DEVICE_NAMES}")
    return name


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
    _check_choice("model.vmf_sampler", config.model.vmf_sampler, VMF_SAMPLERS)
    _check_choice("data.batching", config.data.batching, BATCHINGS)
    check_device(config.train.device, "train.device")
    # nan passes every "< 0" check below, and an inf LR or weight trains into NaN: refuse both here
    for key, value in config.flat().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise CvaeError(f"{key} must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
            raise CvaeError(f"{key}={value:,} is beyond {MAX_INTEGER:,}, the bound on integer settings (the paper "
                            "trains 60,000 steps; a billion would take weeks even at 1,000 steps/s): a typo?")
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
        "train.pretrain_steps": config.train.pretrain_steps,
        "train.dynamics_every": config.train.dynamics_every,
        "data.synthetic_seed": config.data.synthetic_seed,
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
        "train.aggressive_max_inner": config.train.aggressive_max_inner,
        "train.aggressive_window": config.train.aggressive_window,
    }
    for key, value in positive.items():
        if value <= 0:
            raise CvaeError(f"{key} must be > 0, got {value}")
    if not 0 < config.regularizer.cycle_ratio <= 1:
        raise CvaeError(f"regularizer.cycle_ratio must be in (0, 1], got {config.regularizer.cycle_ratio}")
    if config.model.dropout >= 1:
        raise CvaeError(f"model.dropout must be < 1, got {config.model.dropout}")
    _validate_combinations(config)
    if config.data.dataset == "synthetic":
        _validate_synthetic(config.data)
    if config.data.dataset in ("yelp13", "yahoo", "text", "swda", "pairs") and not (
            config.data.data_dir or config.data.train_path):
        ext = {"swda": "jsonl", "pairs": "tsv"}.get(config.data.dataset, "txt")
        raise CvaeError(
            f"data.dataset={config.data.dataset} needs data.data_dir=DIR (with train.{ext}, valid.{ext}, "
            f"test.{ext}) or data.train_path/valid_path/test_path"
        )


def _validate_synthetic(data: DataConfig) -> None:
    """Settings that would silently change what the synthetic data's known answer refers to."""
    if data.min_count != 1:
        raise CvaeError(f"data.min_count={data.min_count} does not apply to dataset synthetic: its vocabulary is "
                        "the generator's 1,000 words, seen or not, so that the true NLL is of the words themselves; "
                        "set data.min_count=1 (e.g. --set data.min_count=1 over a PTB spec)")
    if data.max_len < SYNTHETIC_LENGTH:
        raise CvaeError(f"data.max_len={data.max_len} would cut the synthetic sentences ({SYNTHETIC_LENGTH} words), "
                        f"and their true NLL is of whole sentences; use data.max_len >= {SYNTHETIC_LENGTH}")
    for key in ("train_path", "valid_path", "test_path"):
        if getattr(data, key):
            raise CvaeError(f"data.{key}={getattr(data, key)} is not used by dataset synthetic (it is generated "
                            "from data.synthetic_seed; data.data_dir names its cache folder); drop it")


def _validate_combinations(config: Config) -> None:
    """Combinations of individually valid values that do not make a model (one-line errors, so a
    study searching model.posterior x regularizer.kind can prune them)."""
    model, reg, train = config.model, config.regularizer, config.train
    latent = model.kind == "vae"
    if config.coupling.enabled and model.kind not in ("vae", "cvae"):
        raise CvaeError(f"coupling needs model.kind=vae or cvae, got {model.kind!r}")
    conditional_data = config.data.dataset in PAIR_DATASETS
    if conditional_data != (model.kind in CONDITIONAL_KINDS):
        raise CvaeError(f"model.kind={model.kind} and data.dataset={config.data.dataset} do not fit: the "
                        f"conditional models ({', '.join(CONDITIONAL_KINDS)}) read post/response pairs "
                        f"({', '.join(PAIR_DATASETS)}), the others read sentences")
    if model.kind == "cvae" and (model.posterior, model.decoder, reg.kind) != ("gaussian", "gru", "kl"):
        raise CvaeError("model.kind=cvae is the paper's Gaussian CVAE: it needs model.posterior=gaussian, "
                        f"model.decoder=gru and regularizer.kind=kl, got {model.posterior}, {model.decoder}, "
                        f"{reg.kind}")
    if train.dynamics_every and not (model.kind == "dae" or (latent and model.posterior == "gaussian")):
        raise CvaeError("train.dynamics_every (Figure 2's gradient norms) needs a DAE or a Gaussian VAE "
                        f"(coupled or not), got model.kind={model.kind}, model.posterior={model.posterior}")
    if model.kind == "seq2seq" and model.decoder != "gru":
        raise CvaeError(f"model.kind=seq2seq has a GRU decoder only, got model.decoder={model.decoder}")
    if latent and reg.kind == "free_bits" and model.posterior != "gaussian":
        raise CvaeError(f"regularizer.kind=free_bits needs model.posterior=gaussian (a per-dimension KL), "
                        f"got model.posterior={model.posterior}")
    if latent and reg.kind == "mmd" and model.posterior not in ("gaussian", "nf"):
        raise CvaeError(f"regularizer.kind=mmd needs a Gaussian prior (model.posterior=gaussian or nf), "
                        f"got model.posterior={model.posterior}")
    if latent and model.posterior in ("vmf", "power_spherical") and model.latent_dim < 2:
        raise CvaeError(f"model.posterior={model.posterior} needs model.latent_dim >= 2, got {model.latent_dim}")
    if model.kind == "lm" and model.decoder != "gru":
        raise CvaeError(f"model.kind=lm has a GRU decoder only, got model.decoder={model.decoder}")
    if train.aggressive and not latent:
        raise CvaeError(f"train.aggressive (Lagging-VAE) needs model.kind=vae, got {model.kind!r}")
    if (train.pretrain_steps or train.init_from) and not (latent and model.posterior == "gaussian"):
        raise CvaeError("train.pretrain_steps / train.init_from (PreFB encoder pretraining) need model.kind=vae"
                        f" with model.posterior=gaussian, got model.kind={model.kind},"
                        f" model.posterior={model.posterior}")


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
            setattr(coupling, name, _coerce(key, value, ftype))
    return coupling

"""The configuration's schema: the typed sections of a :class:`Config`, the allowed values of
its choice settings, and the table of every settable dotted key (``FIELDS``)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from ..errors import CvaeError

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
# The bound on every integer setting: far above any this model needs (the paper trains 60,000
# steps; its largest sizes are in the hundreds), far below what a typo such as steps=10**20 asks.
MAX_INTEGER = 10**9
SYNTHETIC_SEED = 19950927  # He et al.'s generate.py default
SYNTHETIC_LENGTH = 10  # words per sentence of their synthetic data
BATCHINGS = ("bucket", "random")


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
    amp: bool = False  # bf16 autocast in training steps (CUDA, or a CPU with bf16 matrix units)
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

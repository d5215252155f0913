"""Whole-config validation: every value in its allowed set or range, and the combinations the
models support; each problem is a one-line CvaeError naming the key."""
from __future__ import annotations

import math
import re

from ..errors import CvaeError
from .schema import (BATCHINGS, CONDITIONAL_KINDS, DATASETS, DECODERS, DEVICE_NAMES, DISTANCES, MAX_INTEGER,
                     MODEL_KINDS, PAIR_DATASETS, POSTERIORS, REGULARIZERS, SCALES, SCHEDULES, SYNTHETIC_LENGTH,
                     VMF_SAMPLERS, Config, DataConfig)

_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


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

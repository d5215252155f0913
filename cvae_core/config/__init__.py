"""Typed configuration, named presets and ``key=value`` overrides.

A :class:`Config` is built as ``scale defaults -> preset -> per-dataset preset settings ->
user overrides`` (:func:`build_config`).  Every override is validated against the dataclass schema
(unknown keys and ill-typed values raise :class:`CvaeError` naming the key).

Rooms: ``schema`` (the sections, choices and settable keys), ``overrides`` (``key=value``),
``validation`` (ranges and combinations), ``presets`` (scales, presets, ``build_config``).
"""
from .schema import (BATCHINGS, CONDITIONAL_KINDS, DATASETS, DECODERS, DEVICE_NAMES, DISTANCES, FIELDS,
                     MAX_INTEGER, MODEL_KINDS, PAIR_DATASETS, POSTERIORS, REGULARIZERS, SCALES, SCHEDULES,
                     SYNTHETIC_LENGTH, SYNTHETIC_SEED, VMF_SAMPLERS, Config, CouplingConfig, DataConfig,
                     ModelConfig, RegularizerConfig, TrainConfig, flatten, resolve_key)  # noqa: F401
from .overrides import apply_overrides, coerce, parse_assignments  # noqa: F401
from .validation import check_device, validate  # noqa: F401
from .presets import (CVAE_LAMBDA_M, DATASET_SIZES, PAPER_DATASETS, PAPER_STEP_KEYS, PRESETS, QUICK_FACTOR,
                      SCALE_SETTERS, Preset, build_config, config_from_dict, paper_scale, preset_coupling,
                      quick_scale, register_pair, register_preset)  # noqa: F401

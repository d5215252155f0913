"""Search spaces (define-by-run Optuna functions) and the paper's fixed grids.

A *trial config* is a flat dict handed to the trainable:

* core keys with the dotted names of ``cvae_core.config`` (``coupling.lambda_m``, ...), applied as
  overrides on top of the spec's base configuration;
* ``preset`` (optional): replaces the spec's base preset (e.g. the VAE baseline);
* ``train.seed``: set by the study searcher, one trial per seed;
* ``search.*``: the searcher's own bookkeeping (e.g. whether the matching term is on); the
  trainable ignores these.

Define-by-run functions must stay module-level (StudyOptunaSearch pickles them with its state) and
cheap.  Conditional parameters use a distinct name per branch and never change their choice
lists, so a persisted Optuna study can be resumed (optuna/optuna#2564).
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from cvae_core.config import CVAE_LAMBDA_M

SEARCH_PREFIX = "search."

# lambda_m: a log-uniform range plus an explicit "off" arm for lambda_m = 0 (the paper's
# Table 4 ablation), which a log scale cannot reach.
LAMBDA_M_RANGE = (0.01, 10.0)
LAMBDA_R_RANGE = (0.0, 5.0)  # uniform in steps of 0.5: holds 0, 0.5, 1 and 5 of Table 3
RQ_C_RANGE = (2.0, 512.0)  # the authors' C = 2 * latent_dim sits inside
N_FLOWS_RANGE = (1, 6)
FAMILIES = ("gaussian", "vmf", "nf")
FAMILY_PRESETS = {"gaussian": "vae", "vmf": "vmf-vae", "nf": "vae-nf"}


def _lambda_m(trial) -> dict[str, Any]:
    """Suggest lambda_m including 0; returns the constant to merge when the arm is off."""
    if trial.suggest_categorical("search.matching", ["on", "off"]) == "off":
        return {"coupling.lambda_m": 0.0}
    trial.suggest_float("coupling.lambda_m", *LAMBDA_M_RANGE, log=True)
    return {}


def lambda_space(trial) -> dict[str, Any]:
    """lambda_r x lambda_m x distance for the Gaussian Coupled-VAE (Table 3's axes).

    The distance and RQ's C only exist while the matching term is on (lambda_m > 0); C only
    for the RQ distance.
    """
    trial.suggest_float("coupling.lambda_r", *LAMBDA_R_RANGE, step=0.5)
    constants = _lambda_m(trial)
    if not constants:  # matching on
        if trial.suggest_categorical("coupling.distance", ["eucl", "rq"]) == "rq":
            trial.suggest_float("coupling.rq_c", *RQ_C_RANGE, log=True)
    return constants


def posterior_space(trial) -> dict[str, Any]:
    """Posterior family x coupled or not (Tables 1 and 4).

    Family-specific parameters only for their family: the number of planar flows for ``nf``
    (the vMF concentration is learned, the Gaussian has none).  Coupled models also search
    lambda_m (with its 0 arm, Table 4); the distance stays RQ, the only one the authors' code
    offers for vMF and NF.
    """
    family = trial.suggest_categorical("model.posterior", list(FAMILIES))
    coupled = trial.suggest_categorical("coupling.enabled", [False, True])
    if family == "nf":
        trial.suggest_int("model.n_flows", *N_FLOWS_RANGE)
    constants: dict[str, Any] = {"preset": ("coupled-" if coupled else "") + FAMILY_PRESETS[family]}
    if coupled:
        constants.update(_lambda_m(trial))
    return constants


SPACES: dict[str, Callable] = {"lambda": lambda_space, "posterior": posterior_space}


def lambda_params(config: dict[str, Any], ran: dict[str, Any]) -> dict[str, Any]:
    """The parameters of :func:`lambda_space` for a configuration that ran with the flat config
    ``ran`` (a grid cell names only what differs from its base, and has no ``search.*`` arm)."""
    lambda_m = ran["coupling.lambda_m"]
    params: dict[str, Any] = {"coupling.lambda_r": ran["coupling.lambda_r"],
                              "search.matching": "on" if lambda_m > 0 else "off"}
    if lambda_m > 0:
        params.update({"coupling.lambda_m": lambda_m, "coupling.distance": ran["coupling.distance"]})
        if ran["coupling.distance"] == "rq":
            params["coupling.rq_c"] = ran["coupling.rq_c"]
    return params


# How --warm-start (studies/warmstart.py) turns another study's configuration into this space's
# parameters; a space without an entry takes the configuration's own keys (an Optuna study's
# configurations carry every parameter, ``search.*`` included).
SPACE_PARAMS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {"lambda": lambda_params}


# ---------------------------------------------------------------------------------------------
# Grids

def table3_grid() -> list[dict[str, Any]]:
    """The paper's Table 3, exactly: RQ/Eucl x lambda_m in {0.1, 1, 5} at lambda_r = 1;
    RQ, lambda_m = 0.1 x lambda_r in {0, 0.5, 1, 5}; plus the VAE baseline (10 configurations:
    RQ lambda_m = 0.1, lambda_r = 1 belongs to both blocks and runs once)."""
    cells: list[dict[str, Any]] = [{"preset": "vae"}]
    for distance in ("rq", "eucl"):
        for lambda_m in (0.1, 1.0, 5.0):
            cells.append({"preset": "coupled-vae", "coupling.distance": distance,
                          "coupling.lambda_r": 1.0, "coupling.lambda_m": lambda_m})
    for lambda_r in (0.0, 0.5, 5.0):
        cells.append({"preset": "coupled-vae", "coupling.distance": "rq",
                      "coupling.lambda_r": lambda_r, "coupling.lambda_m": 0.1})
    return cells


def coupling_effect_grid() -> list[dict[str, Any]]:
    """The synthetic-data study's cells (and the default's until it needed a 4th seed within its
    time budget: docs/default-study-design.md): the VAE, Table 1's Coupled-VAE (the preset: RQ,
    lambda_r = 1, lambda_m = 0.1) and Table 3's lambda_m = 1 cells of both distances. Run over
    seeds, each coupled cell is compared with the VAE seed by seed; RQ 1 vs RQ 0.1 is Table 3's
    "larger lambda_m" direction."""
    cells: list[dict[str, Any]] = [{"preset": "vae"}]
    for distance, lambda_m in (("rq", 0.1), ("rq", 1.0), ("eucl", 1.0)):
        cells.append({"preset": "coupled-vae", "coupling.distance": distance,
                      "coupling.lambda_r": 1.0, "coupling.lambda_m": lambda_m})
    return cells


def paper_directions_grid() -> list[dict[str, Any]]:
    """The default study's cells (docs/default-study-design.md): the VAE, Table 1's Coupled-VAE
    (the preset: RQ, lambda_r = 1, lambda_m = 0.1) and Table 3's RQ lambda_m = 1. Run over seeds,
    each coupled cell is compared with the VAE seed by seed (Tables 1 and 2: coupling raises KL
    and MI), and RQ 1 with RQ 0.1 (Table 3: a larger lambda_m raises them further)."""
    return [{"preset": "vae"}, *({"preset": "coupled-vae", "coupling.distance": "rq", "coupling.lambda_r": 1.0,
                                  "coupling.lambda_m": lambda_m} for lambda_m in (0.1, 1.0))]


def posterior_grid() -> list[dict[str, Any]]:
    """Tables 1 and 4 per family: the base model, its coupled twin with the preset's lambda_m
    (Table 1) and the coupled twin without matching, lambda_m = 0 (Table 4)."""
    cells = []
    for family in FAMILIES:
        preset = FAMILY_PRESETS[family]
        cells += [{"preset": preset}, {"preset": f"coupled-{preset}"},
                  {"preset": f"coupled-{preset}", "coupling.lambda_m": 0.0}]
    return cells


def table8_grid() -> list[dict[str, Any]]:
    """The paper's Table 8 rows: the GRU encoder-decoder, the CVAE and the Coupled-CVAE at each
    lambda_m in {0.1, 0.5, 1, 2} (RQ, lambda_r = 1, the preset's)."""
    return [{"preset": "seq2seq"}, {"preset": "cvae"},
            *({"preset": "coupled-cvae", "coupling.lambda_m": lm} for lm in CVAE_LAMBDA_M)]


GRIDS: dict[str, Callable[[], list[dict[str, Any]]]] = {"table3": table3_grid, "coupling_effect": coupling_effect_grid,
                                                          "paper_directions": paper_directions_grid,
                                                          "posterior": posterior_grid, "table8": table8_grid}


# ---------------------------------------------------------------------------------------------
# Labels

def _unicode_ok() -> bool:
    try:
        "λ".encode(sys.stdout.encoding or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def describe(config: dict[str, Any], base_preset: str = "") -> str:
    """A short human label for a trial config, e.g. ``coupled-vae rq λr=1 λm=0.1``."""
    lam = "λ" if _unicode_ok() else "lambda_"
    short = {"coupling.lambda_r": f"{lam}r", "coupling.lambda_m": f"{lam}m", "coupling.rq_c": "C",
             "model.n_flows": "K"}
    parts = [str(config.get("preset", base_preset))]
    if "coupling.distance" in config:
        parts.append(str(config["coupling.distance"]))
    for key in ("coupling.lambda_r", "coupling.lambda_m", "coupling.rq_c", "model.n_flows"):
        if key in config:
            parts.append(f"{short[key]}={_fmt(config[key])}")
    skip = {"preset", "coupling.distance", "train.seed", "model.posterior", "coupling.enabled", *short}
    parts += [f"{k}={_fmt(v)}" for k, v in sorted(config.items())
              if k not in skip and not k.startswith(SEARCH_PREFIX) and not k.startswith("__")]
    return " ".join(parts)

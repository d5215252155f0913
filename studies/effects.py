"""Coupling's effect, stated with its uncertainty: for every coupled configuration that a study
repeats over seeds beside its uncoupled twin (``coupled-vae`` beside ``vae``), the paired
differences ΔNLL, ΔKL, ΔMI, ΔAU (coupled − base, same seed) with a 95% Student-t interval.

Only trials that ran to the end count (a trial stopped early or diverged has no final metrics to
compare), and each trial contributes its metrics at the core's best evaluation, the ones the
ranked table shows.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

from cvae_core.stats import PairedDifference, decimals_needed, paired_difference

from .spaces import SEARCH_PREFIX


class Row(Protocol):
    """What an effect needs of a trial (``studies.summary.TrialRow`` has it)."""
    label: str
    config: dict[str, Any]
    seed: int | None
    status: str
    best: dict[str, float]


EFFECT_METRICS = ("val_nll", "val_kl", "val_mi_loo", "val_au")
EFFECT_NAMES = {"val_nll": "ΔNLL", "val_kl": "ΔKL", "val_mi_loo": "ΔMI", "val_au": "ΔAU"}
COUPLED_PREFIX = "coupled-"
EFFECTS_HEADING = ("Coupling's effect (coupled − uncoupled twin, same seed; mean [95% t-interval] "
                   "over the seeds, at each trial's best checkpoint)")


def _settings(config: dict[str, Any], base_preset: str) -> dict[str, Any]:
    """What defines a configuration: its settings without the seed and the search's bookkeeping,
    with the preset spelled out (a proposal of the search inherits the spec's)."""
    settings = {k: v for k, v in config.items()
                if k != "train.seed" and not k.startswith(("__", SEARCH_PREFIX))}
    settings.setdefault("preset", base_preset)
    return settings


def _key(settings: dict[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in settings.items()))


def _twin_key(settings: dict[str, Any]) -> tuple | None:
    """The uncoupled twin's key of a coupled configuration (None if it is not coupled): the same
    settings with the ``coupled-`` preset's base preset and no coupling keys."""
    preset = str(settings["preset"])
    if not preset.startswith(COUPLED_PREFIX):
        return None
    twin = {k: v for k, v in settings.items() if not k.startswith("coupling.")}
    twin["preset"] = preset[len(COUPLED_PREFIX):]
    return _key(twin)


def coupling_effects(rows: list[Row], base_preset: str = "") -> list[dict[str, Any]]:
    """One entry per coupled configuration with at least one seed paired with its twin:
    ``{"label", "base", "seeds": [...], "val_nll": {"mean", "low", "high", "n"}, ...}``.
    ``base_preset``: the spec's preset, which a configuration without its own ``preset`` has."""
    done = [r for r in rows if r.status == "done" and r.best and r.seed is not None]
    groups: dict[tuple, list[Row]] = {}
    for row in done:
        groups.setdefault(_key(_settings(row.config, base_preset)), []).append(row)
    out = []
    for members in groups.values():
        base_key = _twin_key(_settings(members[0].config, base_preset))
        base = {r.seed: r for r in groups.get(base_key, [])} if base_key is not None else {}
        pairs = [(row, base[row.seed]) for row in sorted(members, key=lambda r: r.seed) if row.seed in base]
        if not pairs:
            continue
        entry: dict[str, Any] = {"label": members[0].label, "base": pairs[0][1].label,
                                 "seeds": [row.seed for row, _ in pairs]}
        for metric in EFFECT_METRICS:
            entry[metric] = _interval(paired_difference([a.best.get(metric) for a, _ in pairs],
                                                        [b.best.get(metric) for _, b in pairs]))
        out.append(entry)
    return out


def _interval(d: PairedDifference) -> dict[str, float | int | None]:
    """JSON-safe (no NaN): bounds are None for fewer than 2 pairs."""
    def safe(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {"mean": safe(d.mean), "low": safe(d.low), "high": safe(d.high), "n": d.n}


def _number(value: float | None, digits: int) -> str:
    return "nan" if value is None else f"{value:+.{digits}f}"


def effect_line(entry: dict[str, Any]) -> str:
    """One line per configuration, e.g.
    ``coupled-vae rq λr=1 λm=1 − vae: ΔNLL −1.2 [−3.0, +0.6], ΔKL +0.31 [+0.05, +0.57], ... (3 seeds, paired)``"""
    parts = []
    for metric in EFFECT_METRICS:
        d = entry[metric]
        digits = decimals_needed(d["mean"] or 0.0, 1 if metric in ("val_nll", "val_au") else 2)
        interval = (f" [{_number(d['low'], digits)}, {_number(d['high'], digits)}]"
                    if d["low"] is not None else "")
        parts.append(f"{EFFECT_NAMES[metric]} {_number(d['mean'], digits)}{interval}")
    n = len(entry["seeds"])
    return f"{entry['label']} − {entry['base']}: " + ", ".join(parts) + f" ({n} seed{'s' if n != 1 else ''}, paired)"

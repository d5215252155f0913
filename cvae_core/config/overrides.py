"""``key=value`` overrides: a dotted (or unambiguous bare) key, its value coerced to the field's
type, or a one-line CvaeError naming the key."""
from __future__ import annotations

from typing import Any

from ..errors import CvaeError
from .schema import FIELDS, Config, resolve_key


def coerce(key: str, value: Any, ftype: type) -> Any:
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
        setattr(target, fname, coerce(key, value, ftype))
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

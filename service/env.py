"""Settings from environment variables, checked when the service is imported.

A malformed or out-of-range value stops the server at start-up with a message naming the
variable, instead of surfacing later as a 500 on every request (a limit read lazily) or as
a behaviour nobody asked for (a negative body timeout answering every POST with 408).
An unset or empty variable takes its default.
"""
from __future__ import annotations

import math
import os
import re

from bentoml.exceptions import BentoMLConfigException


class ConfigError(BentoMLConfigException):
    """A bad setting. BentoML's command line prints such an exception's message alone, as one
    line (a plain ValueError came inside a 60-line traceback, its message on the last line).
    Not a ValueError: serving a Bento by tag, BentoML takes a ValueError for "not a Bento tag"
    and showed `No module named 'condgen'` instead of the setting."""


def _raw(name: str) -> str | None:
    raw = os.environ.get(name)
    return None if raw is None or raw.strip() == "" else raw.strip()


def env_int(name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    raw = _raw(name)
    if raw is None:
        return default
    # ASCII digits only: int() also reads other scripts' digits ("٣" as 3)
    if not re.fullmatch(r"[+-]?[0-9]+", raw) or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
        raise ConfigError(f"{name}={raw!r}: must be a whole number >= {minimum}"
                          + (f" and <= {maximum}" if maximum is not None else ""))
    return int(raw)


def env_float(name: str, default: float, minimum: float, allow_minimum: bool = False,
              maximum: float = math.inf) -> float:
    """A finite number above `minimum` (or equal to it, with allow_minimum), at most `maximum`."""
    raw = _raw(name)
    if raw is None:
        return default
    # ASCII only: float() also reads other scripts' digits and underscores ("1_0" as 10)
    value = float(raw) if re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", raw) else math.nan
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_minimum) or value > maximum:
        at_most = f" and <= {maximum:g}" if maximum < math.inf else ""
        raise ConfigError(f"{name}={raw!r}: must be a number {'>=' if allow_minimum else '>'} {minimum}{at_most}")
    return value


def env_flag(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    if raw not in ("0", "1"):
        raise ConfigError(f"{name}={raw!r}: must be 0 or 1")
    return raw == "1"


def env_choice(name: str, default: str, pattern: str, expected: str) -> str:
    raw = _raw(name)
    if raw is None:
        return default
    if not re.fullmatch(pattern, raw):
        raise ConfigError(f"{name}={raw!r}: must be {expected}")
    return raw

"""Field checks shared by the settings of every module: each returns the value, or raises a
`ConfigError` naming the field, the value and what is valid. `bool` is refused as a number
(it is an `int` to Python, never what a caller meant)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tracedoffload._exceptions import ConfigError


def check_int(field: str, value: Any, low: int, high: int | None = None, meaning: str = "") -> int:
    """An integer from `low` (to `high`, when given); `meaning` adds what a value means."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        valid = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(field, value, f"{valid} ({meaning})" if meaning else valid)
    return value


def check_number(field: str, value: Any, low: float, high: float, valid: str) -> float:
    """A finite number from `low` to `high`, both included; `valid` says so in the field's terms."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(field, value, valid)
    return float(value)


def check_choice(field: str, value: Any, choices: Sequence[str]) -> str:
    """One of `choices`."""
    if value not in choices:
        raise ConfigError(field, value, f"one of {list(choices)}")
    return value


def check_positive(field: str, value: Any, valid: str = "a finite number > 0") -> float:
    """A finite number > 0; `valid` says so in the field's own terms (units, what None means)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(field, value, valid)
    return float(value)

"""Checks on the values the sections read from the run's JSON, YAML and log records."""

from __future__ import annotations

import math
from typing import Any

from framelm.errors import FramelmError


def number_field(rec: dict[str, Any], key: str, where: str) -> float:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FramelmError(f"{where}: field '{key}' must be a number, got {value!r}")
    return float(value)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

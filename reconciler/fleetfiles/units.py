"""Human units in fleet files: durations ("90s", "15m", "1h30m", "never") and sizes ("24GiB")."""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_duration(value: object) -> float | None:
    """Seconds, or None for "never". Accepts a number of seconds or e.g. "90s", "15m", "1h30m"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m, 1h or never, got a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 90s, 15m, 1h or never, got {type(value).__name__}")
    text = value.strip().lower()
    if text == "never":
        return None
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration; write e.g. 90s, 15m, 1h30m, or never")
    return total


def parse_size(value: object) -> int:
    """Bytes. Accepts an integer number of bytes or e.g. "24GiB", "16 GB", "512MiB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 24GiB, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "B").lower()
            return int(float(m.group(1)) * _SIZE_FACTOR[unit])
    raise ValueError(f"{value!r} is not a size; write e.g. 24GiB, 16GB or 512MiB")


def format_size(n: float) -> str:
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"

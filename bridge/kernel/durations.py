"""Durations, one parser per unit with the unit in its name.

``parse_duration_ms`` reads the retention grammar (whole numbers, ``s m h d w y``,
``forever``) into milliseconds; ``parse_duration_seconds`` reads the bots' config grammar
(``90s``, ``1.5h``, bare numbers are seconds) into seconds; ``parse_ago_ms`` reads the CLI's
relative times (``--since 24h``: a whole number and a lower-case ``s m h d w``). They differ
on purpose: each keeps the grammar its YAML or command line was written in.
"""

from __future__ import annotations

import re
from typing import Any

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
YEAR_MS = 365 * DAY_MS
# Longer than any retention law; bigger numbers are typos and would overflow BIGINT columns
# once added to a timestamp.
MAX_DURATION_MS = 1000 * YEAR_MS

_UNITS = {"s": SECOND_MS, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS, "w": WEEK_MS,
          "y": YEAR_MS}
_DURATION_RE = re.compile(r"^(\d{1,15})\s*([smhdwy])$")
# largest unit first: format_duration_ms picks the largest that divides exactly
_NAMES = (("year", YEAR_MS), ("week", WEEK_MS), ("day", DAY_MS), ("hour", HOUR_MS),
          ("minute", MINUTE_MS), ("second", SECOND_MS))


def parse_duration_ms(text: str) -> int | None:
    """``"90d"`` -> milliseconds; ``"forever"`` -> None. Raises ValueError otherwise.

    Units: s, m (minutes), h, d, w, y (365 days). The number is a positive whole number.
    """
    if not isinstance(text, str) or isinstance(text, bool):
        raise ValueError(
            f"{text!r} is not a duration: give a string such as '90d', '12h' or 'forever' "
            "(a bare number has no unit)")
    t = text.strip().lower()
    if t == "forever":
        return None
    m = _DURATION_RE.match(t)
    if m is None:
        raise ValueError(
            f"{text!r} is not a duration: use a whole number and a unit (s, m, h, d, w, y), "
            "e.g. '90d', or 'forever'")
    ms = int(m.group(1)) * _UNITS[m.group(2)]
    if ms <= 0:
        raise ValueError(f"{text!r}: a duration must be longer than zero")
    if ms > MAX_DURATION_MS:
        raise ValueError(f"{text!r} is longer than 1000 years: use 'forever'")
    return ms


def format_duration_ms(ms: int | None) -> str:
    """Milliseconds for people: ``"90 days"``, ``"2 years"``, ``"30 seconds"``, ``"forever"``.

    Uses the largest unit that divides exactly, so the text is never rounded.
    """
    if ms is None or ms < 0:  # negative: OVERRIDE_FOREVER
        return "forever"
    for name, size in _NAMES:
        if ms and ms % size == 0:
            n = ms // size
            return f"{n} {name}" + ("" if n == 1 else "s")
    return "0 seconds" if ms == 0 else f"{ms} milliseconds"


_AGO_RE = re.compile(r"^(\d+)([smhdw])$")


def parse_ago_ms(text: str) -> int | None:
    """A CLI relative time, ``"90m"``, ``"24h"``, ``"7d"``, ``"2w"`` -> milliseconds (how
    long ago); None when ``text`` is not one (an ISO date, say). No years, no upper case."""
    m = _AGO_RE.match(text.strip())
    return int(m.group(1)) * _UNITS[m.group(2)] if m else None


_SECONDS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration_seconds(value: Any) -> Any:
    """``'4h'`` -> 14400 seconds; ints pass through; anything else is left for the type
    check (a pydantic ``BeforeValidator``). Raises ValueError for a string it cannot read."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SECONDS_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration such as 90s, 30m, 4h, 2d or 1w")
        return int(float(m.group(1)) * _SECONDS_UNITS[m.group(2)])
    return value

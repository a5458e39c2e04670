"""Incremental reads: the mark of each mode (``modifyTimestamp``, ``entryCSN``, AD's
``uSNChanged``), the filter selecting entries changed since a mark, and filter composition.
Pure.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

# -- incremental marks -------------------------------------------------------------------------

# the attribute that carries each mode's mark
MARK_ATTR = {"modify_timestamp": "modifyTimestamp", "entry_csn": "entryCSN",
              "usn": "uSNChanged"}


def parse_generalized_time(value: str) -> datetime:
    """``20240102030405Z`` / ``20240102030405.123Z`` -> aware UTC datetime."""
    m = re.match(r"^(\d{14})(?:[.,](\d+))?Z$", value.strip())
    if not m:
        raise ValueError(f"not a generalized time: {value!r}")
    return datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def mark_filter(mode: str, mark: str, overlap_seconds: int) -> str:
    """The filter part selecting entries changed since ``mark`` (minus the overlap)."""
    if mode == "modify_timestamp":
        t = parse_generalized_time(mark) - timedelta(seconds=overlap_seconds)
        return f"(modifyTimestamp>={t:%Y%m%d%H%M%S}Z)"
    if mode == "entry_csn":
        t = parse_generalized_time(mark.split("#", 1)[0]) - timedelta(seconds=overlap_seconds)
        return f"(entryCSN>={t:%Y%m%d%H%M%S}.000000Z#000000#000#000000)"
    if mode == "usn":
        return f"(uSNChanged>={int(mark) + 1})"
    raise ValueError(f"no mark filter for mode {mode!r}")


def later_mark(mode: str, a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a if b is None else b
    if mode == "usn":
        return a if int(a) >= int(b) else b
    return max(a, b)  # generalized times and CSNs of one server compare as strings


def and_filter(base: str, extra: str) -> str:
    base = base.strip()
    if not base.startswith("("):
        base = f"({base})"
    return f"(&{base}{extra})"

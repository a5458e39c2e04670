"""Matrix timestamps (milliseconds since the epoch, UTC) as datetimes and text.

One conversion and the few text forms Enclave shows: ISO 8601 for records and transcripts,
a readable UTC form for the CLI, local time for what the bots tell people.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, date, datetime

from .durations import parse_ago_ms


def _is_ms(ms: object) -> bool:
    return isinstance(ms, int)


def utc_datetime(ms: int) -> datetime:
    """The aware UTC datetime of a millisecond timestamp."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def epoch_ms(value: datetime | date) -> int:
    """Milliseconds since the epoch of a YAML date or date-time: a bare date is the start
    of that day, a date-time without a zone is UTC."""
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def local_datetime(ms: int, timezone: str = "UTC") -> datetime:
    """The same instant in an IANA time zone (``Europe/Berlin``)."""
    return utc_datetime(ms).astimezone(zoneinfo.ZoneInfo(timezone))


def iso_utc(ms: int | None, missing: str = "?") -> str:
    """``2024-05-01T12:30:00Z`` (second precision); ``missing`` when there is no time."""
    return utc_datetime(ms).strftime("%Y-%m-%dT%H:%M:%SZ") if _is_ms(ms) else missing  # type: ignore[arg-type]


def readable_utc(ms: int | None, missing: str = "") -> str:
    """``2024-05-01 12:30:00`` (UTC, for tables); ``missing`` when there is no time."""
    return utc_datetime(ms).strftime("%Y-%m-%d %H:%M:%S") if _is_ms(ms) else missing  # type: ignore[arg-type]


# 0001-01-01T00:00:00Z, the earliest time a datetime (and so an ISO date) can name
MIN_WHEN_MS = -62_135_596_800_000


def parse_when_ms(value: str, now_ms: int) -> int | None:
    """``'90m'``, ``'24h'``, ``'7d'`` (that long before ``now_ms``) or an ISO date/time (UTC
    if it names no zone) -> epoch ms; None when it is neither."""
    ago_ms = parse_ago_ms(value)
    if ago_ms is not None:
        # "99999999999999d": before year 1 is no time (and would overflow a 64-bit column)
        got = now_ms - ago_ms
        return got if got >= MIN_WHEN_MS else None
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)

"""Timestamps: one conversion from Matrix milliseconds, the text forms Enclave shows."""

from __future__ import annotations

import pytest

from bridge.kernel.timestamps import iso_utc, local_datetime, readable_utc, utc_datetime

T = 1_714_566_600_123  # 2024-05-01T12:30:00.123Z


@pytest.mark.parametrize(("fn", "ms", "missing", "text"), [
    (iso_utc, T, "?", "2024-05-01T12:30:00Z"),
    (iso_utc, None, "?", "?"),
    (iso_utc, None, "-", "-"),
    (iso_utc, 0, "?", "1970-01-01T00:00:00Z"),  # 0 is a time, not a missing one
    (readable_utc, T, "", "2024-05-01 12:30:00"),
    (readable_utc, None, "", ""),
    (readable_utc, "junk", "?", "?"),
])
def test_text_forms(fn: object, ms: object, missing: str, text: str) -> None:
    assert fn(ms, missing) == text  # type: ignore[operator]


def test_datetimes() -> None:
    assert utc_datetime(T).isoformat() == "2024-05-01T12:30:00.123000+00:00"
    berlin = local_datetime(T, "Europe/Berlin")
    assert berlin.strftime("%H:%M %Z") == "14:30 CEST" and berlin == utc_datetime(T)

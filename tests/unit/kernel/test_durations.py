"""Durations: one parser per unit (milliseconds for retention, seconds for the bots)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.kernel.durations import (
    DAY_MS,
    HOUR_MS,
    YEAR_MS,
    format_duration_ms,
    parse_duration_ms,
    parse_duration_seconds,
)
from bridge.policy.retention import OVERRIDE_FOREVER


# -- durations -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("30s", 30_000), ("15m", 15 * 60_000), ("12h", 12 * HOUR_MS), ("90d", 90 * DAY_MS),
        ("2w", 14 * DAY_MS), ("1y", 365 * DAY_MS), ("forever", None), ("FOREVER", None),
        (" 90D ", 90 * DAY_MS), ("5 d", 5 * DAY_MS), ("1000y", 1000 * YEAR_MS),
    ],
)
def test_parse_duration_ms(text: str, ms: int | None) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "not a duration"), ("d", "not a duration"), ("90", "not a duration"),
        ("-1d", "not a duration"), ("1.5d", "not a duration"), ("3mo", "not a duration"),
        ("ninety days", "not a duration"), ("never", "not a duration"),
        ("0s", "longer than zero"), ("1001y", "1000 years"),
        (90, "bare number"), (None, "bare number"), (True, "bare number"),
    ],
)
def test_parse_duration_rejects(text: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_duration_ms(text)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "forever"), (OVERRIDE_FOREVER, "forever"), (30_000, "30 seconds"),
        (1000, "1 second"), (60_000, "1 minute"), (36 * HOUR_MS, "36 hours"),
        (DAY_MS, "1 day"), (90 * DAY_MS, "90 days"), (14 * DAY_MS, "2 weeks"),
        (730 * DAY_MS, "2 years"), (YEAR_MS, "1 year"), (366 * DAY_MS, "366 days"),
        (1500, "1500 milliseconds"), (0, "0 seconds"),
    ],
)
def test_format_duration_ms(ms: int | None, text: str) -> None:
    assert format_duration_ms(ms) == text


@pytest.mark.parametrize("text", ["30s", "15m", "12h", "90d", "2w", "1y", "730d", "forever"])
def test_format_then_parse_keeps_the_value(text: str) -> None:
    # "90 days" -> "90d": the first letter of each unit name is its suffix
    ms = parse_duration_ms(text)
    words = format_duration_ms(ms).split()
    again = words[0] if len(words) == 1 else words[0] + words[1][0]
    assert parse_duration_ms(again) == ms


@pytest.mark.parametrize(("value", "seconds"), [
    ("90s", 90), ("30m", 1800), ("4h", 14400), ("1.5h", 5400), ("2d", 172800), ("1w", 604800),
    (" 45 ", 45), (120, 120), (60.0, 60),
    # not for this parser: left to the model's type check
    (True, True), (None, None), (1.5, 1.5),
])
def test_parse_duration_seconds(value: Any, seconds: Any) -> None:
    assert parse_duration_seconds(value) == seconds


@pytest.mark.parametrize("text", ["", "4y", "forever", "-1h", "1.5.2h", "four hours"])
def test_parse_duration_seconds_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_seconds(text)


def test_units_are_not_mixed_up() -> None:
    # the same text in both grammars: milliseconds vs seconds, never confused
    assert parse_duration_ms("90s") == 1000 * parse_duration_seconds("90s")

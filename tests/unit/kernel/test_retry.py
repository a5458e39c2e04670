"""The one retry policy (bridge.kernel.retry)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.kernel.retry import RECONNECT, Backoff, retry_after_seconds


@pytest.mark.parametrize(("policy", "delays"), [
    (RECONNECT, [1, 2, 4, 8, 16, 32, 60, 60]),
    (Backoff(0.5, 30.0), [0.5, 1, 2, 4, 8, 16, 30, 30]),
    (Backoff(2.0, 3.0), [2, 3, 3, 3, 3, 3, 3, 3]),
])
def test_backoff_doubles_up_to_the_cap(policy: Backoff, delays: list[float]) -> None:
    assert [policy.delay(a) for a in range(1, 9)] == delays


def test_backoff_edges() -> None:
    assert RECONNECT.delay(0) == 1  # attempts count from 1
    assert RECONNECT.delay(10_000) == 60  # no overflow however long it has failed
    assert Backoff(1.5, 300.0).delay_ms(2) == 3000


@pytest.mark.parametrize(("rand", "factor"), [(0.0, 0.75), (0.5, 1.0), (0.999, 1.2495)])
def test_jitter_spreads_75_to_125_percent(rand: float, factor: float) -> None:
    assert Backoff(4.0, 60.0, jitter=True).delay(2, rand) == pytest.approx(8.0 * factor)


@pytest.mark.parametrize(("body", "header", "seconds"), [
    ({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1500}, None, 1.5),
    ({"retry_after_ms": 0}, None, 0.0),  # "now" is an answer, not a missing one
    ({"retry_after_ms": 10_000_000}, None, 3600.0),  # capped at an hour
    ({"retry_after_ms": 250}, "9", 0.25),  # the body wins over the header
    ({"retry_after_ms": -5}, "7", 7.0),
    ({"retry_after_ms": True}, None, None),
    ({"retry_after_ms": "100"}, None, None),
    ({}, "12", 12.0),
    ({}, "Wed, 21 Oct 2015 07:28:00 GMT", None),  # HTTP dates are not honoured
    ("not json", None, None),
    (None, "99999", 3600.0),
])
def test_retry_after_seconds(body: Any, header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(body, header) == seconds

"""The completeness check's decisions (bridge/policy/completeness.py), table-driven."""

from __future__ import annotations

import pytest

from bridge.policy.completeness import (
    CAUSE_ENCLAVE_DOWNTIME,
    CAUSE_HOMESERVER_RESTART,
    CAUSE_NOT_PUSHED,
    RULE_RECOVER,
    RULE_WAIT,
    SeenEvent,
    classify_cause,
    decide_page,
    event_age_ms,
    timing_for_bound,
)

NOW = 1_000_000
GRACE = 10_000


def page(*events: tuple[str, int | None]) -> list[SeenEvent]:
    return [SeenEvent(eid, ts) for eid, ts in events]


@pytest.mark.parametrize(("events", "known", "first_seen", "recover", "waiting", "advance",
                          "oldest_waiting", "rule"), [
    # everything pushed, old enough: move on
    (page(("$a", NOW - 30_000), ("$b", NOW - 20_000)), {"$a", "$b"}, {}, (), (), True, None,
     RULE_RECOVER),
    # everything pushed but the newest is young: an event still being persisted may sort
    # into this page, so read it again next time
    (page(("$a", NOW - 30_000), ("$b", NOW - 1_000)), {"$a", "$b"}, {}, (), (), False, None,
     RULE_RECOVER),
    # the push missed an old one: recover it; the page is then complete
    (page(("$a", NOW - 30_000), ("$b", NOW - 20_000)), {"$a"}, {}, ("$b",), (), True, None,
     RULE_RECOVER),
    # exactly at the grace: recovered
    (page(("$a", NOW - GRACE),), set(), {}, ("$a",), (), True, None, RULE_RECOVER),
    # a young one the push may still bring: wait, do not advance
    (page(("$a", NOW - 30_000), ("$b", NOW - 2_000)), {"$a"}, {}, (), ("$b",), False, 2_000,
     RULE_WAIT),
    # both at once, in timeline order
    (page(("$a", NOW - 40_000), ("$b", NOW - 30_000), ("$c", NOW - 500)), set(), {},
     ("$a", "$b"), ("$c",), False, 500, RULE_RECOVER),
    # a timestamp in the future (a remote server's clock) counts from when it was first seen
    (page(("$f", NOW + 3_600_000),), set(), {"$f": NOW - 12_000}, ("$f",), (), True, None,
     RULE_RECOVER),
    (page(("$f", NOW + 3_600_000),), set(), {}, (), ("$f",), False, 0, RULE_WAIT),
    # no timestamp at all: first seen decides too
    (page(("$n", None),), set(), {"$n": NOW - 11_000}, ("$n",), (), True, None, RULE_RECOVER),
    # an empty page never holds the cursor back
    ([], set(), {}, (), (), True, None, RULE_RECOVER),
])
def test_decide_page(events: list[SeenEvent], known: set[str], first_seen: dict[str, int],
                     recover: tuple[str, ...], waiting: tuple[str, ...], advance: bool,
                     oldest_waiting: int | None, rule: str) -> None:
    d = decide_page(events, known, NOW, GRACE, first_seen)
    assert (d.recover, d.waiting, d.advance, d.oldest_waiting_ms, d.rule_id) == (
        recover, waiting, advance, oldest_waiting, rule)
    assert d.reason


@pytest.mark.parametrize(("ts", "outages", "expected"), [
    (NOW - 5_000, [(NOW - 6_000, NOW - 2_000)], CAUSE_HOMESERVER_RESTART),
    (NOW - 5_000, [(NOW - 3_000, None)], CAUSE_HOMESERVER_RESTART),  # within the margin
    (NOW - 5_000, [(NOW - 60_000, NOW - 50_000)], CAUSE_NOT_PUSHED),
    (NOW - 90_000, [], CAUSE_ENCLAVE_DOWNTIME),  # before this process started
    (NOW - 5_000, [], CAUSE_NOT_PUSHED),
    (None, [(NOW - 6_000, None)], CAUSE_NOT_PUSHED),
])
def test_classify_cause(ts: int | None, outages: list[tuple[int, int | None]],
                        expected: str) -> None:
    assert classify_cause(ts, process_started_ms=NOW - 60_000, homeserver_outages=outages,
                          margin_ms=2_500) == expected


@pytest.mark.parametrize(("bound", "grace", "interval"), [
    (60, 10_000, 20_000), (10, 1_666, 3_333), (3, 500, 1_000), (600, 100_000, 200_000),
])
def test_timing_for_bound(bound: float, grace: int, interval: int) -> None:
    t = timing_for_bound(bound)
    assert (t.grace_ms, t.interval_ms) == (grace, interval)
    # worst case to recovery (grace + interval) leaves half the bound for processing
    assert t.grace_ms + t.interval_ms <= bound * 1000 / 2 + 1


def test_event_age_never_negative() -> None:
    assert event_age_ms(SeenEvent("$x", NOW + 5), NOW, None) == 0
    assert event_age_ms(SeenEvent("$x", NOW - 5), NOW, NOW - 9) == 9

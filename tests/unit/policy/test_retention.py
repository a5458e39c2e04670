"""Retention policy: durations, periods, adjustments, holds, purge plans, media and archive."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bridge.config.retention import RetentionConfig
from bridge.policy.retention import (
    DAY_MS,
    HOUR_MS,
    OVERRIDE_FOREVER,
    YEAR_MS,
    Hold,
    Period,
    PurgePlan,
    RetentionPolicy,
    validate_hold,
)

CONFIG: dict[str, Any] = {
    "default": {"keep": "365d"},
    "classes": [
        {"id": "ret-int", "room_class": "internal", "keep": "730d",
         "adjustable_by": "moderators", "min": "30d", "max": "3650d", "archive_keep": "7y"},
        {"id": "ret-ext", "room_class": "external", "keep": "90d"},
        {"id": "ret-open", "room_class": "open", "keep": "30d", "adjustable_by": "moderators"},
        {"id": "ret-vault", "room_class": "vault", "keep": "forever"},
    ],
    "dms": {"keep": "14d", "adjustable_by": "moderators", "max": "30d"},
    "archive": {"keep": "2y"},
    "visibility": {"text": "Kept for {period} here."},
    "adjust_power": 50,
}


def policy(**changes: Any) -> RetentionPolicy:
    return RetentionPolicy(RetentionConfig.model_validate({**CONFIG, **changes}))


P = policy()
NOW = 1_000 * YEAR_MS  # far enough from 0 that now - keep is positive for every period


# -- periods ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("room_class", "override", "expected"),
    [
        ("internal", None, Period(730 * DAY_MS, "ret-int", "retention.classes[0]", "class")),
        ("external", None, Period(90 * DAY_MS, "ret-ext", "retention.classes[1]", "class")),
        ("vault", None, Period(None, "ret-vault", "retention.classes[3]", "class")),
        ("dm", None, Period(14 * DAY_MS, "retention-dms", "retention.dms", "dm")),
        (None, None, Period(365 * DAY_MS, "retention.default", "retention.default", "default")),
        ("hr", None, Period(365 * DAY_MS, "retention.default", "retention.default", "default")),
        # a moderator's adjustment within bounds wins
        ("internal", 60 * DAY_MS, Period(60 * DAY_MS, "ret-int", "retention.classes[0]", "room")),
        ("internal", 30 * DAY_MS, Period(30 * DAY_MS, "ret-int", "retention.classes[0]", "room")),
        ("dm", 20 * DAY_MS, Period(20 * DAY_MS, "retention-dms", "retention.dms", "room")),
        ("open", OVERRIDE_FOREVER, Period(None, "ret-open", "retention.classes[2]", "room")),
        # ... one the config no longer allows does not
        ("internal", DAY_MS, Period(730 * DAY_MS, "ret-int", "retention.classes[0]", "class")),
        ("internal", OVERRIDE_FOREVER,
         Period(730 * DAY_MS, "ret-int", "retention.classes[0]", "class")),
        ("external", 60 * DAY_MS, Period(90 * DAY_MS, "ret-ext", "retention.classes[1]", "class")),
        (None, 60 * DAY_MS,
         Period(365 * DAY_MS, "retention.default", "retention.default", "default")),
        ("open", 0, Period(30 * DAY_MS, "ret-open", "retention.classes[2]", "class")),
    ],
)
def test_period_for(room_class: str | None, override: int | None, expected: Period) -> None:
    assert P.period_for(room_class, override_ms=override) == expected


@pytest.mark.parametrize(
    ("room_class", "bounds"),
    [
        ("internal", (30 * DAY_MS, 3650 * DAY_MS, "moderators")),
        ("external", (None, None, "nobody")),
        ("open", (None, None, "moderators")),
        ("dm", (None, 30 * DAY_MS, "moderators")),
        (None, (None, None, "nobody")),
    ],
)
def test_bounds_for(room_class: str | None, bounds: tuple[Any, ...]) -> None:
    assert P.bounds_for(room_class) == bounds


@pytest.mark.parametrize(
    ("room_class", "power", "requested", "allow", "rule_id", "reason"),
    [
        ("external", 100, 60 * DAY_MS, False, "ret-ext", "not adjustable"),
        ("vault", 100, None, False, "ret-vault", "not adjustable"),
        (None, 100, 60 * DAY_MS, False, "retention.default", "not adjustable"),
        ("internal", 49, 60 * DAY_MS, False, "retention.adjust_power", "power 49 < 50"),
        ("internal", 50, 60 * DAY_MS, True, "ret-int", "within bounds"),
        ("internal", 100, 30 * DAY_MS, True, "ret-int", "within bounds"),
        ("internal", 100, 3650 * DAY_MS, True, "ret-int", "within bounds"),
        ("internal", 100, 29 * DAY_MS, False, "ret-int", "below min"),
        ("internal", 100, 3651 * DAY_MS, False, "ret-int", "above max"),
        ("internal", 100, None, False, "ret-int", "above max"),
        ("internal", 100, 0, False, "ret-int", "not a period"),
        ("open", 50, None, True, "ret-open", "within bounds"),
        ("open", 50, 1000, True, "ret-open", "within bounds"),
        ("dm", 50, 31 * DAY_MS, False, "retention-dms", "above max"),
        ("dm", 50, None, False, "retention-dms", "above max"),
        ("dm", 50, HOUR_MS, True, "retention-dms", "within bounds"),
    ],
)
def test_decide_adjustment(room_class: str | None, power: int, requested: int | None,
                           allow: bool, rule_id: str, reason: str) -> None:
    d = P.decide_adjustment(room_class, power, requested)
    assert (d.allow, d.rule_id) == (allow, rule_id)
    assert reason in d.reason
    assert bool(d.message) == (not allow)
    if not allow:
        assert rule_id in d.message


def test_adjustment_message_names_bounds() -> None:
    d = P.decide_adjustment("internal", 100, DAY_MS)
    assert "between 30 days and 10 years" in d.message
    d = P.decide_adjustment("dm", 100, None)
    assert "forever is longer than allowed; choose between any and 30 days" in d.message


def test_adjustment_when_disabled() -> None:
    d = policy(enabled=False).decide_adjustment("internal", 100, 60 * DAY_MS)
    assert (d.allow, d.rule_id) == (False, "retention.enabled")


# -- visibility ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keep", "state", "text"),
    [
        (90 * DAY_MS, {"max_lifetime": 90 * DAY_MS}, "Kept for 90 days here."),
        (None, {}, "Kept for forever here."),
        (30_000, {"max_lifetime": 30_000}, "Kept for 30 seconds here."),
    ],
)
def test_state_and_notice(keep: int | None, state: dict[str, int], text: str) -> None:
    period = Period(keep, "r", "retention.default", "default")
    assert P.retention_state(period) == state
    assert P.notice_text(period) == text


def test_default_notice_text() -> None:
    cfg = RetentionConfig.model_validate({})
    period = Period(90 * DAY_MS, "r", "p", "class")
    assert RetentionPolicy(cfg).notice_text(period) == "Messages here are kept for 90 days."


@pytest.mark.parametrize(
    ("service", "content", "expected", "allow"),
    [
        (True, {"max_lifetime": 1}, {"max_lifetime": 90}, True),
        (False, {"max_lifetime": 90}, {"max_lifetime": 90}, True),
        (False, {}, {}, True),
        (False, {"max_lifetime": 1}, {"max_lifetime": 90}, False),
        (False, {}, {"max_lifetime": 90}, False),
        (False, {"max_lifetime": 90, "min_lifetime": 1}, {"max_lifetime": 90}, False),
    ],
)
def test_decide_retention_event(service: bool, content: dict[str, int],
                                expected: dict[str, int], allow: bool) -> None:
    d = P.decide_retention_event(sender_is_service=service, content=content, expected=expected)
    assert (d.allow, d.rule_id) == (allow, "builtin.retention_state")
    assert bool(d.message) == (not allow)


# -- holds -----------------------------------------------------------------------------------
def hold(users: tuple[str, ...] = (), rooms: tuple[str, ...] = (), since: int | None = None,
         until: int | None = None, **kw: Any) -> Hold:
    fields: dict[str, Any] = {
        "id": "h1", "case_id": "CASE-1", "reason": "litigation", "placed_by": "@legal:corp",
        "users": frozenset(users), "rooms": frozenset(rooms), "since_ms": since,
        "until_ms": until, "created_at": 0, **kw}
    return Hold(**fields)


A, B, R1, R2 = "@a:corp", "@b:corp", "!r1:corp", "!r2:corp"


@pytest.mark.parametrize(
    ("h", "room", "sender", "ts", "matches"),
    [
        (hold(users=(A,)), R1, A, 5, True),
        (hold(users=(A,)), R2, A, 5, True),
        (hold(users=(A,)), R1, B, 5, False),
        (hold(users=(A,)), R1, None, 5, False),
        (hold(rooms=(R1,)), R1, B, 5, True),
        (hold(rooms=(R1,)), R1, None, 5, True),
        (hold(rooms=(R1,)), R2, A, 5, False),
        (hold(users=(A,), rooms=(R1,)), R1, A, 5, True),
        (hold(users=(A,), rooms=(R1,)), R2, A, 5, False),
        (hold(users=(A,), rooms=(R1,)), R1, B, 5, False),
        (hold(users=(A, B), rooms=(R1, R2)), R2, B, 5, True),
        (hold(rooms=(R1,), since=100, until=200), R1, A, 99, False),
        (hold(rooms=(R1,), since=100, until=200), R1, A, 100, True),
        (hold(rooms=(R1,), since=100, until=200), R1, A, 200, True),
        (hold(rooms=(R1,), since=100, until=200), R1, A, 201, False),
        (hold(rooms=(R1,), since=100), R1, A, 10**15, True),
        (hold(rooms=(R1,), until=200), R1, A, 0, True),
        (hold(rooms=(R1,), released_at=7, released_by="@legal:corp"), R1, A, 5, False),
    ],
)
def test_hold_matches(h: Hold, room: str, sender: str | None, ts: int, matches: bool) -> None:
    assert h.matches(room, sender, ts) is matches


def test_hold_active() -> None:
    assert hold(rooms=(R1,)).active()
    assert not hold(rooms=(R1,), released_at=1, released_by="@legal:corp").active()


@pytest.mark.parametrize(
    "h",
    [
        hold(users=(A,)), hold(rooms=(R1,)), hold(rooms=("!v12roomid",)),
        hold(users=(A,), rooms=(R1,), since=5, until=5),
    ],
)
def test_validate_hold_accepts(h: Hold) -> None:
    validate_hold(h)


@pytest.mark.parametrize(
    ("h", "words"),
    [
        (hold(), "give users and/or rooms"),
        (hold(users=(A,), since=10, until=9), "is after until"),
        (hold(users=("alice",)), "'alice' is not a Matrix user id"),
        (hold(rooms=("#alias:corp",)), "'#alias:corp' is not a Matrix room id"),
        (hold(users=(A,), case_id=" "), "case id"),
        (hold(users=(A,), placed_by=""), "who places"),
        (hold(users=(A,), id="bad id"), "hold id"),
    ],
)
def test_validate_hold_rejects(h: Hold, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        validate_hold(h)


# -- purge plans -----------------------------------------------------------------------------
PERIOD = Period(100, "ret-x", "retention.classes[9]", "class")
T = 1000  # now: events with ts < 900 are due


def plan(ts: list[int], held: list[int] = (), ids: tuple[str, ...] = (), window: int = 10,
         period: Period = PERIOD, pol: RetentionPolicy = P) -> PurgePlan:
    return pol.plan_purge("!r:corp", period, T, ts, list(held), list(ids), window)


@pytest.mark.parametrize(
    ("ts", "held", "window", "cutoff", "windows", "counts", "held_from", "rule_id"),
    [
        # counts: (due, held, deferred, purged)
        pytest.param([], [], 10, None, (), (0, 0, 0, 0), None, "ret-x", id="no-events"),
        pytest.param([900, 950], [], 10, None, (), (0, 0, 0, 0), None, "ret-x",
                     id="nothing-due-boundary"),
        pytest.param([1, 2, 3], [], 10, 900, (900,), (3, 0, 0, 3), None, "ret-x",
                     id="all-due"),
        pytest.param([1, 2, 899, 900], [], 10, 900, (900,), (3, 0, 0, 3), None, "ret-x",
                     id="some-due"),
        pytest.param([1, 2, 3, 4, 5], [3], 10, 3, (3,), (5, 1, 2, 2), 3, "builtin.legal_hold",
                     id="hold-in-middle"),
        pytest.param([1, 2, 3, 4, 950], [3, 950], 10, 3, (3,), (4, 1, 1, 2), 3,
                     "builtin.legal_hold", id="hold-in-middle-and-not-due"),
        pytest.param([1, 2, 950], [950], 10, 900, (900,), (2, 0, 0, 2), None, "ret-x",
                     id="held-but-not-due"),
        pytest.param([1, 2], [1], 10, None, (), (2, 1, 1, 0), 1, "builtin.legal_hold",
                     id="first-event-held"),
        pytest.param([1, 2, 3], [1, 2, 3], 10, None, (), (3, 3, 0, 0), 1,
                     "builtin.legal_hold", id="all-held"),
        # an unheld event with the held event's ts stays too: purge is by time
        pytest.param([1, 2, 3, 3, 4], [3], 10, 3, (3,), (5, 1, 2, 2), 3,
                     "builtin.legal_hold", id="held-ts-shared"),
        pytest.param([10, 20, 30, 40, 50], [], 1, 900, (20, 30, 40, 50, 900), (5, 0, 0, 5),
                     None, "ret-x", id="window-1"),
        pytest.param([10, 20, 30, 40, 50], [], 2, 900, (30, 50, 900), (5, 0, 0, 5), None,
                     "ret-x", id="window-2"),
        pytest.param([10, 20, 30, 40, 50], [], 10**6, 900, (900,), (5, 0, 0, 5), None,
                     "ret-x", id="window-large"),
        pytest.param([10, 20, 30, 40, 50], [40], 2, 40, (30, 40), (5, 1, 1, 3), 40,
                     "builtin.legal_hold", id="windows-stop-at-hold"),
        # equal timestamps are never split over two steps
        pytest.param([10, 10, 10, 20], [], 2, 900, (20, 900), (4, 0, 0, 4), None, "ret-x",
                     id="equal-run-longer-than-window"),
        pytest.param([10, 10, 10, 20], [], 1, 900, (20, 900), (4, 0, 0, 4), None, "ret-x",
                     id="equal-run-window-1"),
        pytest.param([10, 20, 20, 30], [], 2, 900, (20, 30, 900), (4, 0, 0, 4), None,
                     "ret-x", id="equal-pair-across-boundary"),
        pytest.param([10, 20, 20, 20, 30, 30], [30], 2, 30, (20, 30), (6, 1, 1, 4), 30,
                     "builtin.legal_hold", id="equal-runs-and-hold"),
        pytest.param([5, 5, 5, 5], [], 2, 900, (900,), (4, 0, 0, 4), None, "ret-x",
                     id="one-ts-only"),
    ],
)
def test_plan_purge(ts: list[int], held: list[int], window: int, cutoff: int | None,
                    windows: tuple[int, ...], counts: tuple[int, int, int, int],
                    held_from: int | None, rule_id: str) -> None:
    p = plan(ts, held, ("h2", "h1", "h2"), window)
    assert p.due_before_ms == 900
    assert (p.cutoff_ms, p.windows, p.held_from_ms, p.rule_id) == (
        cutoff, windows, held_from, rule_id)
    assert (p.due_events, p.held_events, p.deferred_events, p.purge_events) == counts
    assert p.hold_ids == ("h1", "h2")
    assert p.room_id == "!r:corp" and p.period == PERIOD


@pytest.mark.parametrize(
    ("pol", "period", "reason"),
    [
        (P, Period(None, "ret-vault", "retention.classes[3]", "class"), "kept forever"),
        (policy(enabled=False), PERIOD, "retention disabled"),
    ],
)
def test_plan_purge_nothing(pol: RetentionPolicy, period: Period, reason: str) -> None:
    p = plan([1, 2, 3], [], period=period, pol=pol)
    assert (p.due_before_ms, p.cutoff_ms, p.windows, p.due_events) == (None, None, (), 0)
    assert p.reason == reason


def test_plan_purge_reason_names_rule_and_holds() -> None:
    p = plan([1, 2, 3, 4], [3], ("case-7",))
    assert "4 events older than" in p.reason and "ret-x" in p.reason
    assert "2 purged in 1 step;" in p.reason
    assert "1 held by case-7" in p.reason and "1 after it deferred" in p.reason


def test_plan_purge_sorts_its_input() -> None:
    assert plan([50, 10, 40, 20, 30], window=2) == plan([10, 20, 30, 40, 50], window=2)


def test_plan_purge_rejects_empty_windows() -> None:
    with pytest.raises(ValueError, match="window_events"):
        plan([1], window=0)


@pytest.mark.parametrize("seed", range(200))
def test_plan_purge_invariants(seed: int) -> None:
    """Whatever the input: steps purge only due, unheld events, each step purges something,
    a step exceeds window_events only for one run of equal ts, and the steps add up."""
    rnd = random.Random(seed)
    grid = range(0, 1000, rnd.choice((1, 7, 50)))  # coarse grids give many equal ts
    ts = sorted(rnd.choice(grid) for _ in range(rnd.randint(0, 40)))
    held = [t for t in ts if rnd.random() < 0.05]
    window = rnd.choice((1, 2, 3, 5, 100))
    p = plan(ts, held, ("h",), window)
    assert list(p.windows) == sorted(set(p.windows))
    if p.windows:
        assert p.windows[-1] == p.cutoff_ms
    prev = None
    purged = 0
    for w in p.windows:
        assert w <= 900  # only due events
        assert all(h >= w for h in held)  # purge_up_to_ts purges ts < w: no held event
        step = [t for t in ts if (prev is None or t >= prev) and t < w]
        assert step, "a step that purges nothing"
        assert len(step) <= window or len(set(step)) == 1
        purged += len(step)
        prev = w
    assert purged == p.purge_events
    assert p.due_events == sum(t < 900 for t in ts)
    assert p.held_events == sum(t < 900 for t in held)
    if not held or min(held) >= 900:
        assert p.purge_events == p.due_events


# -- media and the archive -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("media_keep", "period_keep", "age", "due"),
    [
        (None, 100, 101, True),  # null: the period of the event that references it
        (None, 100, 100, False),
        (None, None, 500 * YEAR_MS, False),
        ("1s", None, 1001, True),  # media.keep wins over the event's period
        ("1s", 100, 999, False),
        ("1s", 10**9, 1001, True),
        ("forever", 100, 500 * YEAR_MS, False),
    ],
)
def test_media_due(media_keep: str | None, period_keep: int | None, age: int,
                   due: bool) -> None:
    pol = policy(media={"keep": media_keep})
    period = Period(period_keep, "r", "p", "class")
    assert pol.media_due(period, NOW - age, NOW) is due


def test_media_not_due_when_disabled() -> None:
    assert not policy(enabled=False).media_due(PERIOD, 0, T)


@pytest.mark.parametrize(
    ("room_class", "keep"),
    [("internal", 7 * YEAR_MS), ("external", 2 * YEAR_MS), ("dm", 2 * YEAR_MS),
     (None, 2 * YEAR_MS), ("unknown", 2 * YEAR_MS)],
)
def test_archive_keep_ms(room_class: str | None, keep: int) -> None:
    assert P.archive_keep_ms(room_class) == keep


@pytest.mark.parametrize(
    ("pol", "room_class", "age", "held", "prune"),
    [
        (P, "external", 2 * YEAR_MS + 1, False, True),
        (P, "external", 2 * YEAR_MS, False, False),
        (P, "external", 50 * YEAR_MS, True, False),
        # archive_keep 7y, but moderators may keep internal rooms up to 10y on the homeserver
        (P, "internal", 8 * YEAR_MS, False, False),
        (P, "internal", 3650 * DAY_MS + 1, False, True),
        (P, "open", 500 * YEAR_MS, False, False),  # adjustable without bound: maybe forever
        (P, "vault", 500 * YEAR_MS, False, False),  # kept forever on the homeserver
        (P, "dm", 2 * YEAR_MS + 1, False, True),
        # the live period outlasting archive.keep wins
        (policy(archive={"keep": "30d"}), "external", 31 * DAY_MS, False, False),
        (policy(archive={"keep": "30d"}), "external", 90 * DAY_MS + 1, False, True),
        (policy(archive={"keep": "forever"}), "external", 500 * YEAR_MS, False, False),
    ],
)
def test_decide_archive_prune(pol: RetentionPolicy, room_class: str, age: int, held: bool,
                              prune: bool) -> None:
    assert pol.decide_archive_prune(newest_ts=NOW - age, room_class=room_class, held=held,
                                    now_ms=NOW) is prune

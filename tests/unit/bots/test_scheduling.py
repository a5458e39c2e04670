"""Due occurrences as a pure function: fire once, coalesce within grace, report the rest."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from bots.scheduling import (
    CronSchedule,
    JobState,
    OnceSchedule,
    due_occurrences,
    next_occurrence,
    occurrence_id,
    occurrences_between,
    schedule_from_config,
)
from bridge.config.bots import ScheduleConfig

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
MIN = 60_000
HOUR = 60 * MIN


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, tz: dt.tzinfo = dt.UTC) -> int:
    return int(dt.datetime(y, mo, d, h, mi, tzinfo=tz).timestamp() * 1000)


DAILY_9_BERLIN = CronSchedule("0 9 * * *", "Europe/Berlin")


def test_cron_in_a_time_zone_follows_daylight_saving() -> None:
    # 2026-03-29: Berlin switches to summer time; 09:00 local is 08:00 UTC before, 07:00 after
    got = occurrences_between(DAILY_9_BERLIN, ms(2026, 3, 27), ms(2026, 3, 31))
    assert got == [ms(2026, 3, 27, 8), ms(2026, 3, 28, 8), ms(2026, 3, 29, 7),
                   ms(2026, 3, 30, 7)]


def test_occurrences_window_is_open_at_the_start_and_closed_at_the_end() -> None:
    t = ms(2026, 1, 5, 8)  # 09:00 Berlin (winter)
    assert occurrences_between(DAILY_9_BERLIN, t, t + HOUR) == []
    assert occurrences_between(DAILY_9_BERLIN, t - 1, t) == [t]
    assert occurrences_between(OnceSchedule(t), t - 1, t) == [t]
    assert occurrences_between(OnceSchedule(t), t, t + 1) == []
    assert next_occurrence(DAILY_9_BERLIN, t) == t + 24 * HOUR
    assert next_occurrence(OnceSchedule(t), t) is None
    assert next_occurrence(OnceSchedule(t), t - 1) == t


NINE = ms(2026, 1, 5, 8)  # Monday 09:00 Berlin
GRACE = HOUR


@pytest.mark.parametrize(
    ("name", "schedule", "state", "now", "fire", "coalesced", "missed"),
    [
        # first sight of a cron job: its past is not 'missed'; nothing due before 09:00
        ("first sight, before", DAILY_9_BERLIN, None, NINE - MIN, None, (), ()),
        # first sight just after a time: within grace it still fires (deployed at 09:05)
        ("first sight, 5 min late", DAILY_9_BERLIN, None, NINE + 5 * MIN, NINE, (), ()),
        ("on time", DAILY_9_BERLIN, JobState(0, NINE - MIN), NINE, NINE, (), ()),
        ("already considered", DAILY_9_BERLIN, JobState(0, NINE, NINE), NINE + MIN,
         None, (), ()),
        # down over two 09:00s, back 30 min after the second: it fires once, the first
        # is older than grace and reported
        ("outage, back within grace", DAILY_9_BERLIN, JobState(0, NINE - MIN),
         NINE + 24 * HOUR + 30 * MIN, NINE + 24 * HOUR, (), (NINE,)),
        # back 2 h after: too late, reported, not sent
        ("outage, back too late", DAILY_9_BERLIN, JobState(0, NINE - MIN), NINE + 2 * HOUR,
         None, (), (NINE,)),
        # a one-off within grace of first sight fires; one older is reported once
        ("one-off, configured 10 min late", OnceSchedule(NINE), None, NINE + 10 * MIN, NINE,
         (), ()),
        ("one-off, configured a day late", OnceSchedule(NINE), None, NINE + 24 * HOUR, None,
         (), (NINE,)),
        ("one-off, already reported", OnceSchedule(NINE), JobState(0, NINE + 24 * HOUR),
         NINE + 25 * HOUR, None, (), ()),
        ("one-off, in the future", OnceSchedule(NINE), None, NINE - HOUR, None, (), ()),
    ],
)
def test_due_occurrences(name: str, schedule: object, state: JobState | None, now: int,
                         fire: int | None, coalesced: tuple[int, ...],
                         missed: tuple[int, ...]) -> None:
    d = due_occurrences(schedule, state, now, GRACE)  # type: ignore[arg-type]
    assert (d.fire, d.coalesced, d.missed) == (fire, coalesced, missed), name
    assert d.state.considered_until_ms == now
    if fire is not None:
        assert d.state.last_fired_ms == fire


def test_several_late_occurrences_within_grace_fire_once() -> None:
    every_10 = CronSchedule("*/10 * * * *")
    t0 = ms(2026, 1, 5, 9)
    d = due_occurrences(every_10, JobState(0, t0 - 1), t0 + 25 * MIN, GRACE)
    assert d.fire == t0 + 20 * MIN
    assert d.coalesced == (t0, t0 + 10 * MIN)
    assert d.missed == ()


def test_a_restart_after_firing_neither_repeats_nor_skips() -> None:
    # fired at 09:00 and saved: the next ticks do nothing until the next day
    d1 = due_occurrences(DAILY_9_BERLIN, JobState(0, NINE - MIN), NINE, GRACE)
    assert d1.fire == NINE
    d2 = due_occurrences(DAILY_9_BERLIN, d1.state, NINE + 3 * MIN, GRACE)
    assert d2.fire is None and d2.missed == ()
    # crashed after firing, before saving: the old state decides the same occurrence again
    # (firing is idempotent by occurrence id, so this is not a repeat)
    d3 = due_occurrences(DAILY_9_BERLIN, JobState(0, NINE - MIN), NINE + 3 * MIN, GRACE)
    assert d3.fire == NINE and occurrence_id(d3.fire) == occurrence_id(d1.fire)
    assert d2.next_due_ms == NINE + 24 * HOUR


def test_a_long_outage_of_a_frequent_job_is_reported_with_a_count() -> None:
    every_min = CronSchedule("* * * * *")
    t0 = ms(2026, 1, 1)
    d = due_occurrences(every_min, JobState(0, t0), t0 + 10 * 24 * HOUR, GRACE, max_listed=5)
    assert d.fire == t0 + 10 * 24 * HOUR
    assert len(d.coalesced) == 60  # the hour of grace, both ends included
    assert len(d.missed) == 5 and d.missed_more > 5000


def test_schedule_from_config() -> None:
    assert schedule_from_config(ScheduleConfig(cron="0 9 * * mon", timezone="Europe/Berlin")
                                ) == CronSchedule("0 9 * * mon", "Europe/Berlin")
    # a one-off without an offset is in its zone; with an offset it is that instant
    assert schedule_from_config(ScheduleConfig(at="2026-01-05T09:00", timezone="Europe/Berlin")
                                ) == OnceSchedule(NINE)
    assert schedule_from_config(ScheduleConfig(at="2026-01-05T08:00:00+00:00")
                                ) == OnceSchedule(NINE)
    assert occurrence_id(NINE) == "2026-01-05T08:00Z"

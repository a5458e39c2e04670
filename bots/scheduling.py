"""Schedules as data, and which occurrences are due: pure functions of (schedule, state, now).

Occurrence times come from APScheduler 3.x's ``CronTrigger`` (cron in a time zone, DST
included) or a single date-time. :func:`due_occurrences` decides, from what the store
remembers of a job (:class:`JobState`) and ``now``, what to fire and what to report:

* occurrences since the job was last considered that are at most ``grace`` late: the
  latest one fires, once (several missed in a row are coalesced into it);
* older ones are *missed*: reported (audit, log), never sent late;
* on a job's first sight, a cron job starts from now (its past is not "missed"), a
  one-off time up to ``grace`` ago still fires, and an older one is reported once.

The caller fires, then saves the new state: a crash in between fires the same occurrence
again, so firing must be idempotent by occurrence time (the store's once-only insert).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass

from apscheduler.triggers.cron import CronTrigger

from bridge.config.bots import ScheduleConfig
from bridge.kernel.timestamps import local_datetime, utc_datetime

# enumerating a long outage of a per-minute cron stops counting here
MAX_ENUMERATED = 10_000


@dataclass(frozen=True)
class CronSchedule:
    cron: str
    timezone: str = "UTC"


@dataclass(frozen=True)
class OnceSchedule:
    at_ms: int


Schedule = CronSchedule | OnceSchedule


def schedule_from_config(cfg: ScheduleConfig) -> Schedule:
    """The schedule of a config entry (a one-off time without offset is in its zone)."""
    if cfg.cron is not None:
        return CronSchedule(cfg.cron, cfg.timezone)
    assert cfg.at is not None
    at = dt.datetime.fromisoformat(cfg.at)
    if at.tzinfo is None:
        at = at.replace(tzinfo=zoneinfo.ZoneInfo(cfg.timezone))
    return OnceSchedule(int(at.timestamp() * 1000))


def _trigger(s: CronSchedule) -> CronTrigger:
    return CronTrigger.from_crontab(s.cron, timezone=zoneinfo.ZoneInfo(s.timezone))


def _dt(ms: int) -> dt.datetime:
    return utc_datetime(ms)


def occurrences_between(schedule: Schedule, after_ms: int, until_ms: int,
                        limit: int = MAX_ENUMERATED) -> list[int]:
    """Occurrence times in ``(after_ms, until_ms]``, oldest first, at most ``limit``."""
    if isinstance(schedule, OnceSchedule):
        return [schedule.at_ms] if after_ms < schedule.at_ms <= until_ms else []
    trig = _trigger(schedule)
    out: list[int] = []
    cursor = _dt(after_ms + 1)
    while len(out) < limit:
        nxt = trig.get_next_fire_time(None, cursor)
        if nxt is None:
            break
        ms = int(nxt.timestamp() * 1000)
        if ms > until_ms:
            break
        if ms > after_ms:
            out.append(ms)
        cursor = _dt(ms + 1)
    return out


def next_occurrence(schedule: Schedule, after_ms: int) -> int | None:
    """The first occurrence strictly after ``after_ms``, or None (a past one-off)."""
    if isinstance(schedule, OnceSchedule):
        return schedule.at_ms if schedule.at_ms > after_ms else None
    nxt = _trigger(schedule).get_next_fire_time(None, _dt(after_ms + 1))
    return int(nxt.timestamp() * 1000) if nxt is not None else None


@dataclass(frozen=True)
class JobState:
    """What the store keeps per job: when it was first seen, up to when every occurrence
    has been dealt with (fired, coalesced or reported), and the last one fired."""

    first_seen_ms: int
    considered_until_ms: int
    last_fired_ms: int | None = None


@dataclass(frozen=True)
class DueDecision:
    fire: int | None  # the occurrence to fire now
    coalesced: tuple[int, ...]  # late but within grace, merged into ``fire``
    missed: tuple[int, ...]  # too late: report, do not fire (oldest first, capped)
    missed_more: int  # missed beyond those listed (a lower bound after a very long outage)
    state: JobState  # to save once ``fire`` is done
    next_due_ms: int | None  # when the job is due next (for the wake-up timer)


def due_occurrences(schedule: Schedule, state: JobState | None, now_ms: int,
                    grace_ms: int, *, max_listed: int = 100) -> DueDecision:
    """What to do about one job at ``now_ms`` (see the module docstring)."""
    if state is None:
        start = now_ms - grace_ms
        state = JobState(first_seen_ms=now_ms, considered_until_ms=start)
        first_sight = True
    else:
        start = state.considered_until_ms
        first_sight = False
    # occurrences before now - grace are too late; enumerate the two windows apart so a
    # long outage of a frequent job (capped enumeration) still finds the recent ones
    late_end = now_ms - grace_ms - 1
    in_grace = occurrences_between(schedule, max(start, late_end), now_ms)
    too_late = (occurrences_between(schedule, start, late_end, max_listed + MAX_ENUMERATED)
                if start < late_end else [])
    if (first_sight and isinstance(schedule, OnceSchedule)
            and schedule.at_ms <= start):
        too_late = [schedule.at_ms]  # configured after its time had passed
    fire = in_grace[-1] if in_grace else None
    coalesced = tuple(in_grace[:-1])
    new_state = JobState(
        first_seen_ms=state.first_seen_ms,
        considered_until_ms=max(now_ms, state.considered_until_ms),
        last_fired_ms=fire if fire is not None else state.last_fired_ms,
    )
    return DueDecision(
        fire=fire, coalesced=coalesced, missed=tuple(too_late[:max_listed]),
        missed_more=max(0, len(too_late) - max_listed), state=new_state,
        next_due_ms=next_occurrence(schedule, now_ms),
    )


def format_ms(ms: int, timezone: str = "UTC") -> str:
    """A readable local time, e.g. '2026-12-01 09:00 CET'."""
    return local_datetime(ms, timezone).strftime("%Y-%m-%d %H:%M %Z")


def occurrence_id(ms: int) -> str:
    """The id of a scheduled occurrence: its UTC time (stable across restarts)."""
    return _dt(ms).strftime("%Y-%m-%dT%H:%MZ")

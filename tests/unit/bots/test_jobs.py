"""JobScheduler on a real (SQLite) store with a controllable clock: the job state kept in
the store makes a restart neither repeat nor silently skip an occurrence."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from bots.jobs import Job, JobScheduler
from bots.scheduling import CronSchedule
from bots.services import BotStorage
from bridge.store import AuditFilter, AuditRecord, Stores, open_stores

HOUR = 3_600_000
T9 = int(dt.datetime(2026, 1, 5, 9, tzinfo=dt.UTC).timestamp() * 1000)


class Clock:
    def __init__(self, t: int):
        self.t = t

    def __call__(self) -> int:
        return self.t


async def _store(tmp_path: Path) -> Stores:
    s = open_stores("sqlite:///bots.db", base_dir=tmp_path)
    await s.database.open()
    await s.database.migrate()
    return s


def _scheduler(store: Stores, clock: Clock, fired: list[int]) -> JobScheduler:
    storage = BotStorage(store.kv, "bot.test", clock)

    def audit(kind: str, outcome: str, **kw: str) -> AuditRecord:
        return AuditRecord(ts=clock(), source="test", kind=kind, outcome=outcome, **kw)

    js = JobScheduler(storage, clock, grace_ms=HOUR, report=store.audit.add_audit, audit=audit)

    async def fire(at: int) -> None:
        fired.append(at)

    js.add(Job("daily", CronSchedule("0 9 * * *"), fire))
    return js


async def test_restarts_neither_repeat_nor_skip(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        clock, fired = Clock(T9 - HOUR), []
        js = _scheduler(store, clock, fired)
        assert await js.tick() == T9  # first sight: nothing due, next at 09:00
        clock.t = T9 + 60_000
        await js.tick()
        assert fired == [T9]
        # "restart": a new scheduler on the same store fires nothing again
        js2 = _scheduler(store, clock, fired)
        clock.t = T9 + 30 * 60_000
        await js2.tick()
        assert fired == [T9]
        # down through the next 09:00, back 20 min late: it fires once, late
        clock.t = T9 + 24 * HOUR + 20 * 60_000
        await _scheduler(store, clock, fired).tick()
        assert fired == [T9, T9 + 24 * HOUR]
        # down for three days, back 3 h after 09:00: reported, never sent late
        clock.t = T9 + 4 * 24 * HOUR + 3 * HOUR
        await _scheduler(store, clock, fired).tick()
        assert fired == [T9, T9 + 24 * HOUR]
        missed = await store.audit.query_audit(AuditFilter(rule_id="schedule.daily"))
        assert [(r["kind"], r["outcome"]) for r in missed] == [("schedule_missed", "skipped")]
        assert missed[0]["detail"].count("2026-01-") == 3  # the 7th, 8th and 9th
        state = await js.state("daily")
        assert state is not None and state.last_fired_ms == T9 + 24 * HOUR
    finally:
        await store.database.close()

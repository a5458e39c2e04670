"""A bot's background work: scheduled jobs (:class:`JobScheduler`, the I/O around the pure
:func:`bots.scheduling.due_occurrences`), the wake-up timer of a bot's loop
(:class:`Waker`, APScheduler 3.x) and the loop itself (:func:`run_forever`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bridge.store import AuditRecord

from .scheduling import JobState, Schedule, due_occurrences, format_ms
from .services import BotStorage

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A scheduled job: ``fire(occurrence_ms)`` must be idempotent by occurrence."""

    id: str
    schedule: Schedule
    fire: Callable[[int], Awaitable[None]]
    timezone: str = "UTC"


class JobScheduler:
    """Runs jobs on their schedules with the state of each kept in the bot's storage.

    :meth:`tick` is the whole logic (drive it with an injected clock in tests); the
    APScheduler :class:`~apscheduler.schedulers.asyncio.AsyncIOScheduler` of
    :class:`Waker` only decides when the next tick happens."""

    def __init__(self, storage: BotStorage, clock_ms: Callable[[], int], *, grace_ms: int,
                 report: Callable[[AuditRecord], Awaitable[None]],
                 audit: Callable[..., AuditRecord]):
        self.storage = storage
        self.clock_ms = clock_ms
        self.grace_ms = grace_ms
        self.jobs: dict[str, Job] = {}
        self._report = report
        self._audit = audit

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job

    async def state(self, job_id: str) -> JobState | None:
        raw = await self.storage.get(f"job:{job_id}")
        return JobState(**raw) if raw else None

    async def tick(self) -> int | None:
        """Fire what is due, report what was missed; return the next due time."""
        now = self.clock_ms()
        next_due: int | None = None
        for job in list(self.jobs.values()):
            state = await self.state(job.id)
            d = due_occurrences(job.schedule, state, now, self.grace_ms)
            if d.missed:
                await self._report_missed(job, d.missed, d.missed_more)
            if d.coalesced:
                log.info("job %s: %d late occurrence(s) merged into %s", job.id,
                         len(d.coalesced), format_ms(d.fire or now, job.timezone))
            if d.fire is not None:
                log.info("job %s: firing the occurrence of %s", job.id,
                         format_ms(d.fire, job.timezone))
                await job.fire(d.fire)
            await self.storage.put(f"job:{job.id}", d.state.__dict__)
            if d.next_due_ms is not None:
                next_due = d.next_due_ms if next_due is None else min(next_due, d.next_due_ms)
        return next_due

    async def _report_missed(self, job: Job, missed: Sequence[int], more: int) -> None:
        when = ", ".join(format_ms(t, job.timezone) for t in missed[:5])
        extra = len(missed) - 5 + more
        if extra > 0:
            when += f" and {extra} more"
        log.warning("job %s: missed %d occurrence(s) older than the grace time (%s); "
                    "not sent late", job.id, len(missed) + more, when)
        await self._report(self._audit(
            "schedule_missed", "skipped", rule_id=f"schedule.{job.id}",
            reason="occurrence older than misfire_grace_seconds (Enclave was not running)",
            detail=when))


class Waker:
    """When a bot's loop runs next: at a given time, every ``poll`` seconds, or now.

    Uses APScheduler 3.x for the timers: the root's one scheduler in ``enclave run``
    (``scheduler``; its own when none is given); the loop itself waits on an
    :class:`asyncio.Event`."""

    def __init__(self, clock_ms: Callable[[], int], poll_seconds: float, name: str,
                 scheduler: AsyncIOScheduler | None = None):
        self.clock_ms = clock_ms
        self.poll_seconds = poll_seconds
        self.name = name
        self.event = asyncio.Event()
        self._own = scheduler is None
        self._scheduler = AsyncIOScheduler() if scheduler is None else scheduler
        self._started = False

    def start(self) -> None:
        if self._own and not self._scheduler.running:
            self._scheduler.start()
        self._scheduler.add_job(self._timer, "interval", seconds=self.poll_seconds,
                                id=f"waker:{self.name}-poll", coalesce=True, max_instances=1,
                                replace_existing=True)  # started again: a replica leads again
        self._started = True

    def wake(self) -> None:
        self.event.set()

    async def _timer(self) -> None:
        # a coroutine: APScheduler runs it on the event loop (a plain function would run in
        # a worker thread, where setting an asyncio.Event is not safe)
        self.event.set()

    def at(self, when_ms: int | None) -> None:
        """Wake at ``when_ms`` (by the injected clock) unless an earlier wake comes."""
        if when_ms is None or not self._started:
            return
        delay = max(0.0, (when_ms - self.clock_ms()) / 1000)
        run = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        self._scheduler.add_job(self._timer, "date", run_date=run, id=f"waker:{self.name}-at",
                                replace_existing=True, misfire_grace_time=None)

    async def wait(self) -> None:
        await self.event.wait()
        self.event.clear()

    def stop(self) -> None:
        self._started = False
        if self._own:
            if self._scheduler.running:
                self._scheduler.shutdown(wait=False)
            return
        for suffix in ("poll", "at"):
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(f"waker:{self.name}-{suffix}")


async def run_forever(name: str, step: Callable[[], Awaitable[None]], waker: Waker) -> None:
    """Call ``step`` whenever ``waker`` fires; log (do not die on) a failing step."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: a pass failed; trying again at the next wake-up", name)
        await waker.wait()


async def cancel_quietly(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t

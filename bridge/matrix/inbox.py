"""Process the durable inbox: in order within a room, concurrently across rooms.

For each event every registered handler returns Actions (decisions as data). The event is
marked done and its actions are written to the outbox in ONE commit, then the actions are
applied in order. So a crash before the commit re-runs the (pure, repeatable) handlers, and a
crash after it resumes the outbox; sends carry ids derived from the action so a resend is
deduplicated by the homeserver. A handler that keeps failing is retried with backoff and then
parked (metrics, audit, ``enclave inbox parked``), which lets the rest of its room go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..config.models import InboxConfig
from ..metrics import Metrics
from ..policy.actions import Action
from ..store import AuditRecord, InboxEvent, QuarantinedEvent, Store
from .executor import Executor
from .transactions import BadTransaction, ParsedTransaction, parse_transaction

log = logging.getLogger(__name__)


class EventHandler(Protocol):
    """The extension point: separation, retention and bots register one of these."""

    name: str

    async def __call__(self, event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]: ...


@dataclass
class FunctionHandler:
    name: str
    fn: Callable[[dict[str, Any], InboxEvent], Awaitable[Sequence[Action]]]

    async def __call__(self, event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        return await self.fn(event, meta)


JOURNAL_BATCH = 50


async def expand_journal(store: Store, metrics: Metrics, *, limit: int) -> int:
    """Expand journaled transactions into inbox events (and quarantine); return how many.

    Crash-safe without a shared transaction: ``save_transaction`` commits first and
    deduplicates by transaction id, so re-expanding an entry whose removal was lost to a
    crash stores nothing twice.
    """
    entries = await store.journal_pending(limit)
    for entry in entries:
        try:
            parsed = parse_transaction(orjson.loads(entry.body))
        except (orjson.JSONDecodeError, BadTransaction) as e:
            # checked before it was journaled; kept aside rather than lost if it ever fails
            parsed = ParsedTransaction([], [QuarantinedEvent(
                position=0, section="transaction", reason=f"unreadable transaction: {e}",
                raw=entry.body[:65536].decode("utf-8", "replace"),
            )])
        is_new = await store.save_transaction(
            entry.txn_id, parsed.events, parsed.quarantined, entry.received_at
        )
        if not is_new:
            metrics.transactions.labels(result="duplicate").inc()
            continue
        metrics.transactions.labels(result="accepted").inc()
        per_kind: dict[str, int] = {}
        for ev in parsed.events:
            per_kind[ev.kind] = per_kind.get(ev.kind, 0) + 1
        for kind, n in per_kind.items():
            metrics.events_received.labels(kind=kind).inc(n)
        if parsed.quarantined:
            metrics.events_quarantined.inc(len(parsed.quarantined))
            for qe in parsed.quarantined:
                log.warning("quarantined event %d of %s in txn %s: %s", qe.position,
                            qe.section, entry.txn_id, qe.reason)
    await store.journal_remove([e.seq for e in entries])
    return len(entries)


def backoff_ms(attempts: int, cfg: InboxConfig) -> int:
    """Delay before attempt ``attempts + 1``: exponential, capped."""
    delay = min(cfg.backoff_max_seconds, cfg.backoff_initial_seconds * 2 ** (attempts - 1))
    return int(delay * 1000)


class InboxProcessor:
    def __init__(
        self, store: Store, executor: Executor, handlers: Sequence[EventHandler],
        cfg: InboxConfig, metrics: Metrics, clock_ms: Callable[[], int],
    ):
        self.store = store
        self.executor = executor
        self.handlers = list(handlers)
        self.cfg = cfg
        self.metrics = metrics
        self.clock_ms = clock_ms
        self._wake = asyncio.Event()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._lane_retry_at: dict[str, int] = {}
        self._crashes: dict[str, int] = {}
        self._event_retry_due: int | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()  # set whenever a full pass found nothing to do

    def notify(self) -> None:
        """New events were committed to the inbox."""
        self._wake.set()

    async def start(self) -> None:
        # Actions committed before a crash but not applied: resume them first.
        for a in await self.store.pending_actions(None, 100_000):
            self._lane_retry_at.setdefault(a.lane, 0)
        self._task = asyncio.create_task(self._run(), name="inbox-dispatcher")

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop dispatching; let room workers finish the event in hand, then cancel them.

        Cancelling mid-action is safe (the outbox resumes it) but letting it finish avoids
        a needless resend after the restart.
        """
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        tasks = list(self._active.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                started, next_due = await self._dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("inbox dispatch failed; retrying in 1s")
                started, next_due = False, self.clock_ms() + 1000
            if not started and not self._active:
                self.idle.set()
            else:
                self.idle.clear()
            timeout = 1.0
            if self._event_retry_due is not None:
                # an event waiting for its retry: wake exactly when it is due
                if self._event_retry_due <= self.clock_ms():
                    self._event_retry_due = None
                else:
                    next_due = min(next_due or self._event_retry_due, self._event_retry_due)
            if next_due is not None:
                timeout = max(0.0, min(timeout, (next_due - self.clock_ms()) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _dispatch_once(self) -> tuple[bool, int | None]:
        await self._pump_journal()
        now = self.clock_ms()
        free = self.cfg.room_concurrency - len(self._active)
        started = False
        next_due: int | None = None
        # lanes whose outbox must be retried before their rooms go on
        for lane, due in list(self._lane_retry_at.items()):
            if lane in self._active:
                continue
            if due <= now and free > 0:
                del self._lane_retry_at[lane]
                self._start_room(lane, [])
                free -= 1
                started = True
            elif due > now:
                next_due = due if next_due is None else min(next_due, due)
        if free <= 0:
            return started, next_due
        # Snapshot before the query: a worker that finishes while we wait for the database
        # must not have its (now done) events handed to a second worker.
        busy = set(self._active) | set(self._lane_retry_at)
        events = await self.store.fetch_due_events(now, self.cfg.batch_size)
        by_room: dict[str, list[InboxEvent]] = {}
        for ev in events:
            if ev.room_id in busy:
                continue
            by_room.setdefault(ev.room_id, []).append(ev)
        for room, evs in by_room.items():
            if free <= 0:
                break
            self._start_room(room, evs)
            free -= 1
            started = True
        return started, next_due

    async def _pump_journal(self) -> None:
        # Expand a bounded number of journaled transactions per pass, so a big backlog
        # is worked off while events already expanded keep flowing.
        await expand_journal(self.store, self.metrics, limit=JOURNAL_BATCH)

    def _start_room(self, room: str, events: list[InboxEvent]) -> None:
        task = asyncio.create_task(self._run_room(room, events), name=f"room {room}")
        self._active[room] = task

        def done(t: asyncio.Task[None]) -> None:
            self._active.pop(room, None)
            if not t.cancelled() and t.exception() is not None:
                # e.g. the store failed mid-way: back off like an unavailable lane, or the
                # dispatcher would restart this room at once, in a tight loop
                crashes = self._crashes.get(room, 0) + 1
                self._crashes[room] = crashes
                delay = backoff_ms(crashes, self.cfg)
                self._lane_retry_at[room] = self.clock_ms() + delay
                log.error("room worker %s crashed (%d in a row), retry in %.1fs: %r", room,
                          crashes, delay / 1000, t.exception())
            elif not t.cancelled():
                self._crashes.pop(room, None)
            self._wake.set()

        task.add_done_callback(done)

    async def _drain_actions(self, lane: str) -> bool:
        """Apply the lane's pending actions in order; False if the homeserver is away."""
        while True:
            pending = await self.store.pending_actions(lane, 100)
            if not pending:
                return True
            for stored in pending:
                if not await self.executor.run_stored(stored, max_attempts=self.cfg.max_attempts):
                    retry_in = backoff_ms(stored.attempts + 1, self.cfg)
                    self._lane_retry_at[lane] = self.clock_ms() + retry_in
                    return False

    async def _run_room(self, room: str, events: list[InboxEvent]) -> None:
        if not await self._drain_actions(room):
            return
        done: list[int] = []
        for ev in events:
            if self._stopping:
                break
            try:
                actions = await self._handle(ev)
            except Exception as e:
                await self._flush(done, [], [])
                done = []
                if not await self._failed(ev, e):
                    return  # retry later; later events of this room wait for it
                continue
            if not actions:
                done.append(ev)
                continue
            done.append(ev)
            rows = [
                (ev.seq, i, room, a.kind, orjson.dumps(a.to_dict()).decode(), a.rule_id,
                 a.reason)
                for i, a in enumerate(actions)
            ]
            await self._flush(done, rows, actions)
            done = []
            if not await self._drain_actions(room):
                return
        await self._flush(done, [], [])

    async def _flush(self, done: list[InboxEvent], rows: list[Any],
                     actions: Sequence[Action]) -> None:
        if not done:
            return
        now = self.clock_ms()
        await self.store.complete_events([e.seq for e in done], rows, now)
        self.metrics.events_processed.labels(outcome="done").inc(len(done))
        for e in done:
            self.metrics.processing_lag.observe(max(0, now - e.received_at) / 1000)

    async def _handle(self, ev: InboxEvent) -> list[Action]:
        event = orjson.loads(ev.body)
        out: list[Action] = []
        for h in self.handlers:
            out.extend(await h(event, ev))
        return out

    async def _failed(self, ev: InboxEvent, exc: Exception) -> bool:
        """Record a handler failure. True if the event was parked (the room may go on)."""
        attempts = ev.attempts + 1
        park = attempts >= self.cfg.max_attempts
        now = self.clock_ms()
        error = f"{type(exc).__name__}: {exc}"
        due = now + backoff_ms(attempts, self.cfg)
        await self.store.fail_event(ev.seq, attempts, due, error, park)
        if not park:
            self._event_retry_due = min(self._event_retry_due or due, due)
        if park:
            log.error("event %s parked after %d attempts: %s", ev.event_id, attempts, error)
            self.metrics.events_processed.labels(outcome="parked").inc()
            await self.store.add_audit(AuditRecord(
                ts=now, source="inbox", kind="event_parked", outcome="parked",
                room_id=ev.room_id or None, user_id=ev.sender,
                reason=f"handler failed {attempts} times", detail=f"{ev.event_id}: {error}",
            ))
        else:
            log.warning("event %s failed (attempt %d), retry later: %s", ev.event_id,
                        attempts, error)
            self.metrics.events_processed.labels(outcome="retry").inc()
            self._wake.set()
        return park

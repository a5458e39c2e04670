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
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..config.models import InboxConfig
from ..kernel.retry import Backoff
from ..metrics import Metrics
from ..policy.actions import Action
from ..store import AuditRecord, InboxEvent, QuarantinedEvent
from ..store.domains import InboxStore, JournalStore, OutboxStore
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
# A room worker commits the done-marks of events without actions at least this often, and
# gives the event loop a turn (HTTP answers share it) after this much work without an await.
FLUSH_EVERY = 256
YIELD_SECONDS = 0.001
# Ingest priority: defer processing while a homeserver request started this recently, by at
# most MAX_DEFER per slice of work (processing keeps >= 25% of the loop under a burst).
INGEST_QUIET_SECONDS = 0.002
MAX_DEFER_SECONDS = 0.003
DEFER_STEP_SECONDS = 0.0005
# Largest outbox read at start-up; more pending than that: every lane is checked once.
STARTUP_ACTIONS = 100_000


async def expand_journal(
    journal: JournalStore, inbox: InboxStore, metrics: Metrics, *, limit: int,
    pause: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Expand journaled transactions into inbox events (and quarantine); return how many.

    Crash-safe without a shared transaction: ``save_transaction`` commits first and
    deduplicates by transaction id, so re-expanding an entry whose removal was lost to a
    crash stores nothing twice.
    """
    entries = await journal.journal_pending(limit)
    for entry in entries:
        if pause is not None:
            await pause()
        try:
            parsed = parse_transaction(orjson.loads(entry.body))
        except (orjson.JSONDecodeError, BadTransaction) as e:
            # checked before it was journaled; kept aside rather than lost if it ever fails
            parsed = ParsedTransaction([], [QuarantinedEvent(
                position=0, section="transaction", reason=f"unreadable transaction: {e}",
                raw=entry.body[:65536].decode("utf-8", "replace"),
            )])
        is_new = await inbox.save_transaction(
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
    await journal.journal_remove([e.seq for e in entries])
    return len(entries)


def backoff_ms(attempts: int, cfg: InboxConfig) -> int:
    """Delay before attempt ``attempts + 1``: exponential, capped."""
    return Backoff(cfg.backoff_initial_seconds, cfg.backoff_max_seconds).delay_ms(attempts)


class InboxProcessor:
    def __init__(
        self, journal: JournalStore, inbox: InboxStore, outbox: OutboxStore, executor: Executor,
        handlers: Sequence[EventHandler],
        cfg: InboxConfig, metrics: Metrics, clock_ms: Callable[[], int],
    ):
        self.journal = journal
        self.inbox = inbox
        self.outbox = outbox
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
        self._journal_task: asyncio.Task[None] | None = None
        self._journal_wake = asyncio.Event()
        self.idle = asyncio.Event()  # set whenever a full pass found nothing to do
        # Each pending event is read from the database once: fetched events wait in their
        # room's queue (FIFO, seq order) until the room's worker takes them. ``_owned``:
        # every event fetched and not yet finished (queued or in a worker's hands) -> room;
        # a fetch skips those. Memory only: after a restart everything is read again.
        self._queues: dict[str, deque[InboxEvent]] = {}
        self._owned: dict[int, str] = {}
        # While a fetch is in flight its snapshot may predate commits made meanwhile: rows
        # finished (``_released``) or rooms dropped (``_dropped``) during it are ignored.
        self._fetching = False
        self._released: set[int] = set()
        self._dropped: set[str] = set()
        # An earlier process may have begun an action and crashed before recording its
        # attempt: in a lane actions run one at a time, in order, so only the lane's first
        # pending action written before this start can be such a one (it is read back
        # before it is sent again). Memory only, read again at each start.
        self._resume_up_to = 0
        self._lanes_resumed: set[str] = set()
        self._maybe_more = True  # the inbox may hold due events not fetched yet
        # Lanes that may have pending actions: only those query the outbox.
        self._action_lanes: set[str] = set()
        self._actions_unknown = False  # start-up read was truncated: check every lane once
        self._lanes_checked: set[str] = set()
        self._ingest_seen = 0.0
        self._slice_started = 0.0

    def note_ingest(self) -> None:
        """A homeserver request is being answered: give it the event loop first."""
        self._ingest_seen = time.perf_counter()

    async def yield_to_ingest(self) -> None:
        """Let the loop run; while the homeserver is pushing, wait (bounded) for a gap.

        The answer to the homeserver is on its critical path (one transaction in flight),
        processing is not; but processing still gets at least one slice in
        ``1 + MAX_DEFER_SECONDS / YIELD_SECONDS``, so a long burst cannot starve it.
        """
        if time.perf_counter() - self._slice_started < YIELD_SECONDS:
            return  # this slice of work is not used up yet
        await asyncio.sleep(0)
        waited = 0.0
        while (time.perf_counter() - self._ingest_seen < INGEST_QUIET_SECONDS
               and waited < MAX_DEFER_SECONDS):
            await asyncio.sleep(DEFER_STEP_SECONDS)
            waited += DEFER_STEP_SECONDS
        self._slice_started = time.perf_counter()

    def notify(self) -> None:
        """New transactions were journaled (or events committed to the inbox)."""
        self._maybe_more = True
        self._journal_wake.set()
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping

    async def start(self) -> None:
        """Start processing (again, after :meth:`stop`: a replica that leads once more)."""
        # What a previous run held in memory may be stale: another replica has processed
        # since. Everything is read again from the database.
        self._stopping = False
        self._queues.clear()
        self._owned.clear()
        self._lane_retry_at.clear()
        self._crashes.clear()
        self._action_lanes.clear()
        self._lanes_checked.clear()
        self._event_retry_due = None
        self._maybe_more = True
        # Actions committed before a crash but not applied: resume them first.
        self._resume_up_to = await self.outbox.last_action_id()
        self._lanes_resumed.clear()
        pending = await self.outbox.pending_actions(None, STARTUP_ACTIONS)
        for a in pending:
            self._lane_retry_at.setdefault(a.lane, 0)
            self._action_lanes.add(a.lane)
        self._actions_unknown = len(pending) >= STARTUP_ACTIONS
        self._task = asyncio.create_task(self._run(), name="inbox-dispatcher")
        self._journal_task = asyncio.create_task(self._run_journal(), name="journal-expander")

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop dispatching; let room workers finish the event in hand, then cancel them.

        Cancelling mid-action is safe (the outbox resumes it) but letting it finish avoids
        a needless resend after the restart.
        """
        self._stopping = True
        self._wake.set()
        # Cancelling the expander mid-entry is safe: an entry is removed from the journal
        # only after its events are committed, and re-expanding it is deduplicated.
        for task in (self._task, self._journal_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        tasks = list(self._active.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._journal_task = None

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
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                # retries come due; events requeued by another process (``enclave inbox``)
                self._maybe_more = True

    async def _dispatch_once(self) -> tuple[bool, int | None]:
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
                self._start_room(lane)
                free -= 1
                started = True
            elif due > now:
                next_due = due if next_due is None else min(next_due, due)
        free, started = self._start_ready(free, started)
        # Read more only when a worker slot would stay idle and few events are in hand, so
        # rows are not read again while they wait in a queue (they are still pending).
        if free > 0 and self._maybe_more and len(self._owned) < self.cfg.batch_size:
            await self._fetch(now)
            free, started = self._start_ready(free, started)
        return started, next_due

    def _start_ready(self, free: int, started: bool) -> tuple[int, bool]:
        """Start workers for rooms with queued events, in the order they were fetched."""
        if free <= 0:
            return free, started
        for room, q in list(self._queues.items()):
            if not q or room in self._active or room in self._lane_retry_at:
                continue
            self._start_room(room)
            started = True
            free -= 1
            if free <= 0:
                break
        return free, started

    async def _fetch(self, now: int) -> None:
        self._maybe_more = False  # a notify() during the read sets it again
        limit = self.cfg.batch_size + len(self._owned)  # rows in hand come back too
        self._fetching = True
        try:
            events = await self.inbox.fetch_due_events(now, limit)
        except BaseException:
            self._maybe_more = True
            raise
        finally:
            self._fetching = False
            released, dropped = self._released, self._dropped
            self._released, self._dropped = set(), set()
        if len(events) >= limit or dropped:
            self._maybe_more = True
        owned, queues, blocked = self._owned, self._queues, self._lane_retry_at
        for ev in events:
            seq, room = ev.seq, ev.room_id
            if seq in owned or seq in released or room in dropped:
                continue
            if room in blocked:
                # its outbox waits for the homeserver: read the rest when it is back
                self._maybe_more = True
                continue
            owned[seq] = room
            q = queues.get(room)
            if q is None:
                q = queues[room] = deque()
            q.append(ev)

    def _release(self, seqs: Sequence[int]) -> None:
        """Events finished (done or parked, committed): a later fetch may not return them."""
        owned = self._owned
        for s in seqs:
            owned.pop(s, None)
        if self._fetching:
            self._released.update(seqs)

    def _drop_room(self, room: str) -> None:
        """Forget the room's fetched events; they are read again from the database (after
        a failed event's backoff, or after a crash of the worker)."""
        self._queues.pop(room, None)
        self._release([s for s, r in self._owned.items() if r == room])
        if self._fetching:
            self._dropped.add(room)
        self._maybe_more = True

    async def _run_journal(self) -> None:
        """Expand journaled transactions into the inbox, beside (not inside) dispatching,
        so a burst of transactions never holds up rooms whose events are already in."""
        while not self._stopping:
            self._journal_wake.clear()
            try:
                n = await expand_journal(self.journal, self.inbox, self.metrics,
                                         limit=JOURNAL_BATCH, pause=self.yield_to_ingest)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("expanding the transaction journal failed; retrying in 1s")
                n = 0
            if n:
                self._maybe_more = True  # new inbox rows to fetch
                self._wake.set()
            if n < JOURNAL_BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._journal_wake.wait(), 1.0)

    def _start_room(self, room: str) -> None:
        task = asyncio.create_task(self._run_room(room), name=f"room {room}")
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
        """Apply the lane's pending actions in order; False if the homeserver is away.

        Only lanes known to have some are read: actions are written by this room's own
        worker (which marks the lane first) or were left from before a restart (read by
        :meth:`start`).
        """
        if lane not in self._action_lanes and (
                not self._actions_unknown or lane in self._lanes_checked):
            return True
        while True:
            pending = await self.outbox.pending_actions(lane, 100)
            for stored in pending:
                # only a lane's first action written before this process began can have
                # been begun by a crashed one (a lane's actions run one at a time, in order)
                resumed = False
                if stored.id <= self._resume_up_to and lane not in self._lanes_resumed:
                    resumed = True
                    self._lanes_resumed.add(lane)
                if not await self.executor.run_stored(stored, max_attempts=self.cfg.max_attempts,
                                                      resumed=resumed):
                    retry_in = backoff_ms(stored.attempts + 1, self.cfg)
                    self._lane_retry_at[lane] = self.clock_ms() + retry_in
                    return False
            if len(pending) < 100:
                # run_stored returned True: each reached a final state; none was added
                # meanwhile (only this worker adds to its lane)
                break
        self._action_lanes.discard(lane)
        if self._actions_unknown:
            self._lanes_checked.add(lane)
        return True

    async def _run_room(self, room: str) -> None:
        """Work off the room's queue, including events the dispatcher appends meanwhile."""
        try:
            if not await self._drain_actions(room):
                return  # the queue waits (in order) for the lane's retry
            done: list[InboxEvent] = []
            queues = self._queues
            clock = time.perf_counter
            last_yield = clock()
            while not self._stopping:
                q = queues.get(room)
                if not q:
                    if not done:
                        if q is not None:
                            del queues[room]
                        return
                    await self._flush(done, [], [])  # the dispatcher may append meanwhile
                    done = []
                    continue
                ev = q.popleft()
                try:
                    actions = await self._handle(ev)
                except Exception as e:
                    await self._flush(done, [], [])
                    done = []
                    if not await self._failed(ev, e):
                        # retry later; later events of this room wait for it, and are
                        # read again (in order) once it is due
                        self._drop_room(room)
                        return
                    self._release((ev.seq,))
                    continue
                done.append(ev)
                if actions:
                    rows = [
                        (ev.seq, i, room, a.kind, orjson.dumps(a.to_dict()).decode(),
                         a.rule_id, a.reason)
                        for i, a in enumerate(actions)
                    ]
                    self._action_lanes.add(room)  # before the commit: it may be unknown
                    await self._flush(done, rows, actions)
                    done = []
                    if not await self._drain_actions(room):
                        return
                elif len(done) >= FLUSH_EVERY:
                    await self._flush(done, [], [])
                    done = []
                # handlers rarely really await: let the HTTP endpoint answer meanwhile
                if clock() - last_yield >= YIELD_SECONDS:
                    await self.yield_to_ingest()
                    last_yield = clock()
            await self._flush(done, [], [])  # stopping
        except BaseException:
            # e.g. the store failed (the done-marks in hand may or may not be committed):
            # read the room again from the database when it is retried
            self._drop_room(room)
            raise

    async def _flush(self, done: list[InboxEvent], rows: list[Any],
                     actions: Sequence[Action]) -> None:
        if not done:
            return
        now = self.clock_ms()
        seqs = [e.seq for e in done]
        await self.inbox.complete_events(seqs, rows, now)
        self._release(seqs)
        self.metrics.events_processed.labels(outcome="done").inc(len(done))
        for e in done:
            self.metrics.processing_lag.observe(max(0, now - e.received_at) / 1000)

    async def _handle(self, ev: InboxEvent) -> list[Action]:
        if not self.handlers:
            return []
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
        audit = AuditRecord(
            ts=now, source="inbox", kind="event_parked", outcome="parked",
            room_id=ev.room_id or None, user_id=ev.sender,
            reason=f"handler failed {attempts} times", detail=f"{ev.event_id}: {error}",
        ) if park else None
        await self.inbox.fail_event(ev.seq, attempts, due, error, park, audit)
        if park:
            log.error("event %s parked after %d attempts: %s", ev.event_id, attempts, error)
            self.metrics.events_processed.labels(outcome="parked").inc()
        else:
            self._event_retry_due = min(self._event_retry_due or due, due)
            log.warning("event %s failed (attempt %d), retry later: %s", ev.event_id,
                        attempts, error)
            self.metrics.events_processed.labels(outcome="retry").inc()
            self._wake.set()
        return park

"""The completeness check: every event the homeserver has reaches the inbox, within a bound.

Synapse's appservice push is not enough on its own: it drops the events it holds in memory
when it stops (element-hq/synapse#11637) and can strand a transaction while it recovers
the appservice (docs/operators/known-issues.md). So the leading replica reads every room's timeline
forward from a per-room cursor (Synapse admin API, ``GET /_synapse/admin/v1/rooms`` and
``/rooms/{id}/messages``), compares it with the inbox and puts what the push missed into
the SAME inbox: deduplicated by event id (a late push of the same event is dropped), in
timeline order, with ``unsigned["org.enclave.recovered"] = {cause, late_ms}`` on the event
so handlers and the archive can tell, one audit record per recovered batch, and
``enclave_events_recovered_total{cause}``. The decisions are pure
(``bridge.policy.completeness``); this module does the I/O.

Cursors live in the store (component ``completeness``), so a restart of Enclave or of the
homeserver resumes where the last check stopped; Synapse's pagination tokens are positions
in its database, valid across its restarts. A room seen for the first time is read back to
when the check was first switched on (``since``), never further: history from before
Enclave is not fed to the handlers. Why this design, and what it costs:
docs/operators/completeness.md, "Why this design" and "Limits".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from ..metrics import Metrics
from ..policy.completeness import (
    RULE_RECOVER,
    SeenEvent,
    Timing,
    classify_cause,
    decide_page,
    timing_for_bound,
)
from ..store import AuditRecord, NewEvent
from ..store.domains import InboxStore, KVStore
from .client import HomeserverUnavailable, MatrixClient, MatrixRequestError
from .transactions import parse_event

log = logging.getLogger(__name__)

COMPONENT = "completeness"
SINCE_KEY = "since"
CURSOR_PREFIX = "cursor:"
RECOVERED_KEY = "org.enclave.recovered"
PAGE_LIMIT = 200
ROOMS_PAGE = 500
ROOM_CONCURRENCY = 4
# outages remembered for the cause of a recovery
MAX_OUTAGES = 64


class CompletenessCheck:
    """Runs on the leader: one check every ``timing.interval_ms`` (see the module doc)."""

    def __init__(self, inbox: InboxStore, kv: KVStore, client: MatrixClient, metrics: Metrics,
                 *,
                 admin_user_id: str, bound_seconds: float,
                 clock_ms: Callable[[], int],
                 on_recovered: Callable[[], None],
                 admin_ready: Callable[[], bool] = lambda: True,
                 timing: Timing | None = None):
        self.inbox = inbox
        self.kv = kv
        self.client = client
        self.metrics = metrics
        self.admin = admin_user_id
        self.bound_seconds = bound_seconds
        self.timing = timing or timing_for_bound(bound_seconds)
        self.clock_ms = clock_ms
        self.on_recovered = on_recovered
        self.admin_ready = admin_ready
        self.started_ms = clock_ms()
        self._first_seen: dict[str, int] = {}
        self._outages: deque[tuple[int, int | None]] = deque(maxlen=MAX_OUTAGES)
        self.last_ok_started_ms: int | None = None  # start of the last complete check
        self.last_error: str | None = None
        self.oldest_gap_ms = 0
        self.recovered_total = 0
        self.rooms = 0
        self.checks = 0
        self.quiet_checks = 0  # checks that found the room stream where it was
        self._position: str | None = None  # the room stream position the last check saw
        self._unsettled: set[str] = set()  # rooms whose cursor could not reach the end
        metrics.completeness_lag.set_function(lambda: self.lag_seconds())
        metrics.completeness_bound.set(bound_seconds)

    # -- what /ready and /metrics show ---------------------------------------------------
    def lag_seconds(self) -> float:
        """How stale the verification is: since the start of the last complete check (or of
        this process, before the first one)."""
        ref = self.last_ok_started_ms if self.last_ok_started_ms is not None else self.started_ms
        return max(0.0, (self.clock_ms() - ref) / 1000)

    def status(self) -> dict[str, Any]:
        lag = self.lag_seconds()
        return {
            "ok": self.last_error is None and lag <= self.bound_seconds,
            "bound_seconds": self.bound_seconds,
            "lag_seconds": round(lag, 1),
            "oldest_gap_seconds": round(self.oldest_gap_ms / 1000, 1),
            "recovered": self.recovered_total,
            "rooms_read": self.rooms,
            "checks": self.checks,
            "quiet_checks": self.quiet_checks,
            "error": self.last_error,
        }

    # -- homeserver outages (for the cause) -----------------------------------------------
    def homeserver_unreachable(self) -> None:
        """Any outgoing call found the homeserver unreachable (MatrixClient hook)."""
        now = self.clock_ms()
        if self._outages and self._outages[-1][1] is None:
            return
        self._outages.append((now, None))

    def _homeserver_answered(self) -> None:
        if self._outages and self._outages[-1][1] is None:
            start, _ = self._outages.pop()
            self._outages.append((start, self.clock_ms()))

    # -- the loop ---------------------------------------------------------------------------
    async def run_forever(self, wait_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Check every interval until cancelled (the leader runs it). The first check waits a
        grace period: after a start, the homeserver's redelivery (the start-up ping) comes
        first and the check does not race it."""
        # The first start with the check on: nothing older is fed to the handlers (kept
        # once, so a crash before the first check does not move it).
        await self.kv.component_put_new(COMPONENT, SINCE_KEY, str(self.started_ms),
                                           self.started_ms)
        if wait_ready is not None:
            await wait_ready()
        await asyncio.sleep(self.timing.grace_ms / 1000)
        while True:
            started = time.monotonic()
            await self.check_logged()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.timing.interval_ms / 1000 - elapsed))

    async def check_logged(self) -> int:
        """One check; errors are logged and shown on /ready, not raised."""
        if not self.admin_ready():
            self.last_error = "Enclave's admin identity is not a homeserver admin"
            return 0
        try:
            return await self.check_once()
        except asyncio.CancelledError:
            raise
        except (HomeserverUnavailable, aiohttp.ClientError, TimeoutError, OSError) as e:
            self.homeserver_unreachable()
            self.last_error = f"homeserver unreachable: {e}"
            log.warning("completeness check: %s", self.last_error)
        except MatrixRequestError as e:
            self.last_error = str(e)
            log.warning("completeness check failed: %s", e)
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("completeness check failed")
        return 0

    async def check_once(self) -> int:
        """Read every room forward from its cursor; recover what the push missed. Returns
        how many events were recovered."""
        started = self.clock_ms()
        # Where the homeserver's room stream is now (one cheap request): if no room got an
        # event since the last complete check, only the rooms it left unsettled are read.
        try:
            position = await self.client.room_stream_position(self.admin)
        except (MatrixRequestError, HomeserverUnavailable) as e:
            # without it every room is read: slower, never less complete
            log.warning("completeness check: no room stream position (%s)", e)
            position = None
        else:
            self._homeserver_answered()
        quiet = position is not None and position == self._position
        await self.kv.component_put_new(COMPONENT, SINCE_KEY, str(self.started_ms), started)
        since_ms = int(await self.kv.component_get(COMPONENT, SINCE_KEY) or self.started_ms)
        rooms = sorted(self._unsettled) if quiet else await self._rooms()
        cursors = await self.kv.component_list(COMPONENT, CURSOR_PREFIX)
        recovered, gap = 0, 0
        waiting: set[str] = set()
        # a few rooms at a time: one check of many rooms stays well inside the bound
        # without flooding the homeserver
        slots = asyncio.Semaphore(ROOM_CONCURRENCY)

        async def one(room: str) -> tuple[int, int, set[str], bool]:
            async with slots:
                try:
                    return await self._check_room(room, cursors.get(CURSOR_PREFIX + room),
                                                  since_ms)
                except MatrixRequestError as e:
                    if e.status not in (400, 403, 404):
                        raise
                    # e.g. a room deleted meanwhile: it has nothing left to deliver, and
                    # one such room must not stop the check of the others
                    log.info("completeness check: room %s not readable (%s)", room, e)
                    return 0, 0, set(), True

        unsettled: set[str] = set()
        results = await asyncio.gather(*(one(r) for r in rooms))
        for room, (n, room_gap, room_waiting, settled) in zip(rooms, results, strict=True):
            recovered += n
            gap = max(gap, room_gap)
            waiting |= room_waiting
            if not settled:
                unsettled.add(room)
        self._unsettled = unsettled
        self._position = position
        self.quiet_checks += 1 if quiet else 0
        # forget first-seen times of events no longer waiting
        self._first_seen = {e: t for e, t in self._first_seen.items() if e in waiting}
        self.oldest_gap_ms = gap
        self.metrics.completeness_gap.set(gap / 1000)
        if self.checks == 0 or recovered:
            log.info("completeness check: %d rooms, %d event(s) recovered, oldest gap %.1fs",
                     len(rooms), recovered, gap / 1000)
        self.rooms = len(rooms)
        self.checks += 1
        self.last_ok_started_ms = started
        self.last_error = None
        return recovered

    async def _rooms(self) -> list[str]:
        out: list[str] = []
        start: int | None = 0
        while start is not None:
            page, start = await self.client.admin_list_rooms(admin=self.admin, start=start,
                                                             limit=ROOMS_PAGE)
            out.extend(r["room_id"] for r in page if isinstance(r.get("room_id"), str))
        return list(dict.fromkeys(out))

    async def _start_cursor(self, room: str, since_ms: int) -> str | None:
        """Where a room never checked before is read from: back to ``since_ms`` (the page
        that holds the first older event), or the room's start (None)."""
        token: str | None = None
        while True:
            chunk, end = await self.client.admin_room_messages(
                room, admin=self.admin, from_token=token, dir="b", limit=PAGE_LIMIT)
            if not chunk or end is None:
                return None  # the whole room is younger than since: read it from its start
            token = end
            oldest = chunk[-1].get("origin_server_ts")
            if isinstance(oldest, int) and oldest < since_ms:
                return token

    async def _check_room(self, room: str, cursor: str | None,
                          since_ms: int) -> tuple[int, int, set[str], bool]:
        """Read one room forward from its cursor. Returns (recovered, oldest waiting age,
        waiting event ids, settled: the cursor reached the room's end)."""
        if cursor is None:
            cursor = await self._start_cursor(room, since_ms)
        token, new_cursor, advancing = cursor, cursor, True
        recovered, gap = 0, 0
        waiting: set[str] = set()
        while True:
            chunk, end = await self.client.admin_room_messages(
                room, admin=self.admin, from_token=token, dir="f", limit=PAGE_LIMIT)
            if not chunk:
                break
            now = self.clock_ms()
            events = [e for e in chunk if isinstance(e, dict)
                      and isinstance(e.get("event_id"), str)]
            seen = [SeenEvent(e["event_id"], _ts(e)) for e in events
                    if (_ts(e) or now) >= since_ms]
            known = await self.inbox.inbox_known([s.event_id for s in seen])
            decision = decide_page(seen, known, now, self.timing.grace_ms, self._first_seen)
            for eid in decision.waiting:
                self._first_seen.setdefault(eid, now)
            waiting.update(decision.waiting)
            if decision.oldest_waiting_ms is not None:
                gap = max(gap, decision.oldest_waiting_ms)
            if decision.recover:
                wanted = set(decision.recover)
                recovered += await self._recover(
                    room, [e for e in events if e["event_id"] in wanted], now)
            if advancing and decision.advance and end is not None:
                new_cursor = end
            else:
                advancing = False
            if end is None:
                break
            token = end
        if new_cursor is not None and new_cursor != cursor:
            await self.kv.component_put(COMPONENT, CURSOR_PREFIX + room, new_cursor,
                                           self.clock_ms())
        return recovered, gap, waiting, advancing

    async def _recover(self, room: str, events: list[dict[str, Any]], now: int) -> int:
        margin = self.timing.grace_ms + self.timing.interval_ms
        rows: list[NewEvent] = []
        causes: dict[str, int] = {}
        late: list[int] = []
        for ev in events:
            ts = _ts(ev)
            cause = classify_cause(ts, process_started_ms=self.started_ms,
                                   homeserver_outages=list(self._outages), margin_ms=margin)
            late_ms = max(0, now - ts) if ts is not None else None
            marked = dict(ev)
            marked.setdefault("room_id", room)
            unsigned = dict(marked.get("unsigned") or {})
            unsigned[RECOVERED_KEY] = {"cause": cause, "late_ms": late_ms, "at": now}
            marked["unsigned"] = unsigned
            try:
                rows.append(parse_event(marked, "pdu"))
            except ValueError as e:  # the push would have quarantined it: same here
                log.warning("recovered event %s of %s unusable: %s", ev.get("event_id"),
                            room, e)
                continue
            causes[cause] = causes.get(cause, 0) + 1
            if late_ms is not None:
                late.append(late_ms)
        if not rows:
            return 0
        ids = [r.event_id or "" for r in rows]
        digest = hashlib.sha256("\0".join(ids).encode()).hexdigest()[:16]
        main_cause = max(causes, key=lambda c: causes[c])
        audit = AuditRecord(
            ts=now, source="completeness", kind="events_recovered", outcome="recovered",
            room_id=room, rule_id=RULE_RECOVER,
            reason=(f"{len(rows)} event(s) the homeserver has but never pushed to Enclave "
                    f"({', '.join(f'{c}: {n}' for c, n in sorted(causes.items()))}); "
                    f"up to {max(late, default=0) / 1000:.1f}s late"),
            detail=orjson.dumps({"event_ids": ids, "causes": causes,
                                 "max_late_ms": max(late, default=None)}).decode(),
        )
        n = await self.inbox.save_recovered(f"recovered:{main_cause}:{digest}", rows, audit,
                                            now)
        if n:
            # counted by what went in (a push may have won the race for some)
            for cause, k in causes.items():
                self.metrics.events_recovered.labels(cause=cause).inc(
                    k if n == len(rows) else min(k, n))
            self.recovered_total += n
            log.warning("recovered %d event(s) of %s the homeserver never pushed (%s)", n,
                        room, audit.reason)
            self.on_recovered()
        return n


def _ts(ev: dict[str, Any]) -> int | None:
    ts = ev.get("origin_server_ts")
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else None

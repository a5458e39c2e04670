"""Nothing silently lost: every event the homeserver has is processed exactly once, within
the completeness bound, also when Synapse drops or strands it (issue #16).

Each scenario runs a real Synapse and a real ``enclave run`` (ledger handler, see
ledger_handler.py) on a SQLite and on a PostgreSQL store, with a short bound
(``inbox.completeness.bound_seconds: BOUND``). The truth is what the homeserver HAS (its
rooms read back through the admin API), not what the clients believe they sent: a send cut
off by a Synapse crash may or may not have been persisted. For each event the homeserver
has, Enclave's handlers ran exactly once (one inbox row, done, with one action, applied:
its ledger message is on the homeserver), within the bound (``done_at``) of its creation
(``origin_server_ts``) or, for events created while Enclave was down, of Enclave's start.
Each ledger message is on the homeserver once, too: the executor reads the room back
before resending an action whose answer a Synapse restart cut off (before that read-back,
0-3 of ~125 per restart were stored twice: Synapse keeps an appservice's transaction ids
in memory only; test_exactly_once.py reproduces it deterministically).

On the code before this work (``inbox.completeness.enabled: false`` is that code path:
the appservice push alone; ``ENCLAVE_E2E_COMPLETENESS_OFF=1`` runs the scenarios that way):
the Synapse SIGTERM/SIGKILL scenarios lose the events Synapse held in memory and the quiet
stranded event is never delivered — 6 of 6 failed, measured. The Enclave-SIGKILL-during-
catch-up scenario fails on PostgreSQL because the restarted process waited for its dead
predecessor's leader lease (default name ``host:pid``: events processed 25 s late, measured
before that fix), and on SQLite only when Synapse's recovery race strands an event (it is a
race: 1 of 2 runs with the check off lost one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .harness import (
    EnclaveProcess,
    Stack,
    fresh_pg_database,
    ledger_enclave,
    nio,
    wait_until,
)

pytestmark = pytest.mark.integration

BOUND = 15.0  # seconds: grace 2.5 s, a check every 5 s (2 shared cores: processing the
# recovered backlog with a ledger send per event takes several seconds under load)
OFF = os.environ.get("ENCLAVE_E2E_COMPLETENESS_OFF") == "1"
SENDERS = 4
CYCLES = 3


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A Synapse of this module's own: the tests stop and kill it."""
    s = Stack.create(tmp_path_factory.mktemp("completeness"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield "sqlite:///enclave.db"
        return
    with fresh_pg_database("enclave_complete") as dsn:
        yield dsn


async def start_enclave(stack: Stack, make: Callable[..., EnclaveProcess],
                        store_url: str) -> tuple[EnclaveProcess, str]:
    return await ledger_enclave(
        stack, make, database=store_url,
        inbox={"completeness": {"enabled": not OFF, "bound_seconds": BOUND}})


def inbox_rows(enclave: EnclaveProcess, store_url: str, event_ids: list[str],
               ) -> dict[str, tuple[str, int | None, int | None, str, int, int]]:
    """event_id -> (status, origin_server_ts, done_at, txn_id, actions, applied actions)
    from Enclave's store: the handlers ran once for an event if it has exactly one inbox
    row, done, with exactly one (ledger) action."""
    sql = ("SELECT i.event_id, i.status, i.origin_server_ts, i.done_at, i.txn_id, "
           "COUNT(a.id), SUM(CASE WHEN a.status = 'applied' THEN 1 ELSE 0 END) "
           "FROM inbox i LEFT JOIN actions a ON a.event_seq = i.seq "
           "WHERE i.event_id IN ({}) GROUP BY i.seq, i.event_id, i.status, "
           "i.origin_server_ts, i.done_at, i.txn_id")
    if store_url.startswith("sqlite"):
        db = sqlite3.connect(enclave.config.parent / "enclave.db", timeout=10)
        try:
            rows = db.execute(sql.format(", ".join("?" * len(event_ids))),
                              event_ids).fetchall()
        finally:
            db.close()
    else:
        import psycopg2

        conn = psycopg2.connect(store_url)
        try:
            with conn.cursor() as cur:
                cur.execute(sql.format(", ".join(["%s"] * len(event_ids))), event_ids)
                rows = cur.fetchall()
        finally:
            conn.close()
    out: dict[str, tuple[str, int | None, int | None, str, int, int]] = {}
    for r in rows:
        assert r[0] not in out, f"two inbox rows for {r[0]}"
        out[r[0]] = (r[1], r[2], r[3], r[4], int(r[5]), int(r[6] or 0))
    return out


async def homeserver_has(stack: Stack, rooms: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every staff message the homeserver has in ``rooms``, per room in room order."""
    out = {}
    for room in rooms:
        out[room] = [e for e in await stack.room_messages(room)
                     if e.get("sender") != stack.bot_user_id]
    return out


async def assert_complete(stack: Stack, enclave: EnclaveProcess, store_url: str,
                          ledger_room: str, rooms: list[str], *,
                          not_before_ms: dict[str, int] | None = None,
                          within: float = BOUND + 30) -> dict[str, Any]:
    """Every event the homeserver has in ``rooms``: in the ledger exactly once, and
    processed within BOUND of max(its creation, ``not_before_ms``)."""
    has = await homeserver_has(stack, rooms)
    events = [e for evs in has.values() for e in evs]
    ids = [e["event_id"] for e in events]
    assert ids, "the homeserver has no events: the scenario sent nothing"

    async def all_in_ledger() -> bool:
        counts = Counter(eid for _, eid in await stack.ledger(ledger_room))
        return all(counts[i] >= 1 for i in ids)

    with contextlib.suppress(AssertionError):
        await wait_until(all_in_ledger, within=within, interval=1.0,
                         what="every event in the ledger")
    counts = Counter(eid for _, eid in await stack.ledger(ledger_room))
    missing = [i for i in ids if counts[i] == 0]
    assert not missing, (f"{len(missing)} of {len(ids)} events the homeserver has were never "
                         f"processed: {missing[:5]}\n{stack.stranded_report()}")
    # Exactly once on the homeserver too: a ledger entry twice would be the executor's
    # resend of ONE action whose answer a Synapse restart cut off (Synapse keeps an
    # appservice's transaction ids in memory only); the read-back before a resend finds
    # the first one (measured before it: 0-3 of ~125 per restart).
    doubled = {i: counts[i] for i in ids if counts[i] > 1}
    assert not doubled, (f"{len(doubled)} ledger entries on the homeserver more than once: "
                         f"{list(doubled.items())[:5]}")
    rows = inbox_rows(enclave, store_url, ids)
    late: list[tuple[str, float, str]] = []
    recovered = 0
    for e in events:
        status, ts, done_at, txn, n_actions, n_applied = rows[e["event_id"]]
        assert status == "done", (e["event_id"], status)
        assert (n_actions, n_applied) == (1, 1), (e["event_id"], n_actions, n_applied)
        start = max(ts or 0, (not_before_ms or {}).get(e["event_id"], 0))
        assert done_at is not None
        lateness = (done_at - start) / 1000
        if lateness > BOUND:
            late.append((e["event_id"], lateness, txn))
        recovered += txn.startswith("recovered:")
    assert not late, f"{len(late)} events processed later than the {BOUND}s bound: {late[:5]}"
    status, ready = await enclave.get_json("/ready")
    assert status == 200, ready
    comp = ready["completeness"]
    print(f"\n{len(ids)} events on the homeserver, all processed once within {BOUND}s; "
          f"{recovered} recovered by the completeness check; /ready completeness: {comp}")
    return {"events": len(ids), "recovered": recovered, "ready": comp}


class Senders:
    """Staff sending one message after another into their own rooms; a send the
    homeserver cut off is retried (it may or may not have been persisted: the truth is read
    from the homeserver afterwards)."""

    def __init__(self, clients: list[nio.AsyncClient], rooms: list[str], *,
                 pause: float = 0.0):
        self.clients, self.rooms = clients, rooms
        self.pause = pause  # between one sender's messages
        self.ok = 0
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    async def _send_loop(self, client: nio.AsyncClient, room: str) -> None:
        i = 0
        while not self.stopping:
            i += 1
            try:
                resp = await asyncio.wait_for(client.room_send(
                    room, "m.room.message", {"msgtype": "m.text", "body": f"m {i}"}), 5)
            except (TimeoutError, OSError, Exception):
                await asyncio.sleep(0.2)
                continue
            if isinstance(resp, nio.RoomSendResponse):
                self.ok += 1
                if self.pause:
                    await asyncio.sleep(self.pause)
            else:
                await asyncio.sleep(0.2)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send_loop(c, r))
                       for c, r in zip(self.clients, self.rooms, strict=True)]

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_sent(self, n: int) -> None:
        async def enough() -> bool:
            return self.ok >= n

        await wait_until(enough, within=60, interval=0.05, what=f"{n} messages sent")


async def staff_rooms(stack: Stack, staff: list[nio.AsyncClient],
                      n: int = SENDERS) -> tuple[list[nio.AsyncClient], list[str]]:
    clients = [await stack.new_staff(f"busy{i}") for i in range(n)]
    staff.extend(clients)
    rooms = []
    for c in clients:
        resp = await c.room_create(name="completeness")
        assert isinstance(resp, nio.RoomCreateResponse), resp
        rooms.append(resp.room_id)
    return clients, rooms


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_synapse_stopped_mid_stream_loses_nothing(
    crash_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
    staff: list[nio.AsyncClient], store_url: str, how: str,
) -> None:
    """Senders busy; Synapse is stopped (SIGTERM) or killed (SIGKILL) mid-stream and
    started again; senders keep going. The events Synapse held in memory for the
    appservice are never pushed: the completeness check recovers them.

    Synapse holds events in memory while a transaction to the appservice is in flight
    (one at a time). Enclave answers in milliseconds, so with a handful of senders that
    queue is usually empty at the stop (the issue saw 1–9 events lost in 3 of 5 runs at a
    steady load); to make the stop find events there every time, Enclave is paused
    (SIGSTOP) for the moment before it, as a busy Enclave would be, and resumed after."""
    stack = crash_stack
    enclave, ledger_room = await start_enclave(stack, enclave_factory, store_url)
    clients, rooms = await staff_rooms(stack, staff)
    senders = Senders(clients, rooms)
    senders.start()
    assert enclave.proc is not None
    try:
        await senders.wait_sent(60)
        os.kill(enclave.proc.pid, signal.SIGSTOP)
        try:
            await senders.wait_sent(senders.ok + 8)  # persisted, queued for the push
            if how == "sigterm":
                await asyncio.to_thread(stack.synapse.stop)
            else:
                await asyncio.to_thread(stack.synapse.kill)
        finally:
            os.kill(enclave.proc.pid, signal.SIGCONT)
        await asyncio.to_thread(stack.synapse.start)
        await senders.wait_sent(senders.ok + 60)
    finally:
        await senders.stop()
    result = await assert_complete(stack, enclave, store_url, ledger_room, rooms)
    assert result["recovered"] >= 1  # the stop did drop events: the check found them
    assert result["ready"]["error"] is None
    assert await enclave.stop() == 0, enclave.describe()


async def test_enclave_killed_during_synapse_catch_up_loses_nothing(
    crash_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
    staff: list[nio.AsyncClient], store_url: str,
) -> None:
    """Senders busy throughout; CYCLES times: Enclave is SIGKILLed, restarted while
    Synapse holds a backlog, SIGKILLed again while Synapse is catching up, started again,
    and Synapse finishes its catch-up with the senders still busy (its recoverer strands
    an event created as it finishes: docs/operators/known-issues.md; a race, so several cycles).
    Every event is processed once, within the bound of its creation or (created while
    Enclave was down) of Enclave's last start."""
    stack = crash_stack
    enclave, ledger_room = await start_enclave(stack, enclave_factory, store_url)
    clients, rooms = await staff_rooms(stack, staff)
    senders = Senders(clients, rooms, pause=0.2)  # about 20 messages/s
    senders.start()
    try:
        await senders.wait_sent(40)
        for _ in range(CYCLES):
            assert await enclave.kill() == -9
            await senders.wait_sent(senders.ok + 60)  # a backlog for Synapse to catch up
            await enclave.start()
            await asyncio.sleep(0.3)  # Synapse is pushing its backlog now
            assert await enclave.kill() == -9
            await senders.wait_sent(senders.ok + 20)
            await enclave.start()
            started_ms = int(time.time() * 1000)
            # the restarted process (a new pid, default name) leads at once, on both
            # engines: it does not wait out its dead predecessor's lease
            _status, ready = await enclave.get_json("/ready")
            assert ready["cluster"]["leader"] is True, ready["cluster"]
            await stack.wait_as_up()  # the catch-up finished, senders busy through it
            await senders.wait_sent(senders.ok + 20)
    finally:
        await senders.stop()
    has = await homeserver_has(stack, rooms)
    not_before = {e["event_id"]: started_ms for evs in has.values() for e in evs
                  if e["origin_server_ts"] < started_ms}
    await assert_complete(stack, enclave, store_url, ledger_room, rooms,
                          not_before_ms=not_before)
    assert await enclave.stop() == 0, enclave.describe()


async def test_stranded_event_on_a_quiet_server_is_processed(
    crash_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
    staff: list[nio.AsyncClient], store_url: str,
) -> None:
    """One event stranded in Synapse (stored for the appservice while Synapse marks it up:
    the state Synapse's recoverer race leaves, docs/operators/known-issues.md), and then nothing:
    no traffic that could trigger a redelivery. The completeness check finds it."""
    stack = crash_stack
    enclave, ledger_room = await start_enclave(stack, enclave_factory, store_url)
    (client,), (room,) = await staff_rooms(stack, staff, 1)
    assert await enclave.kill() == -9
    resp = await client.room_send(room, "m.room.message", {"msgtype": "m.text",
                                                           "body": "stranded"})
    assert isinstance(resp, nio.RoomSendResponse), resp

    async def stored() -> bool:  # Synapse failed to push it and keeps it for a recovery
        return resp.event_id in await asyncio.to_thread(stack.stored_for_appservice)

    await wait_until(stored, within=30, what="Synapse to store the event for the appservice")
    await asyncio.to_thread(stack.synapse.stop)
    # Strand it: stored for the appservice, the appservice marked up (no recoverer runs)
    await asyncio.to_thread(stack.set_as_state_up)
    await asyncio.to_thread(stack.synapse.start)
    await enclave.start()
    started_ms = int(time.time() * 1000)
    assert any(e == resp.event_id for _, e, _ in stack.stranded()), stack.stranded_report()
    result = await assert_complete(stack, enclave, store_url, ledger_room, [room],
                                   not_before_ms={resp.event_id: started_ms},
                                   within=BOUND + 20)
    assert result["recovered"] >= 1
    r = await enclave.cli("audit", "--format", "json")
    assert "events_recovered" in r.stdout, r.stdout[-2000:]
    assert await enclave.stop() == 0, enclave.describe()

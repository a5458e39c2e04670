"""The completeness check against a scripted homeserver (rooms with a timeline, Synapse-like
pagination tokens) and a real SQLite store: what it recovers, marks and audits, what it
leaves to the push, where its cursors go, and what a quiet check costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bridge.matrix.completeness import CURSOR_PREFIX, RECOVERED_KEY, CompletenessCheck
from bridge.metrics import Metrics
from bridge.policy.completeness import Timing
from bridge.store import AuditFilter, NewEvent, Stores

from ..conftest import new_store

ADMIN = "@enclave-admin:corp.test"
T0 = 1_800_000_000_000
TIMING = Timing(grace_ms=2_000, interval_ms=4_000)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class FakeHomeserver:
    """Rooms as lists of events; a token ``p<n>`` sits after the room's n-th event."""

    def __init__(self) -> None:
        self.rooms: dict[str, list[dict[str, Any]]] = {}
        self.calls: list[str] = []
        self.position = 0

    def add(self, room: str, ts: int) -> dict[str, Any]:
        evs = self.rooms.setdefault(room, [])
        ev = {"event_id": f"${room[1:]}-{len(evs)}", "room_id": room, "type": "m.room.message",
              "sender": "@a:corp.test", "origin_server_ts": ts, "content": {"body": "x"}}
        evs.append(ev)
        self.position += 1
        return ev

    async def room_stream_position(self, user_id: str) -> str | None:
        self.calls.append("sync")
        return f"s{self.position}"

    async def admin_list_rooms(self, *, admin: str, start: int = 0,
                               limit: int = 500) -> tuple[list[dict[str, Any]], int | None]:
        self.calls.append("rooms")
        return [{"room_id": r} for r in self.rooms], None

    async def admin_room_messages(self, room_id: str, *, admin: str,
                                  from_token: str | None = None, dir: str = "f",
                                  limit: int = 1000) -> tuple[list[dict[str, Any]], str | None]:
        self.calls.append(f"messages {room_id} {dir}")
        evs = self.rooms[room_id]
        if dir == "f":
            n = int(from_token[1:]) if from_token else 0
            chunk = evs[n:n + limit]
            return chunk, (f"p{n + len(chunk)}" if chunk else None)
        n = int(from_token[1:]) if from_token else len(evs)
        chunk = list(reversed(evs[max(0, n - limit):n]))
        return chunk, (f"p{max(0, n - limit)}" if chunk else None)


def check_for(store: Stores, hs: FakeHomeserver, clock: Clock,
              recovered: list[int]) -> CompletenessCheck:
    return CompletenessCheck(store.inbox, store.kv, hs, Metrics(), admin_user_id=ADMIN,  # type: ignore[arg-type]
                             bound_seconds=12, clock_ms=clock, timing=TIMING,
                             on_recovered=lambda: recovered.append(1))


def pushed(ev: dict[str, Any]) -> NewEvent:
    return NewEvent(ev["event_id"], ev["room_id"], "pdu", ev["type"], ev["sender"],
                    ev["origin_server_ts"], orjson.dumps(ev).decode())


async def test_recovers_what_the_push_missed_marked_audited_once(store: Stores) -> None:
    hs, clock, woken = FakeHomeserver(), Clock(), []
    check = check_for(store, hs, clock, woken)
    await store.kv.component_put("completeness", "since", str(T0 - 60_000), T0)
    before = hs.add("!old", T0 - 120_000)  # older than the check: never fed to handlers
    a = hs.add("!r", T0 - 30_000)
    b = hs.add("!r", T0 - 20_000)  # the push dropped this one
    c = hs.add("!r", T0 - 500)  # young: the push may still bring it
    await store.inbox.save_transaction("t1", [pushed(a)], [], T0 - 29_000)
    assert await check.check_once() == 1
    assert woken == [1]
    inbox = {e.event_id: e for e in await store.inbox.fetch_due_events(clock.now, 100)}
    assert set(inbox) == {a["event_id"], b["event_id"]}
    assert inbox[b["event_id"]].txn_id.startswith("recovered:")
    mark = orjson.loads(inbox[b["event_id"]].body)["unsigned"][RECOVERED_KEY]
    assert mark == {"cause": "enclave_downtime", "late_ms": 20_000, "at": T0}
    audit = await store.audit.query_audit(AuditFilter(room_id="!r"))
    assert [(r["kind"], r["rule_id"]) for r in audit] == [
        ("events_recovered", "completeness.recover")]
    assert b["event_id"] in audit[0]["detail"]
    assert before["event_id"] not in inbox
    assert check.status()["oldest_gap_seconds"] == 0.5
    # the young one's page was not settled: the cursor stays before it (here: at the
    # room's start, so none is stored)
    assert (await store.kv.component_list("completeness", CURSOR_PREFIX)).get(
        CURSOR_PREFIX + "!r") is None

    # the push brings c; the next check recovers nothing and settles the room
    await store.inbox.save_transaction("t2", [pushed(c)], [], T0)
    clock.now += TIMING.interval_ms
    assert await check.check_once() == 0
    assert (await store.kv.component_list("completeness", CURSOR_PREFIX))[
        CURSOR_PREFIX + "!r"] == "p3"
    assert len(await store.audit.query_audit(AuditFilter(room_id="!r"))) == 1


async def test_quiet_server_costs_one_request_and_restart_resumes(tmp_path: Path) -> None:
    store = await new_store(tmp_path)
    hs, clock, woken = FakeHomeserver(), Clock(), []
    await store.kv.component_put("completeness", "since", str(T0 - 60_000), T0)
    for i in range(3):
        hs.add(f"!r{i}", T0 - 30_000)
    check = check_for(store, hs, clock, woken)
    assert await check.check_once() == 3
    hs.calls.clear()
    clock.now += TIMING.interval_ms
    assert await check.check_once() == 0
    assert hs.calls == ["sync"]  # nothing moved anywhere: no room is read
    assert check.status()["quiet_checks"] == 1
    await store.database.close()

    # Enclave restarts (new process, same store): an event Synapse dropped meanwhile
    store = await new_store(tmp_path)
    dropped = hs.add("!r1", clock.now - 5_000)
    clock.now += TIMING.interval_ms
    check = check_for(store, hs, clock, woken)
    hs.calls.clear()
    assert await check.check_once() == 1
    # each room read from its stored cursor (no read back to `since`)
    assert not any(c.endswith(" b") for c in hs.calls), hs.calls
    assert dropped["event_id"] in {e.event_id for e in
                                   await store.inbox.fetch_due_events(clock.now, 100)}
    await store.database.close()


async def test_homeserver_outage_names_the_cause(store: Stores) -> None:
    hs, clock, woken = FakeHomeserver(), Clock(), []
    await store.kv.component_put("completeness", "since", str(T0 - 60_000), T0)
    check = check_for(store, hs, clock, woken)
    clock.now += 30_000
    check.homeserver_unreachable()  # e.g. the executor's send found it gone
    ev = hs.add("!r", clock.now - 1_000)
    clock.now += 10_000
    assert await check.check_once() == 1
    body = orjson.loads((await store.inbox.fetch_due_events(clock.now, 10))[0].body)
    assert ev["event_id"] == body["event_id"]
    assert body["unsigned"][RECOVERED_KEY]["cause"] == "homeserver_restart"

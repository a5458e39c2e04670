"""InboxProcessor over a real SQLite store, with stub handlers and a stub executor."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.config.models import InboxConfig
from bridge.matrix import inbox as inbox_module
from bridge.matrix.inbox import FunctionHandler, InboxProcessor, backoff_ms
from bridge.metrics import Metrics
from bridge.policy.actions import Action, SendEvent, action_from_dict
from bridge.store import AuditFilter, InboxEvent, NewEvent, StoredAction, Stores
from bridge.store.domains import InboxStore, OutboxStore

from ..conftest import new_store

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class RecordingExecutor:
    """Applies stored actions by recording them and marking them applied in the store."""

    def __init__(self, store: Stores, *, fail_with: BaseException | None = None) -> None:
        self.store = store
        self.fail_with = fail_with
        self.applied: list[tuple[int, dict[str, Any]]] = []
        self.calls = 0
        self.resumed: list[int] = []  # run as possibly begun by an earlier process

    async def run_stored(self, stored: StoredAction, *, max_attempts: int,
                         resumed: bool = False) -> bool:
        self.calls += 1
        if resumed:
            self.resumed.append(stored.id)
        if self.fail_with is not None:
            raise self.fail_with  # a crash/kill between commit and apply
        self.applied.append((stored.id, orjson.loads(stored.payload)))
        await self.store.outbox.finish_action(stored.id, "applied", "ok", stored.attempts + 1,
                                              None, T0)
        return True


def ev(n: int, room: str) -> NewEvent:
    body = {"type": "m.room.message", "event_id": f"$e{n}", "room_id": room,
            "sender": "@a:x", "content": {"n": n}}
    return NewEvent(f"$e{n}", room, "pdu", "m.room.message", "@a:x", n, orjson.dumps(body).decode())


def cfg(**over: Any) -> InboxConfig:
    base: dict[str, Any] = {"room_concurrency": 4, "batch_size": 100, "max_attempts": 3,
                            "backoff_initial_seconds": 1.0, "backoff_max_seconds": 300.0}
    base.update(over)
    return InboxConfig(**base)


class Running:
    """A processor plus helpers to let it work until it has nothing left to do."""

    def __init__(self, store: Stores, handler: Callable[..., Any], *, clock: Clock,
                 executor: Any = None, **cfg_over: Any) -> None:
        self.store = store
        self.executor = executor or RecordingExecutor(store)
        self.proc = InboxProcessor(store.journal, store.inbox, store.outbox, self.executor,
                                   [FunctionHandler("test", handler)],
                                   cfg(**cfg_over), Metrics(), clock)

    async def __aenter__(self) -> Running:
        await self.proc.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.proc.stop()

    async def settle(self, rounds: int = 3) -> None:
        """Wake the dispatcher and wait until a whole pass finds nothing to do, a few times."""
        for _ in range(rounds):
            self.proc.idle.clear()
            self.proc.notify()
            await asyncio.wait_for(self.proc.idle.wait(), 10)


async def test_backoff_ms() -> None:
    c = cfg(backoff_initial_seconds=0.5, backoff_max_seconds=3.0)
    assert [backoff_ms(a, c) for a in range(1, 7)] == [500, 1000, 2000, 3000, 3000, 3000]


async def test_order_within_room_concurrency_across_rooms(store: Stores) -> None:
    rooms = [f"!room{i}" for i in range(6)]
    rng = random.Random(42)
    n = 0
    expected: dict[str, list[int]] = defaultdict(list)
    for t in range(12):  # interleave rooms across many transactions
        batch = []
        for room in rng.sample(rooms, 4):
            n += 1
            batch.append(ev(n, room))
            expected[room].append(n)
        await store.inbox.save_transaction(f"t{t}", batch, [], T0)

    seen: dict[str, list[int]] = defaultdict(list)
    in_room: dict[str, int] = defaultdict(int)
    active = 0
    max_active = 0

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        nonlocal active, max_active
        room = event["room_id"]
        in_room[room] += 1
        active += 1
        max_active = max(max_active, active)
        assert in_room[room] == 1, "two workers in one room at once"
        await asyncio.sleep(rng.random() * 0.004)
        seen[room].append(event["content"]["n"])
        in_room[room] -= 1
        active -= 1
        return []

    async with Running(store, handler, clock=Clock(), room_concurrency=4) as r:
        await r.settle()
    assert dict(seen) == dict(expected)
    assert max_active > 1, "rooms were not processed concurrently"
    assert max_active <= 4, "room_concurrency not respected"
    assert (await store.inbox.inbox_stats())["events"] == {"pending": 0, "done": n, "parked": 0}


async def test_failing_handler_backs_off_then_parks_and_room_goes_on(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!bad"), ev(2, "!bad"), ev(3, "!ok"),
                                              ev(4, "!bad")], [], T0)
    clock = Clock()
    calls: list[tuple[int, int]] = []  # (event n, clock at call)

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        calls.append((event["content"]["n"], clock.now))
        if event["content"]["n"] == 1:
            raise RuntimeError("boom")
        return []

    async with Running(store, handler, clock=clock, max_attempts=3) as r:
        await r.settle()
        # attempt 1 failed; the other room went on, the failing room waits
        assert calls == [(1, T0), (3, T0)] or calls == [(3, T0), (1, T0)]
        clock.now = T0 + 999  # backoff after attempt 1 is 1 s: not yet
        await r.settle()
        assert [c for c in calls if c[0] != 3] == [(1, T0)]
        clock.now = T0 + 1000
        await r.settle()
        assert [c for c in calls if c[0] != 3] == [(1, T0), (1, T0 + 1000)]
        clock.now = T0 + 1000 + 1999  # backoff after attempt 2 is 2 s
        await r.settle()
        assert len([c for c in calls if c[0] == 1]) == 2
        assert 2 not in [c[0] for c in calls] and 4 not in [c[0] for c in calls]
        clock.now = T0 + 3000
        await r.settle()
    # attempt 3 == max_attempts: parked; then (and only then) the rest of the room
    assert [c for c in calls if c[0] != 3] == [
        (1, T0), (1, T0 + 1000), (1, T0 + 3000), (2, T0 + 3000), (4, T0 + 3000)]
    (parked,) = await store.inbox.list_events("parked")
    assert (parked["event_id"], parked["attempts"]) == ("$e1", 3)
    assert parked["last_error"] == "RuntimeError: boom"
    stats = await store.inbox.inbox_stats()
    assert stats["events"] == {"pending": 0, "done": 3, "parked": 1}
    (audit,) = await store.audit.query_audit(AuditFilter())
    assert (audit["source"], audit["kind"], audit["outcome"]) == ("inbox", "event_parked",
                                                                  "parked")
    assert audit["room_id"] == "!bad"
    assert audit["user_id"] == "@a:x"
    assert audit["ts"] == T0 + 3000
    assert "$e1" in audit["detail"] and "boom" in audit["detail"]


async def test_requeued_parked_event_is_processed(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!r"), ev(2, "!r")], [], T0)
    clock = Clock()
    broken = True
    calls: list[int] = []

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        calls.append(event["content"]["n"])
        if broken and event["content"]["n"] == 1:
            raise ValueError("bad data")
        return []

    async with Running(store, handler, clock=clock, max_attempts=1) as r:
        await r.settle()
        assert calls == [1, 2]
        assert [e["event_id"] for e in await store.inbox.list_events("parked")] == ["$e1"]
        broken = False
        assert await store.inbox.requeue_parked() == 1
        await r.settle()
    assert calls == [1, 2, 1]
    assert await store.inbox.list_events("parked") == []
    assert (await store.inbox.inbox_stats())["events"] == {"pending": 0, "done": 2, "parked": 0}


async def test_unfinished_work_resumes_after_restart(tmp_path: Path) -> None:
    store = await new_store(tmp_path)
    await store.inbox.save_transaction("t1", [ev(i, "!a" if i % 2 else "!b") for i in range(1, 11)],
                                       [], T0)
    stuck = asyncio.Event()
    first: list[int] = []

    async def slow(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        n = event["content"]["n"]
        if n == 7:
            stuck.set()
            await asyncio.Event().wait()  # hangs until the "crash"
        first.append(n)
        return [SendEvent(rule_id="test.r", reason="r", room=event["room_id"],
                          event_type="m.notice", content={"n": n})]

    r1 = Running(store, slow, clock=Clock())
    await r1.proc.start()
    r1.proc.notify()
    await asyncio.wait_for(stuck.wait(), 10)
    await r1.proc.stop(grace_seconds=0)  # the crash: workers cancelled mid-room
    await store.database.close()

    store = await new_store(tmp_path)
    second: list[int] = []

    async def fast(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        second.append(event["content"]["n"])
        return [SendEvent(rule_id="test.r", reason="r", room=event["room_id"],
                          event_type="m.notice", content={"n": event["content"]["n"]})]

    try:
        async with Running(store, fast, clock=Clock()) as r2:
            await r2.settle()
        assert 7 in second and 7 not in first
        # an event whose actions were committed is never handled again
        assert not set(first) & set(second)
        assert sorted(first + second) == list(range(1, 11))
        assert (await store.inbox.inbox_stats())["events"] == {
            "pending": 0, "done": 10, "parked": 0}
        # every action applied exactly once across both runs, in room order
        applied = [p["content"]["n"] for _, p in r1.executor.applied + r2.executor.applied]
        assert sorted(applied) == list(range(1, 11))
        for room_parity in (0, 1):
            ns = [n for n in applied if n % 2 == room_parity]
            assert ns == sorted(ns)
        assert await store.outbox.pending_actions(None, 100) == []
    finally:
        await store.database.close()


@pytest.mark.parametrize("crash", [RuntimeError("executor crashed"), asyncio.CancelledError()],
                         ids=["exception", "cancelled"])
async def test_actions_committed_with_done_mark_survive_a_crash(tmp_path: Path,
                                                                crash: BaseException) -> None:
    store = await new_store(tmp_path)
    await store.inbox.save_transaction("t1", [ev(1, "!r")], [], T0)
    handled: list[int] = []

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        handled.append(event["content"]["n"])
        return [SendEvent(rule_id="sep.dm", reason="not staff", room="!r",
                          event_type="m.room.message", content={"body": "no"}),
                SendEvent(rule_id="sep.dm", reason="second", room="!r",
                          event_type="m.room.message", content={"body": "2"})]

    crashing = RecordingExecutor(store, fail_with=crash)
    r1 = Running(store, handler, clock=Clock(), executor=crashing)
    await r1.proc.start()
    r1.proc.notify()
    for _ in range(500):
        if crashing.calls:
            break
        await asyncio.sleep(0.01)
    await r1.proc.stop()
    assert handled == [1]
    assert crashing.applied == []
    # committed together: the event is done AND its actions wait in the outbox
    assert (await store.inbox.inbox_stats())["events"]["done"] == 1
    assert [a.position for a in await store.outbox.pending_actions("!r", 10)] == [0, 1]
    ids = [a.id for a in await store.outbox.pending_actions("!r", 10)]
    # written after that process started: it had not begun them before (no read-back)
    assert crashing.resumed == []
    await store.database.close()

    store = await new_store(tmp_path)
    try:
        async with Running(store, handler, clock=Clock()) as r2:
            await r2.settle()
        assert handled == [1], "the handler ran again after the restart"
        # the crash may have cut the lane's first action off after its send and before its
        # attempt was counted: it is run as resumed (read back first); the second one was
        # not begun (a lane runs one action at a time, in order) and is not
        assert r2.executor.resumed == [ids[0]]
        assert [p["reason"] for _, p in r2.executor.applied] == ["not staff", "second"]
        assert action_from_dict(r2.executor.applied[0][1]) == SendEvent(
            rule_id="sep.dm", reason="not staff", room="!r", event_type="m.room.message",
            content={"body": "no"})
        # a further restart applies nothing again
        async with Running(store, handler, clock=Clock()) as r3:
            await r3.settle()
        assert r3.executor.applied == []
    finally:
        await store.database.close()


async def test_homeserver_away_keeps_room_waiting(store: Stores) -> None:
    """An executor reporting 'unavailable' blocks its lane (room) and retries it with backoff."""
    await store.inbox.save_transaction("t1", [ev(1, "!r"), ev(2, "!r")], [], T0)
    clock = Clock()
    handled: list[int] = []

    class FlakyExecutor(RecordingExecutor):
        up = False

        async def run_stored(self, stored: StoredAction, *, max_attempts: int,
                             resumed: bool = False) -> bool:
            self.calls += 1
            if not self.up:
                await self.store.outbox.finish_action(stored.id, "pending", "down",
                                                      stored.attempts + 1, None, clock.now)
                return False
            return await super().run_stored(stored, max_attempts=max_attempts,
                                            resumed=resumed)

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        handled.append(event["content"]["n"])
        return [SendEvent(rule_id="r", reason="r", room="!r", event_type="m.notice")]

    flaky = FlakyExecutor(store)
    async with Running(store, handler, clock=clock, executor=flaky) as r:
        await r.settle()
        assert handled == [1]  # event 2 waits behind event 1's unapplied action
        calls = flaky.calls
        clock.now += backoff_ms(1, cfg()) - 1  # the first retry comes after 1 s
        await r.settle()
        assert flaky.calls == calls
        flaky.up = True
        clock.now += 1
        await r.settle()
    assert handled == [1, 2]
    assert len(flaky.applied) == 2


async def test_crashing_room_worker_backs_off(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!r"), ev(2, "!r")], [], T0)

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        return [SendEvent(rule_id="r", reason="r", room="!r", event_type="m.notice")]

    broken = RecordingExecutor(store, fail_with=RuntimeError("database went away"))
    async with Running(store, handler, clock=Clock(), executor=broken) as r:
        r.proc.notify()
        await asyncio.sleep(0.5)
    assert broken.calls <= 5


class CountingInbox:
    """Wraps the inbox store: counts the rows read."""

    def __init__(self, inbox: InboxStore) -> None:
        self._inbox = inbox
        self.reads: dict[int, int] = defaultdict(int)
        self.rows_read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inbox, name)

    async def fetch_due_events(self, now_ms: int, limit: int) -> list[InboxEvent]:
        rows = await self._inbox.fetch_due_events(now_ms, limit)
        self.rows_read += len(rows)
        for r in rows:
            self.reads[r.seq] += 1
        return rows


class CountingOutbox:
    """Wraps the outbox store: counts the reads per lane."""

    def __init__(self, outbox: OutboxStore) -> None:
        self._outbox = outbox
        self.lane_queries: list[str | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outbox, name)

    async def pending_actions(self, lane: str | None, limit: int) -> list[StoredAction]:
        self.lane_queries.append(lane)
        return await self._outbox.pending_actions(lane, limit)


async def test_events_read_about_once_and_outbox_read_only_for_lanes_with_actions(
        store: Stores) -> None:
    n = 0
    expected: dict[str, list[int]] = defaultdict(list)
    for t in range(30):
        batch = []
        for room in [f"!r{i}" for i in range(20)]:
            n += 1
            batch.append(ev(n, room))
            expected[room].append(n)
        await store.inbox.save_transaction(f"t{t}", batch, [], T0)
    seen: dict[str, list[int]] = defaultdict(list)

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        seen[event["room_id"]].append(event["content"]["n"])
        if event["room_id"] == "!r7" and event["content"]["n"] % 3 == 0:
            return [SendEvent(rule_id="r", reason="r", room="!r7", event_type="m.notice",
                              content={"n": event["content"]["n"]})]
        return []

    inbox, outbox = CountingInbox(store.inbox), CountingOutbox(store.outbox)
    counting = dataclasses.replace(store, inbox=inbox, outbox=outbox)
    async with Running(counting, handler, clock=Clock(), room_concurrency=4,  # type: ignore[arg-type]
                       batch_size=100) as r:
        await r.settle()
    assert dict(seen) == dict(expected)
    assert (await store.inbox.inbox_stats())["events"] == {"pending": 0, "done": n, "parked": 0}
    # every row read, most exactly once (the old dispatcher read each ~4 times)
    assert set(inbox.reads) == set(range(1, n + 1))
    assert inbox.rows_read <= 1.5 * n, inbox.rows_read
    # the outbox: once at start-up (all lanes), then only the lane that got actions
    assert outbox.lane_queries[0] is None
    assert set(outbox.lane_queries[1:]) == {"!r7"}
    assert len(outbox.lane_queries) - 1 == len(expected["!r7"]) // 3
    assert [p["content"]["n"] for _, p in r.executor.applied] == [
        x for x in expected["!r7"] if x % 3 == 0]


async def test_room_worker_yields_to_the_event_loop(store: Stores) -> None:
    """A handler that never really awaits must not hold the loop (the HTTP endpoint's)
    for a whole batch."""
    await store.inbox.save_transaction("t1", [ev(i, "!busy") for i in range(1, 1501)], [], T0)
    handled = 0

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        nonlocal handled
        handled += 1
        end = time.perf_counter() + 0.0001  # 100 us of CPU, no await
        while time.perf_counter() < end:
            pass
        return []

    gaps: list[float] = []
    stop = False

    async def probe() -> None:
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(probe())
    gc.disable()  # a full collection in a big test session pauses the loop by itself
    try:
        async with Running(store, handler, clock=Clock(), batch_size=2000) as r:
            await r.settle()
    finally:
        gc.enable()
    stop = True
    await task
    assert handled == 1500
    # 150 ms of handler work in one room; without yielding the loop stalls for all of it
    assert max(gaps) < 0.05, f"event loop blocked for {max(gaps) * 1000:.1f} ms"


async def test_room_waiting_for_a_retry_keeps_its_order(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!r"), ev(2, "!r"), ev(3, "!r"), ev(4, "!o")],
                                       [], T0)
    clock = Clock()
    calls: list[int] = []
    fail = {2}

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        n = event["content"]["n"]
        calls.append(n)
        if n in fail:
            fail.discard(n)
            raise RuntimeError("once")
        return []

    async with Running(store, handler, clock=clock, max_attempts=3) as r:
        await r.settle()
        assert sorted(calls) == [1, 2, 4]
        # more events for both rooms arrive while !r waits for event 2's retry
        await store.inbox.save_transaction("t2", [ev(5, "!r"), ev(6, "!o"), ev(7, "!r")], [], T0)
        await r.settle()
        assert sorted(calls) == [1, 2, 4, 6]
        clock.now = T0 + 1000
        await r.settle()
    assert [c for c in calls if c not in (4, 6)] == [1, 2, 2, 3, 5, 7]
    assert (await store.inbox.inbox_stats())["events"] == {"pending": 0, "done": 7, "parked": 0}


async def test_truncated_startup_outbox_read_checks_every_lane(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More actions left from before a restart than start-up reads: no lane is skipped."""
    store = await new_store(tmp_path)
    await store.inbox.save_transaction("t1", [ev(1, "!a"), ev(2, "!b")], [], T0)
    for seq, room in ((1, "!a"), (2, "!b")):
        await store.inbox.complete_events([seq], [(seq, 0, room, "send_event", orjson.dumps(
            SendEvent(rule_id="r", reason=room, room=room, event_type="m.notice").to_dict()
        ).decode(), "r", room)], T0)
    await store.inbox.save_transaction("t2", [ev(3, "!a"), ev(4, "!b")], [], T0)
    monkeypatch.setattr(inbox_module, "STARTUP_ACTIONS", 1)
    order: list[str] = []

    class Recording(RecordingExecutor):
        async def run_stored(self, stored: StoredAction, *, max_attempts: int,
                             resumed: bool = False) -> bool:
            order.append(f"action {stored.lane}")
            return await super().run_stored(stored, max_attempts=max_attempts,
                                            resumed=resumed)

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        order.append(f"event {event['content']['n']}")
        return []

    try:
        async with Running(store, handler, clock=Clock(), executor=Recording(store)) as r:
            await r.settle()
        assert order.index("action !a") < order.index("event 3")
        assert order.index("action !b") < order.index("event 4")
        assert await store.outbox.pending_actions(None, 10) == []
    finally:
        await store.database.close()


async def test_crashed_worker_reads_its_room_again(store: Stores) -> None:
    """The store failing mid-room: the room backs off, then is read again from the
    database (nothing lost, nothing done twice, order kept)."""
    await store.inbox.save_transaction("t1", [ev(i, "!r") for i in range(1, 6)], [], T0)
    clock = Clock()
    calls: list[int] = []
    real_complete = store.inbox.complete_events
    failures = 1

    async def flaky_complete(*args: Any) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("database went away")
        await real_complete(*args)

    store.inbox.complete_events = flaky_complete  # type: ignore[method-assign]

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        calls.append(event["content"]["n"])
        return []

    async with Running(store, handler, clock=clock) as r:
        await r.settle()
        assert calls == [1, 2, 3, 4, 5]
        assert (await store.inbox.inbox_stats())["events"]["pending"] == 5
        clock.now = T0 + backoff_ms(1, cfg())
        await r.settle()
    assert calls == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    assert (await store.inbox.inbox_stats())["events"] == {"pending": 0, "done": 5, "parked": 0}


async def test_stopped_processor_starts_again_from_the_database(store: Stores) -> None:
    """A replica that stops leading and later leads again: what it held in memory is
    dropped and everything still pending is read again; nothing is handled twice."""
    seen: list[int] = []
    gate = asyncio.Event()

    async def handler(event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        n = event["content"]["n"]
        if n == 3:
            await gate.wait()  # in hand when the processor stops
        seen.append(n)
        return [SendEvent(room=event["room_id"], event_type="m.room.message",
                          content={"n": n}, rule_id="t", reason="r")]

    await store.inbox.save_transaction("t1", [ev(i, "!r") for i in range(1, 6)], [], T0)
    r = Running(store, handler, clock=Clock())
    await r.proc.start()
    await asyncio.sleep(0.2)
    assert seen == [1, 2]
    await r.proc.stop(grace_seconds=0.1)  # event 3 is cancelled mid-handler
    assert not r.proc.running
    await store.inbox.save_transaction("t2", [ev(6, "!r")], [], T0)
    gate.set()
    await r.proc.start()
    assert r.proc.running
    await r.settle()
    await r.proc.stop()
    assert seen == [1, 2, 3, 4, 5, 6]
    applied = [payload["content"]["n"] for _, payload in r.executor.applied]
    assert applied == [1, 2, 3, 4, 5, 6]  # each action once, in order
    assert (await store.inbox.inbox_stats())["events"] == {"pending": 0, "done": 6, "parked": 0}

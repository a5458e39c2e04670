"""The audit log read as a feed (bridge/store/audit_feed.py) and the streamer on it, on
SQLite and PostgreSQL: in id order, nothing skipped when PostgreSQL commits a lower id after
a higher one, at least once across a failed send."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import pytest

from bridge.auditstream.feed import GapWatch
from bridge.auditstream.service import COMPONENT, AuditStreamer
from bridge.config.audit import AuditConfig
from bridge.metrics import Metrics
from bridge.store import AuditRecord, Stores
from bridge.store.audit import AUDIT_INSERT, audit_row
from bridge.store.base import AuditEntry

from .conftest import MakeStore


def rec(n: int, **kw: object) -> AuditRecord:
    fields: dict[str, object] = dict(ts=1000 + n, source="test", kind=f"k{n}",
                                     outcome="applied", reason=f"r{n}")
    fields.update(kw)
    return AuditRecord(**fields)  # type: ignore[arg-type]


async def test_feed_reads_after_the_cursor_in_id_order(store: Stores) -> None:
    for n in range(5):
        await store.audit.add_audit(rec(n, user_id=f"@u{n}:x"))
    feed = store.audit_feed
    assert await feed.audit_last_id() == 5
    page = await feed.audit_feed(0, 3)
    assert [e.id for e in page.entries] == [1, 2, 3]
    assert page.entries[0].record == rec(0, user_id="@u0:x")
    page = await feed.audit_feed(3, 100)
    assert [(e.id, e.record.kind) for e in page.entries] == [(4, "k3"), (5, "k4")]
    assert (await feed.audit_feed(5, 100)).entries == ()
    if store.database.dialect == "sqlite":
        assert page.horizon is None
    else:
        assert page.horizon is not None and page.horizon[0] <= page.horizon[1]


async def test_an_audit_write_wakes_the_watcher(store: Stores) -> None:
    woken: list[int] = []
    stop = store.audit_feed.watch_audit(lambda: woken.append(1))
    await store.audit.add_audit(rec(1))
    await store.kv.set_kv("x", "y")  # not an audit write
    stop()
    await store.audit.add_audit(rec(2))
    assert woken == [1]


async def _pg_insert(conn: asyncpg.Connection, r: AuditRecord) -> int:
    sql = AUDIT_INSERT.replace("?", "${}").format(*range(1, 11)) + " RETURNING id"
    return int(await conn.fetchval(sql, *audit_row(r)))


@pytest.fixture
async def pg_conns(db_url: str, store: Stores) -> Sequence[asyncpg.Connection]:
    if not db_url.startswith("postgres"):
        pytest.skip("concurrent writers: PostgreSQL only (SQLite has one writer)")
    conns = [await asyncpg.connect(db_url) for _ in range(2)]
    yield conns
    for c in conns:
        await c.close()


async def test_postgres_lower_id_committed_after_a_higher_one_is_not_skipped(
        store: Stores, pg_conns: Sequence[asyncpg.Connection]) -> None:
    a, b = pg_conns
    await store.audit.add_audit(rec(0))  # id 1, committed
    ta, tb = a.transaction(), b.transaction()
    await ta.start()
    await tb.start()
    low = await _pg_insert(a, rec(1))  # id 2, still open
    high = await _pg_insert(b, rec(2))  # id 3
    assert (low, high) == (2, 3)
    await tb.commit()  # 3 commits first
    watch, cursor = GapWatch(settle_seconds=0.0), 0
    page = await store.audit_feed.audit_feed(cursor, 100)
    assert [e.id for e in page.entries] == [1, 3]  # a naive id > cursor would pass 2
    sent = watch.ready(cursor, page, 0.0)
    assert [e.id for e in sent] == [1]
    cursor = sent[-1].id
    # however long it stays open, 3 is not sent before 2
    for t in (1.0, 5.0, 60.0):
        assert watch.ready(cursor, await store.audit_feed.audit_feed(cursor, 100), t) == []
    await ta.commit()
    sent = watch.ready(cursor, await store.audit_feed.audit_feed(cursor, 100), 61.0)
    assert [(e.id, e.record.kind) for e in sent] == [(2, "k1"), (3, "k2")]


async def test_postgres_rolled_back_id_is_passed_once_final(
        store: Stores, pg_conns: Sequence[asyncpg.Connection]) -> None:
    a, b = pg_conns
    ta = a.transaction()
    await ta.start()
    await _pg_insert(a, rec(1))  # id 1, will roll back
    await _pg_insert(b, rec(2))  # id 2, autocommit
    watch = GapWatch(settle_seconds=0.2)
    assert watch.ready(0, await store.audit_feed.audit_feed(0, 100), 0.0) == []
    await ta.rollback()
    # the transaction ended, but the hole has not settled yet
    assert watch.ready(0, await store.audit_feed.audit_feed(0, 100), 0.1) == []
    # settled; final once every writing transaction of the server that was open at the
    # first read has ended (others' tests may be writing on this server: wait for them)
    sent: list[AuditEntry] = []
    for _ in range(600):
        sent = watch.ready(0, await store.audit_feed.audit_feed(0, 100), 0.5)
        if sent:
            break
        await asyncio.sleep(0.05)
    assert [e.id for e in sent] == [2]


class FlakySink:
    """A sink that fails the Nth send (after nothing went out) and records the rest."""

    def __init__(self, fail_on: set[int]):
        self.name = "flaky"
        self.fail_on = fail_on
        self.calls = 0
        self.got: list[int] = []

    async def send(self, entries: Sequence[AuditEntry]) -> None:
        self.calls += 1
        if self.calls in self.fail_on:
            raise ConnectionResetError("peer reset")
        self.got.extend(e.id for e in entries)

    async def close(self) -> None:
        return None


def _cfg(tmp_path: Path, **kw: object) -> AuditConfig:
    sink: dict[str, object] = {"name": "file", "type": "jsonl", "path": str(tmp_path / "a.jsonl"),
                               "batch_size": 7}
    sink.update(kw)
    return AuditConfig.model_validate({"stream": [sink], "poll_seconds": 0.05})


async def _until(cond: object, wait_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while not cond():  # type: ignore[operator]
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


async def test_streamer_jsonl_every_record_once_in_order_and_cursor_kept(
        make_store: MakeStore, tmp_path: Path) -> None:
    store = await make_store()
    for n in range(20):
        await store.audit.add_audit(rec(n, room_id="!é:x" if n == 3 else None))
    cfg = _cfg(tmp_path)
    streamer = AuditStreamer(cfg, store.audit_feed, store.kv, Metrics(), lambda: 5000, tmp_path)
    task = asyncio.create_task(streamer.run())
    out = tmp_path / "a.jsonl"

    def lines() -> list[dict[str, object]]:
        return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []

    await _until(lambda: len(lines()) == 20)
    # written by this process: woken at once, well before a poll would matter
    for n in range(20, 25):
        await store.audit.add_audit(rec(n))
    await _until(lambda: len(lines()) == 25)
    # the cursor is committed after the send: wait for it before stopping
    for _ in range(1000):
        if await store.kv.component_get(COMPONENT, "file") == "25":
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    got = lines()
    assert [x["id"] for x in got] == list(range(1, 26))
    assert got[3]["room_id"] == "!é:x" and got[3]["kind"] == "k3"
    assert await store.kv.component_get(COMPONENT, "file") == "25"
    # a torn last line (a killed writer) is cut before the next batch
    with out.open("a") as f:
        f.write('{"id": 26, "tru')
    await store.audit.add_audit(rec(25))
    again = AuditStreamer(cfg, store.audit_feed, store.kv, Metrics(), lambda: 5000, tmp_path)
    task = asyncio.create_task(again.run())
    await _until(lambda: out.read_text().endswith("\n") and len(lines()) == 26)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [x["id"] for x in lines()] == list(range(1, 27))


async def test_streamer_resends_a_failed_batch_and_starts_at_end(
        make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.auditstream import service

    monkeypatch.setattr(service, "RECONNECT", service.RECONNECT.__class__(0.01, 0.05))
    store = await make_store()
    for n in range(10):
        await store.audit.add_audit(rec(n))
    sink = FlakySink(fail_on={2, 3})
    streamer = AuditStreamer(_cfg(tmp_path, batch_size=4), store.audit_feed, store.kv,
                             Metrics(), lambda: 5000, tmp_path, sinks=[sink])
    task = asyncio.create_task(streamer.run())
    await _until(lambda: sink.got[-1:] == [10])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sink.got == list(range(1, 11))  # the failed batch 5-8 went later, in order
    # a new sink that starts at the end sends only what comes after it first started
    late = FlakySink(fail_on=set())
    cfg = AuditConfig.model_validate({"stream": [
        {"name": "late", "type": "jsonl", "path": "x", "start": "end"}]})
    streamer = AuditStreamer(cfg, store.audit_feed, store.kv, Metrics(), lambda: 5000,
                             tmp_path, sinks=[late])
    task = asyncio.create_task(streamer.run())
    await _until(lambda: streamer.streamers[0].cursor == 10)
    await store.audit.add_audit(rec(10))
    await _until(lambda: late.got == [11])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

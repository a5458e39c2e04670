"""The Stores contract, on both engines (see conftest: sqlite and postgres params)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import orjson
import pytest

from bridge.model.people import StaffRecord
from bridge.store import (
    AuditFilter,
    AuditRecord,
    DatabaseError,
    DirectoryRecord,
    NewEvent,
    QuarantinedEvent,
    SchemaError,
    ScimResource,
    Stores,
)
from bridge.store.shared import load_migrations

from .conftest import MakeStore

NOW = 1_700_000_000_000


def ev(n: int, room: str = "!r1", *, event_id: str | None = "auto", kind: str = "pdu",
       body: dict[str, Any] | None = None) -> NewEvent:
    eid = f"$e{n}" if event_id == "auto" else event_id
    return NewEvent(eid, room, kind, "m.room.message", "@a:x", n,
                    orjson.dumps(body or {"n": n}).decode())


async def seqs_of(store: Stores, now: int = NOW, limit: int = 1000) -> list[tuple[str, int]]:
    return [(e.room_id, orjson.loads(e.body)["n"])
            for e in await store.inbox.fetch_due_events(now, limit)]


async def rows(store: Stores, sql: str, *args: Any) -> list[tuple]:
    async with store.database.db.transaction() as c:
        return [tuple(r) for r in await c.fetch(sql, *args)]


# -- migrations ---------------------------------------------------------------------------
EXPECTED_TABLES = {
    "transactions": {"txn_id", "received_at", "event_count", "quarantined"},
    "inbox": {"seq", "txn_id", "event_id", "room_id", "kind", "type", "sender",
              "origin_server_ts", "body", "status", "attempts", "next_attempt_at",
              "last_error", "received_at", "done_at"},
    "quarantine": {"id", "txn_id", "position", "section", "reason", "raw", "received_at"},
    "actions": {"id", "event_seq", "position", "lane", "kind", "payload", "rule_id", "reason",
                "status", "attempts", "outcome", "created_at", "applied_at"},
    "audit": {"id", "ts", "source", "actor", "kind", "user_id", "room_id", "rule_id",
              "reason", "outcome", "detail"},
    "kv": {"key", "value"},
    "enclave_schema": {"version"},
    "directory_people": {"person_id", "user_id", "status", "email", "displayname",
                         "updated_at", "deactivated_at"},
    "managed_rooms": {"key", "room_id", "created_at"},
    "scim_resources": {"resource_type", "id", "external_id", "data", "version",
                       "created_at", "updated_at"},
    "leases": {"name", "owner", "expires_at"},
    "directory_view": {"user_id", "person_id", "active", "username", "display_name", "email",
                       "title", "department", "location", "manager_user_id", "groups",
                       "updated_at"},
    "component_kv": {"component", "key", "value", "updated_at"},
    "archive_events": {"event_id", "room_id", "sender", "type", "state_key", "ts", "segment",
                       "line", "archived_at", "purged_at"},
    "archive_heads": {"room_id", "entries", "head", "segment", "segment_bytes", "updated_at"},
    "archive_media": {"mxc", "sha256", "size", "content_type", "room_id", "event_id", "ts",
                      "archived_at", "deleted_at"},
    "archive_staged": {"room_id", "entry_index", "entry", "data", "staged_at"},
    "legal_holds": {"id", "case_id", "reason", "placed_by", "users", "rooms", "since_ms",
                    "until_ms", "created_at", "released_at", "released_by"},
    "console_sessions": {"id_hash", "user_id", "roles", "csrf", "created_at", "last_seen"},
    "retention_rooms": {"room_id", "room_class", "override_ms", "override_by", "purged_up_to",
                        "last_purge_at", "notice_event_id", "state_set_at", "updated_at"},
}
JOURNAL_COLUMNS = {"seq", "txn_id", "body", "received_at"}


async def columns(store: Stores) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    if store.database.dialect == "sqlite":
        for (table,) in await rows(store, "SELECT name FROM sqlite_master WHERE type = 'table' "
                                          "AND name NOT LIKE 'sqlite_%'"):
            out[table] = {r[1] for r in await rows(store, f"PRAGMA table_info({table})")}
    else:
        for table, col in await rows(store, "SELECT table_name, column_name FROM "
                                            "information_schema.columns WHERE "
                                            "table_schema = 'public'"):
            out.setdefault(table, set()).add(col)
    return out


def test_both_dialects_have_the_same_migrations() -> None:
    sqlite, pg = load_migrations("sqlite"), load_migrations("postgres")
    assert [(v, n) for v, n, _ in sqlite] == [(v, n) for v, n, _ in pg]
    assert [v for v, _, _ in sqlite] == list(range(1, len(sqlite) + 1))


def test_each_migration_is_written_once() -> None:
    # an engine's own file only where the engines differ; the rest in common/
    from importlib import resources

    root = resources.files("bridge.store") / "migrations"
    sqlite = {e.name: e.read_text() for e in (root / "sqlite").iterdir()}
    pg = {e.name: e.read_text() for e in (root / "postgres").iterdir()}
    assert [n for n in sqlite if pg.get(n) == sqlite[n]] == []
    assert set(sqlite) == set(pg)  # a difference is one file per engine, never one alone


async def test_fresh_to_latest_and_rerun(make_store: MakeStore) -> None:
    store = await make_store(migrate=False)
    assert await store.database.schema_version() == 0
    with pytest.raises(SchemaError, match="run 'enclave migrate'"):
        await store.database.check_schema()
    latest = store.database.latest_version
    assert await store.database.migrate() == list(range(1, latest + 1))
    assert await store.database.schema_version() == latest
    await store.database.check_schema()
    assert await store.database.migrate() == []  # re-run: no-op
    expected = dict(EXPECTED_TABLES)
    if store.database.dialect == "postgres":
        expected["txn_journal"] = JOURNAL_COLUMNS  # SQLite: in its own file
    assert await columns(store) == expected
    # another process (a restart) sees the same version and migrates nothing
    again = await make_store(migrate=False)
    assert await again.database.migrate() == []
    await again.database.check_schema()


async def test_newer_database_is_refused(make_store: MakeStore) -> None:
    store = await make_store()
    async with store.database.db.transaction() as c:
        await c.execute("INSERT INTO enclave_schema (version) VALUES (?)", 99)
    for call in (store.database.migrate, store.database.check_schema):
        with pytest.raises(SchemaError, match="at schema version 99, newer than this Enclave"):
            await call()
    assert await store.database.schema_version() == 99


def _with_extra_migration(store: Stores, sql: str) -> None:
    version = store.database.latest_version + 1
    database = store.database
    database._migrations = [*database._migrations, (version, f"{version:03d}_extra.sql", sql)]
    store.database.latest_version = version


async def test_older_database_asks_to_migrate_then_upgrades(make_store: MakeStore) -> None:
    old = await make_store()  # at this code's latest
    v = old.database.latest_version
    await old.kv.set_kv("keep", "me")
    newer = await make_store(migrate=False)  # "the next release", same database
    _with_extra_migration(newer, "CREATE TABLE extra (x INTEGER);\n"
                                 "INSERT INTO extra (x) VALUES (1);")
    with pytest.raises(SchemaError, match=f"at schema version {v}; this Enclave needs {v + 1}"):
        await newer.database.check_schema()
    assert await newer.database.migrate() == [v + 1]
    await newer.database.check_schema()
    assert await rows(newer, "SELECT x FROM extra") == [(1,)]
    assert await newer.kv.get_kv("keep") == "me"
    # and the old code now refuses the upgraded database
    with pytest.raises(SchemaError, match="newer than this Enclave"):
        await old.database.check_schema()


@pytest.mark.parametrize("version", range(1, len(load_migrations("sqlite"))))
async def test_a_database_of_every_older_version_upgrades_to_the_latest(
        make_store: MakeStore, version: int) -> None:
    """A database an older release made (its migrations only, then some data) is brought
    to this release's schema by ``migrate``: the same tables as a fresh one, data kept."""
    old = await make_store(migrate=False)
    older = old.database
    older._migrations = older._migrations[:version]  # what that release shipped
    older.latest_version = version
    assert await older.migrate() == list(range(1, version + 1))
    await old.kv.set_kv("made_by", f"v{version}")
    current = await make_store(migrate=False)  # this release, same database
    latest = current.database.latest_version
    with pytest.raises(SchemaError, match=f"at schema version {version}; this Enclave needs"):
        await current.database.check_schema()
    assert await current.database.migrate() == list(range(version + 1, latest + 1))
    await current.database.check_schema()
    expected = dict(EXPECTED_TABLES)
    if current.database.dialect == "postgres":
        expected["txn_journal"] = JOURNAL_COLUMNS  # SQLite: in its own file
    assert await columns(current) == expected
    assert await current.kv.get_kv("made_by") == f"v{version}"


async def test_failed_migration_leaves_previous_version(make_store: MakeStore) -> None:
    store = await make_store()
    v = store.database.latest_version
    _with_extra_migration(store, "CREATE TABLE half (x INTEGER);\nTHIS IS NOT SQL;")
    with pytest.raises(Exception):  # noqa: B017 - engine-specific syntax error type
        await store.database.migrate()
    assert await store.database.schema_version() == v
    assert "half" not in await columns(store)


# -- save_transaction -----------------------------------------------------------------------
async def test_save_transaction_is_idempotent(store: Stores) -> None:
    q = [QuarantinedEvent(1, "events", "missing 'event_id'", '{"type":"x"}')]
    assert await store.inbox.save_transaction("t1", [ev(1), ev(2)], q, NOW) is True
    assert await store.inbox.save_transaction("t1", [ev(1), ev(2), ev(3)], q, NOW + 5) is False
    assert await seqs_of(store) == [("!r1", 1), ("!r1", 2)]
    assert len(await store.inbox.list_quarantine()) == 1
    stats = await store.inbox.inbox_stats()
    assert (stats["transactions"], stats["quarantined"]) == (1, 1)
    assert await rows(store, "SELECT txn_id, received_at, event_count, quarantined "
                             "FROM transactions") == [("t1", NOW, 2, 1)]


async def test_event_id_dedupe_across_transactions(store: Stores) -> None:
    assert await store.inbox.save_transaction("t1", [ev(1), ev(2)], [], NOW)
    assert await store.inbox.save_transaction("t2", [ev(2), ev(3), ev(3)], [], NOW)
    assert await seqs_of(store) == [("!r1", 1), ("!r1", 2), ("!r1", 3)]
    # the first copy wins: event 2 still belongs to t1
    assert [(e["event_id"], e["txn_id"]) for e in await store.inbox.list_events("pending")] == [
        ("$e1", "t1"), ("$e2", "t1"), ("$e3", "t2")]


async def test_events_without_id_are_never_deduplicated(store: Stores) -> None:
    typing = [ev(1, event_id=None, kind="ephemeral"), ev(2, event_id=None, kind="ephemeral")]
    assert await store.inbox.save_transaction("t1", typing, [], NOW)
    assert await store.inbox.save_transaction("t2", [ev(3, "", event_id=None, kind="to_device")],
                                              [], NOW)
    assert await seqs_of(store) == [("!r1", 1), ("!r1", 2), ("", 3)]


async def test_empty_transaction_is_recorded(store: Stores) -> None:
    assert await store.inbox.save_transaction("t0", [], [], NOW) is True
    assert await store.inbox.save_transaction("t0", [], [], NOW) is False


async def test_concurrent_redelivery_stores_once(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()  # two connections/processes
    results = await asyncio.gather(*[
        (a if i % 2 else b).inbox.save_transaction("same", [ev(1), ev(2)], [], NOW)
        for i in range(8)
    ])
    assert sorted(results) == [False] * 7 + [True]
    assert len(await a.inbox.list_events("pending")) == 2


async def test_event_fields_roundtrip(store: Stores) -> None:
    body = {"n": 1, "content": {"body": "ünïcode ✓ " + "x" * 70_000}}
    await store.inbox.save_transaction("t1", [ev(1, "!room:x", body=body)], [], NOW)
    (got,) = await store.inbox.fetch_due_events(NOW, 10)
    assert (got.txn_id, got.event_id, got.room_id, got.kind, got.type, got.sender) == (
        "t1", "$e1", "!room:x", "pdu", "m.room.message", "@a:x")
    assert (got.attempts, got.received_at) == (0, NOW)
    assert orjson.loads(got.body) == body


async def test_quarantine_rows(store: Stores) -> None:
    q = [QuarantinedEvent(0, "events", "event is a JSON str, not an object", '"x"'),
         QuarantinedEvent(3, "de.sorunome.msc2409.ephemeral", "'type' must be a non-empty "
                          "string", "{}")]
    await store.inbox.save_transaction("t9", [], q, NOW)
    got = await store.inbox.list_quarantine()
    assert [(r["txn_id"], r["position"], r["section"], r["reason"], r["raw"], r["received_at"])
            for r in got] == [("t9", x.position, x.section, x.reason, x.raw, NOW) for x in q]
    assert got[0]["id"] < got[1]["id"]
    assert len(await store.inbox.list_quarantine(limit=1)) == 1


# -- fetch_due_events -----------------------------------------------------------------------
async def test_fetch_due_orders_by_arrival_and_limits(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!b"), ev(2, "!a"), ev(3, "!b")], [], NOW)
    await store.inbox.save_transaction("t2", [ev(4, "!a")], [], NOW)
    assert await seqs_of(store) == [("!b", 1), ("!a", 2), ("!b", 3), ("!a", 4)]
    assert await seqs_of(store, limit=2) == [("!b", 1), ("!a", 2)]
    got = await store.inbox.fetch_due_events(NOW, 10)
    assert [e.seq for e in got] == sorted(e.seq for e in got)


async def test_room_whose_head_waits_for_retry_is_blocked(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!a"), ev(2, "!b"), ev(3, "!a"), ev(4, "!b")],
                                       [], NOW)
    head = (await store.inbox.fetch_due_events(NOW, 10))[0]
    await store.inbox.fail_event(head.seq, 1, NOW + 1000, "RuntimeError: boom", park=False)
    assert await seqs_of(store, NOW) == [("!b", 2), ("!b", 4)]
    assert await seqs_of(store, NOW + 999) == [("!b", 2), ("!b", 4)]
    due = await store.inbox.fetch_due_events(NOW + 1000, 10)
    assert [(e.room_id, e.attempts) for e in due] == [("!a", 1), ("!b", 0), ("!a", 0),
                                                       ("!b", 0)]
    (pending_a,) = [e for e in await store.inbox.list_events("pending") if e["seq"] == head.seq]
    assert pending_a["last_error"] == "RuntimeError: boom"


async def test_parked_and_done_events_are_not_fetched_nor_block(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!a"), ev(2, "!a"), ev(3, "!a")], [], NOW)
    e1, e2, _ = await store.inbox.fetch_due_events(NOW, 10)
    await store.inbox.fail_event(e1.seq, 3, NOW + 10**9, "x" * 5000, park=True)
    await store.inbox.complete_events([e2.seq], [], NOW)
    assert await seqs_of(store) == [("!a", 3)]
    (parked,) = await store.inbox.list_events("parked")
    assert (parked["event_id"], parked["attempts"]) == ("$e1", 3)
    assert len(parked["last_error"]) == 2000  # errors are truncated
    (done,) = await store.inbox.list_events("done")
    assert (done["event_id"], done["done_at"]) == ("$e2", NOW)
    assert (await store.inbox.inbox_stats())["events"] == {"pending": 1, "done": 1, "parked": 1}


# -- complete_events / actions -------------------------------------------------------------
def action_row(seq: int, pos: int, lane: str = "!a", rule: str = "sep.dm") -> tuple:
    return (seq, pos, lane, "kick", orjson.dumps({"kind": "kick", "pos": pos}).decode(), rule,
            f"reason {pos}")


async def test_complete_events_with_actions(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!a"), ev(2, "!b"), ev(3, "!a")], [], NOW)
    e1, e2, e3 = await store.inbox.fetch_due_events(NOW, 10)
    await store.inbox.complete_events([e1.seq, e2.seq], [
        action_row(e1.seq, 0), action_row(e1.seq, 1), action_row(e2.seq, 0, "!b")], NOW + 1)
    assert await seqs_of(store) == [("!a", 3)]
    everything = await store.outbox.pending_actions(None, 10)
    assert [(a.event_seq, a.position, a.lane, a.attempts) for a in everything] == [
        (e1.seq, 0, "!a", 0), (e1.seq, 1, "!a", 0), (e2.seq, 0, "!b", 0)]
    assert [a.position for a in await store.outbox.pending_actions("!a", 10)] == [0, 1]
    assert [a.lane for a in await store.outbox.pending_actions("!b", 10)] == ["!b"]
    assert len(await store.outbox.pending_actions(None, 2)) == 2
    assert orjson.loads(everything[1].payload) == {"kind": "kick", "pos": 1}
    # completing again (a resend after a crash) neither duplicates actions nor re-dates events
    await store.inbox.complete_events([e1.seq], [action_row(e1.seq, 0)], NOW + 99)
    assert len(await store.outbox.pending_actions(None, 10)) == 3
    done = {e["event_id"]: e["done_at"] for e in await store.inbox.list_events("done")}
    assert done == {"$e1": NOW + 1, "$e2": NOW + 1}
    await store.inbox.complete_events([], [action_row(e3.seq, 0)], NOW)  # nothing to complete
    assert len(await store.outbox.pending_actions(None, 10)) == 3


async def test_complete_events_is_atomic(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!a")], [], NOW)
    (e1,) = await store.inbox.fetch_due_events(NOW, 10)
    bad = (e1.seq, 0, "!a", "kick", "{}", None, "reason")  # rule_id NOT NULL: the insert fails
    with pytest.raises(Exception):  # noqa: B017 - engine-specific integrity error
        await store.inbox.complete_events([e1.seq], [bad], NOW)
    assert await seqs_of(store) == [("!a", 1)]  # not marked done either
    assert await store.outbox.pending_actions(None, 10) == []


async def test_finish_action_with_audit(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1, "!a")], [], NOW)
    (e1,) = await store.inbox.fetch_due_events(NOW, 10)
    await store.inbox.complete_events([e1.seq], [action_row(e1.seq, 0), action_row(e1.seq, 1)], NOW)
    a0, a1 = await store.outbox.pending_actions(None, 10)
    # a transient failure: stays pending, attempts counted, no audit yet
    await store.outbox.finish_action(a0.id, "pending", "502 upstream", 1, None, NOW + 1)
    assert [(a.id, a.attempts) for a in await store.outbox.pending_actions(None, 10)] == [
        (a0.id, 1), (a1.id, 0)]
    rec = AuditRecord(ts=NOW + 2, source="inbox", kind="kick", outcome="applied",
                      actor="@enclave:x", user_id="@eve:x", room_id="!a", rule_id="sep.dm",
                      reason="reason 0", detail="ok")
    await store.outbox.finish_action(a0.id, "applied", "ok", 2, rec, NOW + 2)
    await store.outbox.finish_action(a1.id, "failed", "403 M_FORBIDDEN: no" * 200, 1,
                                     AuditRecord(ts=NOW + 3, source="inbox", kind="kick",
                                                 outcome="failed"), NOW + 3)
    assert await store.outbox.pending_actions(None, 10) == []
    assert await rows(store, "SELECT id, status, attempts, applied_at, LENGTH(outcome) "
                             "FROM actions ORDER BY id") == [
        (a0.id, "applied", 2, NOW + 2, 2), (a1.id, "failed", 1, NOW + 3, 2000)]
    audit = await store.audit.query_audit(AuditFilter())
    assert [(r["outcome"], r["rule_id"], r["ts"]) for r in audit] == [
        ("applied", "sep.dm", NOW + 2), ("failed", None, NOW + 3)]
    assert audit[0] | {"id": 0} == {"id": 0, "ts": NOW + 2, "source": "inbox",
                                    "actor": "@enclave:x", "kind": "kick", "user_id": "@eve:x",
                                    "room_id": "!a", "rule_id": "sep.dm",
                                    "reason": "reason 0", "outcome": "applied", "detail": "ok"}
    assert (await store.inbox.inbox_stats())["actions"] == {"applied": 1, "failed": 1}


# -- requeue_parked -------------------------------------------------------------------------
async def park_all(store: Stores, n: int) -> list[int]:
    await store.inbox.save_transaction("t1", [ev(i, f"!r{i}") for i in range(1, n + 1)], [], NOW)
    seqs = [e.seq for e in await store.inbox.fetch_due_events(NOW, 100)]
    for s in seqs:
        await store.inbox.fail_event(s, 5, NOW + 10**9, "boom", park=True)
    return seqs


async def test_requeue_all_parked(store: Stores) -> None:
    await park_all(store, 3)
    assert await store.inbox.fetch_due_events(NOW, 10) == []
    assert await store.inbox.requeue_parked() == 3
    due = await store.inbox.fetch_due_events(NOW, 10)
    assert [(e.attempts, orjson.loads(e.body)["n"]) for e in due] == [(0, 1), (0, 2), (0, 3)]
    assert await store.inbox.requeue_parked() == 0


async def test_requeue_some_parked(store: Stores) -> None:
    s1, s2, s3 = await park_all(store, 3)
    await store.inbox.save_transaction("t2", [ev(9, "!z")], [], NOW)
    pending_seq = next(e.seq for e in await store.inbox.fetch_due_events(NOW, 10))
    assert await store.inbox.requeue_parked([s2, pending_seq, 10**9]) == 1
    assert await store.inbox.requeue_parked([]) == 0
    assert [e["seq"] for e in await store.inbox.list_events("parked")] == [s1, s3]
    assert [e.seq for e in await store.inbox.fetch_due_events(NOW, 10)] == [s2, pending_seq]


# -- audit ----------------------------------------------------------------------------------
AUDIT = [
    AuditRecord(ts=100, source="inbox", kind="kick", outcome="applied", user_id="@a:x",
                room_id="!1", rule_id="sep.dm"),
    AuditRecord(ts=200, source="sync", kind="invite", outcome="failed", user_id="@b:x",
                room_id="!1", rule_id="sync.member"),
    AuditRecord(ts=300, source="inbox", kind="kick", outcome="applied", user_id="@a:x",
                room_id="!2", rule_id="sep.dm"),
    AuditRecord(ts=300, source="cli", kind="leave", outcome="parked", user_id=None,
                room_id=None, rule_id=None),
]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (AuditFilter(), [0, 1, 2, 3]),
        (AuditFilter(since_ms=200), [1, 2, 3]),
        (AuditFilter(until_ms=300), [0, 1]),
        (AuditFilter(since_ms=200, until_ms=301), [1, 2, 3]),
        (AuditFilter(user_id="@a:x"), [0, 2]),
        (AuditFilter(room_id="!1"), [0, 1]),
        (AuditFilter(rule_id="sep.dm"), [0, 2]),
        (AuditFilter(outcome="parked"), [3]),
        (AuditFilter(user_id="@a:x", room_id="!2", since_ms=0), [2]),
        (AuditFilter(outcome="nope"), []),
        (AuditFilter(limit=2), [0, 1]),
        (AuditFilter(since_ms=150, limit=1), [1]),
    ],
)
async def test_query_audit_filters(store: Stores, flt: AuditFilter, expected: list[int]) -> None:
    for r in AUDIT:
        await store.audit.add_audit(r)
    got = await store.audit.query_audit(flt)
    assert [(r["ts"], r["kind"], r["user_id"]) for r in got] == [
        (AUDIT[i].ts, AUDIT[i].kind, AUDIT[i].user_id) for i in expected]
    assert [r["id"] for r in got] == sorted(r["id"] for r in got)


# -- kv, stats, lifecycle -------------------------------------------------------------------
async def test_kv(store: Stores) -> None:
    assert await store.kv.get_kv("sync.cursor") is None
    await store.kv.set_kv("sync.cursor", "a")
    await store.kv.set_kv("other", "")
    await store.kv.set_kv("sync.cursor", "b" * 10_000)
    assert await store.kv.get_kv("sync.cursor") == "b" * 10_000
    assert await store.kv.get_kv("other") == ""


async def test_inbox_stats(store: Stores) -> None:
    empty = await store.inbox.inbox_stats()
    assert empty == {"events": {"pending": 0, "done": 0, "parked": 0}, "actions": {},
                     "quarantined": 0, "transactions": 0, "journaled_transactions": 0,
                     "oldest_pending_received_at": None}
    await store.inbox.save_transaction("t1", [ev(1)], [], NOW)
    await store.inbox.save_transaction("t2", [ev(2)], [], NOW + 50)
    stats = await store.inbox.inbox_stats()
    assert stats["oldest_pending_received_at"] == NOW
    assert stats["events"]["pending"] == 2


async def test_data_survives_reopen(make_store: MakeStore) -> None:
    s1 = await make_store()
    await s1.inbox.save_transaction("t1", [ev(1)], [], NOW)
    await s1.kv.set_kv("k", "v")
    await s1.database.close()
    s2 = await make_store(migrate=False)
    await s2.database.check_schema()
    assert await s2.inbox.save_transaction("t1", [ev(1)], [], NOW) is False
    assert await s2.kv.get_kv("k") == "v"
    assert await seqs_of(s2) == [("!r1", 1)]


async def test_closed_store_raises_database_error(make_store: MakeStore) -> None:
    s = await make_store()
    await s.database.ping()
    await s.database.close()
    with pytest.raises(DatabaseError, match="not open"):
        await s.database.ping()


# -- cancellation ---------------------------------------------------------------------------
async def test_cancel_during_begin_leaves_store_usable(store: Stores) -> None:
    """A task cancelled while its transaction is being opened must not leave it open."""
    db = store.database.db
    if store.database.dialect == "sqlite":
        import time

        real_call = db._call  # type: ignore[attr-defined]

        async def slow_call(fn):  # the worker thread is busy when the cancel arrives
            def slow(c):
                time.sleep(0.05)
                return fn(c)

            return await real_call(slow)

        db._call = slow_call  # type: ignore[attr-defined]
        task = asyncio.create_task(store.inbox.requeue_parked())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        db._call = real_call  # type: ignore[attr-defined]
    await store.kv.set_kv("after", "ok")
    await store.inbox.requeue_parked()
    await store.database.ping()
    assert await store.kv.get_kv("after") == "ok"


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 8])
async def test_cancel_at_any_point_leaves_store_usable(store: Stores, steps: int) -> None:
    await store.inbox.save_transaction("t0", [ev(1)], [], NOW)
    for op in (lambda: store.inbox.requeue_parked(), lambda: store.kv.set_kv("k", "v"),
               lambda: store.inbox.save_transaction(f"t{steps}", [ev(2)], [], NOW),
               lambda: store.inbox.complete_events([1], [], NOW)):
        task = asyncio.create_task(op())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DatabaseError):
            await task
    await store.kv.set_kv("after", "ok")
    assert await store.kv.get_kv("after") == "ok"
    assert await store.inbox.requeue_parked() == 0
    await store.database.ping()


# -- transaction journal ------------------------------------------------------------------
async def test_journal_append_dedupes_and_keeps_order(store: Stores) -> None:
    assert await store.journal.journal_append("t1", b'{"events": [1]}', NOW) is True
    assert await store.journal.journal_append("t2", b'{"events": [2]}', NOW + 1) is True
    assert await store.journal.journal_append("t1", b'{"events": ["other"]}', NOW + 2) is False
    entries = await store.journal.journal_pending(10)
    assert [(e.txn_id, e.body, e.received_at) for e in entries] == [
        ("t1", b'{"events": [1]}', NOW), ("t2", b'{"events": [2]}', NOW + 1)]
    assert await store.journal.journal_stats() == (2, NOW)
    assert [e.txn_id for e in await store.journal.journal_pending(1)] == ["t1"]


async def test_journal_remove_and_oldest_pending(store: Stores) -> None:
    await store.journal.journal_append("t1", b"{}", NOW - 500)
    await store.journal.journal_append("t2", b"{}", NOW)
    await store.inbox.save_transaction("t0", [ev(1)], [], NOW - 100)
    # a journaled transaction is waiting too: it is the oldest
    assert (await store.inbox.inbox_stats())["oldest_pending_received_at"] == NOW - 500
    first = (await store.journal.journal_pending(1))[0]
    await store.journal.journal_remove([first.seq])
    assert [e.txn_id for e in await store.journal.journal_pending(10)] == ["t2"]
    stats = await store.inbox.inbox_stats()
    assert stats["journaled_transactions"] == 1
    assert stats["oldest_pending_received_at"] == NOW - 100
    # once removed, the same id may be journaled again (the inbox dedupes it later)
    assert await store.journal.journal_append("t1", b"{}", NOW) is True


async def test_journal_survives_reopen(make_store: MakeStore) -> None:
    s1 = await make_store()
    await s1.journal.journal_append("t1", b'{"events": []}', NOW)
    await s1.database.close()
    s2 = await make_store(migrate=False)
    assert [e.txn_id for e in await s2.journal.journal_pending(10)] == ["t1"]
    assert await s2.journal.journal_append("t1", b"{}", NOW) is False


async def test_parking_writes_its_audit_record_in_the_same_commit(store: Stores) -> None:
    await store.inbox.save_transaction("t1", [ev(1)], [], NOW)
    (e1,) = await store.inbox.fetch_due_events(NOW, 10)
    rec = AuditRecord(ts=NOW, source="inbox", kind="event_parked", outcome="parked",
                      room_id="!r1", reason="handler failed 3 times", detail="$e1: boom")
    await store.inbox.fail_event(e1.seq, 3, NOW + 10, "boom", park=True, audit=rec)
    assert [e["seq"] for e in await store.inbox.list_events("parked")] == [e1.seq]
    (row,) = await store.audit.query_audit(AuditFilter(outcome="parked"))
    assert (row["kind"], row["detail"]) == ("event_parked", "$e1: boom")


async def test_directory_people_upsert_and_list(store: Stores):
    a = DirectoryRecord("p1", "@alice:corp.test", "active", "a@corp.test", "Alice", 10)
    b = DirectoryRecord("p2", "@bob:corp.test", "active", None, "Bob", 10)
    await store.directory.save_directory_people([a, b])
    await store.directory.save_directory_people([])
    b2 = DirectoryRecord("p2", "@bob:corp.test", "deactivated", None, "Bob", 20, 20)
    await store.directory.save_directory_people([b2])
    assert await store.directory.directory_people() == [a, b2]
    # a Matrix user id belongs to one person only
    with pytest.raises(Exception):  # noqa: B017 - engine-specific integrity error
        await store.directory.save_directory_people(
            [DirectoryRecord("p3", "@alice:corp.test", "active", None, None, 30)])
    assert [r.person_id for r in await store.directory.directory_people()] == ["p1", "p2"]


async def test_managed_rooms_remember_and_replace(store: Stores):
    assert await store.directory.managed_rooms() == {}
    await store.directory.save_managed_room("dept/Sales", "!a", 1)
    await store.directory.save_managed_room("dept/Ops", "!b", 1)
    await store.directory.save_managed_room("dept/Sales", "!c", 2)  # recreated after deletion
    assert await store.directory.managed_rooms() == {"dept/Sales": "!c", "dept/Ops": "!b"}


async def test_scim_resources_crud(store: Stores):
    u = ScimResource("User", "u1", "ext-1", '{"userName": "a"}', 1, 5, 5)
    g = ScimResource("Group", "g1", None, '{"displayName": "G"}', 1, 5, 5)
    await store.scim.scim_put(u)
    await store.scim.scim_put(g)
    assert await store.scim.scim_get("User", "u1") == u
    assert await store.scim.scim_get("User", "g1") is None
    u2 = ScimResource("User", "u1", "ext-1", '{"userName": "b"}', 2, 5, 9)
    await store.scim.scim_put(u2)
    assert await store.scim.scim_list("User") == [u2]
    assert await store.scim.scim_delete("User", "u1") is True
    assert await store.scim.scim_delete("User", "u1") is False
    assert await store.scim.scim_list("User") == []
    assert await store.scim.scim_list("Group") == [g]


async def test_leases_one_holder_until_expiry(store: Stores):
    assert await store.leases.acquire_lease("sync", "a", 1000, 500) is True
    assert await store.leases.acquire_lease("sync", "b", 1200, 500) is False   # a holds it
    assert await store.leases.acquire_lease("sync", "a", 1400, 500) is True    # a renews (to 1900)
    assert await store.leases.acquire_lease("sync", "b", 1800, 500) is False
    assert await store.leases.acquire_lease("sync", "b", 1900, 500) is True    # expired: b takes it
    await store.leases.release_lease("sync", "a")                               # not a's: no effect
    assert await store.leases.acquire_lease("sync", "a", 2000, 500) is False
    await store.leases.release_lease("sync", "b")
    assert await store.leases.acquire_lease("sync", "a", 2000, 500) is True
    assert await store.leases.acquire_lease("other", "b", 2000, 500) is True


async def test_directory_view_replace_writes_only_changes(store: Stores):
    alice = StaffRecord(user_id="@alice:corp.test", person_id="p1", active=True,
                        username="alice", display_name="Alice", department="Sales",
                        groups=frozenset({"sales", "staff"}), manager_user_id="@bob:corp.test",
                        updated_at=1)
    bob = StaffRecord(user_id="@bob:corp.test", person_id="p2", active=True, username="bob",
                      display_name="Bob", updated_at=1)
    assert await store.directory.replace_directory_view([alice, bob]) == 2
    assert await store.directory.directory_view() == [alice, bob]
    # same content, newer timestamp: nothing written
    assert await store.directory.replace_directory_view(
        [dataclasses.replace(alice, updated_at=9), dataclasses.replace(bob, updated_at=9)]) == 0
    left = dataclasses.replace(bob, active=False, updated_at=10)
    assert await store.directory.replace_directory_view([left]) == 2  # alice gone, bob changed
    assert await store.directory.directory_view() == [left]


async def test_component_kv_once_only_guard(store: Stores):
    assert await store.kv.component_put_new("notices", "k1", "v", 1) is True
    assert await store.kv.component_put_new("notices", "k1", "other", 2) is False
    assert await store.kv.component_get("notices", "k1") == "v"
    await store.kv.component_put("notices", "k1", "w", 3)
    await store.kv.component_put("notices", "k2", "x", 3)
    await store.kv.component_put("bots", "k1", "y", 3)
    assert await store.kv.component_list("notices") == {"k1": "w", "k2": "x"}
    assert await store.kv.component_list("notices", "k2") == {"k2": "x"}
    assert await store.kv.component_delete("notices", "k1") is True
    assert await store.kv.component_delete("notices", "k1") is False
    assert await store.kv.component_get("notices", "k1") is None


async def test_recovered_events_join_the_inbox_once_with_their_audit(store: Stores):
    """The completeness check's write: new events in the given order with ONE audit record,
    in one commit; an event id already in the inbox (pushed meanwhile) is skipped; nothing
    new: no audit record either. A push of a recovered event later is dropped."""
    await store.inbox.save_transaction("t1", [ev(1, "!r", event_id="$a")], [], 1000)
    assert await store.inbox.inbox_known(["$a", "$b", "$c"]) == {"$a"}
    audit = AuditRecord(ts=2000, source="completeness", kind="events_recovered",
                        outcome="recovered", room_id="!r", rule_id="completeness.recover",
                        reason="2 events")
    batch = [ev(1, "!r", event_id="$a"), ev(2, "!r", event_id="$b"),
             ev(3, "!r", event_id="$c")]
    n = await store.inbox.save_recovered("recovered:x", batch, audit, 2000)
    assert n == 2
    assert await store.inbox.inbox_known(["$a", "$b", "$c"]) == {"$a", "$b", "$c"}
    due = await store.inbox.fetch_due_events(3000, 10)
    assert [(e.event_id, e.txn_id) for e in due] == [
        ("$a", "t1"), ("$b", "recovered:x"), ("$c", "recovered:x")]
    assert await store.inbox.save_recovered(
        "recovered:y", [ev(2, "!r", event_id="$b")], audit, 2500) == 0
    rows = await store.audit.query_audit(AuditFilter(room_id="!r"))
    assert [r["kind"] for r in rows] == ["events_recovered"]
    # the homeserver's push of a recovered event comes late: stored once
    assert await store.inbox.save_transaction("t2", [ev(3, "!r", event_id="$c")], [], 4000)
    assert len(await store.inbox.fetch_due_events(5000, 10)) == 3


async def test_lease_take_over_only_from_the_named_holder(store: Stores):
    assert await store.leases.lease_holder("leader") is None
    assert await store.leases.acquire_lease("leader", "host:1", 1000, 30_000)
    assert await store.leases.lease_holder("leader") == ("host:1", 31_000)
    assert not await store.leases.take_over_lease("leader", "host:9", "host:2", 2000, 30_000)
    assert await store.leases.take_over_lease("leader", "host:1", "host:2", 2000, 30_000)
    assert await store.leases.lease_holder("leader") == ("host:2", 32_000)
    assert not await store.leases.acquire_lease("leader", "host:1", 3000, 30_000)

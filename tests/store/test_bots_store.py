"""The bots' own store (bots/store.py) and its migrations on Enclave's database, on SQLite
and PostgreSQL: its tables made by the bots' migrations (not Enclave's), and a database
made by the release whose core migrations 5 and 7 made them upgrades with its rows kept."""

from __future__ import annotations

from typing import Any

import pytest

from bots.store import (
    MIGRATIONS,
    AnnouncementMessage,
    AnnouncementOccurrence,
    AnnouncementStore,
)
from bridge.store import AuditFilter, AuditRecord, SchemaError, Stores
from bridge.store.shared import load_migrations

from .conftest import MakeStore
from .test_store import EXPECTED_TABLES, columns, rows

BOTS_TABLES = {
    "announcement_occurrences": {"announcement_id", "occurrence_id", "kind", "spec", "status",
                                 "scheduled_at", "created_at", "created_by", "delivered_at",
                                 "closed_at"},
    "announcement_deliveries": {"announcement_id", "occurrence_id", "target", "status",
                                "room_id", "event_id", "detail", "attempts", "sent_at",
                                "acked_at", "ack_method", "ack_event_id", "reminders",
                                "last_reminder_at", "escalated_at", "escalated_to",
                                "reminder_failures", "reminder_error", "escalation_error"},
    "announcement_messages": {"event_id", "room_id", "announcement_id", "occurrence_id",
                              "kind", "target", "sent_at"},
    "capture_gaps": {"event_id", "room_id", "sender", "session_id", "sender_key", "reason",
                     "event_json", "first_seen", "attempts", "last_attempt",
                     "key_requested_at", "recovered_at"},
}


@pytest.fixture
async def bots(make_store: MakeStore) -> tuple[Stores, AnnouncementStore]:
    core = await make_store(extra_migrations=[MIGRATIONS])
    return core, AnnouncementStore(core.database.db)


# -- migrations -----------------------------------------------------------------------------
async def test_the_bots_tables_come_from_the_bots_migrations(make_store: MakeStore) -> None:
    core_only = await make_store()
    assert not set(BOTS_TABLES) & set(await columns(core_only))  # not Enclave's own
    store = await make_store(migrate=False, extra_migrations=[MIGRATIONS])
    with pytest.raises(SchemaError, match="bots tables are at schema version 0"):
        await store.database.check_schema()
    await store.database.migrate()
    await store.database.check_schema()
    assert await store.database.component_version("bots") == 3  # type: ignore[attr-defined]
    got = await columns(store)
    assert {t: got[t] for t in BOTS_TABLES} == BOTS_TABLES
    assert await store.database.migrate() == []  # re-run: no-op
    assert await store.database.component_version("bots") == 3  # type: ignore[attr-defined]


async def _as_the_previous_release(store: Stores, up_to: int) -> None:
    """Migrate like the release before the bots became an extension: Enclave's own
    migrations 5 and 7 were the bots' 1 and 2 (the same SQL)."""
    bots = {5: 1, 7: 2}
    theirs = {v: sql for v, _, sql in load_migrations(store.database.dialect, MIGRATIONS.folder)}
    async with store.database.db.transaction() as c:
        await c.execute("CREATE TABLE enclave_schema (version INTEGER NOT NULL)")
    for version, _, sql in load_migrations(store.database.dialect):
        if version > up_to:
            break
        async with store.database.db.transaction() as c:
            await c.execute_script(theirs[bots[version]] if version in bots else sql)
            await c.execute("INSERT INTO enclave_schema (version) VALUES (?)", version)


@pytest.mark.parametrize("release_version", [7, 6, 4])
async def test_a_database_of_the_previous_release_upgrades(make_store: MakeStore,
                                                         release_version: int) -> None:
    # 7: the release before this one (every bots table made by Enclave's migrations);
    # 6: one made by a release with the announcements but not the reminder columns;
    # 4: one from before the bots
    old = await make_store(migrate=False)
    await _as_the_previous_release(old, release_version)
    if release_version >= 5:
        async with old.database.db.transaction() as c:
            await c.execute(
                "INSERT INTO announcement_occurrences (announcement_id, occurrence_id, kind,"
                " spec, status, scheduled_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                "policy", "o1", "manual", "{}", "delivered", 1, 2)
            await c.execute(
                "INSERT INTO announcement_deliveries (announcement_id, occurrence_id, target,"
                " status, attempts, reminders) VALUES (?, ?, ?, ?, ?, ?)",
                "policy", "o1", "@a:x", "sent", 1, 0)
    await old.kv.set_kv("installation_id", "kept")
    new = await make_store(migrate=False, extra_migrations=[MIGRATIONS])
    with pytest.raises(SchemaError, match="run 'enclave migrate'"):
        await new.database.check_schema()
    await new.database.migrate()
    await new.database.check_schema()
    assert await new.database.component_version("bots") == 3  # type: ignore[attr-defined]
    expected = {**EXPECTED_TABLES, **BOTS_TABLES}
    got = await columns(new)
    assert {t: got[t] for t in expected if t != "enclave_schema"} == {
        t: c for t, c in expected.items() if t != "enclave_schema"}
    assert await new.kv.get_kv("installation_id") == "kept"
    ann = AnnouncementStore(new.database.db)
    if release_version >= 5:
        (occ,) = await ann.announcement_occurrences()
        assert (occ.announcement_id, occ.occurrence_id, occ.status) == ("policy", "o1",
                                                                        "delivered")
        (d,) = await ann.announcement_deliveries("policy", "o1")
        assert (d.target, d.status, d.reminder_failures, d.reminder_error) == (
            "@a:x", "sent", 0, None)
    # and the upgraded database works as a new one does
    assert await ann.announcement_create(_occ("after"), ["@b:x"]) is True
    assert [x.target for x in await ann.announcement_deliveries("policy", "after")] == ["@b:x"]


async def test_a_newer_bots_schema_is_refused(bots: tuple[Stores, AnnouncementStore]) -> None:
    core, _ = bots
    async with core.database.db.transaction() as c:
        await c.execute("INSERT INTO enclave_schema_components (component, version) "
                        "VALUES (?, ?)", "bots", 9)
    for call in (core.database.migrate, core.database.check_schema):
        with pytest.raises(SchemaError, match="bots tables are at schema version 9, newer"):
            await call()
    assert await rows(core, "SELECT COUNT(*) FROM announcement_occurrences") == [(0,)]


async def test_a_create_that_finds_the_occurrence_audits_nothing(
        bots: tuple[Stores, AnnouncementStore]) -> None:
    core, store = bots
    audit = AuditRecord(ts=1, source="bots.announcements", kind="announcement_created",
                        outcome="applied")
    assert await store.announcement_create(_occ(), ["@a:x"], audit=[audit]) is True
    assert await store.announcement_create(_occ(), ["@a:x"], audit=[audit]) is False
    assert [r["kind"] for r in await core.audit.query_audit(AuditFilter())] == [
        "announcement_created"]


# -- occurrences, deliveries, messages ------------------------------------------------------
def _occ(occ_id: str = "2026-12-01T09:00", *, created_at: int = 5) -> Any:
    return AnnouncementOccurrence(
        announcement_id="policy", occurrence_id=occ_id, kind="scheduled", spec='{"t": 1}',
        status="pending", scheduled_at=1, created_at=created_at, created_by=None)


async def test_announcement_occurrence_is_created_once(bots: tuple[Stores, AnnouncementStore]):
    _, store = bots
    targets = ["@b:x", "@a:x", "!room:x", "@a:x"]
    assert await store.announcement_create(_occ(), targets) is True
    # a second process (or a restart) deciding the same occurrence inserts nothing
    assert await store.announcement_create(_occ(), ["@c:x"]) is False
    got = await store.announcement_occurrence("policy", "2026-12-01T09:00")
    assert got == _occ()
    dels = await store.announcement_deliveries("policy", "2026-12-01T09:00")
    assert [(d.target, d.status, d.attempts, d.reminders) for d in dels] == [
        ("!room:x", "pending", 0, 0), ("@a:x", "pending", 0, 0), ("@b:x", "pending", 0, 0)]
    assert await store.announcement_create(_occ("empty", created_at=6), []) is True
    assert [o.occurrence_id for o in await store.announcement_occurrences()] == [
        "2026-12-01T09:00", "empty"]
    await store.announcement_set_status("policy", "empty", "delivered", 77)
    await store.announcement_set_status("policy", "empty", "closed", 88)
    done = await store.announcement_occurrence("policy", "empty")
    assert (done.status, done.delivered_at, done.closed_at) == ("closed", 77, 88)
    assert [o.occurrence_id for o in await store.announcement_occurrences(
        statuses=["pending", "delivering"])] == ["2026-12-01T09:00"]
    assert await store.announcement_occurrences(announcement_id="other") == []


async def test_announcement_sent_failed_acked_reminded(bots: tuple[Stores, AnnouncementStore]):
    core, store = bots
    occ = "o1"
    await store.announcement_create(_occ(occ), ["@a:x", "@b:x", "@c:x"])
    msg = AnnouncementMessage("$ev1", "!dm-a", "policy", occ, "announcement", "@a:x", 10)
    audit = AuditRecord(ts=10, source="bots", kind="announcement_send", outcome="applied",
                        user_id="@a:x", room_id="!dm-a")
    await store.announcement_mark_sent("policy", occ, ["@a:x"], room_id="!dm-a",
                                       event_id="$ev1", now_ms=10, message=msg, audit=[audit])
    # a transient failure stays pending; a final one is failed; a sent row is never failed
    await store.announcement_mark_failed("policy", occ, ["@b:x", "@a:x"], detail="503",
                                         final=False)
    await store.announcement_mark_failed("policy", occ, ["@c:x"], detail="403 forbidden",
                                         final=True)
    by = {d.target: d for d in await store.announcement_deliveries("policy", occ)}
    assert (by["@a:x"].status, by["@a:x"].event_id, by["@a:x"].sent_at) == ("sent", "$ev1", 10)
    assert (by["@b:x"].status, by["@b:x"].attempts, by["@b:x"].detail) == ("pending", 1, "503")
    assert (by["@c:x"].status, by["@c:x"].detail) == ("failed", "403 forbidden")
    assert [d.target for d in await store.announcement_deliveries(
        "policy", occ, status="pending")] == ["@b:x"]
    assert await store.announcement_message("$ev1") == msg
    assert await store.announcement_message("$nope") is None
    assert (await core.audit.query_audit(AuditFilter(user_id="@a:x")))[0]["kind"] == (
        "announcement_send")
    # the first acknowledgement counts; a second one changes nothing
    assert await store.announcement_record_ack("policy", occ, "@a:x", at_ms=20,
                                               method="reaction", event_id="$r1") is True
    assert await store.announcement_record_ack("policy", occ, "@a:x", at_ms=30,
                                               method="command", event_id="$r2") is False
    a = (await store.announcement_deliveries("policy", occ))[0]
    assert (a.acked_at, a.ack_method, a.ack_event_id) == (20, "reaction", "$r1")
    # a member of an explicit target room has no row until they acknowledge
    assert await store.announcement_record_ack("policy", occ, "@m:x", at_ms=40,
                                               method="reaction", event_id="$r3",
                                               room_id="!general") is True
    m = {d.target: d for d in await store.announcement_deliveries("policy", occ)}["@m:x"]
    assert (m.status, m.room_id, m.acked_at) == ("sent", "!general", 40)
    # reminders count up (a replayed lower count changes nothing); escalation once
    rem = AnnouncementMessage("$rem", "!dm-b", "policy", occ, "reminder", "@b:x", 50)
    await store.announcement_mark_reminded("policy", occ, "@b:x", count=1, now_ms=50,
                                           message=rem, audit=None)
    await store.announcement_mark_reminded("policy", occ, "@b:x", count=1, now_ms=60,
                                           message=None, audit=None)
    await store.announcement_mark_escalated("policy", occ, "@b:x", manager="@boss:x",
                                            now_ms=70, message=None, audit=None)
    await store.announcement_mark_escalated("policy", occ, "@b:x", manager="@other:x",
                                            now_ms=80, message=None, audit=None)
    b = {d.target: d for d in await store.announcement_deliveries("policy", occ)}["@b:x"]
    assert (b.reminders, b.last_reminder_at, b.escalated_at, b.escalated_to) == (
        1, 50, 70, "@boss:x")
    # a failed reminder takes its slot but is not counted as sent; its reason is kept
    await store.announcement_mark_reminded("policy", occ, "@b:x", count=2, now_ms=75,
                                           message=None, audit=None, error="403 refused")
    await store.announcement_mark_reminded("policy", occ, "@b:x", count=2, now_ms=76,
                                           message=None, audit=None)  # the slot is taken
    await store.announcement_mark_escalated("policy", occ, "@a:x", manager="@boss:x",
                                            now_ms=77, message=None, audit=None,
                                            error="404 no room")
    got = {d.target: d for d in await store.announcement_deliveries("policy", occ)}
    b, a = got["@b:x"], got["@a:x"]
    assert (b.reminders, b.reminder_failures, b.reminder_error, b.last_reminder_at) == (
        1, 1, "403 refused", 75)
    assert (a.escalated_at, a.escalated_to, a.escalation_error, a.escalated) == (
        77, "@boss:x", "404 no room", False)
    # explicit-room members found when it was sent
    await store.announcement_add_targets("policy", occ, ["@m:x", "@n:x"], status="sent",
                                         room_id="!general", event_id="$g", now_ms=90)
    n = {d.target: d for d in await store.announcement_deliveries("policy", occ)}
    assert (n["@n:x"].status, n["@n:x"].event_id, n["@n:x"].sent_at) == ("sent", "$g", 90)
    assert n["@m:x"].acked_at == 40  # already there: untouched
    await store.announcement_save_message(AnnouncementMessage(
        "$g", "!general", "policy", occ, "announcement", None, 90))
    await store.announcement_save_message(AnnouncementMessage(
        "$g", "!other", "policy", occ, "announcement", None, 91))  # known id: ignored
    assert [x.event_id for x in await store.announcement_messages_in_room("!general")] == ["$g"]
    assert (await store.announcement_message("$g")).room_id == "!general"


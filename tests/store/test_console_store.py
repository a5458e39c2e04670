"""The console's session store and the audit search page, on SQLite and PostgreSQL."""

from __future__ import annotations

from bridge.model.people import StaffRecord
from bridge.store import AuditRecord
from bridge.store.base import AuditSearch, ConsoleSession, RetentionRoom

from .conftest import MakeStore


async def test_sessions_create_touch_expire_delete(make_store: MakeStore) -> None:
    stores = await make_store()
    s = stores.console_sessions
    a = ConsoleSession("h-a", "@ann:corp.test", ("legal", "viewer"), "csrf-a", 1000, 1000)
    b = ConsoleSession("h-b", "@bob:corp.test", ("operator",), "csrf-b", 1000, 1000)
    await s.session_create(a)
    await s.session_create(b)
    assert await s.session_get("h-a") == a
    assert await s.session_get("nope") is None
    assert await s.session_touch("h-a", 5000, ("viewer",))
    got = await s.session_get("h-a")
    assert got is not None and got.last_seen == 5000 and got.roles == ("viewer",)
    assert not await s.session_touch("nope", 5000, ())
    assert [x.id_hash for x in await s.sessions_of("@ann:corp.test")] == ["h-a"]
    # b was last seen at 1000: expiring everything idle since before 2000 drops b only
    assert await s.sessions_expire(2000) == 1
    assert await s.session_get("h-b") is None
    assert await s.session_delete("h-a")
    assert not await s.session_delete("h-a")
    assert await s.session_get("h-a") is None


async def test_audit_page_newest_first_with_keyset(make_store: MakeStore) -> None:
    stores = await make_store()
    for i in range(30):
        await stores.audit.add_audit(AuditRecord(
            ts=1000 + i, source="console" if i % 3 == 0 else "inbox", kind="k",
            outcome="applied" if i % 2 else "refused", actor=f"@a{i % 2}:corp.test",
            user_id=f"@u{i % 5}:corp.test", room_id="!r", rule_id=f"rule.{i % 4}"))
    # one more at the same time as the newest: time first, then id decides
    await stores.audit.add_audit(AuditRecord(ts=1029, source="inbox", kind="k",
                                             outcome="applied"))
    page = await stores.audit.audit_page(AuditSearch(limit=10))
    keys = [(r["ts"], r["id"]) for r in page]
    assert keys == sorted(keys, reverse=True) and len(keys) == 10
    assert keys[0][0] == keys[1][0] == 1029 and keys[0][1] > keys[1][1]
    nxt = await stores.audit.audit_page(AuditSearch(limit=10, before_ts=keys[-1][0],
                                                    before_id=keys[-1][1]))
    assert len(nxt) == 10 and max((r["ts"], r["id"]) for r in nxt) < keys[-1]
    rest = await stores.audit.audit_page(AuditSearch(limit=100, before_ts=nxt[-1]["ts"],
                                                     before_id=nxt[-1]["id"]))
    assert len(page) + len(nxt) + len(rest) == 31  # every row exactly once
    only = await stores.audit.audit_page(AuditSearch(
        actor="@a1:corp.test", outcome="applied", rule_id="rule.1", since_ms=1010, limit=100))
    assert only and all(r["actor"] == "@a1:corp.test" and r["rule_id"] == "rule.1"
                        and r["ts"] >= 1010 for r in only)
    assert [r["ts"] for r in only] == [1029, 1025, 1021, 1017, 1013]


async def test_directory_person(make_store: MakeStore) -> None:
    stores = await make_store()
    rec = StaffRecord(user_id="@ann:corp.test", person_id="1", active=True, username="ann",
                      display_name="Ann", groups=frozenset({"legal"}))
    await stores.directory.replace_directory_view([rec])
    assert await stores.directory.directory_person("@ann:corp.test") == rec
    assert await stores.directory.directory_person("@bob:corp.test") is None


async def test_retention_rooms_first_n(make_store: MakeStore) -> None:
    """The console's retention page reads at most the rooms it lists."""
    stores = await make_store()
    for i in range(5):
        await stores.retention_rooms.retention_room_put(RetentionRoom(
            f"!r{i}:corp.test", "internal", None, None, None, None, None, None, 1000))
    assert len(await stores.retention_rooms.retention_rooms()) == 5
    assert [r.room_id for r in await stores.retention_rooms.retention_rooms(2)] == [
        "!r0:corp.test", "!r1:corp.test"]

"""The store by domain (bridge/store/domains.py): one class per protocol, each with exactly
its protocol's methods and signatures, no method in two domains, and every class working
on its own on a shared database (on each engine)."""

from __future__ import annotations

import dataclasses
import inspect

from bridge.store import AuditFilter, AuditRecord, Stores
from bridge.store import domains as d
from bridge.store.archive_index import SQLArchiveIndexStore
from bridge.store.audit import SQLAuditStore
from bridge.store.audit_feed import SQLAuditFeedStore
from bridge.store.console_sessions import SQLConsoleSessionStore
from bridge.store.directory import SQLDirectoryStore
from bridge.store.holds import SQLHoldStore
from bridge.store.inbox import SQLInboxStore
from bridge.store.journal import SQLJournalStore
from bridge.store.kv import SQLKVStore
from bridge.store.lease import SQLLeaseStore
from bridge.store.outbox import SQLOutboxStore
from bridge.store.retention_rooms import SQLRetentionRoomStore
from bridge.store.scim import SQLScimStore
from bridge.store.shared import SharedDatabase

from .conftest import MakeStore

# protocol -> its implementation, and the attribute of the Stores bundle that holds it
DOMAINS: list[tuple[type, type, str]] = [
    (d.SchemaStore, SharedDatabase, "database"),
    (d.JournalStore, SQLJournalStore, "journal"),
    (d.InboxStore, SQLInboxStore, "inbox"),
    (d.OutboxStore, SQLOutboxStore, "outbox"),
    (d.AuditStore, SQLAuditStore, "audit"),
    (d.KVStore, SQLKVStore, "kv"),
    (d.LeaseStore, SQLLeaseStore, "leases"),
    (d.DirectoryStore, SQLDirectoryStore, "directory"),
    (d.ScimStore, SQLScimStore, "scim"),
    (d.ArchiveIndexStore, SQLArchiveIndexStore, "archive"),
    (d.HoldStore, SQLHoldStore, "holds"),
    (d.RetentionRoomStore, SQLRetentionRoomStore, "retention_rooms"),
    (d.ConsoleSessionStore, SQLConsoleSessionStore, "console_sessions"),
    (d.AuditFeedStore, SQLAuditFeedStore, "audit_feed"),
]


def _methods(cls: type) -> dict[str, object]:
    """The public methods a class defines itself."""
    return {n: f for n, f in vars(cls).items()
            if inspect.isfunction(f) and not n.startswith("_")}


def test_every_protocol_is_a_domain_and_every_domain_is_in_the_bundle() -> None:
    protocols = {obj for _, obj in vars(d).items()
                 if inspect.isclass(obj) and getattr(obj, "_is_protocol", False)
                 and obj.__module__ == d.__name__}
    assert protocols == {p for p, _, _ in DOMAINS}
    assert [f.name for f in dataclasses.fields(Stores)] == [a for _, _, a in DOMAINS]


def test_no_method_belongs_to_two_domains() -> None:
    owners: dict[str, list[str]] = {}
    for proto, _, _ in DOMAINS:
        for name in _methods(proto):
            owners.setdefault(name, []).append(proto.__name__)
    assert {n: o for n, o in owners.items() if len(o) > 1} == {}


def test_each_class_implements_exactly_its_protocol() -> None:
    for proto, cls, _ in DOMAINS:
        mine, theirs = _methods(cls), _methods(proto)
        assert set(mine) == set(theirs), cls.__name__
        for name, fn in theirs.items():
            assert inspect.signature(mine[name]) == inspect.signature(fn), (  # type: ignore[arg-type]
                f"{cls.__name__}.{name}")


async def test_the_bundle_provides_every_domain(make_store: MakeStore) -> None:
    stores = await make_store()
    assert [p.__name__ for p, _, attr in DOMAINS
            if not isinstance(getattr(stores, attr), p)] == []


async def test_a_domain_store_works_on_its_own(make_store: MakeStore) -> None:
    """One domain class built alone on the shared database: nothing else needed."""
    database = (await make_store()).database
    audit = SQLAuditStore(database)
    record = AuditRecord(ts=1, source="test", kind="k", outcome="applied", user_id="@a:x")
    await audit.add_audit(record)
    rows = await audit.query_audit(AuditFilter(user_id="@a:x"))
    assert [(r["kind"], r["outcome"]) for r in rows] == [("k", "applied")]

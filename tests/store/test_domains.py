"""The store by domain (bridge/store/domains.py): every method of the one ``Store`` belongs
to exactly one narrow protocol, with ``Store``'s own signature, and the store on each
engine provides every protocol."""

from __future__ import annotations

import inspect

from bridge.store import Store
from bridge.store import domains as d

from .conftest import MakeStore

DOMAINS = [d.SchemaStore, d.JournalStore, d.InboxStore, d.OutboxStore, d.AuditStore,
           d.KVStore, d.LeaseStore, d.DirectoryStore, d.ScimStore, d.ArchiveIndexStore,
           d.HoldStore, d.RetentionRoomStore]


def _methods(cls: type) -> dict[str, object]:
    return {n: f for n, f in vars(cls).items()
            if inspect.isfunction(f) and not n.startswith("__")}


def test_every_store_method_is_in_exactly_one_domain() -> None:
    owners: dict[str, list[str]] = {}
    for proto in DOMAINS:
        for name in _methods(proto):
            owners.setdefault(name, []).append(proto.__name__)
    assert {n: o for n, o in owners.items() if len(o) > 1} == {}
    assert set(owners) == set(_methods(Store))


def test_the_domains_have_the_store_signatures() -> None:
    store = _methods(Store)
    for proto in DOMAINS:
        for name, fn in _methods(proto).items():
            assert inspect.signature(fn) == inspect.signature(store[name]), (
                f"{proto.__name__}.{name}")  # type: ignore[arg-type]


async def test_the_store_provides_every_domain(make_store: MakeStore) -> None:
    store = await make_store()
    assert [p.__name__ for p in DOMAINS if not isinstance(store, p)] == []

"""Durable state behind one interface, SQLite (default) or PostgreSQL."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import (
    AuditFilter,
    AuditRecord,
    DirectoryRecord,
    InboxEvent,
    JournalEntry,
    NewEvent,
    QuarantinedEvent,
    SchemaError,
    ScimResource,
    Store,
    StoredAction,
)
from .db import DatabaseError, SQLiteDatabase, database_from_url
from .sql import SQLStore


def open_store(
    url: str, *, base_dir: Path, password: str | None = None,
    sqlite_synchronous: str = "full", pool_size: int = 10,
    extra_migrations: Sequence[Any] = (),
) -> Store:
    """Build (not yet open) the store for a database URL; ``extra_migrations``: the
    extensions' own schemas (``bridge.extension.MigrationSet``), migrated and checked with
    Enclave's."""
    db = database_from_url(
        url, base_dir=base_dir, password=password,
        sqlite_synchronous=sqlite_synchronous, pool_size=pool_size,
    )
    if isinstance(db, SQLiteDatabase):
        journal = SQLiteDatabase(journal_path(db.path), synchronous=db.synchronous)
        return SQLStore(db, journal, extra_migrations=extra_migrations)
    return SQLStore(db, extra_migrations=extra_migrations)


def journal_path(db_path: Path) -> Path:
    """The SQLite journal file beside the database: enclave.db -> enclave-journal.db."""
    return db_path.with_name(f"{db_path.stem}-journal{db_path.suffix or '.db'}")


__all__ = [
    "AuditFilter",
    "AuditRecord",
    "DatabaseError",
    "DirectoryRecord",
    "InboxEvent",
    "JournalEntry",
    "NewEvent",
    "QuarantinedEvent",
    "SQLStore",
    "SchemaError",
    "ScimResource",
    "Store",
    "StoredAction",
    "journal_path",
    "open_store",
]

"""The stores of one installation: one per domain, all on one shared database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archive_index import SQLArchiveIndexStore
from .audit import SQLAuditStore
from .audit_feed import SQLAuditFeedStore
from .console_sessions import SQLConsoleSessionStore
from .db import SQLiteDatabase, database_from_url
from .directory import SQLDirectoryStore
from .holds import SQLHoldStore
from .inbox import SQLInboxStore
from .journal import SQLJournalStore
from .kv import SQLKVStore
from .lease import SQLLeaseStore
from .outbox import SQLOutboxStore
from .retention_rooms import SQLRetentionRoomStore
from .scim import SQLScimStore
from .shared import SharedDatabase


@dataclass(frozen=True)
class Stores:
    """One store per domain on ``database`` (what the composition root holds and hands
    out piece by piece; a consumer takes only the protocols it uses)."""

    database: SharedDatabase
    journal: SQLJournalStore
    inbox: SQLInboxStore
    outbox: SQLOutboxStore
    audit: SQLAuditStore
    kv: SQLKVStore
    leases: SQLLeaseStore
    directory: SQLDirectoryStore
    scim: SQLScimStore
    archive: SQLArchiveIndexStore
    holds: SQLHoldStore
    retention_rooms: SQLRetentionRoomStore
    console_sessions: SQLConsoleSessionStore
    audit_feed: SQLAuditFeedStore

    @classmethod
    def on(cls, database: SharedDatabase) -> Stores:
        """Every domain store on ``database`` (built, not opened: open the database)."""
        return cls(
            database=database, journal=SQLJournalStore(database),
            inbox=SQLInboxStore(database), outbox=SQLOutboxStore(database),
            audit=SQLAuditStore(database), kv=SQLKVStore(database),
            leases=SQLLeaseStore(database), directory=SQLDirectoryStore(database),
            scim=SQLScimStore(database), archive=SQLArchiveIndexStore(database),
            holds=SQLHoldStore(database), retention_rooms=SQLRetentionRoomStore(database),
            console_sessions=SQLConsoleSessionStore(database),
            audit_feed=SQLAuditFeedStore(database))


def open_database(
    url: str, *, base_dir: Path, password: str | None = None,
    sqlite_synchronous: str = "full", pool_size: int = 10,
    extra_migrations: Sequence[Any] = (),
) -> SharedDatabase:
    """Build (not yet open) the shared database for a database URL; ``extra_migrations``:
    the extensions' own schemas (``bridge.extension.MigrationSet``), migrated and checked
    with Enclave's."""
    db = database_from_url(
        url, base_dir=base_dir, password=password,
        sqlite_synchronous=sqlite_synchronous, pool_size=pool_size,
    )
    if isinstance(db, SQLiteDatabase):
        journal = SQLiteDatabase(journal_path(db.path), synchronous=db.synchronous)
        return SharedDatabase(db, journal, extra_migrations=extra_migrations)
    return SharedDatabase(db, extra_migrations=extra_migrations)


def open_stores(url: str, *, base_dir: Path, password: str | None = None,
                sqlite_synchronous: str = "full", pool_size: int = 10,
                extra_migrations: Sequence[Any] = ()) -> Stores:
    """:func:`open_database` and every domain store on it (built, not yet open)."""
    return Stores.on(open_database(
        url, base_dir=base_dir, password=password, sqlite_synchronous=sqlite_synchronous,
        pool_size=pool_size, extra_migrations=extra_migrations))


def journal_path(db_path: Path) -> Path:
    """The SQLite journal file beside the database: enclave.db -> enclave-journal.db."""
    return db_path.with_name(f"{db_path.stem}-journal{db_path.suffix or '.db'}")

"""Durable state behind one interface, SQLite (default) or PostgreSQL."""

from pathlib import Path

from .base import (
    AuditFilter,
    AuditRecord,
    InboxEvent,
    NewEvent,
    QuarantinedEvent,
    SchemaError,
    Store,
    StoredAction,
)
from .db import DatabaseError, database_from_url
from .sql import SQLStore


def open_store(
    url: str, *, base_dir: Path, password: str | None = None,
    sqlite_synchronous: str = "full", pool_size: int = 10,
) -> Store:
    """Build (not yet open) the store for a database URL."""
    db = database_from_url(
        url, base_dir=base_dir, password=password,
        sqlite_synchronous=sqlite_synchronous, pool_size=pool_size,
    )
    return SQLStore(db)


__all__ = [
    "AuditFilter",
    "AuditRecord",
    "DatabaseError",
    "InboxEvent",
    "NewEvent",
    "QuarantinedEvent",
    "SQLStore",
    "SchemaError",
    "Store",
    "StoredAction",
    "open_store",
]

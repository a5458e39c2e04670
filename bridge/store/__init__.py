"""Durable state, SQLite (default) or PostgreSQL: one store per domain (the protocols of
:mod:`.domains`) on one shared database (:mod:`.shared`), bundled in :class:`Stores`."""

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
    StoredAction,
)
from .db import DatabaseError
from .shared import SharedDatabase
from .stores import Stores, journal_path, open_database, open_stores

__all__ = [
    "AuditFilter",
    "AuditRecord",
    "DatabaseError",
    "DirectoryRecord",
    "InboxEvent",
    "JournalEntry",
    "NewEvent",
    "QuarantinedEvent",
    "SchemaError",
    "ScimResource",
    "SharedDatabase",
    "StoredAction",
    "Stores",
    "journal_path",
    "open_database",
    "open_stores",
]

"""The one database all the domain stores share: its connection(s), its schema and the
migrations, Enclave's and the extensions' (:class:`~bridge.store.domains.SchemaStore`).

Every domain store (``journal.py``, ``inbox.py``, ...) takes this object in its
constructor and runs its SQL on :attr:`SharedDatabase.db` (the journal on
:attr:`SharedDatabase.journal_db`); opening, migrating and closing happen here, once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from .base import SchemaError
from .db import Database

_MIGRATION_RE = re.compile(r"^(\d{3})_[\w]+\.sql$")


def load_migrations(dialect: str, root: Traversable | None = None,
                    ) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every numbered migration of the dialect, in order.

    ``root``: a migrations folder (default Enclave's own) with a sub-folder per engine
    (``sqlite``, ``postgres``) and optionally ``common`` for migrations written once for
    both; an engine's own file of the same number replaces the common one.
    """
    base = root or resources.files("bridge.store") / "migrations"
    found: dict[int, tuple[str, str]] = {}
    for sub in ("common", dialect):
        folder = base / sub
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            m = _MIGRATION_RE.match(entry.name)
            if m:
                found[int(m.group(1))] = (entry.name, entry.read_text(encoding="utf-8"))
    out = [(v, name, sql) for v, (name, sql) in sorted(found.items())]
    for i, (version, name, _) in enumerate(out, start=1):
        if version != i:
            raise RuntimeError(f"migration numbering has a gap at {name}")
    return out


# the SQLite journal file's own schema version (PRAGMA user_version)
JOURNAL_FILE_VERSION = 1
# PostgreSQL advisory lock key held while migrating (any constant unique to Enclave)
MIGRATION_LOCK = 0x456E636C
_SQLITE_JOURNAL_DDL = """
CREATE TABLE IF NOT EXISTS txn_journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    txn_id TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL,
    received_at BIGINT NOT NULL
);
"""


class SharedDatabase:
    """``db``: the database; ``journal_db``: where raw transactions are journaled, a
    separate SQLite file so the homeserver's answer never waits behind the inbox's writes
    (PostgreSQL: the same database). ``extra_migrations``: the extensions' own schemas
    (``bridge.extension.MigrationSet``), migrated and checked with Enclave's."""

    def __init__(self, db: Database, journal_db: Database | None = None, *,
                 extra_migrations: Sequence[Any] = ()):
        self.db = db
        self.journal_db = journal_db if journal_db is not None else db
        self.dialect = db.dialect
        self._migrations = load_migrations(db.dialect)
        self.latest_version = self._migrations[-1][0]
        # extensions' own schemas (bridge.extension.MigrationSet), versioned apart
        self._components = [(m, load_migrations(db.dialect, m.folder))
                            for m in extra_migrations]

    @property
    def _separate_journal(self) -> bool:
        return self.journal_db is not self.db

    async def open(self) -> None:
        await self.db.open()
        if self._separate_journal:
            try:
                await self.journal_db.open()
                await self._prepare_journal_file()
            except BaseException:
                await self.db.close()
                raise

    async def _prepare_journal_file(self) -> None:
        async with self.journal_db.transaction() as c:
            version = int(await c.fetchval("PRAGMA user_version") or 0)
            if version > JOURNAL_FILE_VERSION:
                raise SchemaError(
                    f"the journal file is at version {version}, newer than this Enclave "
                    f"(knows {JOURNAL_FILE_VERSION})"
                )
            if version < JOURNAL_FILE_VERSION:
                await c.execute_script(_SQLITE_JOURNAL_DDL)
                await c.execute(f"PRAGMA user_version = {JOURNAL_FILE_VERSION}")

    async def close(self) -> None:
        try:
            if self._separate_journal:
                await self.journal_db.close()
        finally:
            await self.db.close()

    async def ping(self) -> None:
        async with self.db.transaction() as c:
            await c.fetchval("SELECT 1")

    async def _table_exists(self, name: str) -> bool:
        # A read only: read-only commands (inbox status, audit) must not take the writer
        # away from a running Enclave. migrate() creates the version tables.
        exists_sql = (
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
            if self.dialect == "sqlite"
            else "SELECT COUNT(*) FROM information_schema.tables "
                 "WHERE table_schema = current_schema() AND table_name = ?"
        )
        (row,) = await self.db.fetch(exists_sql, name)
        return bool(row[0])

    async def schema_version(self) -> int:
        if not await self._table_exists("enclave_schema"):
            return 0
        (row,) = await self.db.fetch("SELECT MAX(version) FROM enclave_schema")
        return int(row[0] or 0)

    async def component_version(self, component: str) -> int:
        """The schema version of an extension's own tables (0: none yet)."""
        if not await self._table_exists("enclave_schema_components"):
            return 0
        (row,) = await self.db.fetch(
            "SELECT MAX(version) FROM enclave_schema_components WHERE component = ?",
            component)
        return int(row[0] or 0)

    def _too_new(self, current: int) -> SchemaError:
        return SchemaError(
            f"the database is at schema version {current}, newer than this Enclave "
            f"(knows up to {self.latest_version}): upgrade Enclave instead of running an "
            "older release against it"
        )

    async def _apply(self, migrations: Sequence[tuple[int, str, str]], current: int,
                     component: str | None,
                     adopted: dict[int, tuple[str, str | None]]) -> list[int]:
        """Run the migrations newer than ``current``, one transaction each (a failure
        leaves the previous version intact); ``component``: an extension's, versioned in
        ``enclave_schema_components`` (None: Enclave's own, in ``enclave_schema``)."""
        pg = self.dialect == "postgres"
        if component is None:
            done_sql, record_sql, key = (
                "SELECT COALESCE(MAX(version), 0) FROM enclave_schema",
                "INSERT INTO enclave_schema (version) VALUES (?)", ())
        else:
            done_sql, record_sql, key = (
                "SELECT COALESCE(MAX(version), 0) FROM enclave_schema_components "
                "WHERE component = ?",
                "INSERT INTO enclave_schema_components (component, version) VALUES (?, ?)",
                (component,))
        applied = []
        for version, _name, sql in migrations:
            if version <= current:
                continue
            async with self.db.transaction() as c:
                if pg:
                    await c.execute("SELECT pg_advisory_xact_lock(?)", MIGRATION_LOCK)
                if int(await c.fetchval(done_sql, *key) or 0) >= version:
                    continue  # another process applied it meanwhile
                # an earlier release made these tables with Enclave's own migrations:
                # record them as applied instead of creating them twice
                if not (version in adopted and await self._has(c, *adopted[version])):
                    await c.execute_script(sql)
                await c.execute(record_sql, *key, version)
            applied.append(version)
        return applied

    async def _create_version_table(self, ddl: str) -> None:
        async with self.db.transaction() as c:
            if self.dialect == "postgres":
                # replicas started together: one migrates, the others wait and find it done
                await c.execute("SELECT pg_advisory_xact_lock(?)", MIGRATION_LOCK)
            await c.execute(ddl)

    async def migrate(self) -> list[int]:
        await self._create_version_table(
            "CREATE TABLE IF NOT EXISTS enclave_schema (version INTEGER NOT NULL)")
        current = await self.schema_version()
        if current > self.latest_version:
            raise self._too_new(current)
        applied = await self._apply(self._migrations, current, None, {})
        for mset, migrations in self._components:
            await self._migrate_component(mset, migrations)
        return applied

    async def _has(self, c: Any, table: str, column: str | None) -> bool:
        if self.dialect == "sqlite":
            rows = await c.fetch(f"PRAGMA table_info({table})")
            names = {r[1] for r in rows}
        else:
            rows = await c.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ?", table)
            names = {r[0] for r in rows}
        return bool(names) and (column is None or column in names)

    async def _migrate_component(self, mset: Any,
                                 migrations: list[tuple[int, str, str]]) -> None:
        await self._create_version_table(
            "CREATE TABLE IF NOT EXISTS enclave_schema_components "
            "(component TEXT NOT NULL, version INTEGER NOT NULL)")
        latest = migrations[-1][0] if migrations else 0
        current = await self.component_version(mset.component)
        if current > latest:
            raise self._too_new_component(mset.component, current, latest)
        await self._apply(migrations, current, mset.component,
                          {v: (t, col) for v, t, col in mset.adopted})

    def _too_new_component(self, component: str, current: int, latest: int) -> SchemaError:
        return SchemaError(
            f"the database's {component} tables are at schema version {current}, newer "
            f"than this Enclave's {component} (knows up to {latest}): upgrade it instead")

    async def check_schema(self) -> None:
        current = await self.schema_version()
        if current > self.latest_version:
            raise self._too_new(current)
        if current < self.latest_version:
            raise SchemaError(
                f"the database is at schema version {current}; this Enclave needs "
                f"{self.latest_version}: run 'enclave migrate'"
            )
        for mset, migrations in self._components:
            latest = migrations[-1][0] if migrations else 0
            have = await self.component_version(mset.component)
            if have > latest:
                raise self._too_new_component(mset.component, have, latest)
            if have < latest:
                raise SchemaError(
                    f"the database's {mset.component} tables are at schema version {have}; "
                    f"this Enclave needs {latest}: run 'enclave migrate'")

"""The one SQL implementation of :class:`Store`, over either database adapter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import orjson

from ..model.people import StaffRecord
from .base import (
    ArchiveConflict,
    ArchivedEvent,
    ArchivedMedia,
    ArchiveHead,
    AuditFilter,
    AuditRecord,
    DirectoryRecord,
    HoldRecord,
    InboxEvent,
    JournalEntry,
    NewEvent,
    QuarantinedEvent,
    RetentionRoom,
    SchemaError,
    ScimResource,
    Store,
    StoredAction,
)
from .db import Database, PostgresDatabase, Step

_MIGRATION_RE = re.compile(r"^(\d{3})_[\w]+\.sql$")


def _staff_row(r: StaffRecord) -> tuple[Any, ...]:
    return (r.user_id, r.person_id, 1 if r.active else 0, r.username, r.display_name, r.email,
            r.title, r.department, r.location, r.manager_user_id,
            orjson.dumps(sorted(r.groups)).decode(), r.updated_at)


def _staff_from_row(row: tuple[Any, ...]) -> StaffRecord:
    return StaffRecord(
        user_id=row[0], person_id=row[1], active=bool(row[2]), username=row[3],
        display_name=row[4], email=row[5], title=row[6], department=row[7], location=row[8],
        manager_user_id=row[9], groups=frozenset(orjson.loads(row[10])), updated_at=row[11])


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


log = logging.getLogger(__name__)

JOURNAL_FILE_VERSION = 1
# PostgreSQL NOTIFY channel: a transaction was journaled (by any replica)
JOURNAL_CHANNEL = "enclave_journal"
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

_AUDIT_COLS = "ts, source, actor, kind, user_id, room_id, rule_id, reason, outcome, detail"


def _audit_row(r: AuditRecord) -> tuple[Any, ...]:
    return (r.ts, r.source, r.actor, r.kind, r.user_id, r.room_id, r.rule_id, r.reason,
            r.outcome, r.detail)


def audit_steps(records: Sequence[AuditRecord]) -> list[Step]:
    """The batch step that writes ``records`` to the audit log: for stores on the same
    database (extensions) that audit in the transaction of their own writes."""
    if not records:
        return []
    return [(f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             [_audit_row(a) for a in records], True)]


class SQLStore(Store):
    """``journal_db``: where raw transactions are journaled; a separate SQLite file, so the
    homeserver's answer never waits behind the inbox's writes (PostgreSQL: the same db)."""

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

    # -- transaction journal -------------------------------------------------------------
    async def journal_append(self, txn_id: str, body: bytes, now_ms: int) -> bool:
        sql = ("INSERT INTO txn_journal (txn_id, body, received_at) VALUES (?, ?, ?) "
               "ON CONFLICT (txn_id) DO NOTHING")
        if isinstance(self.journal_db, PostgresDatabase):
            # the NOTIFY (sent at commit, only for a new entry) wakes the leading replica
            # when another replica took the transaction
            return await self.journal_db.fetchval_autocommit(
                "WITH ins AS (" + sql + " RETURNING 1) SELECT 1 FROM ins, LATERAL "
                f"(SELECT pg_notify('{JOURNAL_CHANNEL}', '')) AS n",
                txn_id, body, now_ms) is not None
        counts = await self.journal_db.batch([(sql, (txn_id, body, now_ms), False)])
        return counts[0] != 0

    async def watch_journal(self, on_append: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        if not isinstance(self.journal_db, PostgresDatabase):
            return await super().watch_journal(on_append)
        db = self.journal_db
        state: dict[str, Any] = {"conn": None, "stop": False}

        async def keep_listening() -> None:
            # reconnects after a lost connection; meanwhile the leader polls (every second)
            while not state["stop"]:
                try:
                    closed = asyncio.Event()
                    conn = state["conn"] = await db.listen(JOURNAL_CHANNEL, on_append)
                    conn.add_termination_listener(lambda _c, ev=closed: ev.set())
                    on_append()  # anything appended while not listening
                    await closed.wait()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("listening for journal notifications failed: %s", e)
                await asyncio.sleep(1)

        task = asyncio.create_task(keep_listening(), name="journal-listener")

        async def stop() -> None:
            state["stop"] = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if state["conn"] is not None:
                with contextlib.suppress(Exception):
                    await state["conn"].close()

        return stop

    async def journal_pending(self, limit: int) -> list[JournalEntry]:
        rows = await self.journal_db.fetch(
            "SELECT seq, txn_id, body, received_at FROM txn_journal ORDER BY seq LIMIT ?",
            limit,
        )
        return [JournalEntry(int(r[0]), r[1], bytes(r[2]), int(r[3])) for r in rows]

    async def journal_remove(self, seqs: Sequence[int]) -> None:
        if seqs:
            await self.journal_db.batch(
                [("DELETE FROM txn_journal WHERE seq = ?", [(s,) for s in seqs], True)],
                urgent=False,
            )

    async def journal_stats(self) -> tuple[int, int | None]:
        (row,) = await self.journal_db.fetch(
            "SELECT COUNT(*), MIN(received_at) FROM txn_journal")
        return int(row[0]), row[1]

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

    # -- inbox ---------------------------------------------------------------------------
    async def save_transaction(
        self, txn_id: str, events: Sequence[NewEvent], quarantined: Sequence[QuarantinedEvent],
        now_ms: int,
    ) -> bool:
        if isinstance(self.db, PostgresDatabase):
            # One statement, one round trip, one commit (instead of BEGIN, 2-3 statements
            # and COMMIT): the events go in only if the transaction id is new.
            return bool(await self.db.fetchval_autocommit(
                _PG_SAVE_TRANSACTION, txn_id, now_ms, len(events), len(quarantined),
                [e.event_id for e in events], [e.room_id for e in events],
                [e.kind for e in events], [e.type for e in events],
                [e.sender for e in events], [e.origin_server_ts for e in events],
                [e.body for e in events],
                [q.position for q in quarantined], [q.section for q in quarantined],
                [q.reason for q in quarantined], [q.raw for q in quarantined],
            ))
        steps: list[Step] = [(
            "INSERT INTO transactions (txn_id, received_at, event_count, quarantined) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (txn_id) DO NOTHING",
            (txn_id, now_ms, len(events), len(quarantined)), False,
        )]
        if events:
            steps.append((
                "INSERT INTO inbox (txn_id, event_id, room_id, kind, type, sender, "
                "origin_server_ts, body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [(txn_id, e.event_id, e.room_id, e.kind, e.type, e.sender,
                  e.origin_server_ts, e.body, now_ms) for e in events], True,
            ))
        if quarantined:
            steps.append((
                "INSERT INTO quarantine (txn_id, position, section, reason, raw, "
                "received_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(txn_id, q.position, q.section, q.reason, q.raw, now_ms)
                 for q in quarantined], True,
            ))
        counts = await self.db.batch(steps, require_first=True)
        return counts[0] != 0

    async def inbox_known(self, event_ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(event_ids))
        known: set[str] = set()
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            rows = await self.db.fetch(
                "SELECT event_id FROM inbox WHERE event_id IN ("
                + ", ".join("?" * len(part)) + ")", *part)
            known.update(r[0] for r in rows)
        return known

    async def save_recovered(self, txn_id: str, events: Sequence[NewEvent],
                             audit: AuditRecord, now_ms: int) -> int:
        async with self.db.transaction() as c:
            ids = [e.event_id for e in events if e.event_id]
            known: set[str] = set()
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                rows = await c.fetch("SELECT event_id FROM inbox WHERE event_id IN ("
                                     + ", ".join("?" * len(part)) + ")", *part)
                known.update(r[0] for r in rows)
            new = [e for e in dict((e.event_id, e) for e in events).values()
                   if e.event_id and e.event_id not in known]
            if not new:
                return 0
            await c.execute(
                "INSERT INTO transactions (txn_id, received_at, event_count, quarantined) "
                "VALUES (?, ?, ?, 0) ON CONFLICT (txn_id) DO NOTHING",
                txn_id, now_ms, len(new))
            # one statement per row: the inbox seq follows the given (room) order
            for e in new:
                await c.execute(
                    "INSERT INTO inbox (txn_id, event_id, room_id, kind, type, sender, "
                    "origin_server_ts, body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    txn_id, e.event_id, e.room_id, e.kind, e.type, e.sender,
                    e.origin_server_ts, e.body, now_ms)
            await c.execute(
                f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                *_audit_row(audit))
            return len(new)

    async def fetch_due_events(self, now_ms: int, limit: int) -> list[InboxEvent]:
        # A room whose head event waits for a retry blocks the rest of that room only.
        rows = await self.db.fetch(
            "SELECT seq, txn_id, event_id, room_id, kind, type, sender, body, attempts, "
            "received_at FROM inbox WHERE status = 'pending' AND room_id NOT IN ("
            " SELECT room_id FROM inbox WHERE status = 'pending' AND next_attempt_at > 0"
            " AND next_attempt_at > ?"
            ") ORDER BY seq LIMIT ?",
            now_ms, limit,
        )
        return [InboxEvent(*tuple(r)) for r in rows]

    async def complete_events(
        self, seqs: Sequence[int], actions: Sequence[tuple[int, int, str, str, str, str, str]],
        now_ms: int,
    ) -> None:
        if not seqs:
            return
        if isinstance(self.db, PostgresDatabase):
            await self.db.fetchval_autocommit(
                _PG_COMPLETE_EVENTS, now_ms, list(seqs),
                *([a[i] for a in actions] for i in range(7)),
            )
            return
        # One hop to the writer; not urgent: it may wait a moment for the next ingest
        # write and share its commit (one fsync for both).
        steps: list[Step] = [(
            "UPDATE inbox SET status = 'done', done_at = ?, last_error = NULL "
            "WHERE seq = ? AND status = 'pending'",
            [(now_ms, s) for s in seqs], True,
        )]
        if actions:
            steps.append((
                "INSERT INTO actions (event_seq, position, lane, kind, payload, rule_id, "
                "reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(*a, now_ms) for a in actions], True,
            ))
        await self.db.batch(steps, urgent=False)

    async def fail_event(
        self, seq: int, attempts: int, next_attempt_at: int, error: str, park: bool,
        audit: AuditRecord | None = None,
    ) -> None:
        steps: list[Step] = [(
            "UPDATE inbox SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ? "
            "WHERE seq = ?",
            ("parked" if park else "pending", attempts, next_attempt_at, error[:2000], seq),
            False,
        )]
        if audit is not None:
            steps.append((
                f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _audit_row(audit), False,
            ))
        await self.db.batch(steps)

    async def requeue_parked(self, seqs: Sequence[int] | None = None) -> int:
        async with self.db.transaction() as c:
            if seqs is None:
                n = await c.fetchval("SELECT COUNT(*) FROM inbox WHERE status = 'parked'")
                await c.execute(
                    "UPDATE inbox SET status = 'pending', attempts = 0, next_attempt_at = 0 "
                    "WHERE status = 'parked'"
                )
                return int(n)
            n = 0
            for s in seqs:
                hit = await c.fetchval(
                    "UPDATE inbox SET status = 'pending', attempts = 0, next_attempt_at = 0 "
                    "WHERE seq = ? AND status = 'parked' RETURNING 1", s,
                )
                n += 1 if hit else 0
            return n

    async def list_events(self, status: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.db.fetch(
            "SELECT seq, txn_id, event_id, room_id, type, sender, attempts, last_error, "
            "received_at, done_at FROM inbox WHERE status = ? ORDER BY seq LIMIT ?",
            status, limit,
        )
        keys = ("seq", "txn_id", "event_id", "room_id", "type", "sender", "attempts",
                "last_error", "received_at", "done_at")
        return [dict(zip(keys, tuple(r), strict=True)) for r in rows]

    async def list_quarantine(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.db.fetch(
            "SELECT id, txn_id, position, section, reason, raw, received_at "
            "FROM quarantine ORDER BY id LIMIT ?", limit,
        )
        keys = ("id", "txn_id", "position", "section", "reason", "raw", "received_at")
        return [dict(zip(keys, tuple(r), strict=True)) for r in rows]

    async def inbox_stats(self) -> dict[str, Any]:
        # one snapshot on the read side: never holds up the writer (ingest)
        rows, oldest_r, quarantined_r, txns_r, actions = await self.db.fetch_many([
            ("SELECT status, COUNT(*) FROM inbox GROUP BY status", ()),
            ("SELECT MIN(received_at) FROM inbox WHERE status = 'pending'", ()),
            ("SELECT COUNT(*) FROM quarantine", ()),
            ("SELECT COUNT(*) FROM transactions", ()),
            ("SELECT status, COUNT(*) FROM actions GROUP BY status", ()),
        ])
        oldest, quarantined, txns = oldest_r[0][0], quarantined_r[0][0], txns_r[0][0]
        journaled, journal_oldest = await self.journal_stats()
        if journal_oldest is not None and (oldest is None or journal_oldest < oldest):
            oldest = journal_oldest  # not yet expanded into the inbox: waiting all the same
        counts = {"pending": 0, "done": 0, "parked": 0}
        counts.update({r[0]: int(r[1]) for r in rows})
        return {
            "events": counts,
            "actions": {r[0]: int(r[1]) for r in actions},
            "quarantined": int(quarantined),
            "transactions": int(txns),
            "journaled_transactions": journaled,
            "oldest_pending_received_at": oldest,
        }

    # -- actions -------------------------------------------------------------------------
    async def pending_actions(self, lane: str | None, limit: int) -> list[StoredAction]:
        if lane is None:
            rows = await self.db.fetch(
                "SELECT id, event_seq, position, lane, payload, attempts FROM actions "
                "WHERE status = 'pending' ORDER BY id LIMIT ?", limit,
            )
        else:
            rows = await self.db.fetch(
                "SELECT id, event_seq, position, lane, payload, attempts FROM actions "
                "WHERE status = 'pending' AND lane = ? ORDER BY id LIMIT ?", lane, limit,
            )
        return [StoredAction(*tuple(r)) for r in rows]

    async def finish_action(
        self, action_id: int, status: str, outcome: str, attempts: int,
        audit: AuditRecord | None, now_ms: int,
    ) -> None:
        steps: list[Step] = [(
            "UPDATE actions SET status = ?, outcome = ?, attempts = ?, applied_at = ? "
            "WHERE id = ?",
            (status, outcome[:2000], attempts, now_ms if status != "pending" else None,
             action_id), False,
        )]
        if audit is not None:
            steps.append((
                f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _audit_row(audit), False,
            ))
        await self.db.batch(steps)

    async def last_action_id(self) -> int:
        rows = await self.db.fetch("SELECT MAX(id) FROM actions")
        return int(rows[0][0] or 0)

    # -- audit ---------------------------------------------------------------------------
    async def add_audit(self, record: AuditRecord) -> None:
        await self.db.batch([(
            f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _audit_row(record), False,
        )])

    async def query_audit(self, flt: AuditFilter) -> list[dict[str, Any]]:
        where, args = [], []
        for col, op, val in (
            ("ts", ">=", flt.since_ms), ("ts", "<", flt.until_ms),
            ("user_id", "=", flt.user_id), ("room_id", "=", flt.room_id),
            ("rule_id", "=", flt.rule_id), ("outcome", "=", flt.outcome),
        ):
            if val is not None:
                where.append(f"{col} {op} ?")
                args.append(val)
        sql = f"SELECT id, {_AUDIT_COLS} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id LIMIT ?"
        rows = await self.db.fetch(sql, *args, flt.limit)
        keys = ("id", *(k.strip() for k in _AUDIT_COLS.split(",")))
        return [dict(zip(keys, tuple(r), strict=True)) for r in rows]

    # -- kv ------------------------------------------------------------------------------
    async def get_kv(self, key: str) -> str | None:
        rows = await self.db.fetch("SELECT value FROM kv WHERE key = ?", key)
        return rows[0][0] if rows else None

    async def set_kv(self, key: str, value: str) -> None:
        await self.db.batch([(
            "INSERT INTO kv (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value), False,
        )])

    # -- directory sync ----------------------------------------------------------------
    async def directory_people(self) -> list[DirectoryRecord]:
        rows = await self.db.fetch(
            "SELECT person_id, user_id, status, email, displayname, updated_at, deactivated_at"
            " FROM directory_people ORDER BY person_id")
        return [DirectoryRecord(*tuple(r)) for r in rows]

    async def save_directory_people(self, records: Sequence[DirectoryRecord]) -> None:
        if not records:
            return
        await self.db.batch([(
            "INSERT INTO directory_people (person_id, user_id, status, email, displayname,"
            " updated_at, deactivated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (person_id) DO UPDATE SET user_id = excluded.user_id,"
            " status = excluded.status, email = excluded.email,"
            " displayname = excluded.displayname, updated_at = excluded.updated_at,"
            " deactivated_at = excluded.deactivated_at",
            [(r.person_id, r.user_id, r.status, r.email, r.displayname, r.updated_at,
              r.deactivated_at) for r in records],
            True,
        )])

    async def managed_rooms(self) -> dict[str, str]:
        rows = await self.db.fetch("SELECT key, room_id FROM managed_rooms")
        return {r[0]: r[1] for r in rows}

    async def save_managed_room(self, key: str, room_id: str, now_ms: int) -> None:
        await self.db.batch([
            ("DELETE FROM managed_rooms WHERE room_id = ? AND key <> ?", (room_id, key), False),
            ("INSERT INTO managed_rooms (key, room_id, created_at) VALUES (?, ?, ?)"
             " ON CONFLICT (key) DO UPDATE SET room_id = excluded.room_id,"
             " created_at = excluded.created_at", (key, room_id, now_ms), False),
        ])

    _VIEW_COLS = ("user_id, person_id, active, username, display_name, email, title,"
                  " department, location, manager_user_id, groups, updated_at")

    async def directory_view(self) -> list[StaffRecord]:
        rows = await self.db.fetch(
            f"SELECT {self._VIEW_COLS} FROM directory_view ORDER BY user_id")
        return [_staff_from_row(tuple(r)) for r in rows]

    async def replace_directory_view(self, records: Sequence[StaffRecord]) -> int:
        old = {r.user_id: r for r in await self.directory_view()}
        new = {r.user_id: r for r in records}
        gone = [(uid,) for uid in old if uid not in new]

        def same(a: StaffRecord, b: StaffRecord) -> bool:
            # updated_at alone changing is not a change worth a write
            return _staff_row(a)[:-1] == _staff_row(b)[:-1]

        changed = [_staff_row(r) for uid, r in new.items()
                   if uid not in old or not same(old[uid], r)]
        if not gone and not changed:
            return 0
        await self.db.batch([
            ("DELETE FROM directory_view WHERE user_id = ?", gone, True),
            (f"INSERT INTO directory_view ({self._VIEW_COLS})"
             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
             " ON CONFLICT (user_id) DO UPDATE SET person_id = excluded.person_id,"
             " active = excluded.active, username = excluded.username,"
             " display_name = excluded.display_name, email = excluded.email,"
             " title = excluded.title, department = excluded.department,"
             " location = excluded.location, manager_user_id = excluded.manager_user_id,"
             " groups = excluded.groups, updated_at = excluded.updated_at", changed, True),
        ])
        return len(gone) + len(changed)

    # -- per-component key/value ---------------------------------------------------------
    async def component_get(self, component: str, key: str) -> str | None:
        rows = await self.db.fetch(
            "SELECT value FROM component_kv WHERE component = ? AND key = ?", component, key)
        return rows[0][0] if rows else None

    async def component_put(self, component: str, key: str, value: str, now_ms: int) -> None:
        await self.db.batch([(
            "INSERT INTO component_kv (component, key, value, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (component, key) DO UPDATE SET value = excluded.value,"
            " updated_at = excluded.updated_at", (component, key, value, now_ms), False)])

    async def component_put_new(self, component: str, key: str, value: str,
                                now_ms: int) -> bool:
        counts = await self.db.batch([(
            "INSERT INTO component_kv (component, key, value, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (component, key) DO NOTHING", (component, key, value, now_ms),
            False)])
        return counts[0] == 1

    async def component_list(self, component: str, prefix: str = "") -> dict[str, str]:
        rows = await self.db.fetch(
            "SELECT key, value FROM component_kv WHERE component = ? AND substr(key, 1, ?) = ?"
            " ORDER BY key", component, len(prefix), prefix)
        return {r[0]: r[1] for r in rows}

    async def component_delete(self, component: str, key: str) -> bool:
        counts = await self.db.batch([(
            "DELETE FROM component_kv WHERE component = ? AND key = ?", (component, key),
            False)])
        return counts[0] == 1

    # -- SCIM --------------------------------------------------------------------------
    _SCIM_COLS = "resource_type, id, external_id, data, version, created_at, updated_at"

    async def scim_get(self, resource_type: str, resource_id: str) -> ScimResource | None:
        rows = await self.db.fetch(
            f"SELECT {self._SCIM_COLS} FROM scim_resources WHERE resource_type = ? AND id = ?",
            resource_type, resource_id)
        return ScimResource(*tuple(rows[0])) if rows else None

    async def scim_list(self, resource_type: str) -> list[ScimResource]:
        rows = await self.db.fetch(
            f"SELECT {self._SCIM_COLS} FROM scim_resources WHERE resource_type = ?"
            " ORDER BY id", resource_type)
        return [ScimResource(*tuple(r)) for r in rows]

    async def scim_put(self, resource: ScimResource) -> None:
        r = resource
        await self.db.batch([(
            f"INSERT INTO scim_resources ({self._SCIM_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (resource_type, id) DO UPDATE SET external_id = excluded.external_id,"
            " data = excluded.data, version = excluded.version,"
            " updated_at = excluded.updated_at",
            (r.resource_type, r.id, r.external_id, r.data, r.version, r.created_at,
             r.updated_at), False,
        )])

    async def scim_delete(self, resource_type: str, resource_id: str) -> bool:
        counts = await self.db.batch([(
            "DELETE FROM scim_resources WHERE resource_type = ? AND id = ?",
            (resource_type, resource_id), False,
        )])
        return counts[0] > 0

    # -- leases --------------------------------------------------------------------------
    async def acquire_lease(self, name: str, owner: str, now_ms: int, ttl_ms: int) -> bool:
        counts = await self.db.batch([(
            "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
            " expires_at = excluded.expires_at"
            " WHERE leases.owner = excluded.owner OR leases.expires_at <= ?",
            (name, owner, now_ms + ttl_ms, now_ms), False,
        )])
        return counts[0] == 1

    async def release_lease(self, name: str, owner: str) -> None:
        await self.db.batch([(
            "DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner), False)])

    async def lease_holder(self, name: str) -> tuple[str, int] | None:
        rows = await self.db.fetch("SELECT owner, expires_at FROM leases WHERE name = ?", name)
        return (rows[0][0], int(rows[0][1])) if rows else None

    async def take_over_lease(self, name: str, dead_owner: str, owner: str, now_ms: int,
                              ttl_ms: int) -> bool:
        counts = await self.db.batch([(
            "UPDATE leases SET owner = ?, expires_at = ? WHERE name = ? AND owner = ?",
            (owner, now_ms + ttl_ms, name, dead_owner), False)])
        return counts[0] == 1


    # -- retention -----------------------------------------------------------------------
    _AEV_COLS = ("event_id, room_id, sender, type, state_key, ts, segment, line, archived_at,"
                 " purged_at")
    _HEAD_COLS = "room_id, entries, head, segment, segment_bytes, updated_at"
    _MEDIA_COLS = ("mxc, sha256, size, content_type, room_id, event_id, ts, archived_at,"
                   " deleted_at")
    _HOLD_COLS = ("id, case_id, reason, placed_by, users, rooms, since_ms, until_ms,"
                  " created_at, released_at, released_by")
    _RROOM_COLS = ("room_id, room_class, override_ms, override_by, purged_up_to,"
                   " last_purge_at, notice_event_id, state_set_at, updated_at")
    # Rows per multi-row INSERT: a plain (not ``many``) step reports its row count on both
    # engines, and 500 x 10 parameters stays far below either engine's parameter limit.
    _CHUNK = 500

    def _head_step(self, head: ArchiveHead) -> Step:
        # Only forward: a head that is not past the stored one changes no row, and the
        # batch (require_first) then writes nothing.
        return (
            f"INSERT INTO archive_heads ({self._HEAD_COLS}) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (room_id) DO UPDATE SET entries = excluded.entries,"
            " head = excluded.head, segment = excluded.segment,"
            " segment_bytes = excluded.segment_bytes, updated_at = excluded.updated_at"
            " WHERE archive_heads.entries < excluded.entries",
            (head.room_id, head.entries, head.head, head.segment, head.segment_bytes,
             head.updated_at), False)

    async def _batch_with_head(self, head: ArchiveHead | None, steps: list[Step]) -> list[int]:
        if head is None:
            return await self.db.batch(steps) if steps else []
        counts = await self.db.batch([self._head_step(head), *steps], require_first=True)
        if counts[0] == 0:
            raise ArchiveConflict(
                f"archive head of {head.room_id} is already at or past entry {head.entries}")
        return counts[1:]

    async def archive_commit(self, events: Sequence[ArchivedEvent], head: ArchiveHead,
                             media: Sequence[ArchivedMedia] = ()) -> int:
        steps: list[Step] = []
        width = len(self._AEV_COLS.split(","))
        for i in range(0, len(events), self._CHUNK):
            chunk = events[i:i + self._CHUNK]
            values = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(chunk))
            args = [v for e in chunk for v in (
                e.event_id, e.room_id, e.sender, e.type, e.state_key, e.ts, e.segment, e.line,
                e.archived_at, e.purged_at)]
            steps.append((f"INSERT INTO archive_events ({self._AEV_COLS}) VALUES {values}"
                          " ON CONFLICT (event_id) DO NOTHING", args, False))
        inserted_steps = len(steps)
        if media:
            steps.append((
                f"INSERT INTO archive_media ({self._MEDIA_COLS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (mxc) DO NOTHING",
                [(m.mxc, m.sha256, m.size, m.content_type, m.room_id, m.event_id, m.ts,
                  m.archived_at, m.deleted_at) for m in media], True))
        counts = await self._batch_with_head(head, steps)
        return sum(counts[:inserted_steps])

    async def archive_known(self, event_ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(event_ids))
        out: set[str] = set()
        for i in range(0, len(ids), self._CHUNK):
            chunk = ids[i:i + self._CHUNK]
            rows = await self.db.fetch(
                "SELECT event_id FROM archive_events WHERE event_id IN ("
                + ", ".join("?" * len(chunk)) + ")", *chunk)
            out.update(r[0] for r in rows)
        return out

    async def archive_events_by_id(self, event_ids: Sequence[str]) -> list[ArchivedEvent]:
        ids = list(dict.fromkeys(event_ids))
        out: list[ArchivedEvent] = []
        for i in range(0, len(ids), self._CHUNK):
            chunk = ids[i:i + self._CHUNK]
            rows = await self.db.fetch(
                f"SELECT {self._AEV_COLS} FROM archive_events WHERE event_id IN ("
                + ", ".join("?" * len(chunk)) + ")", *chunk)
            out.extend(ArchivedEvent(*tuple(r)) for r in rows)
        out.sort(key=lambda e: (e.ts, e.segment, e.line, e.room_id))
        return out

    async def archive_head(self, room_id: str) -> ArchiveHead | None:
        rows = await self.db.fetch(
            f"SELECT {self._HEAD_COLS} FROM archive_heads WHERE room_id = ?", room_id)
        return ArchiveHead(*tuple(rows[0])) if rows else None

    async def archive_heads(self) -> list[ArchiveHead]:
        rows = await self.db.fetch(
            f"SELECT {self._HEAD_COLS} FROM archive_heads ORDER BY room_id")
        return [ArchiveHead(*tuple(r)) for r in rows]

    async def archive_query(
        self, *, room_id: str | None = None, senders: Sequence[str] | None = None,
        since_ms: int | None = None, until_ms: int | None = None,
        include_purged: bool = True,
        after: tuple[int, str, int] | tuple[int, str, int, str] | None = None,
        limit: int = 10000, archive_order: bool = False,
    ) -> list[ArchivedEvent]:
        if archive_order and room_id is None:
            raise ValueError("archive order is a room's order: give room_id")
        where: list[str] = []
        args: list[Any] = []
        if room_id is not None:
            where.append("room_id = ?")
            args.append(room_id)
        if senders is not None:
            if not senders:
                return []
            where.append("sender IN (" + ", ".join("?" * len(senders)) + ")")
            args.extend(senders)
        if since_ms is not None:
            where.append("ts >= ?")
            args.append(since_ms)
        if until_ms is not None:
            where.append("ts <= ?")
            args.append(until_ms)
        if not include_purged:
            where.append("purged_at IS NULL")
        if after is not None:
            # row values: SQLite >= 3.15 and PostgreSQL compare them lexicographically
            if archive_order:
                where.append("(segment, line) > (?, ?)")
                args.extend(after[1:3])
            elif len(after) == 4:
                where.append("(ts, segment, line, room_id) > (?, ?, ?, ?)")
            else:
                where.append("(ts, segment, line) > (?, ?, ?)")
            if not archive_order:
                args.extend(after)
        sql = f"SELECT {self._AEV_COLS} FROM archive_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        order = "segment, line" if archive_order else "ts, segment, line, room_id"
        rows = await self.db.fetch(sql + f" ORDER BY {order} LIMIT ?", *args, limit)
        return [ArchivedEvent(*tuple(r)) for r in rows]

    async def archive_timestamps(self, room_id: str, *, unpurged_only: bool = True,
                                 messages_only: bool = False) -> list[tuple[int, str | None]]:
        sql = "SELECT ts, sender FROM archive_events WHERE room_id = ?"
        if unpurged_only:
            sql += " AND purged_at IS NULL"
        if messages_only:
            sql += " AND state_key IS NULL"
        rows = await self.db.fetch(sql + " ORDER BY ts, segment, line", room_id)
        return [(int(r[0]), r[1]) for r in rows]

    async def archive_rooms(self) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT room_id, COUNT(*) FROM archive_events GROUP BY room_id ORDER BY room_id")
        return {r[0]: int(r[1]) for r in rows}

    async def archive_segments(self, room_id: str) -> list[tuple[str, int, int, int]]:
        rows = await self.db.fetch(
            "SELECT segment, COUNT(*), MIN(ts), MAX(ts) FROM archive_events"
            " WHERE room_id = ? GROUP BY segment ORDER BY segment", room_id)
        return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def archive_mark_purged(self, room_id: str, up_to_ts: int, now_ms: int) -> int:
        counts = await self.db.batch([(
            "UPDATE archive_events SET purged_at = ?"
            " WHERE room_id = ? AND ts < ? AND purged_at IS NULL AND state_key IS NULL",
            (now_ms, room_id, up_to_ts), False)])
        return counts[0]

    async def archive_mark_gone(self, room_id: str, event_ids: Sequence[str],
                                now_ms: int) -> int:
        if not event_ids:
            return 0
        marks = ", ".join("?" * len(event_ids))
        counts = await self.db.batch([(
            "UPDATE archive_events SET purged_at = ? WHERE room_id = ? AND event_id IN "
            f"({marks}) AND purged_at IS NULL AND state_key IS NULL",
            (now_ms, room_id, *event_ids), False)])
        return counts[0]

    async def archive_drop_segment(self, room_id: str, segment: str,
                                   head: ArchiveHead | None = None) -> int:
        counts = await self._batch_with_head(head, [(
            "DELETE FROM archive_events WHERE room_id = ? AND segment = ?",
            (room_id, segment), False)])
        return counts[0]

    async def archive_media_get(self, mxc: str) -> ArchivedMedia | None:
        rows = await self.db.fetch(
            f"SELECT {self._MEDIA_COLS} FROM archive_media WHERE mxc = ?", mxc)
        return ArchivedMedia(*tuple(rows[0])) if rows else None

    async def archive_media_list(self, room_id: str | None = None, *,
                                 sha256: str | None = None) -> list[ArchivedMedia]:
        where, args = [], []
        for col, val in (("room_id", room_id), ("sha256", sha256)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {self._MEDIA_COLS} FROM archive_media"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self.db.fetch(sql + " ORDER BY ts, mxc", *args)
        return [ArchivedMedia(*tuple(r)) for r in rows]

    async def archive_media_mark_deleted(self, mxcs: Sequence[str], now_ms: int) -> None:
        if mxcs:
            await self.db.batch([(
                "UPDATE archive_media SET deleted_at = ? WHERE mxc = ? AND deleted_at IS NULL",
                [(now_ms, m) for m in mxcs], True)])

    @staticmethod
    def _hold_from_row(row: tuple[Any, ...]) -> HoldRecord:
        return HoldRecord(
            id=row[0], case_id=row[1], reason=row[2], placed_by=row[3],
            users=tuple(orjson.loads(row[4])), rooms=tuple(orjson.loads(row[5])),
            since_ms=row[6], until_ms=row[7], created_at=row[8], released_at=row[9],
            released_by=row[10])

    async def hold_add(self, hold: HoldRecord, audit: AuditRecord) -> bool:
        h = hold
        counts = await self.db.batch([
            (f"INSERT INTO legal_holds ({self._HOLD_COLS})"
             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
             (h.id, h.case_id, h.reason, h.placed_by, orjson.dumps(list(h.users)).decode(),
              orjson.dumps(list(h.rooms)).decode(), h.since_ms, h.until_ms, h.created_at,
              h.released_at, h.released_by), False),
            (f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             _audit_row(audit), False),
        ], require_first=True)
        return counts[0] == 1

    async def hold_release(self, hold_id: str, by: str, now_ms: int,
                           audit: AuditRecord) -> bool:
        counts = await self.db.batch([
            ("UPDATE legal_holds SET released_at = ?, released_by = ?"
             " WHERE id = ? AND released_at IS NULL", (now_ms, by, hold_id), False),
            (f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             _audit_row(audit), False),
        ], require_first=True)
        return counts[0] == 1

    async def holds(self, *, include_released: bool = False) -> list[HoldRecord]:
        sql = f"SELECT {self._HOLD_COLS} FROM legal_holds"
        if not include_released:
            sql += " WHERE released_at IS NULL"
        rows = await self.db.fetch(sql + " ORDER BY created_at, id")
        return [self._hold_from_row(tuple(r)) for r in rows]

    async def hold_get(self, hold_id: str) -> HoldRecord | None:
        rows = await self.db.fetch(
            f"SELECT {self._HOLD_COLS} FROM legal_holds WHERE id = ?", hold_id)
        return self._hold_from_row(tuple(rows[0])) if rows else None

    async def retention_room_get(self, room_id: str) -> RetentionRoom | None:
        rows = await self.db.fetch(
            f"SELECT {self._RROOM_COLS} FROM retention_rooms WHERE room_id = ?", room_id)
        return RetentionRoom(*tuple(rows[0])) if rows else None

    async def retention_room_put(self, room: RetentionRoom) -> None:
        r = room
        await self.db.batch([(
            f"INSERT INTO retention_rooms ({self._RROOM_COLS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (room_id) DO UPDATE SET room_class = excluded.room_class,"
            " override_ms = excluded.override_ms, override_by = excluded.override_by,"
            " purged_up_to = excluded.purged_up_to, last_purge_at = excluded.last_purge_at,"
            " notice_event_id = excluded.notice_event_id,"
            " state_set_at = excluded.state_set_at, updated_at = excluded.updated_at",
            (r.room_id, r.room_class, r.override_ms, r.override_by, r.purged_up_to,
             r.last_purge_at, r.notice_event_id, r.state_set_at, r.updated_at), False)])

    async def retention_rooms(self) -> list[RetentionRoom]:
        rows = await self.db.fetch(
            f"SELECT {self._RROOM_COLS} FROM retention_rooms ORDER BY room_id")
        return [RetentionRoom(*tuple(r)) for r in rows]


# PostgreSQL: the ingest write as ONE statement. The inbox rows go in array order (their
# seq follows the transaction's order) and only if the transaction id is new.
_PG_SAVE_TRANSACTION = """
WITH t AS (
    INSERT INTO transactions (txn_id, received_at, event_count, quarantined)
    VALUES ($1, $2, $3, $4) ON CONFLICT (txn_id) DO NOTHING RETURNING 1
), e AS (
    INSERT INTO inbox (txn_id, event_id, room_id, kind, type, sender, origin_server_ts, body,
                       received_at)
    SELECT $1, u.event_id, u.room_id, u.kind, u.type, u.sender, u.ts, u.body, $2
    FROM unnest($5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[],
                $11::text[]) WITH ORDINALITY AS u(event_id, room_id, kind, type, sender, ts,
                                                  body, n)
    WHERE EXISTS (SELECT 1 FROM t)
    ORDER BY u.n
    ON CONFLICT DO NOTHING
), q AS (
    INSERT INTO quarantine (txn_id, position, section, reason, raw, received_at)
    SELECT $1, v.position, v.section, v.reason, v.raw, $2
    FROM unnest($12::integer[], $13::text[], $14::text[], $15::text[])
         WITH ORDINALITY AS v(position, section, reason, raw, n)
    WHERE EXISTS (SELECT 1 FROM t)
    ORDER BY v.n
)
SELECT EXISTS (SELECT 1 FROM t)
"""

# PostgreSQL: mark events done and write their actions (in order) in one statement.
_PG_COMPLETE_EVENTS = """
WITH d AS (
    UPDATE inbox SET status = 'done', done_at = $1, last_error = NULL
    WHERE seq = ANY($2::bigint[]) AND status = 'pending'
    RETURNING 1
), a AS (
    INSERT INTO actions (event_seq, position, lane, kind, payload, rule_id, reason, created_at)
    SELECT u.event_seq, u.position, u.lane, u.kind, u.payload, u.rule_id, u.reason, $1
    FROM unnest($3::bigint[], $4::integer[], $5::text[], $6::text[], $7::text[], $8::text[],
                $9::text[]) WITH ORDINALITY AS u(event_seq, position, lane, kind, payload,
                                                 rule_id, reason, n)
    ORDER BY u.n
    ON CONFLICT DO NOTHING
)
SELECT COUNT(*) FROM d
"""

"""The transaction journal (:class:`~bridge.store.domains.JournalStore`): raw transaction
bodies, committed before the homeserver is answered. On SQLite it lives in its own file
(``journal_db`` of the shared database), so that answer never waits behind the inbox's
writes; on PostgreSQL it is a table of the one database, and a NOTIFY wakes the leader."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .base import JournalEntry
from .db import Database, PostgresDatabase
from .shared import SharedDatabase

log = logging.getLogger(__name__)

# PostgreSQL NOTIFY channel: a transaction was journaled (by any replica)
JOURNAL_CHANNEL = "enclave_journal"


async def journal_stats(journal_db: Database) -> tuple[int, int | None]:
    """(entries waiting, oldest receive time in ms) of the journal on ``journal_db``."""
    (row,) = await journal_db.fetch("SELECT COUNT(*), MIN(received_at) FROM txn_journal")
    return int(row[0]), row[1]


class SQLJournalStore:
    """The journal, on the shared database's journal (its own SQLite file, or the one
    PostgreSQL database)."""

    def __init__(self, shared: SharedDatabase):
        self.journal_db = shared.journal_db

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
            return _stop_nothing
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
        return await journal_stats(self.journal_db)


async def _stop_nothing() -> None:
    """Nothing to stop: one process writes a SQLite store, nobody else journals."""

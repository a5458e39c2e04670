"""The audit log read as a feed (:class:`~bridge.store.domains.AuditFeedStore`): what the
audit stream sends to syslog and files, and the hook that tells it a record was written."""

from __future__ import annotations

from collections.abc import Callable

from .audit import AUDIT_INSERT
from .base import AuditEntry, AuditFeedPage, AuditRecord
from .shared import SharedDatabase

_FEED_COLS = ("id, ts, source, actor, kind, user_id, room_id, rule_id, reason, outcome, "
              "detail")


class SQLAuditFeedStore:
    """The audit feed, on the shared database."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    def watch_audit(self, on_write: Callable[[], None]) -> Callable[[], None]:
        return self.db.on_commit(AUDIT_INSERT, on_write)

    async def audit_feed(self, after_id: int, limit: int) -> AuditFeedPage:
        rows_sql = (f"SELECT {_FEED_COLS} FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit))
        if self.db.dialect == "postgres":
            # one snapshot for the horizon and the rows (repeatable read): a row missing
            # from this read was not committed before the snapshot's xmax
            snap, rows = await self.db.fetch_many([
                ("SELECT pg_snapshot_xmin(pg_current_snapshot())::text, "
                 "pg_snapshot_xmax(pg_current_snapshot())::text", ()),
                rows_sql])
            horizon: tuple[int, int] | None = (int(snap[0][0]), int(snap[0][1]))
        else:
            rows = await self.db.fetch(*rows_sql[:1], *rows_sql[1])
            horizon = None
        entries = tuple(
            AuditEntry(int(r[0]), AuditRecord(
                ts=r[1], source=r[2], actor=r[3], kind=r[4], user_id=r[5], room_id=r[6],
                rule_id=r[7], reason=r[8], outcome=r[9], detail=r[10]))
            for r in rows)
        return AuditFeedPage(entries, horizon)

    async def audit_last_id(self) -> int:
        (row,) = await self.db.fetch("SELECT COALESCE(MAX(id), 0) FROM audit")
        return int(row[0])

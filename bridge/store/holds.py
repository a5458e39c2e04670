"""Legal holds (:class:`~bridge.store.domains.HoldStore`)."""

from __future__ import annotations

from typing import Any

import orjson

from .audit import audit_step
from .base import AuditRecord, HoldRecord
from .shared import SharedDatabase


class SQLHoldStore:
    """Legal holds, on the shared database; placing and releasing one is audited in the
    same commit."""

    _HOLD_COLS = ("id, case_id, reason, placed_by, users, rooms, since_ms, until_ms,"
                  " created_at, released_at, released_by")

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

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
            audit_step(audit),
        ], require_first=True)
        return counts[0] == 1

    async def hold_release(self, hold_id: str, by: str, now_ms: int,
                           audit: AuditRecord) -> bool:
        counts = await self.db.batch([
            ("UPDATE legal_holds SET released_at = ?, released_by = ?"
             " WHERE id = ? AND released_at IS NULL", (now_ms, by, hold_id), False),
            audit_step(audit),
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


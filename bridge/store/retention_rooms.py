"""Per-room retention state (:class:`~bridge.store.domains.RetentionRoomStore`)."""

from __future__ import annotations

from .base import RetentionRoom
from .shared import SharedDatabase


class SQLRetentionRoomStore:
    """Per-room retention state, on the shared database."""

    _RROOM_COLS = ("room_id, room_class, override_ms, override_by, purged_up_to,"
                   " last_purge_at, notice_event_id, state_set_at, updated_at")

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

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

    async def retention_rooms(self, limit: int | None = None) -> list[RetentionRoom]:
        sql = f"SELECT {self._RROOM_COLS} FROM retention_rooms ORDER BY room_id"
        if limit is not None:
            rows = await self.db.fetch(sql + " LIMIT ?", limit)
        else:
            rows = await self.db.fetch(sql)
        return [RetentionRoom(*tuple(r)) for r in rows]

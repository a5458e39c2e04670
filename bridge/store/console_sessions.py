"""The console's sign-in sessions (:class:`~bridge.store.domains.ConsoleSessionStore`)."""

from __future__ import annotations

from typing import Any

from .base import ConsoleSession
from .shared import SharedDatabase

_COLS = "id_hash, user_id, roles, csrf, created_at, last_seen"


def _from_row(r: tuple[Any, ...]) -> ConsoleSession:
    return ConsoleSession(id_hash=r[0], user_id=r[1],
                          roles=tuple(x for x in r[2].split(",") if x), csrf=r[3],
                          created_at=r[4], last_seen=r[5])


class SQLConsoleSessionStore:
    """Console sessions, on the shared database (every replica sees every session)."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    async def session_create(self, session: ConsoleSession) -> None:
        s = session
        await self.db.batch([(
            f"INSERT INTO console_sessions ({_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
            (s.id_hash, s.user_id, ",".join(s.roles), s.csrf, s.created_at, s.last_seen),
            False)])

    async def session_get(self, id_hash: str) -> ConsoleSession | None:
        rows = await self.db.fetch(
            f"SELECT {_COLS} FROM console_sessions WHERE id_hash = ?", id_hash)
        return _from_row(tuple(rows[0])) if rows else None

    async def session_touch(self, id_hash: str, now_ms: int, roles: tuple[str, ...]) -> bool:
        """Record a request (the idle timeout restarts) and the roles re-decided for it."""
        counts = await self.db.batch([(
            "UPDATE console_sessions SET last_seen = ?, roles = ? WHERE id_hash = ?",
            (now_ms, ",".join(roles), id_hash), False)])
        return counts[0] == 1

    async def session_delete(self, id_hash: str) -> bool:
        counts = await self.db.batch([(
            "DELETE FROM console_sessions WHERE id_hash = ?", (id_hash,), False)])
        return counts[0] == 1

    async def sessions_expire(self, seen_before_ms: int) -> int:
        """Drop sessions idle since before ``seen_before_ms``; how many went."""
        counts = await self.db.batch([(
            "DELETE FROM console_sessions WHERE last_seen < ?", (seen_before_ms,), False)],
            urgent=False)
        return counts[0]

    async def sessions_of(self, user_id: str) -> list[ConsoleSession]:
        rows = await self.db.fetch(
            f"SELECT {_COLS} FROM console_sessions WHERE user_id = ? ORDER BY created_at",
            user_id)
        return [_from_row(tuple(r)) for r in rows]

"""The archive device's capture gaps (``capture_gaps``, bots migration 3): encrypted
messages it could not decrypt yet, kept until the plaintext is archived."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bridge.store.audit import audit_steps
from bridge.store.base import AuditRecord
from bridge.store.db import Database


@dataclass(frozen=True)
class CaptureGap:
    """One encrypted message not (yet) archived as plaintext, and why."""

    event_id: str
    room_id: str
    sender: str | None
    session_id: str | None
    sender_key: str | None
    reason: str
    event_json: str
    first_seen: int
    attempts: int = 0
    last_attempt: int | None = None
    key_requested_at: int | None = None
    recovered_at: int | None = None

    @property
    def event(self) -> dict[str, Any]:
        """The ciphertext event as it arrived."""
        out = json.loads(self.event_json)
        return out if isinstance(out, dict) else {}

    @property
    def open(self) -> bool:
        return self.recovered_at is None


class CaptureGapStore:
    """Gaps by event id; opening and recovering one is audited in the same commit."""

    _COLS = ("event_id, room_id, sender, session_id, sender_key, reason, event_json,"
             " first_seen, attempts, last_attempt, key_requested_at, recovered_at")

    def __init__(self, db: Database):
        self.db = db

    async def open_gap(self, gap: CaptureGap, *, audit: AuditRecord | None = None) -> bool:
        """Record a gap once (True: new; a repeat only updates its reason)."""
        g = gap
        counts = await self.db.batch([
            (f"INSERT INTO capture_gaps ({self._COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
             " ?, ?) ON CONFLICT (event_id) DO NOTHING",
             (g.event_id, g.room_id, g.sender, g.session_id, g.sender_key, g.reason,
              g.event_json, g.first_seen, g.attempts, g.last_attempt, g.key_requested_at,
              None), False),
            *audit_steps([audit] if audit is not None else [])], require_first=True)
        if counts[0] == 1:
            return True
        await self.set_reason(g.event_id, g.reason)
        return False

    async def set_reason(self, event_id: str, reason: str) -> None:
        await self.db.batch([("UPDATE capture_gaps SET reason = ? WHERE event_id = ?"
                              " AND recovered_at IS NULL", (reason, event_id), False)])

    async def set_reason_for_session(self, session_id: str, reason: str) -> int:
        """A withheld notice for a session: every open gap of it says so."""
        counts = await self.db.batch([(
            "UPDATE capture_gaps SET reason = ? WHERE session_id = ? AND recovered_at IS NULL",
            (reason, session_id), False)])
        return counts[0]

    async def attempted(self, event_id: str, now_ms: int, *, key_requested: bool) -> None:
        extra = ", key_requested_at = ?" if key_requested else ""
        args: tuple[Any, ...] = (now_ms, now_ms) if key_requested else (now_ms,)
        await self.db.batch([(
            f"UPDATE capture_gaps SET attempts = attempts + 1, last_attempt = ?{extra}"
            " WHERE event_id = ?", (*args, event_id), False)])

    async def recovered(self, event_id: str, now_ms: int, *,
                        audit: AuditRecord | None = None) -> bool:
        """Mark a gap recovered (the plaintext is archived); True if it was open."""
        counts = await self.db.batch([
            ("UPDATE capture_gaps SET recovered_at = ? WHERE event_id = ?"
             " AND recovered_at IS NULL", (now_ms, event_id), False),
            *audit_steps([audit] if audit is not None else [])], require_first=True)
        return counts[0] == 1

    async def gaps(self, *, open_only: bool = True, room_id: str | None = None,
                   session_id: str | None = None) -> list[CaptureGap]:
        """Gaps (open ones only by default), oldest first."""
        where, args = [], []
        if open_only:
            where.append("recovered_at IS NULL")
        if room_id is not None:
            where.append("room_id = ?")
            args.append(room_id)
        if session_id is not None:
            where.append("session_id = ?")
            args.append(session_id)
        sql = f"SELECT {self._COLS} FROM capture_gaps"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self.db.fetch(sql + " ORDER BY first_seen, event_id", *args)
        return [CaptureGap(*tuple(r)) for r in rows]

    async def gap(self, event_id: str) -> CaptureGap | None:
        rows = await self.db.fetch(f"SELECT {self._COLS} FROM capture_gaps WHERE event_id = ?",
                                   event_id)
        return CaptureGap(*tuple(rows[0])) if rows else None

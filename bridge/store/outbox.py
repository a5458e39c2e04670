"""The action outbox (:class:`~bridge.store.domains.OutboxStore`): actions decided (by
:meth:`~bridge.store.domains.InboxStore.complete_events`) and not yet applied."""

from __future__ import annotations

from .audit import audit_step
from .base import AuditRecord, StoredAction
from .db import Step
from .shared import SharedDatabase


class SQLOutboxStore:
    """The outbox, on the shared database."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    async def last_action_id(self) -> int:
        rows = await self.db.fetch("SELECT MAX(id) FROM actions")
        return int(rows[0][0] or 0)

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
            steps.append(audit_step(audit))
        await self.db.batch(steps)


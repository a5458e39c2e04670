"""The durable inbox (:class:`~bridge.store.domains.InboxStore`): transactions expanded
into events, processed once in order per room, retried, parked; and the quarantine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .audit import AUDIT_INSERT, audit_row, audit_step
from .base import AuditRecord, InboxEvent, NewEvent, QuarantinedEvent
from .db import PostgresDatabase, Step
from .journal import journal_stats
from .shared import SharedDatabase


class SQLInboxStore:
    """The inbox, on the shared database (its stats count the journal's waiting entries
    too: not yet expanded, they wait all the same)."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db
        self.journal_db = shared.journal_db

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
                AUDIT_INSERT, *audit_row(audit))
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
            steps.append(audit_step(audit))
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
        journaled, journal_oldest = await journal_stats(self.journal_db)
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

"""The audit log (:class:`~bridge.store.domains.AuditStore`), and the audit write other
stores add to the transaction of their own writes (an inbox event parked, an action
finished, a hold placed: the record commits with the change or not at all)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import AuditFilter, AuditRecord, AuditSearch
from .db import Step
from .shared import SharedDatabase

_AUDIT_COLS = "ts, source, actor, kind, user_id, room_id, rule_id, reason, outcome, detail"
AUDIT_INSERT = f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def audit_row(r: AuditRecord) -> tuple[Any, ...]:
    """The values of :data:`AUDIT_INSERT` for one record."""
    return (r.ts, r.source, r.actor, r.kind, r.user_id, r.room_id, r.rule_id, r.reason,
            r.outcome, r.detail)


def audit_step(record: AuditRecord) -> Step:
    """The batch step that writes one audit record."""
    return (AUDIT_INSERT, audit_row(record), False)


def audit_steps(records: Sequence[AuditRecord]) -> list[Step]:
    """The batch step that writes ``records`` to the audit log: for stores on the same
    database (extensions) that audit in the transaction of their own writes."""
    if not records:
        return []
    return [(AUDIT_INSERT, [audit_row(a) for a in records], True)]


class SQLAuditStore:
    """The audit log, on the shared database."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    async def add_audit(self, record: AuditRecord) -> None:
        await self.db.batch([audit_step(record)])

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


    async def audit_page(self, search: AuditSearch) -> list[dict[str, Any]]:
        """One page of the audit log, newest first (``ts`` then ``id`` descending; keyset:
        rows before ``(before_ts, before_id)``); every filter column leads one of migration
        008's ``(column, ts, id)`` indexes."""
        where, args = [], []
        for col, op, val in (
            ("ts", ">=", search.since_ms), ("ts", "<", search.until_ms),
            ("user_id", "=", search.user_id), ("room_id", "=", search.room_id),
            ("rule_id", "=", search.rule_id), ("outcome", "=", search.outcome),
            ("actor", "=", search.actor),
        ):
            if val is not None:
                where.append(f"{col} {op} ?")
                args.append(val)
        if search.before_ts is not None and search.before_id is not None:
            where.append("(ts, id) < (?, ?)")
            args += [search.before_ts, search.before_id]
        sql = f"SELECT id, {_AUDIT_COLS} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts DESC, id DESC LIMIT ?"
        rows = await self.db.fetch(sql, *args, search.limit)
        keys = ("id", *(k.strip() for k in _AUDIT_COLS.split(",")))
        return [dict(zip(keys, tuple(r), strict=True)) for r in rows]

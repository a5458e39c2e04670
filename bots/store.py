"""The bots' own store: the announcement bot's tables, on Enclave's database.

Its schema is the bots' own (``bots/migrations``, component ``bots``): Enclave's core
store knows nothing of it. Writes that are audited put the audit record in the same
transaction (``bridge.store.audit.audit_steps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from bridge.extension import MigrationSet
from bridge.store.audit import audit_steps
from bridge.store.base import AuditRecord
from bridge.store.db import Database, Step

# the bots' schema; adopted: what Enclave's own migrations 5 and 7 made before the bots
# became an extension (a database made by that release keeps its tables and rows)
MIGRATIONS = MigrationSet(
    component="bots", folder=resources.files("bots") / "migrations",
    adopted=((1, "announcement_occurrences", None),
             (2, "announcement_deliveries", "reminder_failures")))


@dataclass(frozen=True)
class AnnouncementOccurrence:
    """One send of an announcement (a scheduled time, a manual/ad-hoc send, a webhook).

    ``spec`` is the announcement as JSON when the occurrence was made; ``status`` is
    ``pending`` (made, nothing sent), ``delivering``, ``delivered`` or ``closed`` (expired,
    or nothing left to follow up)."""

    announcement_id: str
    occurrence_id: str
    kind: str
    spec: str
    status: str
    scheduled_at: int
    created_at: int
    created_by: str | None = None
    delivered_at: int | None = None
    closed_at: int | None = None


@dataclass(frozen=True)
class AnnouncementDelivery:
    """One target of an occurrence: a person (``@…``) or an explicit room (``!…``).

    ``status``: ``pending``, ``sent`` or ``failed`` (``detail`` says why)."""

    announcement_id: str
    occurrence_id: str
    target: str
    status: str
    room_id: str | None = None
    event_id: str | None = None
    detail: str | None = None
    attempts: int = 0
    sent_at: int | None = None
    acked_at: int | None = None
    ack_method: str | None = None
    ack_event_id: str | None = None
    reminders: int = 0
    last_reminder_at: int | None = None
    escalated_at: int | None = None
    escalated_to: str | None = None
    reminder_failures: int = 0  # reminders whose send failed (not in ``reminders``)
    reminder_error: str | None = None  # why the last failed reminder failed
    escalation_error: str | None = None  # the escalation's message failed: why

    @property
    def escalated(self) -> bool:
        """The manager was told: the homeserver accepted the escalation message."""
        return (self.escalated_at is not None and self.escalated_to is not None
                and self.escalation_error is None)

    @property
    def reminder_slots(self) -> int:
        """Reminders tried so far, accepted or failed: the position in the schedule."""
        return self.reminders + self.reminder_failures


@dataclass(frozen=True)
class AnnouncementMessage:
    """A message the announcement bot sent; ``kind``: announcement, reminder, escalation."""

    event_id: str
    room_id: str
    announcement_id: str
    occurrence_id: str
    kind: str
    target: str | None
    sent_at: int


class AnnouncementStore:
    """Occurrences, deliveries and sent messages of the announcement bot."""

    def __init__(self, db: Database):
        self.db = db

    _OCC_COLS = ("announcement_id, occurrence_id, kind, spec, status, scheduled_at,"
                 " created_at, created_by, delivered_at, closed_at")
    _DEL_COLS = ("announcement_id, occurrence_id, target, status, room_id, event_id, detail,"
                 " attempts, sent_at, acked_at, ack_method, ack_event_id, reminders,"
                 " last_reminder_at, escalated_at, escalated_to, reminder_failures,"
                 " reminder_error, escalation_error")
    _MSG_COLS = "event_id, room_id, announcement_id, occurrence_id, kind, target, sent_at"
    _INSERT_MSG = (f"INSERT INTO announcement_messages ({_MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
                   " ON CONFLICT (event_id) DO NOTHING")

    @staticmethod
    def _msg_row(m: AnnouncementMessage) -> tuple[Any, ...]:
        return (m.event_id, m.room_id, m.announcement_id, m.occurrence_id, m.kind, m.target,
                m.sent_at)

    def _msg_steps(self, message: AnnouncementMessage | None,
                   audit: Sequence[AuditRecord]) -> list[Step]:
        steps: list[Step] = []
        if message is not None:
            steps.append((self._INSERT_MSG, self._msg_row(message), False))
        # audited in the same transaction as the write it records
        return steps + audit_steps(audit)

    async def announcement_create(self, occ: AnnouncementOccurrence,
                                  targets: Sequence[str], *,
                                  audit: Sequence[AuditRecord] = ()) -> bool:
        """Insert an occurrence, a pending delivery per target and ``audit`` in one commit,
        only if the occurrence id is new; True if this call inserted it (the once-only
        guard)."""
        o = occ
        steps: list[Step] = [
            (f"INSERT INTO announcement_occurrences ({self._OCC_COLS})"
             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
             " ON CONFLICT (announcement_id, occurrence_id) DO NOTHING",
             (o.announcement_id, o.occurrence_id, o.kind, o.spec, o.status, o.scheduled_at,
              o.created_at, o.created_by, o.delivered_at, o.closed_at), False)]
        if targets:
            steps.append((
                "INSERT INTO announcement_deliveries (announcement_id, occurrence_id, target,"
                " status, attempts, reminders) VALUES (?, ?, ?, 'pending', 0, 0)"
                " ON CONFLICT DO NOTHING",
                [(o.announcement_id, o.occurrence_id, t) for t in dict.fromkeys(targets)],
                True))
        # require_first: a repeat inserts nothing, and audits nothing
        counts = await self.db.batch(steps + audit_steps(audit), require_first=True)
        return counts[0] == 1

    async def announcement_occurrence(self, announcement_id: str,
                                      occurrence_id: str) -> AnnouncementOccurrence | None:
        """One occurrence, or None."""
        rows = await self.db.fetch(
            f"SELECT {self._OCC_COLS} FROM announcement_occurrences"
            " WHERE announcement_id = ? AND occurrence_id = ?", announcement_id, occurrence_id)
        return AnnouncementOccurrence(*tuple(rows[0])) if rows else None

    async def announcement_occurrences(
        self, *, announcement_id: str | None = None, statuses: Sequence[str] | None = None,
    ) -> list[AnnouncementOccurrence]:
        """Occurrences (of one announcement, with one of ``statuses``), oldest first."""
        where, args = [], []
        if announcement_id is not None:
            where.append("announcement_id = ?")
            args.append(announcement_id)
        if statuses:
            where.append("status IN (" + ", ".join("?" for _ in statuses) + ")")
            args.extend(statuses)
        sql = f"SELECT {self._OCC_COLS} FROM announcement_occurrences"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self.db.fetch(sql + " ORDER BY created_at, occurrence_id", *args)
        return [AnnouncementOccurrence(*tuple(r)) for r in rows]

    async def announcement_set_status(self, announcement_id: str, occurrence_id: str,
                                      status: str, now_ms: int) -> None:
        """Move an occurrence to ``status`` (``delivered``/``closed`` stamp their time)."""
        stamp = {"delivered": ", delivered_at = COALESCE(delivered_at, ?)",
                 "closed": ", closed_at = COALESCE(closed_at, ?)"}.get(status, "")
        args: tuple[Any, ...] = (status, now_ms) if stamp else (status,)
        await self.db.batch([(
            f"UPDATE announcement_occurrences SET status = ?{stamp}"
            " WHERE announcement_id = ? AND occurrence_id = ?",
            (*args, announcement_id, occurrence_id), False)])

    async def announcement_deliveries(
        self, announcement_id: str, occurrence_id: str, *, status: str | None = None,
    ) -> list[AnnouncementDelivery]:
        """The occurrence's targets (with ``status``), in target order."""
        sql = (f"SELECT {self._DEL_COLS} FROM announcement_deliveries"
               " WHERE announcement_id = ? AND occurrence_id = ?")
        args: list[Any] = [announcement_id, occurrence_id]
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        rows = await self.db.fetch(sql + " ORDER BY target", *args)
        return [AnnouncementDelivery(*tuple(r)) for r in rows]

    async def announcement_add_targets(
        self, announcement_id: str, occurrence_id: str, targets: Sequence[str], *,
        status: str, room_id: str | None, event_id: str | None, now_ms: int,
    ) -> None:
        """Add targets that are not there yet (members of an explicit room, found when
        it is sent to), with the given status."""
        if not targets:
            return
        sent_at = now_ms if status == "sent" else None
        await self.db.batch([(
            "INSERT INTO announcement_deliveries (announcement_id, occurrence_id, target,"
            " status, room_id, event_id, attempts, sent_at, reminders)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, ?, 0) ON CONFLICT DO NOTHING",
            [(announcement_id, occurrence_id, t, status, room_id, event_id, sent_at)
             for t in dict.fromkeys(targets)], True)])

    async def announcement_mark_sent(
        self, announcement_id: str, occurrence_id: str, targets: Sequence[str], *,
        room_id: str, event_id: str, now_ms: int, message: AnnouncementMessage | None,
        audit: Sequence[AuditRecord] = (),
    ) -> None:
        """Targets delivered by ``event_id`` in ``room_id``; the message and the audit
        records are written in the same commit."""
        if not targets and message is None and not audit:
            return
        steps: list[Step] = [(
            "UPDATE announcement_deliveries SET status = 'sent', room_id = ?, event_id = ?,"
            " detail = NULL, attempts = attempts + 1, sent_at = ?"
            " WHERE announcement_id = ? AND occurrence_id = ? AND target = ?",
            [(room_id, event_id, now_ms, announcement_id, occurrence_id, t) for t in targets],
            True)] if targets else []
        await self.db.batch(steps + self._msg_steps(message, audit))

    async def announcement_mark_failed(
        self, announcement_id: str, occurrence_id: str, targets: Sequence[str], *,
        detail: str, final: bool, audit: Sequence[AuditRecord] = (),
    ) -> None:
        """Count a failed attempt; ``final`` makes the targets ``failed`` (else they stay
        pending for the next pass)."""
        if not targets:
            return
        status = "failed" if final else "pending"
        steps: list[Step] = [(
            "UPDATE announcement_deliveries SET status = ?, detail = ?,"
            " attempts = attempts + 1"
            " WHERE announcement_id = ? AND occurrence_id = ? AND target = ?"
            " AND status <> 'sent'",
            [(status, detail, announcement_id, occurrence_id, t) for t in targets], True)]
        await self.db.batch(steps + self._msg_steps(None, audit))

    async def announcement_record_ack(
        self, announcement_id: str, occurrence_id: str, user_id: str, *, at_ms: int,
        method: str, event_id: str | None, room_id: str | None = None,
    ) -> bool:
        """Record the first acknowledgement of ``user_id``; True if this call recorded it.

        A member of an explicit target room has no row yet: ``room_id`` adds one."""
        steps: list[Step] = []
        if room_id is not None:
            steps.append((
                "INSERT INTO announcement_deliveries (announcement_id, occurrence_id, target,"
                " status, room_id, attempts, reminders) VALUES (?, ?, ?, 'sent', ?, 0, 0)"
                " ON CONFLICT DO NOTHING",
                (announcement_id, occurrence_id, user_id, room_id), False))
        steps.append((
            "UPDATE announcement_deliveries SET acked_at = ?, ack_method = ?, ack_event_id = ?"
            " WHERE announcement_id = ? AND occurrence_id = ? AND target = ?"
            " AND acked_at IS NULL",
            (at_ms, method, event_id, announcement_id, occurrence_id, user_id), False))
        counts = await self.db.batch(steps)
        return counts[-1] == 1

    async def announcement_mark_reminded(
        self, announcement_id: str, occurrence_id: str, user_id: str, *, count: int,
        now_ms: int, message: AnnouncementMessage | None, audit: AuditRecord | None,
        error: str | None = None,
    ) -> None:
        """Reminder number ``count`` (its slot in the schedule) was sent to the person:
        accepted by the homeserver (``error`` None, counted in ``reminders``) or failed
        (counted in ``reminder_failures`` with ``error``). A repeat of a slot is ignored."""
        counter = "reminders" if error is None else "reminder_failures"
        steps: list[Step] = [(
            f"UPDATE announcement_deliveries SET {counter} = {counter} + 1,"
            " last_reminder_at = ?, reminder_error = COALESCE(?, reminder_error)"
            " WHERE announcement_id = ? AND occurrence_id = ? AND target = ?"
            " AND reminders + reminder_failures < ?",
            (now_ms, error, announcement_id, occurrence_id, user_id, count), False)]
        await self.db.batch(steps + self._msg_steps(message, [audit] if audit else []))

    async def announcement_mark_escalated(
        self, announcement_id: str, occurrence_id: str, user_id: str, *,
        manager: str | None, now_ms: int, message: AnnouncementMessage | None,
        audit: AuditRecord | None, error: str | None = None,
    ) -> None:
        """The person's escalation is done: the manager was told (``manager`` None: there
        was nobody to tell; ``error``: the message to the manager failed, and why)."""
        steps: list[Step] = [(
            "UPDATE announcement_deliveries SET escalated_at = ?, escalated_to = ?,"
            " escalation_error = ?"
            " WHERE announcement_id = ? AND occurrence_id = ? AND target = ?"
            " AND escalated_at IS NULL",
            (now_ms, manager, error, announcement_id, occurrence_id, user_id), False)]
        await self.db.batch(steps + self._msg_steps(message, [audit] if audit else []))

    async def announcement_save_message(self, message: AnnouncementMessage) -> None:
        """Remember a message the bot sent (ignored if its event id is known)."""
        await self.db.batch([(self._INSERT_MSG, self._msg_row(message), False)])

    async def announcement_message(self, event_id: str) -> AnnouncementMessage | None:
        """The bot's message with this event id, or None."""
        rows = await self.db.fetch(
            f"SELECT {self._MSG_COLS} FROM announcement_messages WHERE event_id = ?", event_id)
        return AnnouncementMessage(*tuple(rows[0])) if rows else None

    async def announcement_messages_in_room(self, room_id: str,
                                            limit: int = 20) -> list[AnnouncementMessage]:
        """The bot's latest messages in a room, newest first."""
        rows = await self.db.fetch(
            f"SELECT {self._MSG_COLS} FROM announcement_messages WHERE room_id = ?"
            " ORDER BY sent_at DESC, event_id DESC LIMIT ?", room_id, limit)
        return [AnnouncementMessage(*tuple(r)) for r in rows]

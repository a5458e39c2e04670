"""Acknowledgements, reminders and escalation as pure decisions.

:func:`decide_reminders` looks at one occurrence's deliveries at ``now`` and says who gets
their next reminder, whose manager is told, and whether the occurrence is finished. Only
people who were delivered to and have not acknowledged are ever reminded or escalated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.model.people import StaffRecord

from .spec import AnnouncementSpec

if TYPE_CHECKING:  # the store's dataclass only; importing the store would load its I/O
    from ..store import AnnouncementDelivery


@dataclass(frozen=True)
class Remind:
    user_id: str
    number: int  # 1 for the first reminder
    rule_id: str = "announcements.reminder"
    reason: str = "not acknowledged"


@dataclass(frozen=True)
class Escalate:
    user_id: str
    manager: str | None  # None: the directory names no (active) manager
    rule_id: str = "announcements.escalation"
    reason: str = "not acknowledged after the last reminder"


@dataclass(frozen=True)
class FollowUp:
    reminders: tuple[Remind, ...]
    escalations: tuple[Escalate, ...]
    close: bool  # expired, or nothing left to follow up
    close_reason: str
    next_due_ms: int | None  # when something becomes due next (for the wake-up timer)


def _people(deliveries: Iterable[AnnouncementDelivery]) -> list[AnnouncementDelivery]:
    return [d for d in deliveries if d.target.startswith("@")]


def decide_reminders(spec: AnnouncementSpec, deliveries: Sequence[AnnouncementDelivery],
                     now_ms: int, *, delivered_at: int | None,
                     staff: Mapping[str, StaffRecord]) -> FollowUp:
    """Reminders and escalations due at ``now_ms`` for one delivered occurrence.

    Reminder *k* (1-based) is due ``k * after`` after the person's delivery; the
    escalation one ``after`` past the last reminder. A reminder whose send failed keeps its
    place in the schedule (it is not counted as sent, and not retried at once). Nothing is
    due at or after expiry (``expires_after`` from the occurrence's delivery). The
    occurrence closes when it needs no acknowledgement, has expired, or has nothing left to
    follow up (acknowledgements are still recorded after that)."""
    people = _people(deliveries)
    if not spec.require_ack:
        return FollowUp((), (), True, "no acknowledgement required", None)
    expires_at = (delivered_at + spec.expires_after_ms
                  if delivered_at is not None and spec.expires_after_ms else None)
    if expires_at is not None and now_ms >= expires_at:
        return FollowUp((), (), True, "expired", None)
    after = spec.reminder_after_ms
    reminders: list[Remind] = []
    escalations: list[Escalate] = []
    next_due: int | None = None
    waiting_delivery = False

    def later(t: int) -> None:
        nonlocal next_due
        if expires_at is None or t < expires_at:
            next_due = t if next_due is None else min(next_due, t)

    for d in people:
        if d.acked_at is not None or d.status == "failed":
            continue
        if d.status != "sent" or d.sent_at is None:
            waiting_delivery = True  # nothing to remind of yet
            continue
        if after is None:
            continue
        tried = d.reminders + d.reminder_failures
        if tried < spec.reminder_count:
            due = d.sent_at + (tried + 1) * after
            if due <= now_ms:
                reminders.append(Remind(d.target, tried + 1))
            else:
                later(due)
        elif spec.escalate and d.escalated_at is None:
            due = d.sent_at + (spec.reminder_count + 1) * after
            if due <= now_ms:
                rec = staff.get(d.target)
                manager = rec.manager_user_id if rec is not None else None
                mrec = staff.get(manager) if manager else None
                if manager is not None and (mrec is None or not mrec.active):
                    manager = None  # a leaver, or unknown: nobody to tell
                escalations.append(Escalate(d.target, manager))
            else:
                later(due)
    if reminders or escalations or next_due is not None or waiting_delivery:
        return FollowUp(tuple(reminders), tuple(escalations), False, "", next_due)
    unacked = any(d.acked_at is None and d.status != "failed" for d in people)
    if expires_at is not None and unacked:
        return FollowUp((), (), False, "", expires_at)  # open (for acks) until it expires
    if all(d.acked_at is not None for d in people):
        return FollowUp((), (), True, "everyone acknowledged", None)
    return FollowUp((), (), True, "nothing left to follow up", None)


@dataclass(frozen=True)
class Summary:
    recipients: int
    delivered: int
    failed: int
    pending: int
    acknowledged: int
    reminded: int  # people with at least one reminder the homeserver accepted
    escalated: int  # people whose manager was told (the message was accepted)
    rooms: int  # explicit target rooms
    reminders_failed: int = 0  # people with a reminder whose send failed
    escalations_failed: int = 0

    def line(self, require_ack: bool) -> str:
        text = (f"{self.recipients} recipient(s): {self.delivered} delivered, "
                f"{self.failed} failed, {self.pending} pending")
        if self.rooms:
            text += f"; {self.rooms} room(s)"
        if require_ack:
            text += (f"; {self.acknowledged} acknowledged, {self.reminded} reminded, "
                     f"{self.escalated} escalated")
            if self.reminders_failed:
                text += f"; reminder failed for {self.reminders_failed}"
            if self.escalations_failed:
                text += f"; escalation failed for {self.escalations_failed}"
        return text


def summarise(deliveries: Sequence[AnnouncementDelivery]) -> Summary:
    """Counts for a report or the control room."""
    people = _people(deliveries)
    return Summary(
        recipients=len(people),
        delivered=sum(1 for d in people if d.status == "sent"),
        failed=sum(1 for d in people if d.status == "failed"),
        pending=sum(1 for d in people if d.status == "pending"),
        acknowledged=sum(1 for d in people if d.acked_at is not None),
        reminded=sum(1 for d in people if d.reminders > 0),
        escalated=sum(1 for d in people if d.escalated),
        rooms=sum(1 for d in deliveries if not d.target.startswith("@")),
        reminders_failed=sum(1 for d in people if d.reminder_failures > 0),
        escalations_failed=sum(1 for d in people if d.escalation_error is not None),
    )


@dataclass(frozen=True)
class AckDecision:
    announcement_id: str
    occurrence_id: str
    user_id: str
    room_id: str | None  # set when the person may have no row yet (explicit room)


def decide_ack(message_kind: str, announcement_id: str, occurrence_id: str,
               message_target: str | None, sender: str, *, room_id: str) -> AckDecision | None:
    """Whether a reaction/reply to one of the bot's messages acknowledges, and for whom.

    A per-person message (DM, reminder) only counts for its person; a message to a room
    counts for whoever reacts; escalation notices and summaries do not acknowledge."""
    if message_kind not in ("announcement", "reminder"):
        return None
    if message_target is not None and message_target.startswith("@"):
        if message_target != sender:
            return None
        return AckDecision(announcement_id, occurrence_id, sender, None)
    explicit_room = message_target is not None and not message_target.startswith("@")
    return AckDecision(announcement_id, occurrence_id, sender,
                       room_id if explicit_room else None)

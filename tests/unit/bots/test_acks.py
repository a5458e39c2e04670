"""Reminders only to non-acknowledgers, escalation to managers, closing, ack decisions."""

from __future__ import annotations

import dataclasses

import pytest

from bots.announcements.acks import (
    AckDecision,
    Escalate,
    Remind,
    decide_ack,
    decide_reminders,
    summarise,
)
from bots.announcements.audience import Audience
from bots.announcements.spec import AnnouncementSpec
from bots.store import AnnouncementDelivery
from bridge.model.people import StaffRecord

H = 3_600_000
T0 = 1_000 * H  # delivery time

SPEC = AnnouncementSpec(title="Policy", body="Read it", audience=Audience(all_staff=True),
                        require_ack=True, reminder_after_ms=24 * H, reminder_count=2,
                        escalate=True)


def row(target: str, *, status: str = "sent", acked: bool = False, reminders: int = 0,
        escalated: bool = False, sent_at: int | None = T0, failures: int = 0,
        escalation_error: str | None = None) -> AnnouncementDelivery:
    return AnnouncementDelivery(
        announcement_id="policy", occurrence_id="o", target=target, status=status,
        room_id="!dm", event_id="$e", sent_at=sent_at if status == "sent" else None,
        acked_at=T0 + 1 if acked else None, reminders=reminders,
        escalated_at=T0 + 2 if escalated else None,
        escalated_to="@boss:x" if escalated else None, reminder_failures=failures,
        reminder_error="403 M_FORBIDDEN: refused" if failures else None,
        escalation_error=escalation_error)


STAFF = {
    "@a:x": StaffRecord("@a:x", "a", True, "a", "A", manager_user_id="@boss:x"),
    "@b:x": StaffRecord("@b:x", "b", True, "b", "B", manager_user_id="@gone:x"),
    "@c:x": StaffRecord("@c:x", "c", True, "c", "C"),
    "@boss:x": StaffRecord("@boss:x", "boss", True, "boss", "Boss"),
    "@gone:x": StaffRecord("@gone:x", "gone", False, "gone", "Gone"),
}


@pytest.mark.parametrize(
    ("name", "rows", "now", "reminders", "escalations", "close", "next_due"),
    [
        ("too early", [row("@a:x")], T0 + H, (), (), False, T0 + 24 * H),
        ("first reminder", [row("@a:x")], T0 + 24 * H, (Remind("@a:x", 1),), (), False, None),
        ("acknowledged: never reminded", [row("@a:x", acked=True)], T0 + 24 * H, (), (), True,
         None),
        ("only the one who did not ack", [row("@a:x", acked=True), row("@b:x")], T0 + 25 * H,
         (Remind("@b:x", 1),), (), False, None),
        ("second reminder", [row("@a:x", reminders=1)], T0 + 48 * H, (Remind("@a:x", 2),), (),
         False, None),
        ("between reminders", [row("@a:x", reminders=1)], T0 + 30 * H, (), (), False,
         T0 + 48 * H),
        ("escalation after the last reminder", [row("@a:x", reminders=2)], T0 + 72 * H, (),
         (Escalate("@a:x", "@boss:x"),), False, None),
        ("a manager who left is nobody", [row("@b:x", reminders=2)], T0 + 72 * H, (),
         (Escalate("@b:x", None),), False, None),
        ("no manager at all", [row("@c:x", reminders=2)], T0 + 72 * H, (),
         (Escalate("@c:x", None),), False, None),
        ("all done", [row("@a:x", reminders=2, escalated=True)], T0 + 100 * H, (), (), True,
         None),
        ("failed people are left alone", [row("@a:x", status="failed")], T0 + 100 * H, (), (),
         True, None),
        ("not delivered yet: wait", [row("@a:x", status="pending")], T0 + 100 * H, (), (),
         False, None),
        ("rooms are no people", [row("!room:x")], T0 + 100 * H, (), (), True, None),
    ],
)
def test_decide_reminders(name: str, rows: list[AnnouncementDelivery], now: int,
                          reminders: tuple[Remind, ...], escalations: tuple[Escalate, ...],
                          close: bool, next_due: int | None) -> None:
    fu = decide_reminders(SPEC, rows, now, delivered_at=T0, staff=STAFF)
    assert fu.reminders == reminders, name
    assert fu.escalations == escalations, name
    assert fu.close is close, name
    if next_due is not None:
        assert fu.next_due_ms == next_due, name


def test_expiry_stops_follow_ups() -> None:
    spec = dataclasses.replace(SPEC, expires_after_ms=36 * H)
    fu = decide_reminders(spec, [row("@a:x", reminders=1)], T0 + 36 * H, delivered_at=T0,
                          staff=STAFF)
    assert (fu.reminders, fu.close, fu.close_reason) == ((), True, "expired")
    # the second reminder (48 h) would come after expiry: the next wake-up is the expiry
    fu = decide_reminders(spec, [row("@a:x", reminders=1)], T0 + 30 * H, delivered_at=T0,
                          staff=STAFF)
    assert (fu.close, fu.next_due_ms) == (False, T0 + 36 * H)


def test_without_ack_or_reminders_it_closes_at_once() -> None:
    no_ack = dataclasses.replace(SPEC, require_ack=False)
    assert decide_reminders(no_ack, [row("@a:x")], T0, delivered_at=T0, staff=STAFF).close
    ack_only = dataclasses.replace(SPEC, reminder_after_ms=None, reminder_count=0,
                                   escalate=False)
    fu = decide_reminders(ack_only, [row("@a:x")], T0 + 1000 * H, delivered_at=T0,
                          staff=STAFF)
    assert (fu.reminders, fu.close, fu.close_reason) == ((), True, "nothing left to follow up")


@pytest.mark.parametrize(
    ("kind", "target", "sender", "expected"),
    [
        ("announcement", "@a:x", "@a:x", AckDecision("p", "o", "@a:x", None)),
        ("announcement", "@a:x", "@b:x", None),  # someone else's DM message
        ("reminder", "@a:x", "@a:x", AckDecision("p", "o", "@a:x", None)),
        ("announcement", None, "@b:x", AckDecision("p", "o", "@b:x", None)),  # audience room
        ("announcement", "!general:x", "@b:x", AckDecision("p", "o", "@b:x", "!here")),
        ("escalation", "@boss:x", "@boss:x", None),
        ("summary", None, "@b:x", None),
    ],
)
def test_decide_ack(kind: str, target: str | None, sender: str,
                    expected: AckDecision | None) -> None:
    assert decide_ack(kind, "p", "o", target, sender, room_id="!here") == expected


def test_summarise_counts_people_and_rooms_apart() -> None:
    s = summarise([row("@a:x", acked=True), row("@b:x", reminders=1),
                   row("@c:x", status="failed"), row("@d:x", status="pending"),
                   row("!r:x"), row("@e:x", reminders=2, escalated=True)])
    assert (s.recipients, s.delivered, s.failed, s.pending, s.acknowledged, s.reminded,
            s.escalated, s.rooms) == (5, 3, 1, 1, 1, 2, 1, 1)
    assert "1 acknowledged" in s.line(True) and "acknowledged" not in s.line(False)


def test_a_failed_reminder_keeps_its_place_and_is_not_counted() -> None:
    from bots.announcements.report import report_rows

    # reminder 1 failed: it is not tried again at once; reminder 2 follows at its own time
    failed = row("@a:x", failures=1)
    fu = decide_reminders(SPEC, [failed], T0 + 25 * H, delivered_at=T0, staff=STAFF)
    assert fu.reminders == () and fu.next_due_ms == T0 + 48 * H, fu
    fu = decide_reminders(SPEC, [failed], T0 + 48 * H, delivered_at=T0, staff=STAFF)
    assert fu.reminders == (Remind("@a:x", 2),), fu
    # both failed: the escalation follows at its time
    both = row("@a:x", failures=2)
    fu = decide_reminders(SPEC, [both], T0 + 72 * H, delivered_at=T0, staff=STAFF)
    assert fu.escalations == (Escalate("@a:x", "@boss:x"),), fu

    s = summarise([failed, row("@b:x", reminders=1),
                   row("@c:x", reminders=2, escalated=True, escalation_error="403 refused")])
    assert (s.reminded, s.reminders_failed, s.escalated, s.escalations_failed) == (2, 1, 0, 1)
    assert "1 reminded" not in s.line(True) and "reminder failed for 1" in s.line(True)
    rows = {r["recipient"]: r for r in report_rows(
        [failed, row("@c:x", reminders=2, escalated=True, escalation_error="403 refused")],
        {})}
    assert rows["@a:x"]["reminders"] == 0 and rows["@a:x"]["reminders_failed"] == 1
    assert "reminder(s) failed: 403 M_FORBIDDEN: refused" in rows["@a:x"]["detail"]
    assert rows["@c:x"]["escalated_at"] == "" and rows["@c:x"]["escalated_to"] == ""
    assert "escalation to @boss:x failed: 403 refused" in rows["@c:x"]["detail"]

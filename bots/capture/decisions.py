"""The archive device's pure decisions: whether a room's class requires capture, what keeps
the archive user in such a room (:func:`decide_capture_membership`), how the room shows
that it is archived (:func:`decide_capture_notice`) and why an encrypted message could not
be captured (:func:`gap_reason`). No I/O: the bot reads the room and applies the actions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.policy.actions import Action, Invite, Join, SetState
from bridge.policy.power import RoomPower, enclave_actor
from bridge.policy.separation.outcomes import NotDone

RULE_JOIN = "capture.archive_member"
RULE_REJOIN = "capture.archive_removed"
RULE_NOTICE = "capture.notice"
TOPIC_TYPE = "m.room.topic"

# why a message is a capture gap (the reason recorded and shown by `enclave archive gaps`)
NO_SESSION_KEY = "no session key"
BEFORE_JOIN = "sent before the archive device joined (history it never received keys for)"
ABSENT = "sent while the archive device was not in the room"
DEVICE_NOT_READY = "archive device not ready"


@dataclass(frozen=True)
class CaptureMembership:
    """What keeps the archive user in a capture-required room: actions, or why not."""

    actions: tuple[Action, ...]
    reason: str
    problem: str | None = None  # set when Enclave cannot get the archive user in


def capture_required(room_class: Any) -> bool:
    """Whether a room class config (``RoomClassConfig``) requires capture."""
    return getattr(room_class, "capture", "off") == "required"


def decide_capture_membership(room_id: str, *, required: bool, archive_user: str,
                              members: Mapping[str, str], power: RoomPower,
                              enclave_users: Sequence[str], removed_by: str | None = None,
                              ) -> CaptureMembership:
    """Keep ``archive_user`` joined to ``room_id`` when its class requires capture.

    ``members``: user -> membership (join, invite, leave, ban). Joined: nothing to do.
    Invited: it joins. Otherwise one of Enclave's own users (``enclave_users``: its bot,
    then its admin) with invite power invites it, and it joins; never a member of the room
    on Enclave's behalf (:func:`bridge.policy.power.enclave_actor`). ``removed_by``: the
    user who just kicked it (or it left), named in the reason. Banned, or nobody of
    Enclave's with invite power: a :class:`NotDone` with the fix, since archiving stops.
    """
    if not required:
        return CaptureMembership((), "the room's class does not require capture")
    state = members.get(archive_user)
    if state == "join":
        return CaptureMembership((), "the archive user is joined")
    rule = RULE_REJOIN if removed_by else RULE_JOIN
    why = (f"the archive user was removed by {removed_by}; capture is required here"
           if removed_by else "capture is required in rooms of this class")
    if state == "invite":
        return CaptureMembership(
            (Join(room=room_id, actor=archive_user, rule_id=rule, reason=why),), why)
    if state == "ban":
        problem = (f"the archive user {archive_user} is banned from {room_id}, whose class "
                   "requires capture: encrypted messages are not archived as plaintext. "
                   "Fix: unban it (Enclave then invites it back)")
        return CaptureMembership(
            (NotDone(room=room_id, user=archive_user, message=problem, rule_id=rule,
                     reason=why),), why, problem)
    actor = enclave_actor(members, power, enclave_users, power.needed("invite"))
    if actor is None:
        problem = (f"Enclave cannot invite its archive user {archive_user} into {room_id} "
                   "(capture required): none of its users is joined with invite power. "
                   f"Fix: invite {archive_user}, or invite "
                   f"{enclave_users[0] if enclave_users else 'Enclave s bot'} with power "
                   f"{max(power.needed('invite'), 1)}")
        return CaptureMembership(
            (NotDone(room=room_id, user=archive_user, message=problem, rule_id=rule,
                     reason=why),), why, problem)
    return CaptureMembership(
        (Invite(room=room_id, user=archive_user, actor=actor, rule_id=rule, reason=why),
         Join(room=room_id, actor=archive_user, rule_id=rule, reason=why)), why)


@dataclass(frozen=True)
class CaptureNotice:
    """How a room shows it is archived: ``notice`` (the text the archive user posts, sent
    encrypted like any bot message) and/or ``actions`` (the topic line, or why not)."""

    notice: str | None = None
    actions: tuple[Action, ...] = ()
    rule_id: str = RULE_NOTICE
    reason: str = "the room's class requires capture: staff are told"


def decide_capture_notice(room_id: str, *, mode: str, already_shown: bool,
                          topic: str | None, topic_line: str, notice: str,
                          archive_user: str, members: Mapping[str, str], power: RoomPower,
                          enclave_users: Sequence[str]) -> CaptureNotice:
    """How the room shows staff that it is archived.

    ``notice``: one notice from the archive user (a member: it may post), once per room
    (``already_shown``). ``topic``: ``topic_line`` appended to the room topic by one of
    Enclave's own users with the power to set it; kept when a topic change removed it
    (again appended); where none of them may, a :class:`NotDone` with the fix."""
    if mode == "notice":
        if already_shown or members.get(archive_user) != "join":
            return CaptureNotice()
        return CaptureNotice(notice=notice)
    current = topic or ""
    if topic_line in current:
        return CaptureNotice()
    actor = enclave_actor(members, power, enclave_users, power.needed_state(TOPIC_TYPE))
    if actor is None:
        return CaptureNotice(actions=(NotDone(
            room=room_id, user=None, rule_id=RULE_NOTICE,
            reason="the room's class requires capture: the topic says so",
            message=f"cannot add the archive line to the topic of {room_id}: none of "
                    "Enclave's users is joined with the power to set it. Fix: invite "
                    f"Enclave's bot with power {max(power.needed_state(TOPIC_TYPE), 1)}"),))
    new = f"{current}\n{topic_line}" if current.strip() else topic_line
    return CaptureNotice(actions=(SetState(
        room=room_id, event_type=TOPIC_TYPE, content={"topic": new}, actor=actor,
        rule_id=RULE_NOTICE, reason="the room's class requires capture: the topic says so"),))


def gap_reason(*, withheld: str | None, joined_at_ms: int | None, sent_at_ms: int | None,
               device_ready: bool = True, absent: bool = False) -> str:
    """Why an encrypted message could not be decrypted, for the gap record.

    ``withheld``: the code (and text) of an ``m.room_key.withheld`` the sender's device sent
    for the session; ``joined_at_ms``: when the archive user first joined the room (a
    message sent before that was never meant for it); ``absent``: the archive user is not
    in the room now (not joined yet, or removed)."""
    if withheld:
        return f"withheld: {withheld}"
    if absent:
        return BEFORE_JOIN if joined_at_ms is None else ABSENT
    if joined_at_ms is not None and sent_at_ms is not None and sent_at_ms < joined_at_ms:
        return BEFORE_JOIN
    if not device_ready:
        return DEVICE_NOT_READY
    return NO_SESSION_KEY

"""What retention does in one room, as pure decisions: who of Enclave's users acts there, how
the room shows its period, what ``!retention`` asks for, and which events and archive
segments the holds keep.

The retention service (:mod:`bridge.retention.service` and its parts) reads the room's state,
the archive index and its own notes, calls these, and carries out what they return. No I/O
and no clock reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..kernel.durations import parse_duration_ms
from ..kernel.membership import membership_of, memberships
from .actions import Action, Join, SendEvent, SetState
from .power import RoomPower, enclave_actor, is_enclave_user
from .retention import RETENTION_STATE_TYPE, Hold, Period, PurgePlan

_COMMAND_RE = re.compile(r"^!retention(?:\s+(\S+))?\s*$")


# -- who can act in a room -------------------------------------------------------------------
@dataclass(frozen=True)
class EnclaveUsers:
    """Enclave's own users on its homeserver: its bot, its admin and the appservice's
    namespace. Retention acts in a room only as one of them (the bot first), never as a
    member; what they cannot do is reported."""

    server_name: str
    bot_user_id: str
    admin_user_id: str
    service_prefix: str

    def is_service(self, user: str | None) -> bool:
        """Whether ``user`` is one of Enclave's own (:func:`.power.is_enclave_user`)."""
        return is_enclave_user(user, server_name=self.server_name,
                               own_users=(self.bot_user_id, self.admin_user_id),
                               namespace_prefix=self.service_prefix)

    def actor(self, state: Sequence[Mapping[str, Any]], needed: int) -> str | None:
        """Enclave's own joined user (its bot, else its admin) with at least ``needed``
        power; None if neither is (:func:`bridge.policy.power.enclave_actor`, the rule
        separation follows too)."""
        return enclave_actor(memberships(state), RoomPower.from_state(state),
                             (self.bot_user_id, self.admin_user_id), needed)

    def state_sender(self, state: Sequence[Mapping[str, Any]], event_type: str) -> str | None:
        """Enclave's bot (or admin) if joined with the power to send ``event_type`` state;
        None otherwise."""
        return self.actor(state, RoomPower.from_state(state).needed_state(event_type))

    @property
    def not_in_room(self) -> str:
        """Why Enclave could not do something in a room where it has no such user."""
        return (f"neither {self.bot_user_id} nor {self.admin_user_id} is in the room with "
                "the power to do it")

    def bot_membership(self, state: Sequence[Mapping[str, Any]]) -> str | None:
        """The bot's membership in the room (None: never a member)."""
        return membership_of(state, self.bot_user_id)

    def bot_may_join(self, state: Sequence[Mapping[str, Any]]) -> bool:
        """The bot may join on its own: someone invited it, or the room is public."""
        if self.bot_membership(state) == "invite":
            return True
        rule = next(((e.get("content") or {}).get("join_rule") for e in state
                     if e.get("type") == "m.room.join_rules"), None)
        return rule == "public"


# -- the !retention command ------------------------------------------------------------------
@dataclass(frozen=True)
class RetentionCommand:
    """A ``!retention`` message read: ``arg`` None shows the period; otherwise
    ``requested_ms`` is the period asked for (None: forever) or ``error`` why ``arg`` could
    not be read."""

    arg: str | None
    requested_ms: int | None = None
    error: str | None = None


def parse_retention_command(body: str) -> RetentionCommand:
    """``!retention`` (show the period) or ``!retention 30d`` (ask to change it); anything
    else after ``!retention`` shows the period too."""
    m = _COMMAND_RE.match(body.strip())
    if m is None or m.group(1) is None:
        return RetentionCommand(None)
    try:
        return RetentionCommand(m.group(1), parse_duration_ms(m.group(1)))
    except ValueError as e:
        return RetentionCommand(m.group(1), None, f"Cannot read {m.group(1)!r}: {e}")


# -- visibility ------------------------------------------------------------------------------
def notice_kind(period: Period, state: Sequence[Mapping[str, Any]], configured: str) -> str:
    """How the room is told its period: ``configured`` (``topic``, ``message``, ``none``),
    except ``none`` in a direct chat (a bot joining it would make it a group chat; DMs are
    recognised by separation's is_direct_chat, through the room's class) and no message
    into an encrypted room (nothing is ever posted there in clear)."""
    encrypted = any(e.get("type") == "m.room.encryption" for e in state)
    if period.source == "dm" or (encrypted and configured == "message"):
        return "none"
    return configured


@dataclass(frozen=True)
class VisibilityPlan:
    """The actions that make a room show its period, all as Enclave's bot or admin; what
    they cannot do (a report); and the line put into the topic, to remember once applied."""

    actions: tuple[Action, ...]
    unable: tuple[str, ...]
    topic_line: str | None = None


def decide_visibility(room_id: str, period: Period, state: Sequence[Mapping[str, Any]],
                      users: EnclaveUsers, *, expected: Mapping[str, Any], text: str,
                      set_state: bool, notice: str, last_topic_line: str | None = None,
                      said: str | None = None,
                      notice_event_id: str | None = None) -> VisibilityPlan:
    """What makes the room (its non-empty ``state``) show ``period``: ``expected`` as its
    ``m.room.retention`` (with ``set_state``), ``text`` as a topic line or a notice
    (``notice``, from :func:`notice_kind`). ``last_topic_line`` is the line Enclave put in
    the topic before (replaced), ``said`` the notice text posted before (not posted again),
    ``notice_event_id`` that notice's event (edited rather than posted anew)."""
    actions: list[Action] = []
    unable: list[str] = []
    topic_line: str | None = None
    bot = users.bot_user_id
    if users.bot_membership(state) == "invite":
        # someone invited Enclave's bot: it accepts, and acts with the power it was given
        actions.append(Join(rule_id=period.rule_id, reason="invited; shows the period",
                            actor=bot, room=room_id))
        state = [e for e in state if not (e.get("type") == "m.room.member"
                                          and e.get("state_key") == bot)]
        state.append({"type": "m.room.member", "state_key": bot,
                      "content": {"membership": "join"}})
    current = next((e.get("content") or {} for e in state
                    if e.get("type") == RETENTION_STATE_TYPE and e.get("state_key") == ""), None)
    if set_state and (current or {}) != expected:
        actor = users.state_sender(state, RETENTION_STATE_TYPE)
        if actor is not None:
            actions.append(SetState(rule_id=period.rule_id, reason="show the period",
                                    actor=actor, room=room_id, event_type=RETENTION_STATE_TYPE,
                                    content=dict(expected)))
        else:
            unable.append(f"{RETENTION_STATE_TYPE} not set: {users.not_in_room}")
    if notice == "topic":
        topic = next(((e.get("content") or {}).get("topic") for e in state
                      if e.get("type") == "m.room.topic"), None) or ""
        lines = [ln for ln in topic.split("\n") if ln and ln != last_topic_line and ln != text]
        new_topic = "\n".join([*lines, text])
        if new_topic != topic:
            actor = users.state_sender(state, "m.room.topic")
            if actor is None:
                unable.append(f"period not put in the topic: {users.not_in_room}")
            else:
                actions.append(SetState(rule_id=period.rule_id, reason="period in topic",
                                        actor=actor, room=room_id, event_type="m.room.topic",
                                        content={"topic": new_topic}))
                topic_line = text
    elif notice == "message" and said != text:
        if membership_of(state, bot) != "join":
            # the bot joins only where it was invited or the room is open: Enclave does not
            # invite itself as a member (it would read "<member> invited Enclave");
            # elsewhere the missing notice is reported by the caller
            if not users.bot_may_join(state):
                unable.append("retention notice not posted: Enclave's bot is not in the "
                              "room and not invited")
                return VisibilityPlan(tuple(actions), tuple(unable))
            actions.append(Join(rule_id=period.rule_id,
                                reason="Enclave posts the retention notice", actor=bot,
                                room=room_id))
        content: dict[str, Any] = {"msgtype": "m.notice", "body": text}
        if notice_event_id:
            content = {"msgtype": "m.notice", "body": "* " + text,
                       "m.new_content": {"msgtype": "m.notice", "body": text},
                       "m.relates_to": {"rel_type": "m.replace", "event_id": notice_event_id}}
        actions.append(SendEvent(rule_id=period.rule_id, reason="retention notice",
                                 room=room_id, event_type="m.room.message", content=content))
    return VisibilityPlan(tuple(actions), tuple(unable), topic_line)


# -- what the holds keep ---------------------------------------------------------------------
@dataclass(frozen=True)
class HeldMessages:
    """The timestamps of a room's messages the active holds keep (ascending), and the ids
    of the holds that keep them (sorted)."""

    timestamps: tuple[int, ...]
    hold_ids: tuple[str, ...]


def held_messages(room_id: str, messages: Sequence[tuple[int, str | None]],
                  holds: Sequence[Hold]) -> HeldMessages:
    """Which of the room's ``messages`` ((ts, sender)) the active ``holds`` keep."""
    relevant = [h for h in holds if h.active()]
    held: list[int] = []
    hold_ids: set[str] = set()
    for ts, sender in messages:
        matched = [h.id for h in relevant if h.matches(room_id, sender, ts)]
        if matched:
            held.append(ts)
            hold_ids.update(matched)
    return HeldMessages(tuple(sorted(held)), tuple(sorted(hold_ids)))


def segment_held(room_id: str, first_ts: int, last_ts: int, holds: Sequence[Hold]) -> bool:
    """Whether an archive segment of ``room_id`` with events from ``first_ts`` to
    ``last_ts`` is kept whole: an active hold could cover part of it (its room and time
    range; a hold on users keeps the segments of their time too)."""
    return any(h.active() and (not h.rooms or room_id in h.rooms)
               and (h.since_ms is None or h.since_ms <= last_ts)
               and (h.until_ms is None or h.until_ms >= first_ts)
               for h in holds)


def with_unarchived(plan: PurgePlan, missing: int) -> PurgePlan:
    """A dry run's plan, saying that ``missing`` events will be archived before the purge."""
    return replace(plan, reason=f"{plan.reason}; {missing} events will be archived first")

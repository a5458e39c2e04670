"""Retention in one room: its period (class, a moderator's adjustment), guarding
``m.room.retention``, the ``!retention`` command, and showing the period in the room.

The decisions come from :class:`~bridge.policy.retention.RetentionPolicy` and
:mod:`bridge.policy.retention_rooms`; this module reads the room and Enclave's notes about it,
and writes what was decided.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ..config.retention import RetentionConfig
from ..kernel.membership import membership_of
from ..matrix.client import MatrixClient
from ..matrix.executor import Executor
from ..policy.actions import Action, SendEvent, SetState
from ..policy.power import RoomPower
from ..policy.retention import RETENTION_STATE_TYPE, Period, RetentionPolicy
from ..policy.retention_rooms import (
    EnclaveUsers,
    decide_visibility,
    notice_kind,
    parse_retention_command,
)
from ..store.base import AuditRecord, RetentionRoom
from ..store.domains import AuditStore, KVStore, RetentionRoomStore

log = logging.getLogger(__name__)

TOPIC_COMPONENT = "retention.topic"
NOTICE_COMPONENT = "retention.notice"


class RoomRetention:
    """A room's period, and what Enclave says and sets about it in the room."""

    def __init__(self, config: RetentionConfig, policy: RetentionPolicy, *,
                 users: EnclaveUsers, retention_rooms: RetentionRoomStore, kv: KVStore,
                 audit: AuditStore, client: MatrixClient, executor: Executor,
                 clock_ms: Callable[[], int],
                 classify: Callable[[str], Awaitable[str | None]] | None = None):
        self.config = config
        self.policy = policy
        self.users = users
        self.retention_rooms = retention_rooms
        self.kv = kv
        self.audit = audit
        self.client = client
        self.executor = executor
        self.clock_ms = clock_ms
        self.classify = classify

    # -- periods ---------------------------------------------------------------------------
    async def room_class(self, room_id: str) -> str | None:
        if self.classify is None:
            return None
        return await self.classify(room_id)

    async def period(self, room_id: str, room_class: str | None = None) -> Period:
        if room_class is None:
            room_class = await self.room_class(room_id)
        row = await self.retention_rooms.retention_room_get(room_id)
        override = row.override_ms if row is not None else None
        return self.policy.period_for(room_class, override_ms=override)

    async def room_state(self, room_id: str) -> list[dict[str, Any]]:
        return await self.client.admin_room_state(room_id,
                                                  admin=self.users.admin_user_id) or []

    # -- m.room.retention and adjustments ------------------------------------------------
    async def on_retention_state(self, room_id: str, event: Mapping[str, Any]) -> list[Action]:
        """Someone other than Enclave changed the retention state: put it back."""
        sender = event.get("sender")
        period = await self.period(room_id)
        expected = self.policy.retention_state(period)
        d = self.policy.decide_retention_event(
            sender_is_service=self.users.is_service(sender),
            content=event.get("content") or {}, expected=expected)
        if d.allow:
            return []
        actor = self.users.state_sender(await self.room_state(room_id), RETENTION_STATE_TYPE)
        if actor is None:
            log.warning("retention state in %s changed by %s and Enclave cannot put it "
                        "back", room_id, sender)
            await self.audit.add_audit(AuditRecord(
                ts=self.clock_ms(), source="retention", kind="set_state", outcome="failed",
                room_id=room_id, user_id=sender, rule_id=d.rule_id, reason=d.reason,
                detail=f"not reverted: {self.users.not_in_room}"))
            return []
        return [SetState(rule_id=d.rule_id, reason=f"{d.reason} (changed by {sender})",
                         actor=actor, room=room_id, event_type=RETENTION_STATE_TYPE,
                         content=dict(expected))]

    async def on_command(self, room_id: str, event: Mapping[str, Any],
                         body: str) -> list[Action]:
        """``!retention`` shows the period; ``!retention 30d`` asks to change it."""
        sender = str(event.get("sender", ""))
        if self.users.is_service(sender):
            return []
        cmd = parse_retention_command(body)
        state = await self.room_state(room_id)
        bot_joined = membership_of(state, self.users.bot_user_id) == "join"
        room_class = await self.room_class(room_id)
        period = await self.period(room_id, room_class)
        reply: str
        actions: list[Action] = []
        if cmd.arg is None:
            reply = self.policy.notice_text(period)
        elif cmd.error is not None:
            reply = cmd.error
        else:
            requested = cmd.requested_ms
            power = RoomPower.from_state(state).of(sender)
            d = self.policy.decide_adjustment(room_class, power, requested)
            if d.allow:
                now = self.clock_ms()
                old = await self.retention_rooms.retention_room_get(room_id)
                await self.retention_rooms.retention_room_put(room_row(
                    old, room_id, room_class, now, override_ms=requested,
                    override_by=sender))
                await self.audit.add_audit(AuditRecord(
                    ts=now, source="retention", kind="retention_adjust",
                    outcome="applied", actor=sender, room_id=room_id, rule_id=d.rule_id,
                    reason=d.reason, detail=f"period set to {cmd.arg}"))
                new_period = self.policy.period_for(room_class, override_ms=requested)
                actor = self.users.state_sender(state, RETENTION_STATE_TYPE)
                reply = (f"{self.policy.notice_text(new_period)} (changed by {sender})")
                if actor is not None and self.config.visibility.set_state:
                    actions.append(SetState(
                        rule_id=d.rule_id, reason=f"adjusted by {sender}", actor=actor,
                        room=room_id, event_type=RETENTION_STATE_TYPE,
                        content=self.policy.retention_state(new_period)))
                elif self.config.visibility.set_state:
                    reply += f"; {RETENTION_STATE_TYPE} not updated: {self.users.not_in_room}"
            else:
                reply = d.message or d.reason
        if bot_joined:
            actions.append(SendEvent(
                rule_id="builtin.retention_command", reason="answer to !retention",
                room=room_id, event_type="m.room.message",
                content={"msgtype": "m.notice", "body": reply}))
        return actions

    # -- visibility ----------------------------------------------------------------------
    async def ensure_visibility(self, room_id: str, period: Period,
                                state: Sequence[Mapping[str, Any]], *,
                                apply: bool, unable: list[str] | None = None) -> list[Action]:
        """The actions that make the room show its period (state, notice or topic), all as
        Enclave's bot or admin. What they cannot do in the room is appended to ``unable``
        (a report), never done as one of the room's members."""
        vis = self.config.visibility
        unable = unable if unable is not None else []
        if not state:
            return []
        text = self.policy.notice_text(period)
        notice = notice_kind(period, state, vis.notice)
        last_topic_line = said = notice_event_id = None
        if notice == "topic":
            last_topic_line = await self.kv.component_get(TOPIC_COMPONENT, room_id)
        elif notice == "message":
            row = await self.retention_rooms.retention_room_get(room_id)
            said = await self.kv.component_get(NOTICE_COMPONENT, room_id)
            notice_event_id = row.notice_event_id if row is not None else None
        plan = decide_visibility(
            room_id, period, state, self.users, expected=self.policy.retention_state(period),
            text=text, set_state=vis.set_state, notice=notice,
            last_topic_line=last_topic_line, said=said, notice_event_id=notice_event_id)
        unable += plan.unable
        if apply and plan.topic_line is not None:
            await self.kv.component_put(TOPIC_COMPONENT, room_id, plan.topic_line,
                                        self.clock_ms())
        return list(plan.actions)

    async def run_visibility(self, room_id: str, actions: Sequence[Action], run: str) -> int:
        done = 0
        text_sent: str | None = None
        for a in actions:
            # the key follows the room and the text, so a rerun is deduplicated by Synapse
            key = f"retention-vis:{room_id}:{a.kind}:{_digest(str(a.to_dict()))}"
            o = await self.executor.run_direct(a, key, source="retention")
            if o.status != "applied":
                log.warning("retention visibility in %s: %s failed: %s", room_id, a.kind,
                            o.detail)
                return done
            done += 1
            if isinstance(a, SendEvent):
                body = a.content.get("m.new_content", a.content).get("body")
                text_sent = body
                if "m.relates_to" not in a.content and o.detail.startswith("$"):
                    old = await self.retention_rooms.retention_room_get(room_id)
                    await self.retention_rooms.retention_room_put(room_row(
                        old, room_id, old.room_class if old else None, self.clock_ms(),
                        notice_event_id=o.detail))
        if text_sent is not None:
            await self.kv.component_put(NOTICE_COMPONENT, room_id, text_sent,
                                        self.clock_ms())
        return done


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def room_row(old: RetentionRoom | None, room_id: str, room_class: str | None, now: int,
             **changes: Any) -> RetentionRoom:
    """The room's retention row: ``old`` (or a new one) with ``changes``."""
    base = dict(room_id=room_id, room_class=room_class, override_ms=None, override_by=None,
                purged_up_to=None, last_purge_at=None, notice_event_id=None,
                state_set_at=None, updated_at=now)
    if old is not None:
        base.update({k: getattr(old, k) for k in base if k not in ("updated_at",)})
        if room_class is not None:
            base["room_class"] = room_class
    base.update(changes)
    return RetentionRoom(**base)

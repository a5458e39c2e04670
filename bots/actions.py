"""The bots' own action: :class:`BotMessage` (a message sent as a bot) and its applier.

A bot answers with actions, so its replies go through the outbox: exactly once, with
idempotent transaction ids, audited (see :mod:`bots.bot`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from bridge.matrix.executor import Applier, Outcome, txn_id_for
from bridge.policy.actions import Action

from .sending import MessageSender, SendRefused


@dataclass(frozen=True, kw_only=True)
class BotMessage(Action):
    """Send an ``m.room.message`` as the bot (``actor``), encrypted where the room is."""

    kind: ClassVar[str] = "bot_message"
    room: str
    content: dict[str, Any] = field(default_factory=dict)


def bot_message_applier(sender: MessageSender) -> Applier:
    """The executor's applier for :class:`BotMessage` (one for every bot)."""

    async def apply(action: BotMessage, key: str, *, resend: bool) -> Outcome:
        assert action.actor is not None
        try:
            eid = await sender.send(action.room, action.content, txn_id=txn_id_for(key),
                                    sender=action.actor, resend=resend)
        except SendRefused as e:
            return Outcome("failed", e.reason)
        return Outcome("applied", eid)

    return apply

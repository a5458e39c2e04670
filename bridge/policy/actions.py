"""Actions: the data every decision produces.

Policy functions are pure; they return lists of these frozen dataclasses. The executor
turns each into homeserver calls, the CLI prints them (`plan`, `explain`), and the store keeps
them in the durable outbox between decision and execution. Each action names the rule that
produced it and a machine-readable reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

ACTION_TYPES: dict[str, type[Action]] = {}


@dataclass(frozen=True, kw_only=True)
class Action:
    """Base of all actions. ``actor`` is the local user to act as (None: Enclave's bot)."""

    kind: ClassVar[str] = "action"
    rule_id: str
    reason: str
    actor: str | None = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        ACTION_TYPES[cls.kind] = cls

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including ``kind``; :func:`action_from_dict` reverses it."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @property
    def room_id(self) -> str | None:
        return getattr(self, "room", None)

    def describe(self) -> str:
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("rule_id", "reason", "content")
        }
        args = ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return f"{self.kind}({args}) [{self.rule_id}: {self.reason}]"


def action_from_dict(data: dict[str, Any]) -> Action:
    """Rebuild an action stored with :meth:`Action.to_dict`."""
    data = dict(data)
    kind = data.pop("kind")
    try:
        cls = ACTION_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown action kind {kind!r}") from None
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class SendEvent(Action):
    """Send a room event (message, notice, reaction) as ``actor``."""

    kind: ClassVar[str] = "send_event"
    room: str
    event_type: str
    content: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SetState(Action):
    """Set a state event as ``actor``."""

    kind: ClassVar[str] = "set_state"
    room: str
    event_type: str
    state_key: str = ""
    content: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Invite(Action):
    kind: ClassVar[str] = "invite"
    room: str
    user: str


@dataclass(frozen=True, kw_only=True)
class Join(Action):
    """Join ``room`` as ``actor`` (a local user Enclave may act as)."""

    kind: ClassVar[str] = "join"
    room: str


@dataclass(frozen=True, kw_only=True)
class Leave(Action):
    """Leave ``room`` as ``actor``; for an invitee this rejects the invite."""

    kind: ClassVar[str] = "leave"
    room: str


@dataclass(frozen=True, kw_only=True)
class Redact(Action):
    """Redact ``event_id`` in ``room`` as ``actor`` (its content is removed for everyone)."""

    kind: ClassVar[str] = "redact"
    room: str
    event_id: str


@dataclass(frozen=True, kw_only=True)
class Kick(Action):
    kind: ClassVar[str] = "kick"
    room: str
    user: str

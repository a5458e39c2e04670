"""What separation's enforcement produces besides the core actions: notices to people,
``not_done`` records, findings for operators and the reconciliation plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..actions import Action


@dataclass(frozen=True, kw_only=True)
class NotifyUser(Action):
    """Tell a local user, in a direct chat with Enclave's bot, what policy did and why.

    ``once_key`` makes it once-only across retries, restarts and the three enforcement
    layers: the same incident is never told twice.
    """

    kind: ClassVar[str] = "notify_user"
    user: str
    body: str
    once_key: str


@dataclass(frozen=True, kw_only=True)
class NotDone(Action):
    """What policy requires in a room and Enclave cannot do under its own name there (it
    never acts as a member instead): recorded as a ``not_done`` audit record, logged as a
    finding for operators and counted (``enclave_separation_enforced{kind="not_done"}``).
    ``message`` says why and how to fix it."""

    kind: ClassVar[str] = "not_done"
    room: str
    user: str | None = None  # whom it concerned (the member to remove), if anyone
    message: str


@dataclass(frozen=True)
class Finding:
    """Something reconciliation noticed and did not (or could not) fix."""

    rule_id: str
    room_id: str
    subject: str
    message: str


@dataclass(frozen=True)
class SeparationPlan:
    actions: list[Action]
    findings: list[Finding]
    rooms: int = 0

"""Policy test cases (``enclave policy test CASES.yaml``): facts in, expected decision out.

A case says who does what where, and what the policy must answer (decision, rule id,
optionally a piece of the reason, the room's class, who the person is to policy). Cases
describe facts, not homeserver state: a person's directory facts are given inline (``people``
or on the case), or read from a directory file; a room is described by its class, members,
creators and flags. Checked strictly like the config: unknown keys, wrong types and missing
fields are refused with the case index and the YAML line.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import StrictModel

_USER_RE = re.compile(r"^@[^:\s]+:[^\s]+$")

# what a case asks, and the decision function it is answered by (bridge.policy.cases)
CaseAction = Literal["invite", "join", "dm", "user_search", "create_room", "membership",
                     "state_event", "classify"]
# the actions that need a room (``where``) and those that need a second person (``target``)
NEEDS_ROOM = frozenset({"invite", "join", "membership", "state_event", "classify"})
NEEDS_TARGET = frozenset({"invite", "dm", "user_search"})


def _user_id(v: str) -> str:
    if not _USER_RE.match(v):
        raise ValueError(f"{v!r} is not a Matrix user id (@name:server)")
    return v


class PersonFacts(StrictModel):
    """A local user's directory facts, as the directory view would hold them."""

    # False: a local account the directory does not list (policy.unlisted_local_users)
    staff: bool = True
    # False: a leaver (deactivated in the directory): no longer staff
    active: bool = True
    department: str | None = None
    title: str | None = None
    location: str | None = None
    groups: list[str] = Field(default_factory=list)
    display_name: str | None = None


class CaseUser(PersonFacts):
    """A user with their directory facts given on the case itself."""

    user: str

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        return _user_id(v)


class CaseRoom(StrictModel):
    """The room a case happens in, as facts."""

    id: str | None = Field(None, description="room id; default !case-N:SERVER")
    # Enclave's record of the room's class (None: classified by the policy's rules)
    room_class: str | None = Field(None, alias="class")
    # the server hosting the room (default: this homeserver); a room on another server
    # this server has no state for is unknown to policy (known: false)
    server: str | None = None
    known: bool | None = Field(None, description="this server holds the room's state")
    members: list[str] | dict[str, Literal["join", "invite", "knock"]] = Field(
        default_factory=list, description="user ids (joined), or user id -> membership")
    creators: list[str] = Field(default_factory=list)
    name: str | None = None
    aliases: list[str] = Field(default_factory=list)
    federate: bool = True
    is_direct: bool | None = None
    join_rule: str | None = None
    encrypted: bool = False
    history_visibility: str | None = None
    room_version: str = "12"
    power: dict[str, Any] = Field(default_factory=dict)
    # join: the invitation into this (remote) room was one Enclave approved
    invite_approved: bool = False

    @field_validator("creators")
    @classmethod
    def _creators(cls, v: list[str]) -> list[str]:
        return [_user_id(u) for u in v]

    @field_validator("members")
    @classmethod
    def _members(cls, v: list[str] | dict[str, str]) -> list[str] | dict[str, str]:
        for u in v:
            _user_id(u)
        return v


class CaseEvent(StrictModel):
    """The state event of a ``state_event`` case."""

    type: str
    state_key: str = ""
    content: dict[str, Any] = Field(default_factory=dict)


class CaseExpect(StrictModel):
    """What the policy must answer; only what is given is compared."""

    decision: Literal["allow", "deny"] | None = None
    rule_id: str | None = None
    # a piece of the reason or of the message the person refused would read (any case)
    reason: str | None = None
    room_class: str | None = Field(None, alias="class")
    # what policy makes of ``who``: service, staff, partner, guest or external
    kind: Literal["service", "staff", "partner", "guest", "external"] | None = None


class PolicyCase(StrictModel):
    """One case: who does what where, and the expected answer."""

    name: str | None = None
    who: str | CaseUser
    action: CaseAction
    target: str | CaseUser | None = None
    where: CaseRoom | None = None
    # create_room: the createRoom request body (name, room_alias_name, is_direct, invite …)
    request: dict[str, Any] = Field(default_factory=dict)
    event: CaseEvent | None = None
    # the time the decision is made at (guest expiry); default: the file's ``now``
    now: datetime | date | None = None
    expect: CaseExpect

    @field_validator("who", "target")
    @classmethod
    def _user(cls, v: str | CaseUser | None) -> str | CaseUser | None:
        return _user_id(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _complete(self) -> PolicyCase:
        problems = []
        if self.action in NEEDS_ROOM and self.where is None:
            problems.append(f"action {self.action} needs 'where' (the room)")
        if self.action in NEEDS_TARGET and self.target is None:
            problems.append(f"action {self.action} needs 'target' (the other person)")
        if self.action == "state_event" and self.event is None:
            problems.append("action state_event needs 'event' (type, state_key, content)")
        e = self.expect
        if self.action == "classify":
            if e.room_class is None:
                problems.append("action classify needs 'expect.class'")
        elif e.decision is None or e.rule_id is None:
            problems.append("give 'expect.decision' and 'expect.rule_id'")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PolicyCases(StrictModel):
    """A case file: shared directory facts, the time, and the cases."""

    # the time decisions are made at, unless a case says (guest expiry); default: now
    now: datetime | date | None = None
    # a directory file (the file source's YAML or CSV format), relative to the case file,
    # or 'config': the config's directory source (type file); its people are mapped to
    # user ids with the config's directory.mapping
    directory: str | None = None
    # directory facts by user id (over those of the directory file)
    people: dict[str, PersonFacts] = Field(default_factory=dict)
    cases: list[PolicyCase] = Field(min_length=1)

    @field_validator("people")
    @classmethod
    def _people(cls, v: dict[str, PersonFacts]) -> dict[str, PersonFacts]:
        for u in v:
            _user_id(u)
        return v

"""The ``policy:`` section: separation of work from personal contacts.

Principals are staff (active people in the directory view), partners (remote users or whole
servers), sponsored guests (until their expiry) and everyone else (external). Rooms have a
class; each class says who may be in it and whether it federates. DMs have their own pair
rules, and barriers keep groups apart. Every rule has an id that decisions name.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..kernel.timestamps import epoch_ms
from .base import StrictModel

RULE_ID_PATTERN = r"^[a-z0-9][a-z0-9._\-]*$"
_USER_RE = re.compile(r"^@[^:\s]+:[^\s]+$")
# The class Enclave gives direct-message rooms; its admission follows `dms`, not `allow`.
DM_CLASS = "dm"


class Selector(StrictModel):
    """Staff matched by directory groups and/or attributes (both given: both must match)."""

    groups: list[str] = Field(default_factory=list, description="any of these groups")
    attributes: dict[str, list[str]] = Field(
        default_factory=dict,
        description="attribute -> allowed values, e.g. {department: [Research]}",
    )

    @field_validator("attributes")
    @classmethod
    def _known(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for k in v:
            if k not in ("department", "location", "title"):
                raise ValueError(f"unknown attribute {k!r}; use department, location or title")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> Selector:
        if not self.groups and not self.attributes:
            raise ValueError("give groups and/or attributes")
        return self


class AdmissionConfig(StrictModel):
    """Who may be a member of a room of one class."""

    staff: bool = True
    # if given, only staff matching this selector (e.g. the department's own people)
    staff_only: Selector | None = None
    partners: bool = False
    guests: bool = False
    external: bool = False


class RoomClassConfig(StrictModel):
    id: str = Field(pattern=RULE_ID_PATTERN)
    description: str = ""
    allow: AdmissionConfig = AdmissionConfig()
    # False: rooms are created with m.federate false (the gate sets it) and remote users are
    # never admitted, partners included
    federate: bool = False
    encryption: Literal["required", "optional"] = "optional"
    # False: information barriers do not apply in rooms of this class (e.g. company-wide
    # announcement rooms); they still apply to direct chats
    barriers: bool = True
    # federating classes only (remote people can be present): the most history a member
    # may see, set at creation and kept (a change to something more visible is reverted).
    # 'joined': only what was sent after they joined; 'invited': after their invitation.
    history_visibility: Literal["joined", "invited"] = "joined"
    # 'required': Enclave's archive device (the bots' `archive` bot, an E2EE member of
    # its own) is kept in every room of this class and archives the plaintext of
    # encrypted messages; a message it cannot decrypt is recorded as a capture gap
    # (`enclave archive gaps`) and retried when the key arrives
    capture: Literal["off", "required"] = "off"
    # how staff are shown that the room is archived: a line appended to the room topic
    # (under Enclave's own identity) or one notice from the archive user
    capture_notice: Literal["topic", "notice"] = "notice"

    @field_validator("capture", mode="before")
    @classmethod
    def _capture_off(cls, v: object) -> object:
        # YAML reads a bare `off` as false
        return "off" if v is False else v

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v == DM_CLASS:
            raise ValueError(f"{DM_CLASS!r} is reserved for direct messages (see policy.dms)")
        return v


class ClassRuleConfig(StrictModel):
    """Classify rooms without Enclave's class state: first matching rule wins."""

    id: str = Field(pattern=RULE_ID_PATTERN)
    room_class: str
    alias: str | None = Field(None, description="regex matched against the room's aliases")
    name: str | None = Field(None, description="regex matched against the room's name")
    creator_group: str | None = Field(None, description="the creator is in this group")

    @field_validator("alias", "name")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _some_condition(self) -> ClassRuleConfig:
        if self.alias is None and self.name is None and self.creator_group is None:
            raise ValueError("give at least one of alias, name or creator_group")
        return self


class PartnerConfig(StrictModel):
    id: str = Field(pattern=RULE_ID_PATTERN)
    description: str = ""
    servers: list[str] = Field(default_factory=list, description="every user of these servers")
    users: list[str] = Field(default_factory=list)
    room_classes: list[str] = Field(default_factory=list,
                                    description="classes whose rooms they may join")
    dm: bool = Field(True, description="staff may hold direct chats with them")

    @field_validator("users")
    @classmethod
    def _users(cls, v: list[str]) -> list[str]:
        for u in v:
            if not _USER_RE.match(u):
                raise ValueError(f"{u!r} is not a Matrix user id")
        return v

    @model_validator(mode="after")
    def _someone(self) -> PartnerConfig:
        if not self.servers and not self.users:
            raise ValueError("give servers and/or users")
        return self


class GuestConfig(StrictModel):
    id: str = Field(pattern=RULE_ID_PATTERN)
    user: str
    sponsor: str = Field(description="the staff member responsible (Matrix user id)")
    # an unquoted YAML date or date-time (UTC unless it names a zone)
    expires: datetime | date = Field(description="removed from every room after this")
    room_classes: list[str] = Field(default_factory=list)
    dm: bool = True

    @field_validator("user", "sponsor")
    @classmethod
    def _user(cls, v: str) -> str:
        if not _USER_RE.match(v):
            raise ValueError(f"{v!r} is not a Matrix user id")
        return v

    @property
    def expires_ms(self) -> int:
        """Expiry in ms since the epoch; a bare date means the start of that day, UTC."""
        return epoch_ms(self.expires)


Verdict = Literal["allow", "deny"]


class DmExceptionConfig(StrictModel):
    """Staff matching ``who`` may hold direct chats with the listed kinds anyway."""

    id: str = Field(pattern=RULE_ID_PATTERN)
    who: Selector
    allow: list[Literal["partner", "guest", "external"]]


class DmConfig(StrictModel):
    staff_staff: Verdict = "allow"
    staff_partner: Verdict = "allow"
    staff_guest: Verdict = "allow"
    staff_external: Verdict = "deny"
    # neither side is staff (e.g. a local account the directory does not list)
    non_staff: Verdict = "deny"
    exceptions: list[DmExceptionConfig] = Field(default_factory=list)
    # the most history a member of a direct chat may see (kept like a class's):
    # 'invited' lets the invitee read what was sent after their invitation, so a DM's
    # first message is not lost; someone invited later still sees nothing from before
    history_visibility: Literal["joined", "invited"] = "invited"


class BarrierConfig(StrictModel):
    """Two sets of staff that may not share a direct chat or a room."""

    id: str = Field(pattern=RULE_ID_PATTERN)
    description: str = ""
    between: list[Selector] = Field(min_length=2, max_length=2)
    # rooms that already mix both sides when the barrier is added: 'report' them, or
    # 'remove' the second side's members from them
    existing: Literal["report", "remove"] = "report"


class NotifyConfig(StrictModel):
    enabled: bool = True
    # named in every refusal: whom staff should ask for an exception
    contact: str = "your IT administrators"


class ReconcileConfig(StrictModel):
    interval_minutes: int = Field(60, ge=0, description="0 = only on demand (CLI)")
    max_concurrency: int = Field(8, ge=1, le=64)


class PolicyConfig(StrictModel):
    enabled: bool = True
    default_class: str = "internal"
    # local accounts the directory does not list (made by hand, left over): 'external'
    # treats them like outsiders; 'staff' trusts them
    unlisted_local_users: Literal["external", "staff"] = "external"
    # react to disallowed invites/joins through the appservice (works without the gate)
    reactive: bool = True
    room_classes: list[RoomClassConfig] = Field(
        default_factory=lambda: [RoomClassConfig(id="internal")])
    classify: list[ClassRuleConfig] = Field(default_factory=list)
    partners: list[PartnerConfig] = Field(default_factory=list)
    guests: list[GuestConfig] = Field(default_factory=list)
    dms: DmConfig = DmConfig()
    barriers: list[BarrierConfig] = Field(default_factory=list)
    notify: NotifyConfig = NotifyConfig()
    reconcile: ReconcileConfig = ReconcileConfig()

    @model_validator(mode="after")
    def _references(self) -> PolicyConfig:
        classes = {c.id for c in self.room_classes}
        problems = []
        if len(classes) != len(self.room_classes):
            problems.append("room_classes: class ids must be unique")
        if self.default_class not in classes:
            problems.append(f"default_class {self.default_class!r} is not a room class")
        for section, rules in (("classify", self.classify), ("partners", self.partners),
                               ("guests", self.guests)):
            for i, r in enumerate(rules):
                wanted = [r.room_class] if isinstance(r, ClassRuleConfig) else r.room_classes
                for c in wanted:
                    if c not in classes:
                        problems.append(f"{section}[{i}]: unknown room class {c!r}")
        ids: dict[str, str] = {}
        for section, rules in (("classify", self.classify), ("partners", self.partners),
                               ("guests", self.guests), ("barriers", self.barriers),
                               ("dms.exceptions", self.dms.exceptions)):
            for i, r in enumerate(rules):
                if r.id in ids:
                    problems.append(f"{section}[{i}]: rule id {r.id!r} already used at "
                                    f"{ids[r.id]}")
                ids.setdefault(r.id, f"{section}[{i}]")
        if problems:
            raise ValueError("; ".join(problems))
        return self

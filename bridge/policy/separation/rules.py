"""Separation's vocabulary: rule ids, state types, trust order, and the decision values.

:class:`Decision` (allow or deny, and the rule that decided), :class:`RoomClass`,
:class:`Principal` (what policy makes of a user id) and the small pure helpers every part of
separation shares: selectors, history visibility order, the class record's content and the
federation whitelist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ...kernel.ids import server_of
from ...model.people import StaffRecord

if TYPE_CHECKING:
    from ...config.policy import GuestConfig, PartnerConfig, PolicyConfig, Selector

DM_CLASS = "dm"  # mirrors bridge.config.policy.DM_CLASS (not imported: keeps this pure)
CLASS_STATE_TYPE = "org.enclave.room_class"
HISTORY_STATE_TYPE = "m.room.history_visibility"
# State only Enclave may change: the room's class, and retention (the retention issue).
PROTECTED_STATE_TYPES = frozenset({CLASS_STATE_TYPE, "m.room.retention"})
# How much history each m.room.history_visibility value shows, least first: a class that
# requires one value also accepts the stricter ones.
HISTORY_ORDER = {"joined": 0, "invited": 1, "shared": 2, "world_readable": 3}
# Built-in rules (no YAML line): see docs/operators/separation.md.
UNKNOWN_ROOM_RULE = "builtin.unknown_remote_room"
APPROVED_INVITE_RULE = "builtin.approved_invite"
CLASS_RECORD_RULE = "builtin.class_record"
HISTORY_RULE = "builtin.history_visibility"
ENCRYPTION_CONTENT = {"algorithm": "m.megolm.v1.aes-sha2"}
# Enclave's own users lack the power in a room to do what policy requires there.
ENCLAVE_POWER_RULE = "builtin.enclave_power"

Kind = Literal["service", "staff", "partner", "guest", "external"]
# when a direct chat is not allowed, the less trusted side leaves
TRUST = {"external": 0, "guest": 1, "partner": 2, "staff": 3, "service": 4}


# -- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """Allow or deny, the rule that decided (id and YAML path), and why."""

    allow: bool
    rule_id: str
    path: str
    reason: str
    message: str = ""  # for the person refused: names the rule and whom to ask

    def describe(self) -> str:
        verdict = "ALLOW" if self.allow else "DENY"
        return f"{verdict} by {self.rule_id} ({self.path}): {self.reason}"


@dataclass(frozen=True)
class RoomClass:
    """A room's class and how it was found (``state``, ``dm``, ``rule`` or ``default``)."""

    id: str
    rule_id: str
    path: str
    source: str


@dataclass(frozen=True)
class Principal:
    user_id: str
    kind: Kind
    local: bool
    staff: StaffRecord | None = None
    partner: PartnerConfig | None = None
    partner_index: int = -1
    guest: GuestConfig | None = None
    guest_index: int = -1
    expired: bool = False

    @property
    def groups(self) -> frozenset[str]:
        return self.staff.groups if self.staff is not None else frozenset()


@dataclass(frozen=True)
class CreateDecision:
    decision: Decision
    room_class: RoomClass
    edits: dict[str, Any] | None = None


# -- helpers ---------------------------------------------------------------------------------
def matches(selector: Selector, staff: StaffRecord | None) -> bool:
    """Whether a staff member matches a selector (groups: any; attributes: all given)."""
    if staff is None:
        return False
    if selector.groups and not (staff.groups & set(selector.groups)):
        return False
    for attr, values in selector.attributes.items():
        if staff.attribute(attr) not in values:
            return False
    return True


def history_within(value: Any, required: str) -> bool:
    """Whether history visibility ``value`` (None: unset, which means ``shared``) shows
    no more than ``required``."""
    v = value if isinstance(value, str) and value in HISTORY_ORDER else "shared"
    return HISTORY_ORDER[v] <= HISTORY_ORDER[required]


def class_content(room_class: str, rule_id: str) -> dict[str, Any]:
    """The class state Enclave writes for its record (the gate's carries a grant too)."""
    return {"class": room_class, "rule_id": rule_id, "set_by": "enclave"}


def federation_whitelist(config: PolicyConfig, server_name: str) -> list[str]:
    """The servers the corporate homeserver may federate with for separation to hold
    without the gate module (Synapse's ``federation_domain_whitelist``): its own, and those
    of the policy's partners (their servers and users) and guests. Without the gate nothing
    refuses a staff member's join of a room hosted elsewhere before it happens; this list
    makes Synapse refuse every server the policy does not name."""
    servers = [server_name]
    for p in config.partners:
        servers += p.servers
        servers += [server_of(u) for u in p.users]
    servers += [server_of(g.user) for g in config.guests]
    return list(dict.fromkeys(s for s in servers if s))

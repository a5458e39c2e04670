"""Power in a room, and who of Enclave's own users may act there: one rule, one place.

Every change Enclave makes in a room appears under Enclave's own identity (its bot, else its
admin user), never as one of the room's members. Retention (state, notices, redactions) and
separation (kicks, reverted class and history state) both ask :func:`enclave_actor`; where it
answers None the caller reports what it could not do instead of doing it as someone else.
Pure: no I/O; the caller passes the room's state or facts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Room versions whose creators have unlimited power, are not listed in the power levels'
# ``users`` and cannot be kicked (MSC4289).
CREATOR_POWER_VERSIONS = frozenset({"12"})
CREATOR_POWER = 2**53  # above any power level
# The power Enclave's bot gets in the group rooms created through the gate: enough to kick
# and to put back any state the default power levels protect (history visibility is 100).
ENCLAVE_POWER = 100
# Power levels' defaults for the actions that have one (the spec: kick/ban/redact 50,
# invite 0) when the room's power levels do not name them.
_ACTION_DEFAULTS = {"kick": 50, "ban": 50, "redact": 50, "invite": 0}


def _int(v: Any, default: int) -> int:
    if isinstance(v, bool):
        return default
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v):
        return int(v)
    return default


@dataclass(frozen=True)
class RoomPower:
    """A room's power facts: its ``m.room.power_levels`` content (None: the room has none),
    its version and its creators (the create event's sender and, in v12, the additional
    creators)."""

    levels: Mapping[str, Any] | None
    room_version: str | None
    creators: frozenset[str]

    @classmethod
    def from_state(cls, state: Sequence[Mapping[str, Any]]) -> RoomPower:
        """From a room's full state (admin API or /state)."""
        create = next((e for e in state if e.get("type") == "m.room.create"), {})
        content = create.get("content") or {}
        creators = {create.get("sender")}
        extra = content.get("additional_creators")
        if isinstance(extra, list):
            creators.update(extra)
        levels = next((e.get("content") or {} for e in state
                       if e.get("type") == "m.room.power_levels"
                       and e.get("state_key", "") == ""), None)
        version = str(content.get("room_version", "1")) if create else None
        return cls(levels, version, frozenset(u for u in creators if isinstance(u, str)))

    @property
    def creator_power(self) -> bool:
        """Whether creators outrank everyone (room version 12)."""
        return self.room_version in CREATOR_POWER_VERSIONS

    def of(self, user: str) -> int:
        """``user``'s power level."""
        if self.creator_power and user in self.creators:
            return CREATOR_POWER
        if not self.levels:
            # no power levels yet: the creator has 100, everyone else 0
            return 100 if user in self.creators else 0
        users = self.levels.get("users") or {}
        return _int(users.get(user), _int(self.levels.get("users_default"), 0))

    def needed(self, action: str) -> int:
        """The level ``kick``, ``ban``, ``redact`` or ``invite`` needs."""
        default = _ACTION_DEFAULTS[action]
        return _int(self.levels.get(action), default) if self.levels else default

    def needed_state(self, event_type: str) -> int:
        """The level sending ``event_type`` state needs (0 without power levels)."""
        if not self.levels:
            return 0
        return _int((self.levels.get("events") or {}).get(event_type),
                    _int(self.levels.get("state_default"), 50))

    def removable(self, target: str) -> bool:
        """Whether anyone at all could kick ``target`` (v12 creators cannot be kicked)."""
        return not (self.creator_power and target in self.creators)


def enclave_actor(members: Mapping[str, str], power: RoomPower, enclave_users: Sequence[str],
                  needed: int, *, target: str | None = None) -> str | None:
    """THE choice of who acts for Enclave in a room: the first of ``enclave_users`` (its bot,
    then its admin) that is joined (``members``: user -> membership) with at least
    ``needed`` power, and, with ``target`` (a kick), more power than the target. None if
    none of them can: the caller reports it and never acts as a member of the room."""
    if target is not None and not power.removable(target):
        return None
    floor = power.of(target) if target is not None else None
    for u in enclave_users:
        if members.get(u) != "join" or u == target:
            continue
        p = power.of(u)
        if p >= needed and (floor is None or p > floor):
            return u
    return None


def members_from_state(state: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """user -> membership, from a room's full state."""
    return {str(e.get("state_key")): str((e.get("content") or {}).get("membership"))
            for e in state if e.get("type") == "m.room.member"
            and isinstance(e.get("state_key"), str)}

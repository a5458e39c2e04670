"""Power in a room, and who of Enclave's own users may act there: one rule, one place.

Every change Enclave makes in a room appears under Enclave's own identity (its bot, else its
admin user), never as one of the room's members. Retention (state, notices, redactions) and
separation (kicks, reverted class and history state) both ask :func:`enclave_actor`; where it
answers None the caller reports what it could not do instead of doing it as someone else.
Pure: no I/O; the caller passes the room's state or facts.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..kernel.ids import localpart_of, server_of
from ..kernel.power import (
    CREATOR_POWER,  # noqa: F401  (re-exported for callers of this module)
    action_level,
    creators_have_unlimited_power,
    power_context,
    state_level,
    user_level,
)

# The power Enclave's bot gets in the group rooms created through the gate: enough to kick
# and to put back any state the default power levels protect (history visibility is 100).
ENCLAVE_POWER = 100


def is_enclave_user(user_id: str | None, *, server_name: str, own_users: Collection[str],
                    namespace_prefix: str) -> bool:
    """Whether ``user_id`` is one of Enclave's own users on its homeserver: one of
    ``own_users`` (its bot, its admin) or a localpart in the appservice's namespace
    (``namespace_prefix``; an empty prefix claims no namespace). Separation treats them as
    service principals, retention lets them change a room's period."""
    if not user_id or server_of(user_id) != server_name:
        return False
    if user_id in own_users:
        return True
    return bool(namespace_prefix) and localpart_of(user_id).startswith(namespace_prefix)


@dataclass(frozen=True)
class RoomPower:
    """A room's power facts: its ``m.room.power_levels`` content (None: the room has none),
    its version and its creators (the create event's sender and the additional creators).
    The levels follow the kernel's one rule (:mod:`bridge.kernel.power`)."""

    levels: Mapping[str, Any] | None
    room_version: str | None
    creators: frozenset[str]

    @classmethod
    def from_state(cls, state: Sequence[Mapping[str, Any]]) -> RoomPower:
        """From a room's full state (admin API or /state)."""
        levels, version, creators = power_context(state)
        has_create = any(e.get("type") == "m.room.create" for e in state)
        return cls(levels, version if has_create else None, creators)

    @property
    def creator_power(self) -> bool:
        """Whether creators outrank everyone (room version 12 and later)."""
        return creators_have_unlimited_power(self.room_version)

    def of(self, user: str) -> int:
        """``user``'s power level."""
        return user_level(user, self.levels or None, room_version=self.room_version,
                          creators=self.creators)

    def needed(self, action: str) -> int:
        """The level ``kick``, ``ban``, ``redact`` or ``invite`` needs."""
        return action_level(self.levels or None, action)

    def needed_state(self, event_type: str) -> int:
        """The level sending ``event_type`` state needs (0 without power levels)."""
        return state_level(self.levels or None, event_type)

    def removable(self, target: str) -> bool:
        """Whether anyone at all could kick ``target`` (v12+ creators cannot be kicked)."""
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

"""What the homeserver has, as directory sync reads it: accounts, managed rooms with their
members and power levels, and what Enclave remembers of each person it provisioned."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...kernel.power import creators_have_unlimited_power, user_level

# -- what the homeserver has -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AccountState:
    user_id: str
    displayname: str | None
    deactivated: bool = False
    erased: bool = False
    admin: bool = False  # a server admin


@dataclass(frozen=True)
class RoomView:
    """One room's membership, power levels and creators (unlimited power from room v12,
    see :mod:`bridge.kernel.power`)."""

    room_id: str
    members: Mapping[str, str]  # user id -> join | invite | leave | ban | knock
    power_levels: Mapping[str, Any]
    creators: frozenset[str] = frozenset()
    join_rules: Mapping[str, Any] = field(default_factory=dict)
    room_version: str | None = None

    @property
    def privileged_creators(self) -> frozenset[str]:
        """Creators with unlimited power (room v12+), who must not be in the users map."""
        return self.creators if creators_have_unlimited_power(self.room_version) else frozenset()

    def admits_members_of(self, parent_room_id: str) -> bool:
        """Whether members of ``parent_room_id`` may join without an invite."""
        if self.join_rules.get("join_rule") not in ("restricted", "knock_restricted"):
            return False
        return any(a.get("type") == "m.room_membership" and a.get("room_id") == parent_room_id
                   for a in self.join_rules.get("allow") or [] if isinstance(a, dict))

    def level(self, user_id: str) -> int:
        """``user_id``'s power level (the kernel's one rule)."""
        return user_level(user_id, self.power_levels or None, room_version=self.room_version,
                          creators=self.creators)


@dataclass(frozen=True)
class HomeserverView:
    """What sync needs to know of the homeserver."""

    # local accounts by user id (every account the diff might touch)
    accounts: Mapping[str, AccountState]
    # managed rooms that exist, by key
    rooms: Mapping[str, RoomView] = field(default_factory=dict)
    # joined rooms of people about to leave, by user id
    leaver_rooms: Mapping[str, Sequence[RoomView]] = field(default_factory=dict)
    # lower-cased email -> the account that has it on the homeserver (asked for the emails
    # this run would give someone; absent: nobody has it)
    email_owners: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PersonRecord:
    """What Enclave remembers of a provisioned person (mirrors the store's record)."""

    person_id: str
    user_id: str
    status: str  # active | deactivated | erased
    email: str | None
    displayname: str | None
    deactivated_at: int | None = None

"""The actions of directory sync: accounts (create, update, reactivate, deactivate, erase)
and managed rooms (create, hand a leaver's room over, join through the parent space).

Each is a frozen :class:`~bridge.policy.actions.Action` that the executor applies through
an applier directory sync registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..actions import Action, Join

# a managed room's symbolic id (``managed:<key>``) until it exists: the executor's room
# resolver turns it into the room id
MANAGED_REF = "managed:"

# -- actions of directory sync -------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CreateAccount(Action):
    """Create a local account (admin API) with no password unless the directory gives one
    for evaluation; ``email`` becomes its email threepid."""

    kind: ClassVar[str] = "create_account"
    user: str
    person_id: str
    displayname: str
    email: str | None = None
    initial_password: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d.get("initial_password"):
            d["initial_password"] = "***"  # never into plans, outboxes or logs
        return d

    def describe(self) -> str:
        return (f"{self.kind}(user={self.user}, displayname={self.displayname!r}, "
                f"email={self.email}) [{self.rule_id}: {self.reason}]")


@dataclass(frozen=True, kw_only=True)
class UpdateAccount(Action):
    """Change only the listed profile fields (None: leave as is)."""

    kind: ClassVar[str] = "update_account"
    user: str
    person_id: str
    displayname: str | None = None
    # None: unchanged; () removes every email
    emails: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class ReactivateAccount(Action):
    kind: ClassVar[str] = "reactivate_account"
    user: str
    person_id: str
    displayname: str
    email: str | None = None


@dataclass(frozen=True, kw_only=True)
class DeactivateAccount(Action):
    """Deactivate: Synapse logs out every session and removes the user from every room."""

    kind: ClassVar[str] = "deactivate_account"
    user: str
    person_id: str


@dataclass(frozen=True, kw_only=True)
class EraseAccount(Action):
    """Erase a deactivated account (GDPR): profile gone, messages hidden from new joiners."""

    kind: ClassVar[str] = "erase_account"
    user: str
    person_id: str


@dataclass(frozen=True, kw_only=True)
class CreateManagedRoom(Action):
    """Create a managed space or room as Enclave's bot (never federating, invite only),
    placed in its parent space; idempotent through its alias."""

    kind: ClassVar[str] = "create_managed_room"
    key: str
    name: str
    is_space: bool = False
    topic: str | None = None
    alias: str | None = None
    parent_key: str | None = None
    # power levels of directory members, set at creation
    power_users: dict[str, int] = field(default_factory=dict)
    # members of the parent space may join without an invite (same membership rule)
    join_through_parent: bool = False


@dataclass(frozen=True, kw_only=True)
class HandOverRoom(Action):
    """Before a leaver goes: acting as the leaver (the only admin), bring ``successor`` into
    ``room`` and give them admin power."""

    kind: ClassVar[str] = "hand_over_room"
    room: str
    user: str  # the leaver
    successor: str
    successor_joined: bool = False


@dataclass(frozen=True, kw_only=True)
class JoinThroughParent(Join):
    """Join a room whose join rule admits the members of its parent space (``restricted``),
    so no invite is needed: one membership event instead of two. Runs after the space
    memberships of the same run, since the join is authorised by them."""

    kind: ClassVar[str] = "join_through_parent"

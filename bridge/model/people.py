"""The directory as data: people and groups, whatever source they came from.

Sources (file, LDAP/Active Directory, SCIM) turn what they read into a
:class:`DirectorySnapshot`; the pure sync diff (``bridge.policy.directory``) compares it with
the homeserver. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

# The person attributes a source maps and templates may use.
PERSON_ATTRIBUTES = (
    "id", "username", "display_name", "email", "title", "department", "location", "manager",
)


@dataclass(frozen=True, slots=True)
class Person:
    """One person from the directory.

    ``id`` is the source's stable id (entryUUID, objectGUID, SCIM id, the file's id): it never
    changes when the person is renamed or moved, so it keys everything Enclave remembers.
    ``manager`` is the manager's stable id. ``groups`` are the ids of the groups the person is
    a direct or nested member of (filled by :meth:`DirectorySnapshot.build`).
    """

    id: str
    username: str
    display_name: str
    email: str | None = None
    title: str | None = None
    department: str | None = None
    location: str | None = None
    manager: str | None = None
    disabled: bool = False
    groups: frozenset[str] = frozenset()
    # evaluation only (file source): set as the account's password when it is created
    initial_password: str | None = field(default=None, repr=False, compare=False)

    def attribute(self, name: str) -> str | None:
        """A mapped attribute by name (``department``, ``title`` …), None if unset."""
        if name not in PERSON_ATTRIBUTES:
            raise KeyError(name)
        return getattr(self, name)


@dataclass(frozen=True, slots=True)
class Group:
    """A directory group. ``members`` and ``owners`` are person ids (nesting resolved)."""

    id: str
    name: str
    members: frozenset[str] = frozenset()
    owners: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DirectorySnapshot:
    """Everything one read of a source returned: people and groups by id."""

    people: Mapping[str, Person]
    groups: Mapping[str, Group]
    source: str = ""

    @classmethod
    def build(cls, people: Iterable[Person], groups: Iterable[Group] = (),
              source: str = "") -> DirectorySnapshot:
        """Index people and groups and fill each person's ``groups`` from the group members.

        Group entries are the truth for membership (a group change does not touch the
        member's entry in LDAP), so any ``groups`` a source put on a person are merged with
        the memberships the group entries list. Members that are not people are dropped.
        Duplicate person or group ids raise ValueError: a source answering them is broken.
        """
        by_id: dict[str, Person] = {}
        for p in people:
            if p.id in by_id:
                raise ValueError(f"duplicate person id {p.id!r} in the directory answer")
            by_id[p.id] = p
        gs: dict[str, Group] = {}
        member_of: dict[str, set[str]] = {pid: set(p.groups) for pid, p in by_id.items()}
        for g in groups:
            if g.id in gs:
                raise ValueError(f"duplicate group id {g.id!r} in the directory answer")
            members = frozenset(m for m in g.members if m in by_id)
            gs[g.id] = replace(g, members=members,
                               owners=frozenset(o for o in g.owners if o in by_id))
            for m in members:
                member_of[m].add(g.id)
        # groups named only on people (e.g. a file source listing groups per person)
        for names in member_of.values():
            for gid in names:
                if gid not in gs:
                    gs[gid] = Group(id=gid, name=gid)
        final_groups = {
            gid: replace(g, members=frozenset(
                pid for pid, names in member_of.items() if gid in names))
            for gid, g in gs.items()
        }
        final_people = {
            pid: (p if p.groups == frozenset(member_of[pid])
                  else replace(p, groups=frozenset(member_of[pid])))
            for pid, p in by_id.items()
        }
        return cls(MappingProxyType(final_people), MappingProxyType(final_groups), source)

    def active_people(self) -> list[Person]:
        """People who are not disabled, in id order."""
        return [p for _, p in sorted(self.people.items()) if not p.disabled]


class DirectoryError(Exception):
    """A source could not give a complete, trustworthy answer; sync must change nothing."""


@dataclass(frozen=True, slots=True)
class StaffRecord:
    """What the last directory sync knew about one provisioned person, by Matrix user id.

    Separation policy decides on it (staff, groups, attributes) and bots target with it;
    both read it from the store, so they agree with the last sync and need no directory
    round trip. ``active`` is False for leavers (deactivated or erased accounts).
    """

    user_id: str
    person_id: str
    active: bool
    username: str
    display_name: str
    email: str | None = None
    title: str | None = None
    department: str | None = None
    location: str | None = None
    manager_user_id: str | None = None
    groups: frozenset[str] = frozenset()
    updated_at: int = 0

    def attribute(self, name: str) -> str | None:
        """A directory attribute by name (``department``, ``title``, ``location`` …)."""
        if name in ("user_id", "person_id", "username", "display_name", "email", "title",
                    "department", "location", "manager_user_id"):
            return getattr(self, name)
        raise KeyError(name)

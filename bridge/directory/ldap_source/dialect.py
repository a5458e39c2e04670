"""The two dialects (OpenLDAP, Active Directory) and the attribute mapping: which attribute
holds what (:class:`AttrNames`), an entry as a :class:`PersonRecord` or :class:`GroupRecord`,
and the snapshot assembled from them (group nesting and managers resolved locally). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ...config.directory import LdapAttributeMap
from ...model.people import DirectoryError, DirectorySnapshot, Group, Person
from .entries import (
    EntryError,
    as_text,
    decode_guid,
    first_text,
    flag_disabled,
    lower_keys,
    normalize_dn,
    ranged_values,
    uac_disabled,
)

# -- dialect / attribute names --------------------------------------------------------------

_AD_DEFAULTS = {
    "id": "objectGUID",
    "username": "sAMAccountName",
    "display_name": "displayName",
    "department": "department",
    "group_owner": "managedBy",
}


@dataclass(frozen=True)
class AttrNames:
    """The attribute names one dialect + attribute map reads."""

    dialect: str
    id: str
    username: str
    display_name: str
    email: str
    title: str
    department: str
    location: str
    manager: str
    disabled: str | None
    group_id: str
    group_name: str
    group_member: str
    group_owner: str

    @classmethod
    def of(cls, dialect: str, amap: LdapAttributeMap) -> AttrNames:
        """Effective names. For AD, fields the config left at their (OpenLDAP) defaults
        take AD's: objectGUID, sAMAccountName, displayName, department, managedBy; AD's
        disabled flag is always ``userAccountControl``."""
        values = amap.model_dump()
        if dialect == "ad":
            for k, v in _AD_DEFAULTS.items():
                if k not in amap.model_fields_set:
                    values[k] = v
            values["disabled"] = "userAccountControl"
        return cls(dialect=dialect, **values)

    def person_attributes(self) -> list[str]:
        names = [self.id, self.username, self.display_name, self.email, self.title,
                 self.department, self.location, self.manager]
        if self.disabled:
            names.append(self.disabled)
        return list(dict.fromkeys(names))

    def group_attributes(self) -> list[str]:
        return list(dict.fromkeys([self.group_id, self.group_name, self.group_member,
                                   self.group_owner]))


def stable_id(names: AttrNames, attrs: Mapping[str, Sequence[Any]]) -> str | None:
    """The entry's stable id: GUID-decoded for objectGUID, text otherwise; None if absent."""
    vals = attrs.get(names.id.lower()) or []
    for v in vals:
        if names.id.lower() == "objectguid":
            return decode_guid(v)
        t = as_text(v).strip()
        if t:
            return t
    return None


@dataclass(frozen=True)
class PersonRecord:
    """A person as read, before the manager DN is resolved against the other people."""

    dn: str
    person: Person
    manager_dn: str | None = None
    mark: str | None = None

    def to_json(self) -> dict[str, Any]:
        p = self.person
        return {"dn": self.dn, "manager_dn": self.manager_dn, "id": p.id,
                "username": p.username, "display_name": p.display_name, "email": p.email,
                "title": p.title, "department": p.department, "location": p.location,
                "disabled": p.disabled}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PersonRecord:
        return cls(dn=d["dn"], manager_dn=d.get("manager_dn"), person=Person(
            id=d["id"], username=d["username"], display_name=d["display_name"],
            email=d.get("email"), title=d.get("title"), department=d.get("department"),
            location=d.get("location"), disabled=bool(d.get("disabled"))))


def entry_to_person(dn: str, attrs: Mapping[str, Any], names: AttrNames,
                    mark_attr: str | None = None) -> PersonRecord:
    """One user entry -> :class:`PersonRecord`. Raises :class:`EntryError` when the
    entry has no stable id or no username (the caller skips it with a warning)."""
    a = lower_keys(attrs)
    pid = stable_id(names, a)
    if not pid:
        raise EntryError(f"{dn}: no {names.id} (stable id)")
    username = first_text(a, names.username)
    if not username:
        raise EntryError(f"{dn}: no {names.username} (username)")
    if names.dialect == "ad":
        uac = a.get("useraccountcontrol") or []
        disabled = uac_disabled(uac[0]) if uac else False
    else:
        disabled = flag_disabled(a.get(names.disabled.lower(), [])) if names.disabled else False
    person = Person(
        id=pid,
        username=username,
        display_name=first_text(a, names.display_name) or username,
        email=first_text(a, names.email),
        title=first_text(a, names.title),
        department=first_text(a, names.department),
        location=first_text(a, names.location),
        disabled=disabled,
    )
    return PersonRecord(dn=dn, person=person, manager_dn=first_text(a, names.manager),
                        mark=first_text(a, mark_attr))


@dataclass(frozen=True)
class GroupRecord:
    dn: str
    id: str
    name: str
    member_dns: tuple[str, ...] = ()
    owner_dns: tuple[str, ...] = ()


def entry_to_group(dn: str, attrs: Mapping[str, Any], names: AttrNames) -> GroupRecord:
    """One group entry -> :class:`GroupRecord`. Ranged member values must be complete
    (see :func:`ranged_values`); a ranged answer with more to fetch raises EntryError."""
    a = lower_keys(attrs)
    gid = first_text(a, names.group_id)
    if not gid:
        raise EntryError(f"{dn}: no {names.group_id} (group id)")
    members, nxt = ranged_values(a, names.group_member)
    owners, nxt_o = ranged_values(a, names.group_owner)
    if nxt is not None or nxt_o is not None:
        raise EntryError(f"{dn}: ranged values not fully read")
    return GroupRecord(
        dn=dn, id=gid, name=first_text(a, names.group_name) or gid,
        member_dns=tuple(t for t in (as_text(v).strip() for v in members) if t),
        owner_dns=tuple(t for t in (as_text(v).strip() for v in owners) if t),
    )


def resolve_groups(groups: Iterable[GroupRecord], person_ids: Mapping[str, str], *,
                   nested: bool = True) -> list[Group]:
    """Group records -> groups of person ids.

    ``person_ids`` maps normalised person DNs to ids. A member DN that is one of the
    groups is expanded transitively when ``nested`` (cycles are harmless); other member
    DNs (people outside the user search, foreign objects) are dropped. An owner DN that is
    a group stands for that group's members. Two groups with the same id raise
    :class:`DirectoryError` (memberships would silently depend on read order).
    """
    recs = list(groups)
    by_dn = {normalize_dn(g.dn): g for g in recs}
    seen: dict[str, GroupRecord] = {}
    for g in recs:
        if g.id in seen:
            raise DirectoryError(
                f"two LDAP groups share the id {g.id!r} ({seen[g.id].dn!r} and {g.dn!r}); "
                f"choose a unique attributes.group_id")
        seen[g.id] = g
    memo: dict[str, frozenset[str]] = {}

    def members_of(key: str, stack: set[str]) -> frozenset[str]:
        if key in memo:
            return memo[key]
        stack.add(key)
        out: set[str] = set()
        for m in by_dn[key].member_dns:
            mk = normalize_dn(m)
            pid = person_ids.get(mk)
            if pid is not None:
                out.add(pid)
            elif nested and mk in by_dn and mk not in stack:
                out |= members_of(mk, stack)
        stack.discard(key)
        result = frozenset(out)
        if not stack:  # only memoise complete answers (not ones cut short by a cycle)
            memo[key] = result
        return result

    result = []
    for key, g in by_dn.items():
        owners: set[str] = set()
        for o in g.owner_dns:
            ok = normalize_dn(o)
            if ok in person_ids:
                owners.add(person_ids[ok])
            elif ok in by_dn:
                owners |= members_of(ok, set())
        result.append(Group(id=g.id, name=g.name, members=members_of(key, set()),
                            owners=frozenset(owners)))
    return result


def assemble(records: Iterable[PersonRecord], groups: Iterable[GroupRecord], *,
             dn_to_id: Mapping[str, str] | None = None, nested: bool = True,
             source: str = "ldap") -> DirectorySnapshot:
    """People records + group records -> a snapshot (managers and groups resolved).

    ``dn_to_id`` maps normalised DNs to ids; by default built from ``records``.
    """
    recs = list(records)
    if dn_to_id is None:
        dn_to_id = {normalize_dn(r.dn): r.person.id for r in recs}
    ids = {r.person.id for r in recs}
    people = []
    for r in recs:
        mgr = dn_to_id.get(normalize_dn(r.manager_dn)) if r.manager_dn else None
        people.append(replace(r.person, manager=mgr if mgr in ids else None))
    try:
        return DirectorySnapshot.build(people, resolve_groups(groups, dn_to_id, nested=nested),
                                       source=source)
    except ValueError as e:
        raise DirectoryError(f"LDAP answer is inconsistent: {e}") from e

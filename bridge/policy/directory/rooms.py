"""Managed spaces and rooms: which ones the directory calls for, with members and power
levels (:func:`desired_rooms`), and the membership and power actions that bring one
existing room there."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..actions import Action, Invite, Join, Kick, SetState
from .actions import JoinThroughParent
from .plan import Finding
from .view import RoomView

if TYPE_CHECKING:  # importing bridge.config at run time would pull in its YAML loader
    from ...config.directory import DirectoryConfig, ManagedRoomConfig, PowerRule
    from ...model.people import Person
    from ..mapping import MappedUser

@dataclass(frozen=True)
class DesiredRoom:
    key: str
    entry: ManagedRoomConfig
    value: str | None
    name: str
    topic: str | None
    alias: str | None
    parent_key: str | None
    members: frozenset[str]  # user ids
    power: Mapping[str, int]  # user id -> level (> 0 only)
    # the parent space's membership rule is this room's: its members may join directly
    join_through_parent: bool = False


def same_membership_rule(a: ManagedRoomConfig, b: ManagedRoomConfig) -> bool:
    """Whether two managed-room entries always have the same members for the same value."""
    return (a.for_each, a.members, sorted(a.groups or [])) == (
        b.for_each, b.members, sorted(b.groups or []))


def slug(value: str) -> str:
    """'Research & Development' -> 'research-development' (aliases, keys)."""
    s = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")
    return s or "x"


def _fill(template: str | None, value: str | None) -> str | None:
    if template is None:
        return None
    v = value or ""
    return template.replace("{value}", v).replace("{slug}", slug(v))


def _power_for(person: Person, rules: Sequence[PowerRule], managers: frozenset[str]) -> int:
    level = 0
    for r in rules:
        hit = (
            (r.group is not None and r.group in person.groups)
            or (r.attribute is not None and person.attribute(r.attribute) == r.equals)
            or (r.managers and person.id in managers)
        )
        if hit:
            level = max(level, r.level)
    return level


def desired_rooms(
    entries: Sequence[ManagedRoomConfig], users: Mapping[str, MappedUser]
) -> dict[str, DesiredRoom]:
    """Every managed space/room the directory calls for, with members and power levels.

    ``users`` are the mapped *active* people. A for_each entry yields one room per distinct
    non-empty value; its members are the people with that value.
    """
    out: dict[str, DesiredRoom] = {}
    by_id = {e.id: e for e in entries}
    for e in entries:
        groups: dict[str | None, list[MappedUser]] = {}
        if e.for_each is not None:
            for mu in users.values():
                v = mu.person.attribute(e.for_each)
                if v:
                    groups.setdefault(v, []).append(mu)
        elif e.groups is not None:
            wanted = set(e.groups)
            groups[None] = [mu for mu in users.values() if wanted & mu.person.groups]
        else:
            groups[None] = list(users.values())
        for value, members in sorted(groups.items(), key=lambda kv: kv[0] or ""):
            key = e.id if value is None else f"{e.id}/{value}"
            parent_key = None
            through_parent = False
            if e.parent is not None:
                p = by_id[e.parent]
                parent_key = p.id if p.for_each is None else f"{p.id}/{value}"
                through_parent = same_membership_rule(e, p)
            ids = frozenset(mu.person.id for mu in members)
            managers = frozenset(
                mu.person.manager for mu in members if mu.person.manager is not None)
            power = {}
            for mu in members:
                lvl = _power_for(mu.person, e.power, managers & ids)
                if lvl > 0:
                    power[mu.user_id] = lvl
            out[key] = DesiredRoom(
                key=key, entry=e, value=value, name=_fill(e.name, value) or key,
                topic=_fill(e.topic, value), alias=_fill(e.alias, value),
                parent_key=parent_key, members=frozenset(mu.user_id for mu in members),
                power=power, join_through_parent=through_parent,
            )
    return out


def diff_membership(d: DesiredRoom, room: RoomView, leaving: set[str],
                    directory_users: set[str], is_enclave_user: Any, config: DirectoryConfig,
                    findings: list[Finding], *,
                    through_parent: bool = False) -> Iterable[Action]:
    """The invites, joins and kicks that make ``room``'s members those of ``d`` (drift in
    report mode only noted in ``findings``)."""
    rule = f"directory.rooms.{d.entry.id}"
    for user in sorted(d.members):
        m = room.members.get(user)
        if m == "join":
            continue
        if m == "invite":
            yield Join(rule_id=rule, reason="invited, joining", actor=user, room=room.room_id)
            continue
        if m == "ban":
            findings.append(Finding(f"{rule}.drift", user,
                                    f"should be in {d.key} but is banned there"))
            continue
        if m in ("leave", "knock"):
            if config.drift == "report":
                findings.append(Finding(f"{rule}.drift", user,
                                        f"should be in {d.key} but left or was removed"))
                continue
            reason = "left or was removed by hand; the directory says member (drift: revert)"
        else:
            reason = "member by directory"
        if through_parent:
            yield JoinThroughParent(rule_id=rule, reason=reason + " (joins through its space)",
                                    actor=user, room=room.room_id)
            continue
        yield Invite(rule_id=rule, reason=reason, room=room.room_id, user=user)
        yield Join(rule_id=rule, reason=reason, actor=user, room=room.room_id)
    for user, m in sorted(room.members.items()):
        if m not in ("join", "invite") or user in d.members or is_enclave_user(user):
            continue
        if user in leaving:
            continue  # deactivation removes them from every room
        if user not in directory_users and config.drift == "report":
            findings.append(Finding(f"{rule}.drift", user,
                                    f"in {d.key} without being a member by directory"))
            continue
        reason = ("no longer a member by directory" if user in directory_users
                  else "added by hand; not a member by directory (drift: revert)")
        yield Kick(rule_id=rule, reason=reason, room=room.room_id, user=user)


def diff_power(d: DesiredRoom, room: RoomView, directory_users: set[str],
               is_enclave_user: Any, config: DirectoryConfig,
               findings: list[Finding]) -> Iterable[Action]:
    """The power-levels change that gives ``room`` the levels of ``d`` (Enclave's own users
    and room v12 creators kept; levels set by hand noted in report mode)."""
    default = room.power_levels.get("users_default", 0)
    current = {u: lvl for u, lvl in (room.power_levels.get("users") or {}).items()
               if lvl != default or is_enclave_user(u)}
    # v12 creators must not appear in the users map; Enclave's own users keep their level
    result = {u: lvl for u, lvl in d.power.items() if u not in room.privileged_creators}
    result.update({u: lvl for u, lvl in current.items() if is_enclave_user(u)})
    rule = f"directory.rooms.{d.entry.id}.power"
    for u, lvl in sorted(current.items()):
        if u in result or u in room.privileged_creators:
            continue
        if u in directory_users and u not in d.members:
            continue  # left the group: their level goes with them
        # a level no directory rule gives: set by hand
        if config.drift == "report":
            findings.append(Finding(rule, u, f"power level {lvl} in {d.key} was set by hand "
                                             "(drift: report)"))
            result[u] = lvl
    if result == current:
        return
    content = dict(room.power_levels)
    content["users"] = result
    yield SetState(rule_id=rule, reason="power levels by directory rules",
                   room=room.room_id, event_type="m.room.power_levels", content=content)

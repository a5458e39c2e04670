"""What a new policy would change, before it is loaded: ``enclave policy diff OLD NEW``.

The same rooms (as the homeserver has them now) are judged by both policies with the
functions reconciliation uses (:meth:`SeparationPolicy.classify_room`,
:meth:`SeparationPolicy.diff_room`) and, where both configs have a ``retention:`` section,
:meth:`RetentionPolicy.period_for`; what differs is the answer. Pure: the caller reads the
rooms and the directory view.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .actions import Action, Kick, Leave
from .retention import RetentionPolicy
from .separation import Finding, Principal, RoomFacts, SeparationPolicy


@dataclass(frozen=True)
class Removal:
    """Someone reconciliation would take out of a room (rule and reason from diff_room)."""

    room_id: str
    room_name: str | None
    room_class: str
    user: str
    rule_id: str
    reason: str


@dataclass(frozen=True)
class ClassChange:
    room_id: str
    room_name: str | None
    old_class: str
    old_rule: str
    new_class: str
    new_rule: str


@dataclass(frozen=True)
class RetentionChange:
    room_id: str
    room_name: str | None
    old: str  # Period.describe()
    new: str


@dataclass(frozen=True)
class StandingChange:
    """What policy makes of a user changed (e.g. a partner's server dropped: external)."""

    user: str
    old: str
    new: str


@dataclass(frozen=True)
class PolicyDiff:
    rooms: int
    class_changes: list[ClassChange] = field(default_factory=list)
    removed: list[Removal] = field(default_factory=list)  # new: would be removed
    kept: list[Removal] = field(default_factory=list)  # removed under OLD, not under NEW
    new_findings: list[Finding] = field(default_factory=list)
    resolved_findings: list[Finding] = field(default_factory=list)
    retention_changes: list[RetentionChange] = field(default_factory=list)
    standing_changes: list[StandingChange] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any((self.class_changes, self.removed, self.kept, self.new_findings,
                    self.resolved_findings, self.retention_changes, self.standing_changes))

    def to_dict(self) -> dict[str, Any]:
        def rows(items: Sequence[Any]) -> list[dict[str, Any]]:
            return [dict(vars(i)) for i in items]
        return {"rooms": self.rooms, "changed": self.changed,
                "class_changes": rows(self.class_changes), "removed": rows(self.removed),
                "no_longer_removed": rows(self.kept),
                "new_findings": rows(self.new_findings),
                "resolved_findings": rows(self.resolved_findings),
                "retention_changes": rows(self.retention_changes),
                "standing_changes": rows(self.standing_changes)}


def standing(p: Principal) -> str:
    """A principal as one line: its kind and the rule that made it so."""
    if p.partner is not None:
        return f"partner ({p.partner.id})"
    if p.guest is not None:
        return f"guest ({p.guest.id}{', expired' if p.expired else ''})"
    if p.kind == "external" and p.staff is not None and not p.staff.active:
        return "external (a leaver)"
    return p.kind


def _removals(room: RoomFacts, room_class: str, actions: Iterable[Action],
              ) -> dict[str, Removal]:
    out: dict[str, Removal] = {}
    for a in actions:
        if isinstance(a, Kick):
            user = a.user
        elif isinstance(a, Leave) and a.actor is not None:
            user = a.actor
        else:
            continue
        out.setdefault(user, Removal(room.room_id, room.name, room_class, user, a.rule_id,
                                     a.reason))
    return out


def diff_policies(old: SeparationPolicy, new: SeparationPolicy, rooms: Iterable[RoomFacts],
                  *, old_retention: RetentionPolicy | None = None,
                  new_retention: RetentionPolicy | None = None,
                  users: Iterable[str] = ()) -> PolicyDiff:
    """What changes for ``rooms`` (with Enclave's class records) and people when ``new``
    replaces ``old``: rooms whose class changes, who reconciliation would remove (and who
    no longer), findings that appear or go, retention periods that change, and users
    (those in the rooms, plus ``users``) whose standing changes."""
    diff = PolicyDiff(rooms=0)
    seen: set[str] = set(users)
    n = 0
    for room in rooms:
        n += 1
        seen.update(room.current())
        rc_old, rc_new = old.classify_room(room), new.classify_room(room)
        if rc_old.id != rc_new.id:
            diff.class_changes.append(ClassChange(room.room_id, room.name, rc_old.id,
                                                  rc_old.rule_id, rc_new.id, rc_new.rule_id))
        a_old, f_old = old.diff_room(old.with_class(room))
        a_new, f_new = new.diff_room(new.with_class(room))
        gone_old = _removals(room, rc_old.id, a_old)
        gone_new = _removals(room, rc_new.id, a_new)
        diff.removed.extend(r for u, r in sorted(gone_new.items()) if u not in gone_old)
        diff.kept.extend(r for u, r in sorted(gone_old.items()) if u not in gone_new)
        keys_old = {(f.rule_id, f.subject) for f in f_old}
        keys_new = {(f.rule_id, f.subject) for f in f_new}
        diff.new_findings.extend(f for f in f_new if (f.rule_id, f.subject) not in keys_old)
        diff.resolved_findings.extend(f for f in f_old
                                      if (f.rule_id, f.subject) not in keys_new)
        if old_retention is not None and new_retention is not None:
            p_old = old_retention.period_for(rc_old.id)
            p_new = new_retention.period_for(rc_new.id)
            if (p_old.keep_ms, p_old.rule_id) != (p_new.keep_ms, p_new.rule_id):
                diff.retention_changes.append(RetentionChange(
                    room.room_id, room.name, p_old.describe(), p_new.describe()))
    for user in sorted(seen):
        s_old, s_new = standing(old.principal(user)), standing(new.principal(user))
        if s_old != s_new:
            diff.standing_changes.append(StandingChange(user, s_old, s_new))
    return PolicyDiff(n, diff.class_changes, diff.removed, diff.kept, diff.new_findings,
                      diff.resolved_findings, diff.retention_changes, diff.standing_changes)


def named_users(policy: SeparationPolicy) -> list[str]:
    """Users a policy names itself (partners' users, guests) and the directory view."""
    cfg = policy.config
    return sorted({*(u for p in cfg.partners for u in p.users),
                   *(g.user for g in cfg.guests),
                   *(u for u, r in policy.staff.items() if r is not None)})

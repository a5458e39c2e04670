"""Directory sync as a pure diff: the directory's wish vs what the homeserver has.

:func:`diff_directory` takes the mapped directory (people → Matrix users), what Enclave
remembers having provisioned, and a view of the homeserver (accounts, managed rooms, the
rooms of people about to leave) and returns a :class:`SyncPlan`: the actions that make the
homeserver match, findings that are only reported, and the records to remember. It compares
before it writes, so an unchanged person costs nothing. :func:`check_safety` decides whether a
plan may run at all. ``enclave sync --plan``, ``--apply`` and the scheduled run all call these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from ..kernel.power import creators_have_unlimited_power, user_level
from .actions import Action, Invite, Join, Kick, SetState

if TYPE_CHECKING:  # importing bridge.config at run time would pull in its YAML loader
    from ..config.directory import DirectoryConfig, ManagedRoomConfig, PowerRule
    from ..model.people import DirectorySnapshot, Person
    from .mapping import MappedUser

MANAGED_REF = "managed:"
ADMIN_LEVEL = 100


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


# -- the plan ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Finding:
    """Something sync noticed and only reports (drift in report mode, refusals)."""

    rule_id: str
    subject: str
    message: str


@dataclass(frozen=True)
class SyncPlan:
    actions: tuple[Action, ...]
    findings: tuple[Finding, ...]
    # records to save once every account action of that person has been applied
    records: Mapping[str, PersonRecord]
    active_people: int = 0

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.actions:
            out[a.kind] = out.get(a.kind, 0) + 1
        return out

    @property
    def deactivations(self) -> int:
        return sum(1 for a in self.actions if isinstance(a, DeactivateAccount))


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


# -- the diff ----------------------------------------------------------------------------

def diff_directory(
    snapshot: DirectorySnapshot,
    users: Mapping[str, MappedUser],
    known: Mapping[str, PersonRecord],
    view: HomeserverView,
    config: DirectoryConfig,
    *,
    now_ms: int,
    bot_user_id: str,
    is_enclave_user: Any = lambda _u: False,
    allow_initial_passwords: bool = False,
    remembered_managers: Mapping[str, str] | None = None,
) -> SyncPlan:
    """Actions that make the homeserver match the directory.

    ``users``: every mapped person of ``snapshot`` (disabled ones too), by person id.
    ``known``: every person Enclave provisioned before, by person id. ``view``: the
    homeserver now. ``is_enclave_user(user_id)``: Enclave's own users (bot, admin,
    namespace), which managed-room sync never removes. ``remembered_managers``: user id ->
    manager's user id from the last directory view, so a person deleted from the directory
    still hands their rooms to their manager. Pure: same input, same plan.
    """
    actions: list[Action] = []
    findings: list[Finding] = []
    records: dict[str, PersonRecord] = {}
    leaving: set[str] = set()
    active: dict[str, MappedUser] = {}
    # accounts of directory people that Enclave does not take over: never touched at all
    # (no room membership, no power, no kick when the entry goes)
    not_adopted: set[str] = set()

    refused_email = _refused_emails(users, known, view, findings)

    # joiners, movers (profile), rejoiners
    for pid, mu in sorted(users.items()):
        p = mu.person
        rec = known.get(pid)
        if p.disabled:
            continue
        acct = view.accounts.get(mu.user_id)
        email = p.email or None
        if pid in refused_email:
            email = rec.email if rec is not None else None  # keeps what it had
        rec_new = PersonRecord(pid, mu.user_id, "active", email, mu.displayname)
        if acct is None:
            actions.append(CreateAccount(
                rule_id="directory.joiner", reason="in the directory, no account yet",
                user=mu.user_id, person_id=pid, displayname=mu.displayname, email=email,
                initial_password=p.initial_password if allow_initial_passwords else None,
            ))
            records[pid] = rec_new
            active[pid] = mu
            continue
        if rec is None and acct.admin:
            # adopting it would hand a server admin's account to directory sync, which
            # deactivates it when the person leaves: an admin links accounts by hand
            findings.append(Finding(
                "directory.adopt", mu.user_id,
                "a server admin account of that name exists; not adopted for directory "
                f"person {pid} (map the person elsewhere or remove the admin flag)"))
            not_adopted.add(mu.user_id)
            continue
        if rec is None and acct.deactivated and config.drift == "report" \
                and not acct.erased:
            findings.append(Finding(
                "directory.adopt", mu.user_id,
                "active in the directory; a deactivated account of that name exists "
                "that Enclave never provisioned (drift: report)"))
            not_adopted.add(mu.user_id)
            continue
        active[pid] = mu
        if acct.deactivated:
            if acct.erased:
                findings.append(Finding(
                    "directory.rejoiner", mu.user_id,
                    "active in the directory but the account was erased; an erased account "
                    "cannot return (map this person to a new localpart)"))
                continue
            if rec is not None and rec.status == "active" and config.drift == "report":
                findings.append(Finding(
                    "directory.drift.account", mu.user_id,
                    "active in the directory but deactivated on the homeserver "
                    "(drift: report)"))
                continue
            actions.append(ReactivateAccount(
                rule_id="directory.rejoiner",
                reason="active in the directory again" if rec is not None
                and rec.status != "active" else "active in the directory, account deactivated",
                user=mu.user_id, person_id=pid, displayname=mu.displayname, email=email,
            ))
            records[pid] = rec_new
            continue
        changed_name = mu.displayname if acct.displayname != mu.displayname else None
        # The homeserver's user list carries no emails: what Enclave last applied stands in
        # (an adopted account gets the directory's email, if it has one).
        changed_email: tuple[str, ...] | None = None
        if (rec is None and email) or (rec is not None and rec.email != email):
            changed_email = (email,) if email else ()
        if changed_name is not None or changed_email is not None:
            actions.append(UpdateAccount(
                rule_id="directory.profile",
                reason="profile differs from the directory" if rec is not None
                else "existing account adopted for a directory person",
                user=mu.user_id, person_id=pid, displayname=changed_name,
                emails=changed_email,
            ))
        if rec is None or rec != rec_new:
            records[pid] = rec_new

    # leavers: provisioned and still active, now deleted or disabled in the directory
    for pid, rec in sorted(known.items()):
        if rec.status != "active" or pid in active:
            continue
        gone = pid not in users
        acct = view.accounts.get(rec.user_id)
        if acct is not None and not acct.deactivated:
            leaving.add(rec.user_id)
            why = "deleted from the directory" if gone else "disabled in the directory"
            successor = _successor(pid, snapshot, users, active, config, bot_user_id,
                                   (remembered_managers or {}).get(rec.user_id))
            for room in view.leaver_rooms.get(rec.user_id, ()):
                if _only_admin(room, rec.user_id):
                    actions.append(HandOverRoom(
                        rule_id="directory.leaver.handover",
                        reason=f"{rec.user_id} is the only admin and is leaving ({why})",
                        actor=rec.user_id, room=room.room_id, user=rec.user_id,
                        successor=successor,
                        successor_joined=room.members.get(successor) == "join",
                    ))
            actions.append(DeactivateAccount(
                rule_id="directory.leaver", reason=why, user=rec.user_id, person_id=pid))
        records[pid] = replace(rec, status="deactivated", deactivated_at=now_ms)

    # erase after the grace period
    grace = config.leavers.erase_after_days
    if grace is not None:
        for pid, rec in sorted(known.items()):
            if (rec.status == "deactivated" and pid not in active
                    and rec.deactivated_at is not None
                    and now_ms - rec.deactivated_at >= grace * 86_400_000):
                actions.append(EraseAccount(
                    rule_id="directory.leaver.erase",
                    reason=f"deactivated {grace} days ago or more", user=rec.user_id,
                    person_id=pid))
                records[pid] = replace(rec, status="erased")

    # managed spaces and rooms; deactivated accounts are parted from every room by the
    # homeserver itself (in the background), so they are never kicked
    leaving |= {u for u, a in view.accounts.items() if a.deactivated}
    wanted = desired_rooms(config.managed_rooms, active)
    provisioned = {r.user_id for r in known.values()}
    # a server admin Enclave never provisioned is the homeserver's, not the directory's
    not_adopted |= {u for u, a in view.accounts.items() if a.admin and u not in provisioned}
    directory_users = (provisioned | {mu.user_id for mu in users.values()}) - not_adopted

    def untouched(u: str) -> bool:  # kept as they are in every managed room
        return bool(is_enclave_user(u)) or u in not_adopted

    ordered = sorted(wanted.values(), key=lambda d: (d.parent_key is not None, d.key))
    for d in ordered:
        room = view.rooms.get(d.key)
        if room is None:
            actions.append(CreateManagedRoom(
                rule_id=f"directory.rooms.{d.entry.id}", reason="declared in managed_rooms",
                key=d.key, name=d.name, is_space=d.entry.kind == "space", topic=d.topic,
                alias=d.alias, parent_key=d.parent_key, power_users=dict(d.power),
                join_through_parent=d.join_through_parent,
            ))
            room = RoomView(room_id=MANAGED_REF + d.key, members={}, power_levels={})
            through = d.join_through_parent
        else:
            parent = view.rooms.get(d.parent_key) if d.parent_key else None
            through = (d.join_through_parent and parent is not None
                       and room.admits_members_of(parent.room_id))
        actions.extend(_membership(d, room, leaving, directory_users, untouched, config,
                                   findings, through_parent=through))
        if room.room_id.startswith(MANAGED_REF):
            continue
        actions.extend(_power(d, room, directory_users, untouched, config, findings))

    active_records = sum(1 for r in known.values() if r.status == "active")
    return SyncPlan(tuple(_order(actions)), tuple(findings), records,
                    active_people=active_records)


def _email_key(email: str | None) -> str | None:
    return email.strip().lower() if email and email.strip() else None


def _refused_emails(users: Mapping[str, MappedUser], known: Mapping[str, PersonRecord],
                    view: HomeserverView, findings: list[Finding]) -> set[str]:
    """Person ids whose directory email must not be applied: another active entry claims
    the same address and this person did not already have it, or another account has it
    on the homeserver. The homeserver keeps one owner per address, so applying it would
    take it away from its owner (and removing the new entry would leave nobody with it)."""
    claims: dict[str, list[str]] = {}
    for pid, mu in users.items():
        key = _email_key(mu.person.email)
        if key is not None and not mu.person.disabled:
            claims.setdefault(key, []).append(pid)
    refused: set[str] = set()
    for key, pids in sorted(claims.items()):
        had = [pid for pid in pids if _email_key((known.get(pid) or _NO_RECORD).email) == key]
        for pid in sorted(pids):
            mu = users[pid]
            if len(pids) > 1 and (len(had) != 1 or had[0] != pid):
                others = ", ".join(users[o].user_id for o in sorted(pids) if o != pid)
                keeper = users[had[0]].user_id if len(had) == 1 else None
                findings.append(Finding(
                    "directory.email.duplicate", mu.user_id,
                    f"directory email {mu.person.email} is also the email of {others}; not "
                    "applied" + (f" ({keeper} keeps it)" if keeper else
                                 " to anyone until the directory gives it to one person")))
                refused.add(pid)
                continue
            owner = view.email_owners.get(key)
            if owner is not None and owner != mu.user_id:
                findings.append(Finding(
                    "directory.email.taken", mu.user_id,
                    f"directory email {mu.person.email} belongs to {owner} on the homeserver; "
                    "not applied (the homeserver would take it away from them)"))
                refused.add(pid)
    return refused


_NO_RECORD = PersonRecord("", "", "", None, None)


def _successor(pid: str, snapshot: DirectorySnapshot, users: Mapping[str, MappedUser],
               active: Mapping[str, MappedUser], config: DirectoryConfig,
               bot_user_id: str, remembered_manager: str | None = None) -> str:
    """Who takes over a leaver's rooms: the first of ``leavers.successors`` that applies.
    A person deleted from the directory is no longer in it: their manager is the one the
    last directory view remembered (while that manager is active)."""
    person = snapshot.people.get(pid)
    for choice in config.leavers.successors:
        if choice == "bot":
            return bot_user_id
        if person is None:
            if choice == "manager" and remembered_manager is not None and any(
                    mu.user_id == remembered_manager for mu in active.values()):
                return remembered_manager
            continue
        if choice == "manager" and person.manager in active:
            return active[person.manager].user_id
        if choice == "group_owner":
            for gid in sorted(person.groups):
                g = snapshot.groups.get(gid)
                owners = sorted(o for o in (g.owners if g else ()) if o in active and o != pid)
                if owners:
                    return active[owners[0]].user_id
    return bot_user_id


def _only_admin(room: RoomView, user_id: str) -> bool:
    if room.level(user_id) < ADMIN_LEVEL:
        return False
    return not any(
        u != user_id and m == "join" and room.level(u) >= ADMIN_LEVEL
        for u, m in room.members.items()
    )


def _membership(d: DesiredRoom, room: RoomView, leaving: set[str], directory_users: set[str],
                is_enclave_user: Any, config: DirectoryConfig,
                findings: list[Finding], *, through_parent: bool = False) -> Iterable[Action]:
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


def _power(d: DesiredRoom, room: RoomView, directory_users: set[str], is_enclave_user: Any,
           config: DirectoryConfig, findings: list[Finding]) -> Iterable[Action]:
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


# application order: accounts exist before rooms use them; rooms before memberships; the
# hand-over happens before the leaver is deactivated
PHASES: dict[str, int] = {
    CreateAccount.kind: 0, ReactivateAccount.kind: 0, UpdateAccount.kind: 0,
    CreateManagedRoom.kind: 1, HandOverRoom.kind: 2,
    Invite.kind: 3, Join.kind: 3, Kick.kind: 3, JoinThroughParent.kind: 4, SetState.kind: 5,
    DeactivateAccount.kind: 6, EraseAccount.kind: 7,
}


def _order(actions: list[Action]) -> list[Action]:
    return sorted(actions, key=lambda a: PHASES.get(a.kind, 9))  # stable within a phase


def touching(plan: SyncPlan, user_id: str) -> tuple[list[Action], list[Finding]]:
    """The planned actions and findings that concern one user (``enclave sync --plan
    --user``): actions on them, by them, or that hand their rooms over."""
    acts = [a for a in plan.actions
            if user_id in (getattr(a, "user", None), a.actor, getattr(a, "successor", None))]
    return acts, [f for f in plan.findings if f.subject == user_id]


def check_safety(plan: SyncPlan, snapshot: DirectorySnapshot, config: DirectoryConfig, *,
                 force: bool = False) -> list[str]:
    """Why this plan must not run ([] = it may). ``force`` lifts the deactivation limits
    and the minimum size, never the refusal of an empty answer."""
    problems: list[str] = []
    n = len(snapshot.people)
    if n == 0:
        return ["the directory answered with no people at all; refusing to treat everyone "
                "as a leaver (check the source, its base DN and filter)"]
    s = config.safety
    if force:
        return []
    if n < s.min_people:
        problems.append(f"the directory answered with {n} people, fewer than "
                        f"safety.min_people ({s.min_people})")
    deact = plan.deactivations
    if deact > s.max_deactivations:
        problems.append(f"{deact} accounts would be deactivated, more than "
                        f"safety.max_deactivations ({s.max_deactivations})")
    base = max(plan.active_people, 1)
    if plan.active_people and deact * 100.0 / base > s.max_deactivation_percent:
        problems.append(f"{deact} of {plan.active_people} active accounts "
                        f"({deact * 100.0 / base:.1f}%) would be deactivated, more than "
                        f"safety.max_deactivation_percent ({s.max_deactivation_percent}%)")
    return problems

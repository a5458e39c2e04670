"""Directory sync's diff: the directory's wish against what the homeserver has.

:func:`diff_directory` walks joiners, movers and rejoiners, then leavers (handing their
rooms over first), erasure after the grace period, then the managed rooms
(:mod:`.rooms`), and returns the :class:`~.plan.SyncPlan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..actions import Action
from .actions import (
    MANAGED_REF,
    CreateAccount,
    CreateManagedRoom,
    DeactivateAccount,
    EraseAccount,
    HandOverRoom,
    ReactivateAccount,
    UpdateAccount,
)
from .plan import Finding, SyncPlan, in_phase_order
from .rooms import desired_rooms, diff_membership, diff_power
from .view import HomeserverView, PersonRecord, RoomView

if TYPE_CHECKING:  # importing bridge.config at run time would pull in its YAML loader
    from ...config.directory import DirectoryConfig
    from ...model.people import DirectorySnapshot
    from ..mapping import MappedUser

ADMIN_LEVEL = 100


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
        actions.extend(diff_membership(d, room, leaving, directory_users, untouched, config,
                                       findings, through_parent=through))
        if room.room_id.startswith(MANAGED_REF):
            continue
        actions.extend(diff_power(d, room, directory_users, untouched, config, findings))

    active_records = sum(1 for r in known.values() if r.status == "active")
    return SyncPlan(tuple(in_phase_order(actions)), tuple(findings), records,
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

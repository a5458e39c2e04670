"""``explain``: the rule behind one separation decision, as data.

``enclave explain`` prints it and the console renders it: both call these functions, which
call the separation policy's own decisions (the same ones the gate and the live service
use), so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..policy.separation import RoomFacts
from .service import SeparationService

LineOf = Callable[[str], int | None]


@dataclass(frozen=True)
class Principal:
    user_id: str
    kind: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Ruling:
    """One decision and where its rule is written (``line``: of the config file)."""

    allow: bool
    rule_id: str
    path: str
    line: int | None
    reason: str
    message: str | None = None


@dataclass(frozen=True)
class MemberRuling:
    membership: str
    user_id: str
    kind: str
    ruling: Ruling


@dataclass(frozen=True)
class Explanation:
    """What ``explain invite|join|room`` shows."""

    what: str  # "invite" | "join" | "room"
    title: str
    principals: tuple[Principal, ...] = ()
    decision: Ruling | None = None
    # room only
    room_id: str | None = None
    room_class: str | None = None
    class_rule: Ruling | None = None
    room_version: str | None = None
    federate: bool | None = None
    encrypted: bool | None = None
    members: tuple[MemberRuling, ...] = ()
    actions: tuple[str, ...] = ()
    findings: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _line(line_of: LineOf, path: str) -> int | None:
    return line_of(path) if path.startswith("policy") else None


def _ruling(d: Any, line_of: LineOf) -> Ruling:
    return Ruling(allow=bool(d.allow), rule_id=d.rule_id, path=d.path,
                  line=_line(line_of, d.path), reason=d.reason,
                  message=getattr(d, "message", None) or None)


def _principal(p: Any, user_id: str) -> Principal:
    pr = p.principal(user_id)
    return Principal(user_id, pr.kind, tuple(sorted(pr.groups)))


async def explain_invite(sep: SeparationService, inviter: str, invitee: str,
                         room_id: str | None, line_of: LineOf) -> Explanation:
    """Would ``inviter`` be allowed to invite ``invitee`` (into ``room_id``; None: a new
    direct chat, the usual way a contact is invited)?"""
    p = await sep.policy(fresh=True)
    if room_id is not None:
        facts = await sep.room_facts(room_id)
    else:
        facts = RoomFacts(room_id="(new direct chat)", is_direct=True,
                          members={inviter: "join"})
    return Explanation(
        what="invite", title=f"invite {invitee} by {inviter} into {facts.room_id}",
        principals=(_principal(p, inviter), _principal(p, invitee)),
        decision=_ruling(p.decide_invite(inviter, invitee, facts), line_of))


async def explain_join(sep: SeparationService, user: str, room_id: str,
                       line_of: LineOf) -> Explanation:
    """Would ``user`` be allowed to join ``room_id``?"""
    p = await sep.policy(fresh=True)
    facts = await sep.room_facts(room_id)
    d = p.decide_join(user, facts, invite_approved=await sep.invite_approved(room_id, user))
    return Explanation(what="join",
                       title=f"join {room_id} as {user} ({p.principal(user).kind})",
                       principals=(_principal(p, user),), decision=_ruling(d, line_of))


async def explain_room(sep: SeparationService, room_id: str,
                       line_of: LineOf) -> Explanation:
    """A room's class, each member's standing and what reconciliation would do."""
    p = await sep.policy(fresh=True)
    facts = await sep.room_facts(room_id)
    rc = p.classify_room(facts)
    members = []
    for u in facts.current():
        d = p.decide_membership(u, facts)
        members.append(MemberRuling(facts.members[u], u, p.principal(u).kind,
                                    _ruling(d, line_of)))
    actions, findings = p.diff_room(facts)
    return Explanation(
        what="room", title=f"room {facts.room_id}", room_id=facts.room_id,
        room_class=str(rc.id),
        class_rule=Ruling(True, rc.rule_id, rc.path, _line(line_of, rc.path), ""),
        room_version=facts.room_version, federate=facts.federate, encrypted=facts.encrypted,
        members=tuple(members), actions=tuple(a.describe() for a in actions),
        findings=tuple((f.rule_id, f.message) for f in findings))

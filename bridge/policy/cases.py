"""Policy as code: run test cases against a policy, with the decisions the live parts use.

Each case (``bridge.config.policy_cases``) is answered by the same
:class:`~bridge.policy.separation.SeparationPolicy` method the gate, the reactive handler,
reconciliation and ``enclave explain`` call (see :data:`ACTIONS`), over a directory view made
of the case file's facts; nothing here keeps a rule of its own. Pure: the caller reads the
files and passes the directory records and ``now``.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..kernel.ids import localpart_of, server_of
from ..kernel.timestamps import epoch_ms
from ..model.people import StaffRecord
from .separation import Decision, RoomFacts, SeparationPolicy

if TYPE_CHECKING:
    from ..config.policy import PolicyConfig
    from ..config.policy_cases import CaseRoom, CaseUser, PersonFacts, PolicyCase, PolicyCases

# action -> the decision it is answered by (what the docs and ``--format json`` name)
ACTIONS = {
    "invite": "SeparationPolicy.decide_invite (gate invite check, reactive invite)",
    "join": "SeparationPolicy.decide_join (gate join check)",
    "dm": "SeparationPolicy.decide_invite into a new direct chat (enclave explain invite)",
    "user_search": "SeparationPolicy.decide_user_visible (gate user search)",
    "create_room": "SeparationPolicy.decide_create_room (gate room creation)",
    "membership": "SeparationPolicy.decide_membership (may be / stay a member)",
    "state_event": "SeparationPolicy.decide_state_event (gate state check)",
    "classify": "SeparationPolicy.classify_room (a room's class)",
}
COMPARED = ("decision", "rule_id", "reason", "room_class", "kind")


@dataclass(frozen=True)
class CaseOutcome:
    """What the policy answered for one case."""

    decision: str | None  # "allow" | "deny"; None for classify
    rule_id: str
    path: str  # the YAML path of the rule that decided
    reason: str
    message: str = ""
    room_class: str | None = None
    kind: str | None = None  # what policy makes of ``who``

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "rule_id": self.rule_id, "path": self.path,
                "reason": self.reason, "message": self.message,
                "class": self.room_class, "kind": self.kind}


@dataclass(frozen=True)
class Mismatch:
    """One expected value the policy did not give."""

    field: str  # decision | rule_id | reason | class | kind
    expected: str
    got: str


@dataclass(frozen=True)
class CaseResult:
    index: int
    name: str
    line: int | None
    summary: str  # "invite @b by @a into !room"
    got: CaseOutcome
    mismatches: tuple[Mismatch, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.mismatches


class CaseInputError(ValueError):
    """Case facts the policy cannot be asked about (e.g. directory facts of a remote user)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def staff_record(user_id: str, facts: PersonFacts) -> StaffRecord | None:
    """The directory view's record of a local user with these facts (None: not listed)."""
    if not facts.staff:
        return None
    return StaffRecord(user_id=user_id, person_id=user_id, active=facts.active,
                       username=localpart_of(user_id),
                       display_name=facts.display_name or localpart_of(user_id),
                       title=facts.title, department=facts.department,
                       location=facts.location, groups=frozenset(facts.groups))


def _user(who: str | CaseUser) -> str:
    return who if isinstance(who, str) else who.user


def _room(index: int, server_name: str, where: CaseRoom) -> RoomFacts:
    server = where.server or server_name
    known = where.known if where.known is not None else server == server_name
    members = (dict.fromkeys(where.members, "join") if isinstance(where.members, list)
               else dict(where.members))
    return RoomFacts(
        room_id=where.id or f"!case-{index}:{server}",
        room_version=where.room_version if known else None,
        creators=frozenset(where.creators), class_state=where.room_class,
        aliases=tuple(where.aliases), name=where.name, federate=where.federate,
        join_rule=where.join_rule, encrypted=where.encrypted, is_direct=where.is_direct,
        members=members, power=dict(where.power),
        history_visibility=where.history_visibility, hosted=known)


class CaseRunner:
    """Runs cases against one policy config; builds one policy object per directory view
    and time, and reuses it (a policy object memoises who each user is)."""

    def __init__(self, config: PolicyConfig, *, server_name: str,
                 service_users: Sequence[str], service_prefix: str,
                 directory: Iterable[StaffRecord] = (),
                 people: Mapping[str, PersonFacts] | None = None, now_ms: int):
        self.config = config
        self.server_name = server_name
        self.service_users = tuple(service_users)
        self.service_prefix = service_prefix
        self.now_ms = now_ms
        base: dict[str, StaffRecord | None] = {r.user_id: r for r in directory}
        problems = self._check_people(people or {}, "people")
        if problems:
            raise CaseInputError(problems)
        for user, facts in (people or {}).items():
            base[user] = staff_record(user, facts)
        self.base = base
        self._policies: dict[tuple[int, tuple[tuple[str, str], ...]], SeparationPolicy] = {}

    def _check_people(self, people: Mapping[str, PersonFacts], where: str) -> list[str]:
        return [f"{where}: {u} is not a user of {self.server_name}; only this server's "
                "users have directory facts" for u in people
                if server_of(u) != self.server_name]

    def policy(self, now_ms: int, overrides: Mapping[str, PersonFacts] | None = None,
               ) -> SeparationPolicy:
        """The policy object for a time and the case's own directory facts."""
        overrides = overrides or {}
        # facts are pydantic models with lists (unhashable): keyed by their JSON
        key = (now_ms, tuple(sorted((u, f.model_dump_json()) for u, f in overrides.items())))
        p = self._policies.get(key)
        if p is None:
            # the case's own facts over the shared ones, without copying the directory
            staff: Mapping[str, StaffRecord | None] = (
                ChainMap({u: staff_record(u, f) for u, f in overrides.items()}, self.base)
                if overrides else self.base)
            p = self._policies[key] = SeparationPolicy(
                self.config, staff, server_name=self.server_name,
                service_users=self.service_users, service_prefix=self.service_prefix,
                now_ms=now_ms)
        return p

    def run(self, cases: PolicyCases, lines: Mapping[int, int] | None = None,
            ) -> list[CaseResult]:
        """Every case's result, in file order. :class:`CaseInputError` for facts that
        cannot be asked about (nothing is run then)."""
        problems: list[str] = []
        prepared = []
        for i, case in enumerate(cases.cases):
            overrides = {c.user: c for c in (case.who, case.target)
                         if c is not None and not isinstance(c, str)}
            problems += self._check_people(overrides, f"cases[{i}]")
            prepared.append(overrides)
        if problems:
            raise CaseInputError(problems)
        default_now = epoch_ms(cases.now) if cases.now is not None else self.now_ms
        return [self.run_one(i, case, self.policy(
                    epoch_ms(case.now) if case.now is not None else default_now,
                    prepared[i]), (lines or {}).get(i))
                for i, case in enumerate(cases.cases)]

    def run_one(self, index: int, case: PolicyCase, p: SeparationPolicy,
                line: int | None = None) -> CaseResult:
        who = _user(case.who)
        target = _user(case.target) if case.target is not None else None
        facts = (_room(index, self.server_name, case.where)
                 if case.where is not None else None)
        room_class: str | None = None
        d: Decision
        if case.action == "invite":
            assert facts is not None and target is not None
            d = p.decide_invite(who, target, facts)
            summary = f"{who} invites {target} into {facts.room_id}"
        elif case.action == "join":
            assert facts is not None
            d = p.decide_join(who, facts, invite_approved=case.where is not None
                              and case.where.invite_approved)
            summary = f"{who} joins {facts.room_id}"
        elif case.action == "dm":
            assert target is not None
            # as ``enclave explain invite @a @b`` without a room: a new direct chat
            facts = RoomFacts(room_id="(new direct chat)", is_direct=True,
                              members={who: "join"})
            d = p.decide_invite(who, target, facts)
            summary = f"{who} opens a direct chat with {target}"
        elif case.action == "user_search":
            assert target is not None
            d = p.decide_user_visible(who, target)
            summary = f"{who} searches for {target}"
        elif case.action == "create_room":
            request = dict(case.request)
            if target is not None:
                request["invite"] = [*(request.get("invite") or []), target]
            c = p.decide_create_room(who, request)
            d, room_class = c.decision, c.room_class.id
            summary = f"{who} creates a room {request}"
        elif case.action == "membership":
            assert facts is not None
            d = p.decide_membership(who, facts.with_member(who, None))
            summary = f"{who} is a member of {facts.room_id}"
        elif case.action == "state_event":
            assert facts is not None and case.event is not None
            ev = case.event
            d = p.decide_state_event(who, ev.type, ev.state_key, ev.content, facts)
            summary = f"{who} sends {ev.type}[{ev.state_key!r}] in {facts.room_id}"
        else:  # classify
            assert facts is not None
            rc = p.classify_room(facts)
            d = Decision(True, rc.rule_id, rc.path, f"class {rc.id} ({rc.source})")
            room_class = rc.id
            summary = f"class of {facts.room_id}"
        if room_class is None and facts is not None and case.action != "dm":
            room_class = p.classify_room(facts).id
        got = CaseOutcome(
            decision=None if case.action == "classify" else ("allow" if d.allow else "deny"),
            rule_id=d.rule_id, path=d.path, reason=d.reason, message=d.message,
            room_class=room_class, kind=p.principal(who).kind)
        return CaseResult(index, case.name or f"case {index}", line, summary, got,
                          compare(case, got))


def compare(case: PolicyCase, got: CaseOutcome) -> tuple[Mismatch, ...]:
    """What ``got`` differs in from what the case expects (only given fields count; the
    reason is a case-insensitive piece of the reason or the message)."""
    e = case.expect
    out: list[Mismatch] = []
    for name, want, have in (("decision", e.decision, got.decision),
                             ("rule_id", e.rule_id, got.rule_id),
                             ("class", e.room_class, got.room_class),
                             ("kind", e.kind, got.kind)):
        if want is not None and want != have:
            out.append(Mismatch(name, want, str(have)))
    if e.reason is not None:
        text = f"{got.reason}\n{got.message}".lower()
        if e.reason.lower() not in text:
            out.append(Mismatch("reason", f"contains {e.reason!r}",
                                repr(got.message or got.reason)))
    return tuple(out)

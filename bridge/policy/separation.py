"""Separation of work from personal contacts: every decision, as pure functions.

The gate (Synapse module, before an event exists), the reactive handler (appservice, after),
reconciliation (scheduled scan) and ``enclave explain`` all call these functions with the
same :class:`SeparationPolicy`, so they cannot disagree. No I/O, no clock reads: the caller
passes the directory view, the room's facts and ``now``.

Vocabulary: a *principal* is what policy makes of a user id (Enclave's own service users,
staff, partner, guest, external); a room has a *class* (``dm`` for direct chats); a
*decision* allows or denies and names the rule (id and YAML path) that made it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..kernel.power import creators_of
from ..model.people import StaffRecord
from .actions import Action, Join, Kick, Leave, SetState
from .power import ENCLAVE_POWER, RoomPower, enclave_actor

if TYPE_CHECKING:
    from ..config.policy import (
        AdmissionConfig,
        BarrierConfig,
        GuestConfig,
        PartnerConfig,
        PolicyConfig,
        RoomClassConfig,
        Selector,
    )

DM_CLASS = "dm"  # mirrors bridge.config.policy.DM_CLASS (not imported: keeps this pure)
CLASS_STATE_TYPE = "org.enclave.room_class"
HISTORY_STATE_TYPE = "m.room.history_visibility"
# State only Enclave may change: the room's class, and retention (the retention issue).
PROTECTED_STATE_TYPES = frozenset({CLASS_STATE_TYPE, "m.room.retention"})
# How much history each m.room.history_visibility value shows, least first: a class that
# requires one value also accepts the stricter ones.
HISTORY_ORDER = {"joined": 0, "invited": 1, "shared": 2, "world_readable": 3}
# Built-in rules (no YAML line): see docs/operators/separation.md.
UNKNOWN_ROOM_RULE = "builtin.unknown_remote_room"
APPROVED_INVITE_RULE = "builtin.approved_invite"
CLASS_RECORD_RULE = "builtin.class_record"
HISTORY_RULE = "builtin.history_visibility"
ENCRYPTION_CONTENT = {"algorithm": "m.megolm.v1.aes-sha2"}
# Enclave's own users lack the power in a room to do what policy requires there.
ENCLAVE_POWER_RULE = "builtin.enclave_power"

Kind = Literal["service", "staff", "partner", "guest", "external"]
# when a direct chat is not allowed, the less trusted side leaves
TRUST = {"external": 0, "guest": 1, "partner": 2, "staff": 3, "service": 4}


# -- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """Allow or deny, the rule that decided (id and YAML path), and why."""

    allow: bool
    rule_id: str
    path: str
    reason: str
    message: str = ""  # for the person refused: names the rule and whom to ask

    def describe(self) -> str:
        verdict = "ALLOW" if self.allow else "DENY"
        return f"{verdict} by {self.rule_id} ({self.path}): {self.reason}"


@dataclass(frozen=True)
class RoomClass:
    """A room's class and how it was found (``state``, ``dm``, ``rule`` or ``default``)."""

    id: str
    rule_id: str
    path: str
    source: str


@dataclass(frozen=True)
class Principal:
    user_id: str
    kind: Kind
    local: bool
    staff: StaffRecord | None = None
    partner: PartnerConfig | None = None
    partner_index: int = -1
    guest: GuestConfig | None = None
    guest_index: int = -1
    expired: bool = False

    @property
    def groups(self) -> frozenset[str]:
        return self.staff.groups if self.staff is not None else frozenset()


@dataclass(frozen=True)
class RoomFacts:
    """What a decision needs to know about a room, from the gate, the admin API or an event."""

    room_id: str
    room_version: str | None = None
    creators: frozenset[str] = frozenset()
    class_state: str | None = None
    aliases: tuple[str, ...] = ()
    name: str | None = None
    federate: bool = True
    join_rule: str | None = None
    encrypted: bool = False
    is_direct: bool | None = None
    members: Mapping[str, str] = field(default_factory=dict)  # user -> join | invite | knock
    power: Mapping[str, Any] = field(default_factory=dict)
    # What the room's own org.enclave.room_class state says. Anyone able to send state (or a
    # remote server) can write it, so it never decides the class: ``class_state`` is
    # Enclave's own record (filled by the service from its store). ``claimed_grant`` is the
    # one-time grant the gate put into the class state at creation.
    claimed_class: str | None = None
    claimed_grant: str | None = None
    history_visibility: str | None = None
    predecessor: str | None = None  # the room this one replaced (a room upgrade)
    # False: facts from an invitation's stripped state (a remote room's own claims)
    hosted: bool = True

    @property
    def power_view(self) -> RoomPower:
        """The room's power facts (:mod:`bridge.policy.power`)."""
        return RoomPower(self.power or None, self.room_version, self.creators)

    @property
    def known(self) -> bool:
        """Whether this server has the room's state (a create event it stores itself)."""
        return self.room_version is not None and self.hosted

    def current(self) -> list[str]:
        """Joined and invited users, in id order."""
        return sorted(u for u, m in self.members.items() if m in ("join", "invite"))

    def with_member(self, user: str, membership: str | None) -> RoomFacts:
        members = dict(self.members)
        if membership is None:
            members.pop(user, None)
        else:
            members[user] = membership
        return replace(self, members=members)


@dataclass(frozen=True, kw_only=True)
class NotifyUser(Action):
    """Tell a local user, in a direct chat with Enclave's bot, what policy did and why.

    ``once_key`` makes it once-only across retries, restarts and the three enforcement
    layers: the same incident is never told twice.
    """

    kind: ClassVar[str] = "notify_user"
    user: str
    body: str
    once_key: str


@dataclass(frozen=True, kw_only=True)
class NotDone(Action):
    """What policy requires in a room and Enclave cannot do under its own name there (it
    never acts as a member instead): recorded as a ``not_done`` audit record, logged as a
    finding for operators and counted (``enclave_separation_enforced{kind="not_done"}``).
    ``message`` says why and how to fix it."""

    kind: ClassVar[str] = "not_done"
    room: str
    user: str | None = None  # whom it concerned (the member to remove), if anyone
    message: str


@dataclass(frozen=True)
class Finding:
    """Something reconciliation noticed and did not (or could not) fix."""

    rule_id: str
    room_id: str
    subject: str
    message: str


@dataclass(frozen=True)
class CreateDecision:
    decision: Decision
    room_class: RoomClass
    edits: dict[str, Any] | None = None


@dataclass(frozen=True)
class SeparationPlan:
    actions: list[Action]
    findings: list[Finding]
    rooms: int = 0


# -- the policy ------------------------------------------------------------------------------
def _server(user_id: str) -> str:
    return user_id.split(":", 1)[1] if ":" in user_id else ""


def matches(selector: Selector, staff: StaffRecord | None) -> bool:
    """Whether a staff member matches a selector (groups: any; attributes: all given)."""
    if staff is None:
        return False
    if selector.groups and not (staff.groups & set(selector.groups)):
        return False
    for attr, values in selector.attributes.items():
        if staff.attribute(attr) not in values:
            return False
    return True


class SeparationPolicy:
    """The policy config plus the directory view and ``now``: everything decisions read.

    Build one per policy load / directory change and reuse it; it is immutable.
    """

    def __init__(self, config: PolicyConfig, staff: Iterable[StaffRecord], *,
                 server_name: str, service_users: Iterable[str] = (),
                 service_prefix: str | None = None, now_ms: int):
        self.config = config
        self.server_name = server_name
        self.now_ms = now_ms
        self.staff = {r.user_id: r for r in staff}
        # ordered: Enclave acts as the first of them (its bot, then its admin) with power
        self.enclave_users = tuple(dict.fromkeys(service_users))
        self.service_users = frozenset(self.enclave_users)
        self.service_prefix = service_prefix
        self.classes = {c.id: (i, c) for i, c in enumerate(config.room_classes)}
        self._partner_users: dict[str, int] = {}
        self._partner_servers: dict[str, int] = {}
        for i, p in enumerate(config.partners):
            for u in p.users:
                self._partner_users.setdefault(u, i)
            for s in p.servers:
                self._partner_servers.setdefault(s, i)
        self._guests = {g.user: i for i, g in reversed(list(enumerate(config.guests)))}
        # memo tables: a policy object lives for one policy + directory view + ``now``
        self._principals: dict[str, Principal] = {}
        self._sides: dict[tuple[int, str], frozenset[int]] = {}
        self._classify = [
            (i, r, re.compile(r.alias) if r.alias else None,
             re.compile(r.name) if r.name else None)
            for i, r in enumerate(config.classify)
        ]

    # -- principals ------------------------------------------------------------------------
    def principal(self, user_id: str) -> Principal:
        """What policy makes of a user id (memoised: the policy object is immutable)."""
        p = self._principals.get(user_id)
        if p is None:
            if len(self._principals) > 200_000:
                self._principals.clear()
            p = self._principals[user_id] = self._principal(user_id)
        return p

    def _principal(self, user_id: str) -> Principal:
        local = _server(user_id) == self.server_name
        if local and (user_id in self.service_users or (
                self.service_prefix and user_id[1:].startswith(self.service_prefix))):
            return Principal(user_id, "service", True)
        if local:
            rec = self.staff.get(user_id)
            if rec is not None and rec.active:
                return Principal(user_id, "staff", True, staff=rec)
            if rec is None and self.config.unlisted_local_users == "staff":
                return Principal(user_id, "staff", True)
            return Principal(user_id, "external", True, staff=rec)
        gi = self._guests.get(user_id)
        if gi is not None:
            g = self.config.guests[gi]
            return Principal(user_id, "guest", False, guest=g, guest_index=gi,
                             expired=self.now_ms >= g.expires_ms)
        pi = self._partner_users.get(user_id, self._partner_servers.get(_server(user_id)))
        if pi is not None:
            return Principal(user_id, "partner", False, partner=self.config.partners[pi],
                             partner_index=pi)
        return Principal(user_id, "external", False)

    # -- rooms -----------------------------------------------------------------------------
    def classify_room(self, room: RoomFacts, *, creator: str | None = None) -> RoomClass:
        """The room's class: Enclave's class state, else DM, else the first rule, else default."""
        if room.class_state is not None:
            if room.class_state == DM_CLASS or room.class_state in self.classes:
                return RoomClass(room.class_state, "room.class_state",
                                 f"room state {CLASS_STATE_TYPE}", "state")
        if is_direct_chat(room):
            return RoomClass(DM_CLASS, "room.is_direct", "policy.dms", "dm")
        creators = [creator] if creator else sorted(room.creators)
        if pc := self._partner_room_class(creators):
            return pc
        for i, rule, alias_re, name_re in self._classify:
            if alias_re is not None and not any(alias_re.search(a) for a in room.aliases):
                continue
            if name_re is not None and not (room.name and name_re.search(room.name)):
                continue
            if rule.creator_group is not None and not any(
                    rule.creator_group in self.principal(c).groups for c in creators):
                continue
            return RoomClass(rule.room_class, rule.id, f"policy.classify[{i}]", "rule")
        return RoomClass(self.config.default_class, "default_class", "policy.default_class",
                         "default")

    def _partner_room_class(self, creators: Sequence[str]) -> RoomClass | None:
        """A room made on a partner's server by the partner: the first federating class
        the partner is admitted to (their rooms are theirs, so no local rule can name
        them). None for any other room."""
        if not creators or any(_server(c) == self.server_name for c in creators):
            return None
        p = self.principal(creators[0])
        if p.kind != "partner" or p.partner is None:
            return None
        for c in p.partner.room_classes:
            if c in self.classes and self.classes[c][1].federate:
                return RoomClass(c, p.partner.id,
                                 f"policy.partners[{p.partner_index}].room_classes", "partner")
        return None

    def required_history(self, rc: RoomClass) -> str | None:
        """The m.room.history_visibility a room of this class must keep (or be stricter
        than), or None where no remote person can ever be a member."""
        if rc.id == DM_CLASS:
            return self.config.dms.history_visibility
        _, cls = self._class(rc.id)
        return cls.history_visibility if cls.federate else None

    def _class(self, class_id: str) -> tuple[int, RoomClassConfig]:
        return self.classes.get(class_id) or self.classes[self.config.default_class]

    # -- helpers for decisions -------------------------------------------------------------
    def _deny(self, rule_id: str, path: str, reason: str, human: str) -> Decision:
        contact = self.config.notify.contact
        return Decision(False, rule_id, path, reason,
                        f"Enclave policy ({rule_id}): {human} Ask {contact} if you need an "
                        "exception.")

    def _barrier_side(self, p: Principal, b: BarrierConfig, index: int = -1) -> frozenset[int]:
        if p.kind != "staff":
            return frozenset()
        key = (index, p.user_id)
        if index >= 0 and key in self._sides:
            return self._sides[key]
        sides = frozenset(i for i, sel in enumerate(b.between) if matches(sel, p.staff))
        if index >= 0:
            self._sides[key] = sides
        return sides

    def barrier_between(self, a: Principal, b: Principal) -> Decision | None:
        """The first barrier that keeps ``a`` and ``b`` apart, as a deny; else None."""
        if a.kind != "staff" or b.kind != "staff":
            return None  # barriers are between staff
        for i, bar in enumerate(self.config.barriers):
            sa, sb = self._barrier_side(a, bar, i), self._barrier_side(b, bar, i)
            if not sa or not sb:
                continue
            if (0 in sa and 1 in sb) or (1 in sa and 0 in sb):
                return self._deny(bar.id, f"policy.barriers[{i}]", "barrier",
                                  f"{a.user_id} and {b.user_id} are kept apart by an "
                                  "information barrier.")
        return None

    def _expired(self, p: Principal) -> Decision | None:
        if p.kind == "guest" and p.expired:
            assert p.guest is not None
            return self._deny(p.guest.id, f"policy.guests[{p.guest_index}].expires",
                              "guest expired",
                              f"guest access for {p.user_id} has expired.")
        return None

    # -- direct chats ----------------------------------------------------------------------
    def decide_dm_pair(self, a: Principal, b: Principal) -> Decision:
        """May ``a`` and ``b`` hold a direct chat (or see each other in user search)?"""
        if not self.config.enabled:
            return Decision(True, "policy.enabled", "policy.enabled", "policy disabled")
        if a.kind == "service" or b.kind == "service":
            return Decision(True, "builtin.enclave", "(built in)", "Enclave's own user")
        for p in (a, b):
            if (d := self._expired(p)) is not None:
                return d
        if (d := self.barrier_between(a, b)) is not None:
            return d
        dms = self.config.dms
        staff, other = (a, b) if TRUST[a.kind] >= TRUST[b.kind] else (b, a)
        if staff.kind != "staff":
            return self._verdict(dms.non_staff, "dms.non_staff", "policy.dms.non_staff",
                                 "neither side is staff",
                                 "direct chats between people outside the company are not "
                                 "hosted here.")
        if other.kind == "staff":
            return self._verdict(dms.staff_staff, "dms.staff_staff", "policy.dms.staff_staff",
                                 "staff and staff", "direct chats between staff are off.")
        if other.kind == "partner":
            assert other.partner is not None
            if not other.partner.dm:
                return self._deny(other.partner.id,
                                  f"policy.partners[{other.partner_index}].dm",
                                  "partner without direct chats",
                                  f"{other.user_id} is a partner without direct chats.")
            verdict, rule = dms.staff_partner, "staff_partner"
        elif other.kind == "guest":
            assert other.guest is not None
            if not other.guest.dm:
                return self._deny(other.guest.id, f"policy.guests[{other.guest_index}].dm",
                                  "guest without direct chats",
                                  f"{other.user_id} is a guest without direct chats.")
            verdict, rule = dms.staff_guest, "staff_guest"
        else:
            verdict, rule = dms.staff_external, "staff_external"
        if verdict == "deny":
            for i, exc in enumerate(dms.exceptions):
                if other.kind in exc.allow and matches(exc.who, staff.staff):
                    return Decision(True, exc.id, f"policy.dms.exceptions[{i}]",
                                    f"exception for {other.kind} contacts")
        who = ("people outside the company" if other.kind == "external"
               else f"{other.kind}s")
        return self._verdict(verdict, f"dms.{rule}", f"policy.dms.{rule}",
                             f"staff and {other.kind}",
                             f"work accounts cannot hold direct chats with {who} "
                             f"({other.user_id}).")

    def _verdict(self, verdict: str, rule_id: str, path: str, reason: str,
                 human: str) -> Decision:
        if verdict == "allow":
            return Decision(True, rule_id, path, reason)
        return self._deny(rule_id, path, reason, human)

    # -- room membership -------------------------------------------------------------------
    def decide_admission(self, p: Principal, room_class: RoomClass) -> Decision:
        """May ``p`` be a member of a (non-DM) room of this class, on their own account?"""
        if p.kind == "service":
            return Decision(True, "builtin.enclave", "(built in)", "Enclave's own user")
        if (d := self._expired(p)) is not None:
            return d
        i, cls = self._class(room_class.id)
        if not cls.federate and not p.local:
            return self._deny(f"class.{cls.id}.federate", f"policy.room_classes[{i}].federate",
                              "remote user in a non-federating class",
                              f"{cls.id} rooms are for this server's users only "
                              f"({p.user_id} is not).")
        allow: AdmissionConfig = cls.allow
        path = f"policy.room_classes[{i}].allow"
        rule = f"class.{cls.id}"
        if p.kind == "staff":
            if not allow.staff:
                return self._deny(rule, path + ".staff", "staff not admitted",
                                  f"{cls.id} rooms do not admit staff.")
            if allow.staff_only is not None and not matches(allow.staff_only, p.staff):
                return self._deny(rule, path + ".staff_only", "staff outside the selector",
                                  f"{cls.id} rooms admit only some staff, and "
                                  f"{p.user_id} is not among them.")
            return Decision(True, rule, path + ".staff", "staff admitted")
        if p.kind == "partner":
            assert p.partner is not None
            if allow.partners and cls.id in p.partner.room_classes:
                return Decision(True, p.partner.id, f"policy.partners[{p.partner_index}]",
                                f"partner admitted to {cls.id}")
            return self._deny(rule, path + ".partners", "partner not admitted",
                              f"partner {p.user_id} may not be in {cls.id} rooms.")
        if p.kind == "guest":
            assert p.guest is not None
            if allow.guests and cls.id in p.guest.room_classes:
                return Decision(True, p.guest.id, f"policy.guests[{p.guest_index}]",
                                f"guest admitted to {cls.id}")
            return self._deny(rule, path + ".guests", "guest not admitted",
                              f"guest {p.user_id} may not be in {cls.id} rooms.")
        if allow.external:
            return Decision(True, rule, path + ".external", "external admitted")
        return self._deny(rule, path + ".external", "external not admitted",
                          f"{cls.id} rooms are for staff, and {p.user_id} is not a member "
                          "of staff, a partner or a guest.")

    def decide_membership(self, user: str, room: RoomFacts, *,
                          room_class: RoomClass | None = None) -> Decision:
        """May ``user`` become (or stay) a member of ``room`` with the others in it?

        Checks, in order: the user's own standing (guest expiry), barriers against every
        other member, then the class (direct-chat pair rules against every other member, or
        the class's admission), and finally that the room holds nobody the class would not
        admit: staff do not join rooms mixed with people who should not be there.
        """
        if not self.config.enabled:
            return Decision(True, "policy.enabled", "policy.enabled", "policy disabled")
        p = self.principal(user)
        if p.kind == "service":
            return Decision(True, "builtin.enclave", "(built in)", "Enclave's own user")
        if (d := self._expired(p)) is not None:
            return d
        others = [self.principal(u) for u in room.current() if u != user]
        others = [o for o in others if o.kind != "service"]
        rc = room_class or self.classify_room(room)
        if rc.id == DM_CLASS or self._class(rc.id)[1].barriers:
            for o in others:
                if (d := self.barrier_between(p, o)) is not None:
                    return d
        if rc.id == DM_CLASS:
            last = Decision(True, "builtin.enclave", "(built in)",
                            "direct chat with Enclave's own user only")
            for o in others:
                last = self.decide_dm_pair(p, o)
                if not last.allow:
                    return last
            return last
        own = self.decide_admission(p, rc)
        if not own.allow:
            return own
        for o in others:
            d = self.decide_admission(o, rc)
            if not d.allow:
                return self._deny(d.rule_id, d.path, "room holds someone the class refuses",
                                  f"this {rc.id} room holds {o.user_id}, who may not be "
                                  "in it.")
        return own

    def decide_join(self, user: str, room: RoomFacts, *,
                    invite_approved: bool = False) -> Decision:
        """May ``user`` join ``room`` now (the gate's join check)?

        A room this server has no state for is hosted elsewhere and shows nothing policy
        could judge (no members, no class): a local user joins it only through an
        invitation Enclave approved, or when it is a partner's server's room (a room id
        naming the server) of a class the user may be in. Anything else is refused: an
        empty room would otherwise look like the default class.
        """
        if not self.config.enabled:
            return Decision(True, "policy.enabled", "policy.enabled", "policy disabled")
        p = self.principal(user)
        if room.known or p.kind == "service" or not p.local:
            return self.decide_membership(user, room.with_member(user, None))
        if invite_approved:
            return Decision(True, APPROVED_INVITE_RULE, "(built in)",
                            "joins a remote room Enclave approved the invitation to")
        host = room.room_id.split(":", 1)[1] if ":" in room.room_id else ""
        pi = self._partner_servers.get(host)
        if pi is not None:
            pc = self._partner_room_class([f"@partner:{host}"])
            if pc is not None:
                d = self.decide_admission(p, pc)
                if d.allow:
                    return Decision(True, pc.rule_id, pc.path,
                                    f"partner's room of class {pc.id}")
                return d
        return self._deny(UNKNOWN_ROOM_RULE, "(built in)", "unknown remote room",
                          f"{room.room_id} is hosted on another server and nothing shows it "
                          "is allowed for work accounts (no invitation Enclave approved, "
                          "not a partner's room).")

    def decide_invite(self, inviter: str, invitee: str, room: RoomFacts) -> Decision:
        """May ``inviter`` invite ``invitee`` into ``room``? (The inviter counts as a member.)"""
        facts = room.with_member(inviter, "join").with_member(invitee, None)
        return self.decide_membership(invitee, facts)

    def decide_user_visible(self, searcher: str, candidate: str) -> Decision:
        """May ``searcher`` find ``candidate`` in user search: only people they may DM."""
        return self.decide_dm_pair(self.principal(searcher), self.principal(candidate))

    def decide_state_event(self, sender: str, event_type: str, state_key: str,
                           content: Mapping[str, Any] | None = None,
                           room: RoomFacts | None = None) -> Decision:
        """Protected state (room class, retention) is Enclave's alone to change; in rooms
        where remote people can be present, history may not be made more visible than the
        class allows."""
        service = self.principal(sender).kind == "service"
        if (event_type == CLASS_STATE_TYPE and room is not None and room.class_state
                and (content or {}).get("class") == room.class_state):
            # putting Enclave's record back (by anyone, e.g. a room admin fixing a finding):
            # nothing changes what policy reads
            return Decision(True, CLASS_RECORD_RULE, "(built in)",
                            "class state set to Enclave's record")
        if event_type in PROTECTED_STATE_TYPES and not service:
            return self._deny("builtin.protected_state", "(built in)",
                              f"{event_type} is managed by Enclave",
                              f"{event_type} is managed by Enclave and cannot be changed "
                              "by hand.")
        if event_type == HISTORY_STATE_TYPE and state_key == "" and room is not None \
                and not service:
            required = self.required_history(self.classify_room(room))
            value = (content or {}).get("history_visibility")
            if required is not None and not history_within(value, required):
                return self._deny(HISTORY_RULE, "(built in)",
                                  f"history visibility {value!r} is more than {required!r}",
                                  f"in this room history is visible to members only from "
                                  f"when they were {required} (remote people can be "
                                  "members).")
        return Decision(True, "builtin.state", "(built in)", "unprotected state")

    def diff_protected_state(self, room: RoomFacts, rc: RoomClass | None = None,
                             ) -> tuple[list[Action], list[Finding]]:
        """State Enclave keeps: its class record as the class state (a claim that differs
        is put back) and the class's history visibility. Set by Enclave's own user with the
        power (bot, else admin); a finding when neither can (never set as a member)."""
        if not self.config.enabled or not room.known:
            return [], []
        rc = rc or self.classify_room(room)
        wanted: list[tuple[str, dict[str, Any], str, str]] = []
        if room.class_state is not None and room.claimed_class != room.class_state:
            wanted.append((CLASS_STATE_TYPE, class_content(room.class_state, rc.rule_id),
                           CLASS_RECORD_RULE,
                           f"class state says {room.claimed_class!r}; Enclave's record "
                           f"says {room.class_state!r}"))
        required = self.required_history(rc)
        if required is not None and not history_within(room.history_visibility, required):
            wanted.append((HISTORY_STATE_TYPE, {"history_visibility": required},
                           HISTORY_RULE,
                           f"history visibility {room.history_visibility or 'shared'!r} in "
                           f"a {rc.id} room (at most {required!r})"))
        actions: list[Action] = []
        findings: list[Finding] = []
        pw = room.power_view
        for etype, content, rule, why in wanted:
            needed = pw.needed_state(etype)
            actor = enclave_actor(room.members, pw, self.acting_users(room), needed)
            if actor is None:
                findings.append(Finding(rule, room.room_id, etype,
                                        f"{why}; Enclave has no power to set it here, not "
                                        f"done as a member. Fix: {self.power_fix(needed)}"))
                continue
            actions.append(SetState(rule_id=rule, reason=why, actor=actor,
                                    room=room.room_id, event_type=etype, content=content))
        return actions, findings

    def decide_create_room(self, creator: str, request: Mapping[str, Any]) -> CreateDecision:
        """May ``creator`` create this room, and what must the gate add to the request?

        Edits: Enclave's class state, ``m.federate: false`` for non-federating classes and
        an ``m.room.encryption`` event where the class requires encryption; in a group room
        (not a DM) made by anyone but Enclave, ``invite`` and ``power_users`` that bring
        Enclave's bot in with power :data:`~bridge.policy.power.ENCLAVE_POWER`.
        """
        is_direct = bool(request.get("is_direct"))
        alias_name = request.get("room_alias_name")
        facts = RoomFacts(
            room_id="(new room)", creators=frozenset({creator}), is_direct=is_direct,
            aliases=(f"#{alias_name}:{self.server_name}",) if alias_name else (),
            name=request.get("name") if isinstance(request.get("name"), str) else None,
            members={creator: "join"},
        )
        rc = self.classify_room(facts, creator=creator)
        p = self.principal(creator)
        if p.kind == "service":
            # Enclave's own rooms (managed rooms, notices) are classified like any other
            return CreateDecision(Decision(True, "builtin.enclave", "(built in)",
                                           "Enclave's own user"), rc,
                                  self.creation_edits(rc, request))
        invites = [u for u in request.get("invite") or [] if isinstance(u, str)]
        if rc.id != DM_CLASS:
            own = self.decide_admission(p, rc)
            if not own.allow:
                return CreateDecision(own, rc)
        for invitee in invites:
            d = self.decide_membership(invitee, facts, room_class=rc)
            if not d.allow:
                return CreateDecision(d, rc)
            facts = facts.with_member(invitee, "invite")
        edits = self.creation_edits(rc, request)
        if rc.id != DM_CLASS and self.enclave_users:
            # Enclave's bot is invited with power into every group room made through the
            # gate, so what policy later requires there is done under Enclave's own name
            bot = self.enclave_users[0]
            edits["invite"] = [bot]
            edits["power_users"] = {bot: ENCLAVE_POWER}
        return CreateDecision(Decision(True, rc.rule_id, rc.path, f"class {rc.id}"), rc,
                              edits)

    def creation_edits(self, rc: RoomClass, request: Mapping[str, Any]) -> dict[str, Any]:
        """What a createRoom request of class ``rc`` gets added: the class state,
        ``m.federate: false`` and encryption as the class says."""
        initial = [{"type": CLASS_STATE_TYPE, "state_key": "",
                    "content": {"class": rc.id, "rule_id": rc.rule_id, "set_by": "gate"}}]
        required = self.required_history(rc)
        if required is not None:
            initial.append({"type": HISTORY_STATE_TYPE, "state_key": "",
                            "content": {"history_visibility": required}})
        creation: dict[str, Any] = {}
        if rc.id != DM_CLASS:
            _, cls = self._class(rc.id)
            if not cls.federate:
                creation["m.federate"] = False
            has_enc = any(isinstance(e, Mapping) and e.get("type") == "m.room.encryption"
                          for e in request.get("initial_state") or [])
            if cls.encryption == "required" and not has_enc:
                initial.append({"type": "m.room.encryption", "state_key": "",
                                "content": dict(ENCRYPTION_CONTENT)})
        edits: dict[str, Any] = {"initial_state": initial}
        if creation:
            edits["creation_content"] = creation
        return edits

    # -- enforcement -----------------------------------------------------------------------
    def choose_remover(self, room: RoomFacts, target: str) -> str | None:
        """Enclave's own user (bot, else admin) that can kick ``target``, or None.

        Never a member of the room (:func:`bridge.policy.power.enclave_actor`). Room
        version 12 creators have unlimited power and cannot be kicked at all.
        """
        pw = room.power_view
        return enclave_actor(room.members, pw, self.acting_users(room), pw.needed("kick"),
                             target=target)

    def acting_users(self, room: RoomFacts) -> tuple[str, ...]:
        """Who may act for Enclave in ``room``, in order: its bot, its admin, then its other
        service users (its bots) that are members (e.g. a room one of them made)."""
        others = sorted(u for u in room.members if u not in self.service_users
                        and _server(u) == self.server_name
                        and self.principal(u).kind == "service")
        return self.enclave_users + tuple(others)

    def power_fix(self, needed: int) -> str:
        """How an operator gives Enclave what it lacks in a room."""
        bot = self.enclave_users[0] if self.enclave_users else "Enclave's bot"
        return f"invite {bot} and give it power {max(needed, 1)} (e.g. {ENCLAVE_POWER})"

    def remove(self, room: RoomFacts, user: str, decision: Decision,
               ) -> tuple[list[Action], Finding | None]:
        """Actions that take ``user`` out of ``room``; a finding where Enclave cannot.

        A local user's own membership (rejecting the invitation, leaving) is the one thing
        Enclave does AS that user, through the appservice: Synapse has no other way, and the
        reason says it was done for them by Enclave under the rule. Anyone else is kicked by
        Enclave's own user with the power; where it has none, nothing is done as a member
        of the room: a finding says why and how to fix it (a :class:`NotDone` in the
        reactive layer). A room v12 creator cannot be kicked by anyone, and Enclave's bot is
        not in direct chats, so there the local staff leave instead (their own membership).
        """
        reason = f"{decision.reason}: {decision.describe()}"
        if _server(user) == self.server_name:
            return [Leave(rule_id=decision.rule_id, actor=user, room=room.room_id,
                          reason=f"done for {user} by Enclave (their own membership) under "
                                 f"{decision.rule_id}: {reason}")], None
        remover = self.choose_remover(room, user)
        if remover is not None:
            return [Kick(rule_id=decision.rule_id, reason=reason, actor=remover,
                         room=room.room_id, user=user)], None
        bot = self.enclave_users[0] if self.enclave_users else None
        if bot is not None and room.members.get(bot) == "invite":
            # invited (by the gate's creation edits) and not joined yet: it accepts first
            joined = room.with_member(bot, "join")
            join = self.enclave_invited(joined, bot)
            if join and self.choose_remover(joined, user) == bot:
                return [*join, Kick(rule_id=decision.rule_id, reason=reason, actor=bot,
                                    room=room.room_id, user=user)], None
        pw = room.power_view
        if pw.removable(user) and self.classify_room(room).id != DM_CLASS:
            needed = max(pw.needed("kick"), pw.of(user) + 1)
            return [], Finding(ENCLAVE_POWER_RULE, room.room_id, user,
                               f"{user} must go ({decision.rule_id}) but Enclave has no "
                               f"power to kick in this room; not done as a member. Fix: "
                               f"{self.power_fix(needed)}")
        # nobody can remove them (a v12 creator), or a direct chat (Enclave's bot stays out
        # of those): the local staff leave instead, so work and the outsider no longer
        # share the room
        actions: list[Action] = [
            Leave(rule_id=decision.rule_id, actor=u, room=room.room_id,
                  reason=f"done for {u} by Enclave (their own membership) under "
                         f"{decision.rule_id}: {reason} (cannot remove {user})")
            for u in room.current() if _server(u) == self.server_name
            and self.principal(u).kind != "service"
        ]
        return actions, Finding(decision.rule_id, room.room_id, user,
                                f"cannot remove {user} (a room creator, or a direct chat "
                                f"Enclave is not in); {len(actions)} local member(s) leave "
                                "instead")

    def not_done(self, findings: Sequence[Finding]) -> list[Action]:
        """The reactive layer's record of findings: one :class:`NotDone` each."""
        return [NotDone(rule_id=f.rule_id, reason=f.message, room=f.room_id,
                        user=f.subject if f.subject.startswith("@") else None,
                        message=f.message) for f in findings]

    def notice(self, user: str, decision: Decision, once_key: str, what: str) -> list[Action]:
        """A once-only DM to ``user`` (a local staff member) about a refusal, if enabled."""
        p = self.principal(user)
        if not self.config.notify.enabled or p.kind != "staff":
            return []
        return [NotifyUser(rule_id=decision.rule_id, reason=decision.reason, user=user,
                           once_key=once_key,
                           body=f"{what}\n\n{decision.message}\n\nRule: {decision.rule_id} "
                                f"({decision.path})")]

    def decide_event(self, event: Mapping[str, Any], room: RoomFacts) -> list[Action]:
        """Reactive enforcement for one timeline event: reject, kick and tell, or nothing.

        ``room`` is the room as it was read after the event (the event's own membership
        included or not; it is set from the event here).
        """
        if not self.config.enabled or not self.config.reactive:
            return []
        if event.get("type") in (CLASS_STATE_TYPE, HISTORY_STATE_TYPE) \
                and event.get("state_key") == "" \
                and self.principal(str(event.get("sender", ""))).kind != "service":
            # someone else's class or history state: put Enclave's back
            actions, findings = self.diff_protected_state(room)
            return actions + self.not_done(findings)
        if event.get("type") != "m.room.member" or not isinstance(event.get("state_key"), str):
            return []
        content = event.get("content") or {}
        membership = content.get("membership")
        target, sender = event["state_key"], event.get("sender", "")
        room_id = room.room_id
        event_id = event.get("event_id", "")
        if membership == "invite" and self.principal(target).kind == "service":
            if content.get("is_direct") and room.is_direct is None:
                room = replace(room, is_direct=True)
            join = self.enclave_invited(room, target)
            if not join:
                return []
            # once in, it puts back what it could not before (state set at creation)
            return join + self.diff_protected_state(room.with_member(target, "join"))[0]
        if membership == "invite":
            if content.get("is_direct") and room.is_direct is None:
                room = replace(room, is_direct=True)
            d = self.decide_invite(sender, target, room)
            if d.allow:
                return []
            facts = room.with_member(sender, "join").with_member(target, "invite")
            actions, cannot = self.remove(facts, target, d)
            if _server(target) == self.server_name:
                actions += self.notice(target, d, f"invite:{room_id}:{target}",
                                       f"Enclave declined an invitation from {sender} for "
                                       "you.")
            elif cannot is None:
                actions += self.notice(sender, d, f"invite:{room_id}:{target}",
                                       f"Enclave withdrew your invitation of {target}.")
            elif cannot.rule_id == ENCLAVE_POWER_RULE:
                actions += self.not_done([cannot])
                actions += self.notice(sender, d, f"invite:{room_id}:{target}",
                                       f"Enclave could not withdraw your invitation of "
                                       f"{target}: it has no power in this room. Your IT "
                                       "administrators have been told; please withdraw "
                                       "the invitation yourself.")
            else:
                # e.g. the invitee is a room v12 creator: the invitation stands, so the
                # staff leave the room instead, and the notice says exactly that
                actions += self.notice(sender, d, f"invite:{room_id}:{target}",
                                       f"Enclave could not withdraw your invitation of "
                                       f"{target} (nobody here can remove them from the "
                                       "room), so it took you out of the room instead.")
            return actions
        if membership == "join":
            facts = room.with_member(target, None)
            d = self.decide_membership(target, facts)
            if d.allow:
                return []
            actions, cannot = self.remove(room.with_member(target, "join"), target, d)
            if cannot is not None and cannot.rule_id == ENCLAVE_POWER_RULE:
                actions += self.not_done([cannot])
            if _server(target) == self.server_name:
                actions += self.notice(target, d, f"join:{room_id}:{target}:{event_id}",
                                       "Enclave took you out of a room you joined.")
            return actions
        return []

    def enclave_invited(self, room: RoomFacts, user: str) -> list[Action]:
        """Enclave's bot invited into a room (by the gate's creation edits, or by someone):
        it joins a group room of this server, so it can act there under its own name; never
        a direct chat (it would make it a group) nor a room hosted elsewhere."""
        if (not self.enclave_users or user != self.enclave_users[0] or not room.known
                or self.classify_room(room).id == DM_CLASS):
            return []
        return [Join(rule_id=ENCLAVE_POWER_RULE, actor=user, room=room.room_id,
                     reason="invited into a group room: Enclave acts there as itself")]

    def diff_enclave_power(self, room: RoomFacts, rc: RoomClass) -> list[Finding]:
        """A group room where Enclave's own users cannot kick and put its state back (made
        without the gate, or before Enclave): reported with the fix."""
        if rc.id == DM_CLASS or not room.known or not self.enclave_users:
            return []
        pw = room.power_view
        needed = max(pw.needed("kick"), pw.needed_state(HISTORY_STATE_TYPE),
                     pw.needed_state(CLASS_STATE_TYPE))
        if enclave_actor(room.members, pw, self.acting_users(room), needed) is not None:
            return []
        return [Finding(ENCLAVE_POWER_RULE, room.room_id, self.enclave_users[0],
                        f"Enclave has no power in this {rc.id} room: it cannot remove "
                        f"anyone or put its state back here. Fix: {self.power_fix(needed)}")]

    def diff_room(self, room: RoomFacts) -> tuple[list[Action], list[Finding]]:
        """Reconciliation of one room: who must go, and what to report."""
        if not self.config.enabled:
            return [], []
        rc = self.classify_room(room)
        members = [self.principal(u) for u in room.current()]
        members = [m for m in members if m.kind != "service"]
        gone: set[str] = set()

        def take_out(p: Principal, d: Decision) -> None:
            acts, finding = self.remove(room, p.user_id, d)
            actions.extend(acts)
            gone.add(p.user_id)
            if finding is not None:
                findings.append(finding)

        actions, findings = self.diff_protected_state(room, rc)
        bot = self.enclave_users[0] if self.enclave_users else None
        if bot is not None and room.members.get(bot) == "invite":
            actions.extend(self.enclave_invited(room, bot))
        if rc.id != DM_CLASS:
            _, cls = self._class(rc.id)
            if not cls.federate and room.federate and room.class_state is None:
                findings.append(Finding(f"class.{cls.id}.federate", room.room_id, rc.id,
                                        f"{cls.id} room federates (created before Enclave's "
                                        "gate); remote users are removed, the flag cannot "
                                        "change"))
        staff = [m for m in members if m.kind == "staff"]
        for p in members:
            if rc.id == DM_CLASS:
                if p.kind == "staff":
                    d = self._expired(p)
                else:
                    d = self._expired(p) or next(
                        (x for s in staff if not (x := self.decide_dm_pair(s, p)).allow), None)
            else:
                a = self.decide_admission(p, rc)
                d = None if a.allow else a
            if d is not None:
                take_out(p, d)
                if p.expired and p.guest is not None:
                    # the sponsor hears once per room that their guest's access ended
                    actions.extend(self.notice(
                        p.guest.sponsor, d, f"guest-expired:{p.user_id}:{room.room_id}",
                        f"Guest access for {p.user_id} ({p.guest.id}) has expired; Enclave "
                        f"removed them from {room.name or room.room_id}."))
        # barriers among the staff who stay (unless the class is exempt)
        exempt = rc.id != DM_CLASS and not self._class(rc.id)[1].barriers
        for bi, bar in enumerate([] if exempt else self.config.barriers):
            sides: list[list[Principal]] = [[], []]
            for p in staff:
                if p.user_id in gone:
                    continue
                for s in self._barrier_side(p, bar, bi):
                    sides[s].append(p)
            if not sides[0] or not sides[1]:
                continue
            d = self._deny(bar.id, f"policy.barriers[{bi}]", "barrier",
                           "this room mixes both sides of an information barrier.")
            if bar.existing == "remove":
                for p in sides[1]:
                    if p.user_id not in gone:
                        take_out(p, d)
            else:
                findings.append(Finding(bar.id, room.room_id, "barrier",
                                        f"room mixes both sides of barrier {bar.id} "
                                        f"({len(sides[0])} and {len(sides[1])} members); "
                                        "reported, not changed (existing: report)"))
        if not any(f.rule_id == ENCLAVE_POWER_RULE for f in findings) and not any(
                isinstance(a, Join) for a in actions):
            findings.extend(self.diff_enclave_power(room, rc))
        return actions, findings


def history_within(value: Any, required: str) -> bool:
    """Whether history visibility ``value`` (None: unset, which means ``shared``) shows
    no more than ``required``."""
    v = value if isinstance(value, str) and value in HISTORY_ORDER else "shared"
    return HISTORY_ORDER[v] <= HISTORY_ORDER[required]


def class_content(room_class: str, rule_id: str) -> dict[str, Any]:
    """The class state Enclave writes for its record (the gate's carries a grant too)."""
    return {"class": room_class, "rule_id": rule_id, "set_by": "enclave"}


def is_direct_chat(room: RoomFacts, *, invite_content: Mapping[str, Any] | None = None,
                   enclave_dm: bool = False) -> bool:
    """THE answer to "is this room a direct chat?" for every part of Enclave.

    Enclave's record decides when there is one. Otherwise any of: ``is_direct`` on an
    invitation (the room's, or ``invite_content``), a room Enclave's bot made as a DM
    (``enclave_dm``: the bot's own notices, whose invites may not carry ``is_direct``), a
    ``trusted_private_chat`` (room v12 ``additional_creators``: the invitee is a creator)
    with at most two people, or an unnamed invite-only room with at most two people and
    no alias. Nothing here needs the gate.
    """
    if room.class_state is not None:
        return room.class_state == DM_CLASS
    if room.is_direct or enclave_dm:
        return True
    if invite_content is not None and invite_content.get("is_direct") is True:
        return True
    people = room.current()
    if len(people) > 2 or not room.known:
        return False
    if len(room.creators) == 2 and set(people) <= set(room.creators):
        return True  # trusted_private_chat in room v12: both are creators
    return (room.join_rule == "invite" and room.name is None and not room.aliases
            and len(people) == 2)


def federation_whitelist(config: PolicyConfig, server_name: str) -> list[str]:
    """The servers the corporate homeserver may federate with for separation to hold
    without the gate module (Synapse's ``federation_domain_whitelist``): its own, and those
    of the policy's partners (their servers and users) and guests. Without the gate nothing
    refuses a staff member's join of a room hosted elsewhere before it happens; this list
    makes Synapse refuse every server the policy does not name."""
    servers = [server_name]
    for p in config.partners:
        servers += p.servers
        servers += [_server(u) for u in p.users]
    servers += [_server(g.user) for g in config.guests]
    return list(dict.fromkeys(s for s in servers if s))


def apply_edits(request: Mapping[str, Any], edits: Mapping[str, Any] | None) -> dict[str, Any]:
    """A createRoom body with gate edits merged (as the gate module merges them):
    ``creation_content`` keys set, ``initial_state`` events replacing same type/state_key,
    ``invite`` added, ``power_users`` into ``power_level_content_override`` (room version 12,
    Synapse's default, where creators are not listed; the module handles older versions)."""
    body = dict(request)
    if edits and edits.get("invite"):
        current = list(body.get("invite") or [])
        body["invite"] = current + [u for u in edits["invite"] if u not in current]
    if edits and edits.get("power_users"):
        override = dict(body.get("power_level_content_override") or {})
        override["users"] = {**(override.get("users") or {}), **edits["power_users"]}
        body["power_level_content_override"] = override
    if not edits:
        return body
    if edits.get("creation_content"):
        body["creation_content"] = {**(body.get("creation_content") or {}),
                                    **edits["creation_content"]}
    if edits.get("initial_state"):
        new = list(edits["initial_state"])
        keys = {(e["type"], e.get("state_key", "")) for e in new}
        body["initial_state"] = [
            e for e in body.get("initial_state") or []
            if (e.get("type"), e.get("state_key", "")) not in keys] + new
    return body


def diff_separation(policy: SeparationPolicy, rooms: Iterable[RoomFacts]) -> SeparationPlan:
    """Reconciliation: the actions and findings for every room scanned."""
    actions: list[Action] = []
    findings: list[Finding] = []
    n = 0
    for room in rooms:
        n += 1
        a, f = policy.diff_room(room)
        actions.extend(a)
        findings.extend(f)
    return SeparationPlan(actions, findings, n)


# -- facts from the homeserver ---------------------------------------------------------------
def room_facts_from_state(room_id: str, state: Sequence[Mapping[str, Any]]) -> RoomFacts:
    """Build :class:`RoomFacts` from a room's full state (admin API or /state)."""
    members: dict[str, str] = {}
    creators: set[str] = set()
    version: str | None = None
    federate = True
    claimed: str | None = None
    grant: str | None = None
    history: str | None = None
    aliases: list[str] = []
    name = join_rule = None
    encrypted = False
    direct: bool | None = None
    predecessor: str | None = None
    power: Mapping[str, Any] = {}
    for ev in state:
        t, key, content = ev.get("type"), ev.get("state_key"), ev.get("content") or {}
        if t == "m.room.member" and isinstance(key, str):
            m = content.get("membership")
            if m in ("join", "invite", "knock"):
                members[key] = m
            if content.get("is_direct") is True:
                direct = True  # an invitation (or a join keeping it) marked as a DM
        elif t == "m.room.create":
            version = str(content.get("room_version", "1"))
            federate = content.get("m.federate", True) is not False
            creators.update(creators_of(ev))
            pred = content.get("predecessor")
            if isinstance(pred, dict) and isinstance(pred.get("room_id"), str):
                predecessor = pred["room_id"]
        elif t == CLASS_STATE_TYPE and key == "":
            c, g = content.get("class"), content.get("grant")
            claimed = c if isinstance(c, str) else None
            grant = g if isinstance(g, str) else None
        elif t == HISTORY_STATE_TYPE and key == "":
            h = content.get("history_visibility")
            history = h if isinstance(h, str) else None
        elif t == "m.room.canonical_alias" and key == "":
            if isinstance(content.get("alias"), str):
                aliases.append(content["alias"])
            alt = content.get("alt_aliases")
            if isinstance(alt, list):
                aliases.extend(a for a in alt if isinstance(a, str))
        elif t == "m.room.name" and key == "":
            name = content.get("name") if isinstance(content.get("name"), str) else None
        elif t == "m.room.join_rules" and key == "":
            join_rule = content.get("join_rule")
        elif t == "m.room.encryption" and key == "":
            encrypted = True
        elif t == "m.room.power_levels" and key == "":
            power = content
    return RoomFacts(room_id=room_id, room_version=version, creators=frozenset(creators),
                     claimed_class=claimed, claimed_grant=grant, history_visibility=history,
                     aliases=tuple(aliases), name=name, federate=federate,
                     join_rule=join_rule, encrypted=encrypted, members=members, power=power,
                     is_direct=direct, predecessor=predecessor)


def room_facts_from_invite(event: Mapping[str, Any]) -> RoomFacts:
    """Facts of a remote room we are not in, from an invite's stripped state."""
    stripped = ((event.get("unsigned") or {}).get("invite_room_state") or [])
    facts = room_facts_from_state(event.get("room_id", ""), stripped)
    content = event.get("content") or {}
    members = dict(facts.members)
    sender = event.get("sender")
    if isinstance(sender, str):
        members[sender] = "join"
    members[event.get("state_key", "")] = "invite"
    return replace(facts, members=members, is_direct=bool(content.get("is_direct")) or None,
                   hosted=False)


def room_facts_from_gate(room: Mapping[str, Any]) -> RoomFacts:
    """Facts the gate module read inside Synapse (see bridge.gate.protocol)."""
    creators = set(room.get("creators") or [])
    if room.get("creator"):
        creators.add(room["creator"])
    return RoomFacts(
        room_id=room.get("room_id") or "", room_version=room.get("room_version"),
        creators=frozenset(creators), claimed_class=room.get("class"),
        claimed_grant=room.get("class_grant"), history_visibility=room.get("history"),
        aliases=tuple(room.get("aliases") or ()), name=room.get("name"),
        federate=room.get("federate", True) is not False, join_rule=room.get("join_rule"),
        encrypted=bool(room.get("encrypted")), is_direct=room.get("is_direct"),
        members=dict(room.get("members") or {}), power=dict(room.get("power") or {}),
    )

"""Separation decisions as tables: principal x action x class, barriers, guests, DMs."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
import yaml

from bridge.config.policy import PolicyConfig
from bridge.model.people import StaffRecord
from bridge.policy.actions import Join, Kick, Leave, SetState
from bridge.policy.separation import (
    CLASS_STATE_TYPE,
    HISTORY_STATE_TYPE,
    NotDone,
    NotifyUser,
    RoomFacts,
    SeparationPolicy,
    class_content,
    diff_separation,
    is_direct_chat,
    room_facts_from_invite,
    room_facts_from_state,
)

S = "corp.test"
NOW = int(datetime(2026, 11, 28, tzinfo=UTC).timestamp() * 1000)

POLICY_YAML = """
default_class: internal
room_classes:
  - {id: internal}
  - {id: hr, allow: {staff_only: {groups: [hr]}}}
  - {id: external, federate: true, allow: {partners: true, guests: true}}
  - {id: open, federate: true, allow: {external: true}}
  - {id: research, allow: {staff_only: {attributes: {department: [Research]}}}}
classify:
  - {id: cls-ext-alias, room_class: external, alias: '^#ext-'}
  - {id: cls-hr-creator, room_class: hr, creator_group: hr}
partners:
  - {id: partner-acme, servers: [acme.example], room_classes: [external]}
  - {id: partner-nodm, users: ['@quinn:nodm.example'], room_classes: [external], dm: false}
guests:
  - {id: guest-gina, user: '@gina:gmail.example', sponsor: '@alice:corp.test',
     expires: 2026-12-31, room_classes: [external]}
  - {id: guest-old, user: '@old:gmail.example', sponsor: '@alice:corp.test',
     expires: 2026-01-01, room_classes: [external]}
dms:
  exceptions:
    - {id: dm-sales-external, who: {groups: [sales]}, allow: [external]}
barriers:
  - {id: barrier-research-trading, between: [{groups: [research]}, {groups: [trading]}],
     existing: remove}
  - {id: barrier-legal-ops, between: [{attributes: {department: [Legal]}}, {groups: [ops]}]}
notify: {contact: '#it-help:corp.test'}
"""


def staff(name: str, *groups: str, department: str | None = None,
          active: bool = True) -> StaffRecord:
    return StaffRecord(user_id=f"@{name}:{S}", person_id=name, active=active, username=name,
                       display_name=name.title(), department=department,
                       groups=frozenset(groups))


STAFF = [
    staff("alice", "sales"), staff("bob", "engineering"),
    staff("carol", "research", department="Research"), staff("dave", "trading"),
    staff("erin", "hr"), staff("frank", "sales", active=False),
    staff("lena", department="Legal"), staff("otto", "ops"),
]


def u(name: str, server: str = S) -> str:
    return f"@{name}:{server}"


ALICE, BOB, CAROL, DAVE, ERIN, FRANK = (u(n) for n in ("alice", "bob", "carol", "dave",
                                                          "erin", "frank"))
LENA, OTTO, MALLORY, BOT = u("lena"), u("otto"), u("mallory"), u("enclave")
PAT, ACME2 = u("pat", "acme.example"), u("ann", "acme.example")
QUINN = u("quinn", "nodm.example")
GINA, OLD = u("gina", "gmail.example"), u("old", "gmail.example")
EVE = u("eve", "personal.example")


def make_policy(text: str = POLICY_YAML, now: int = NOW, **changes: object) -> SeparationPolicy:
    data = yaml.safe_load(text)
    data.update(changes)
    return SeparationPolicy(PolicyConfig.model_validate(data), STAFF, server_name=S,
                            service_users=[BOT], service_prefix="enclave_", now_ms=now)


P = make_policy()


def room(cls: str | None = None, *members: str, is_direct: bool | None = None,
         aliases: tuple[str, ...] = (), version: str = "12", creator: str | None = None,
         power: dict | None = None, history: str | None = "joined") -> RoomFacts:
    ms = {m: "join" for m in members}
    return RoomFacts(room_id="!r", room_version=version, class_state=cls, claimed_class=cls,
                     history_visibility=history,
                     creators=frozenset({creator or (members[0] if members else ALICE)}),
                     aliases=aliases, is_direct=is_direct, members=ms,
                     power=power or {})


# -- principals --------------------------------------------------------------------------------
@pytest.mark.parametrize(("user", "kind"), [
    (ALICE, "staff"), (FRANK, "external"), (MALLORY, "external"), (BOT, "service"),
    (u("enclave_announce"), "service"), (PAT, "partner"), (ACME2, "partner"),
    (QUINN, "partner"), (GINA, "guest"), (OLD, "guest"), (EVE, "external"),
])
def test_principal_kinds(user: str, kind: str) -> None:
    assert P.principal(user).kind == kind


def test_unlisted_local_users_may_be_trusted() -> None:
    assert make_policy(unlisted_local_users="staff").principal(MALLORY).kind == "staff"
    # a leaver stays out even then: the directory says they left
    assert make_policy(unlisted_local_users="staff").principal(FRANK).kind == "external"


def test_guest_expiry_is_by_now() -> None:
    assert not P.principal(GINA).expired and P.principal(OLD).expired
    later = make_policy(now=int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000))
    assert later.principal(GINA).expired


# -- invites: principal x class ----------------------------------------------------------------
INVITES = [
    # (id, inviter, invitee, room, allow, rule_id)
    ("staff-staff-internal", ALICE, BOB, room("internal", ALICE), True, "class.internal"),
    ("staff-external-internal", ALICE, EVE, room("internal", ALICE), False,
     "class.internal.federate"),
    ("staff-partner-internal", ALICE, PAT, room("internal", ALICE), False,
     "class.internal.federate"),
    ("staff-guest-internal", ALICE, GINA, room("internal", ALICE), False,
     "class.internal.federate"),
    ("staff-unlisted-internal", ALICE, MALLORY, room("internal", ALICE), False,
     "class.internal"),
    ("staff-leaver-internal", ALICE, FRANK, room("internal", ALICE), False, "class.internal"),
    ("staff-partner-external", ALICE, PAT, room("external", ALICE), True, "partner-acme"),
    ("staff-partner-by-user-external", ALICE, QUINN, room("external", ALICE), True,
     "partner-nodm"),
    ("staff-guest-external", ALICE, GINA, room("external", ALICE), True, "guest-gina"),
    ("staff-expired-guest-external", ALICE, OLD, room("external", ALICE), False, "guest-old"),
    ("staff-external-external", ALICE, EVE, room("external", ALICE), False, "class.external"),
    ("staff-external-open", ALICE, EVE, room("open", ALICE), True, "class.open"),
    ("staff-staff-external", ALICE, BOB, room("external", ALICE), True, "class.external"),
    ("hr-member-hr", ERIN, ERIN.replace("erin", "erin"), room("hr", ERIN), True, "class.hr"),
    ("non-hr-staff-hr", ERIN, BOB, room("hr", ERIN), False, "class.hr"),
    ("research-attribute-ok", CAROL, CAROL, room("research"), True, "class.research"),
    ("research-attribute-no", CAROL, BOB, room("research", CAROL), False, "class.research"),
    ("bot-anywhere", ALICE, BOT, room("internal", ALICE), True, "builtin.enclave"),
    ("bot-invites-staff", BOT, BOB, room("internal", BOT), True, "class.internal"),
    ("partner-invites-staff-to-mixed-internal", PAT, BOB, room("internal", ALICE, PAT), False,
     "class.internal.federate"),
    ("staff-into-room-holding-external", ALICE, BOB, room("internal", ALICE, EVE), False,
     "class.internal.federate"),
    ("classified-by-alias", ALICE, PAT, room(None, ALICE, aliases=("#ext-acme:corp.test",)),
     True, "partner-acme"),
    ("classified-by-creator-group", ERIN, BOB, room(None, ERIN), False, "class.hr"),
    ("default-class", ALICE, PAT, room(None, ALICE), False, "class.internal.federate"),
    ("unknown-class-state-falls-back", ALICE, PAT, room("nonsense", ALICE), False,
     "class.internal.federate"),
    # barriers: rooms
    ("barrier-room", CAROL, DAVE, room("internal", CAROL), False, "barrier-research-trading"),
    ("barrier-room-reverse", DAVE, CAROL, room("internal", DAVE), False,
     "barrier-research-trading"),
    ("barrier-room-third-party", ALICE, DAVE, room("internal", ALICE, CAROL), False,
     "barrier-research-trading"),
    ("barrier-attribute-vs-group", LENA, OTTO, room("internal", LENA), False,
     "barrier-legal-ops"),
    ("barrier-same-side", CAROL, CAROL, room("internal", ALICE), True, "class.internal"),
]


@pytest.mark.parametrize(("inviter", "invitee", "facts", "allow", "rule_id"),
                         [c[1:] for c in INVITES], ids=[c[0] for c in INVITES])
def test_invites(inviter: str, invitee: str, facts: RoomFacts, allow: bool,
                 rule_id: str) -> None:
    d = P.decide_invite(inviter, invitee, facts)
    assert (d.allow, d.rule_id) == (allow, rule_id), d.describe()
    if not allow:
        assert rule_id in d.message and "#it-help:corp.test" in d.message
        assert d.path.startswith(("policy.", "(built in)"))


# -- direct chats --------------------------------------------------------------------------------
DMS = [
    ("staff-staff", ALICE, BOB, True, "dms.staff_staff"),
    ("staff-partner", BOB, PAT, True, "dms.staff_partner"),
    ("partner-staff", PAT, BOB, True, "dms.staff_partner"),
    ("staff-partner-without-dm", BOB, QUINN, False, "partner-nodm"),
    ("staff-guest", BOB, GINA, True, "dms.staff_guest"),
    ("staff-expired-guest", BOB, OLD, False, "guest-old"),
    ("staff-external", BOB, EVE, False, "dms.staff_external"),
    ("external-staff", EVE, BOB, False, "dms.staff_external"),
    ("sales-external-exception", ALICE, EVE, True, "dm-sales-external"),
    ("external-sales-exception", EVE, ALICE, True, "dm-sales-external"),
    ("leaver-external", FRANK, EVE, False, "dms.non_staff"),
    ("unlisted-external", MALLORY, EVE, False, "dms.non_staff"),
    ("barrier-dm", CAROL, DAVE, False, "barrier-research-trading"),
    ("barrier-dm-reverse", DAVE, CAROL, False, "barrier-research-trading"),
    ("bot-external", BOT, EVE, True, "builtin.enclave"),
    ("external-bot", EVE, BOT, True, "builtin.enclave"),
]


@pytest.mark.parametrize(("a", "b", "allow", "rule_id"), [c[1:] for c in DMS],
                         ids=[c[0] for c in DMS])
def test_dm_invites(a: str, b: str, allow: bool, rule_id: str) -> None:
    d = P.decide_invite(a, b, room(None, a, is_direct=True))
    assert (d.allow, d.rule_id) == (allow, rule_id), d.describe()
    # user search shows exactly the people one may DM
    v = P.decide_user_visible(a, b)
    assert (v.allow, v.rule_id) == (allow, rule_id)


def test_dm_class_state_makes_a_direct_chat_without_is_direct() -> None:
    assert not P.decide_invite(BOB, EVE, room("dm", BOB)).allow
    assert P.decide_invite(BOB, PAT, room("dm", BOB)).allow


def test_dm_policy_settings_flip() -> None:
    strict = make_policy(dms={"staff_staff": "deny", "staff_partner": "deny"})
    assert strict.decide_invite(ALICE, BOB, room(None, ALICE, is_direct=True)).rule_id == \
        "dms.staff_staff"
    assert not strict.decide_invite(ALICE, PAT, room(None, ALICE, is_direct=True)).allow
    loose = make_policy(dms={"staff_external": "allow"})
    assert loose.decide_invite(BOB, EVE, room(None, BOB, is_direct=True)).allow


def test_disabled_policy_allows_everything() -> None:
    off = make_policy(enabled=False)
    d = off.decide_invite(BOB, EVE, room(None, BOB, is_direct=True))
    assert d.allow and d.rule_id == "policy.enabled"


# -- guests before and after expiry ----------------------------------------------------------------
@pytest.mark.parametrize(("when", "allow", "rule_id"), [
    (datetime(2026, 12, 30, tzinfo=UTC), True, "guest-gina"),
    (datetime(2026, 12, 31, tzinfo=UTC), False, "guest-gina"),
    (datetime(2027, 3, 1, tzinfo=UTC), False, "guest-gina"),
])
def test_guest_expiry_boundaries(when: datetime, allow: bool, rule_id: str) -> None:
    p = make_policy(now=int(when.timestamp() * 1000))
    d = p.decide_invite(ALICE, GINA, room("external", ALICE))
    assert (d.allow, d.rule_id) == (allow, rule_id)


# -- create, state, join ---------------------------------------------------------------------------
def test_create_internal_room_gets_no_federation_and_class_state() -> None:
    c = P.decide_create_room(BOB, {"name": "Plans", "preset": "private_chat"})
    assert c.decision.allow and c.room_class.id == "internal"
    assert c.edits is not None
    assert c.edits["creation_content"] == {"m.federate": False}
    assert c.edits["initial_state"][0]["type"] == CLASS_STATE_TYPE
    assert c.edits["initial_state"][0]["content"]["class"] == "internal"


@pytest.mark.parametrize(("creator", "request_", "bot_in"), [
    pytest.param(BOB, {"name": "Plans"}, True, id="group-room"),
    pytest.param(BOB, {"room_alias_name": "ext-acme", "invite": [PAT]}, True,
                 id="external-room"),
    pytest.param(ALICE, {"is_direct": True, "invite": [BOB]}, False, id="dm"),
    pytest.param(BOT, {"name": "Managed"}, False, id="enclaves-own-room"),
])
def test_group_rooms_bring_enclaves_bot_in_with_power(creator: str, request_: dict,
                                                      bot_in: bool) -> None:
    c = P.decide_create_room(creator, request_)
    assert c.decision.allow and c.edits is not None
    if bot_in:
        assert c.edits["invite"] == [BOT] and c.edits["power_users"] == {BOT: 100}
    else:
        assert "invite" not in c.edits and "power_users" not in c.edits


def test_create_external_room_by_alias_federates() -> None:
    c = P.decide_create_room(BOB, {"room_alias_name": "ext-acme", "invite": [PAT]})
    assert c.decision.allow and c.room_class.id == "external"
    assert c.edits is not None and "creation_content" not in c.edits


@pytest.mark.parametrize(("creator", "request_", "allow", "rule_id"), [
    (BOB, {"is_direct": True, "invite": [EVE]}, False, "dms.staff_external"),
    (ALICE, {"is_direct": True, "invite": [EVE]}, True, "room.is_direct"),
    (BOB, {"is_direct": True, "invite": [ALICE]}, True, "room.is_direct"),
    (CAROL, {"is_direct": True, "invite": [DAVE]}, False, "barrier-research-trading"),
    (BOB, {"invite": [ALICE, EVE]}, False, "class.internal.federate"),
    (MALLORY, {"name": "x"}, False, "class.internal"),
    (BOT, {"invite": [EVE]}, True, "builtin.enclave"),
])
def test_create_room_decisions(creator: str, request_: dict, allow: bool,
                               rule_id: str) -> None:
    d = P.decide_create_room(creator, request_).decision
    assert (d.allow, d.rule_id) == (allow, rule_id), d.describe()


def test_required_encryption_is_added_once() -> None:
    classes = yaml.safe_load(POLICY_YAML)["room_classes"]
    classes[0]["encryption"] = "required"
    p = make_policy(room_classes=classes)
    c = p.decide_create_room(BOB, {})
    assert c.edits is not None
    assert [e["type"] for e in c.edits["initial_state"]] == [CLASS_STATE_TYPE,
                                                             "m.room.encryption"]
    c2 = p.decide_create_room(BOB, {"initial_state": [{"type": "m.room.encryption",
                                                        "state_key": "", "content": {}}]})
    assert c2.edits is not None and len(c2.edits["initial_state"]) == 1


@pytest.mark.parametrize(("sender", "etype", "allow"), [
    (ALICE, CLASS_STATE_TYPE, False), (ALICE, "m.room.retention", False),
    (BOT, CLASS_STATE_TYPE, True), (ALICE, "m.room.topic", True),
    (u("enclave_admin2"), "m.room.retention", True),
])
def test_protected_state(sender: str, etype: str, allow: bool) -> None:
    d = P.decide_state_event(sender, etype, "")
    assert d.allow is allow
    if not allow:
        assert d.rule_id == "builtin.protected_state"


@pytest.mark.parametrize(("user", "facts", "allow", "rule_id"), [
    (EVE, room("internal", ALICE), False, "class.internal.federate"),
    (EVE, room("open", ALICE), True, "class.open"),
    (PAT, room("external", ALICE), True, "partner-acme"),
    (BOB, room("internal", ALICE), True, "class.internal"),
    (DAVE, room("internal", ALICE, CAROL), False, "barrier-research-trading"),
    (OLD, room("external", ALICE), False, "guest-old"),
])
def test_joins(user: str, facts: RoomFacts, allow: bool, rule_id: str) -> None:
    d = P.decide_membership(user, facts)
    assert (d.allow, d.rule_id) == (allow, rule_id), d.describe()


# -- reactive enforcement -------------------------------------------------------------------------
def member_event(sender: str, target: str, membership: str, **content: object) -> dict:
    return {"type": "m.room.member", "sender": sender, "state_key": target,
            "room_id": "!r", "event_id": "$e", "content": {"membership": membership, **content}}


def test_reactive_rejects_external_dm_invite_as_invitee_and_tells_them() -> None:
    ev = member_event(EVE, BOB, "invite", is_direct=True)
    ev["unsigned"] = {"invite_room_state": [
        {"type": "m.room.create", "sender": EVE, "state_key": "",
         "content": {"room_version": "12"}}]}
    actions = P.decide_event(ev, room_facts_from_invite(ev))
    assert [type(a) for a in actions] == [Leave, NotifyUser]
    leave, note = actions
    assert leave.actor == BOB and leave.rule_id == "dms.staff_external"
    assert isinstance(note, NotifyUser) and note.user == BOB
    assert "dms.staff_external" in note.body and "#it-help:corp.test" in note.body


def test_reactive_allows_staff_dm() -> None:
    ev = member_event(ALICE, BOB, "invite", is_direct=True)
    assert P.decide_event(ev, room(None, ALICE)) == []


def test_reactive_kicks_remote_joiner_as_enclaves_bot_never_as_the_creator_v12() -> None:
    facts = room("internal", ALICE, BOT, EVE, creator=ALICE, power={"users": {BOT: 100}})
    actions = P.decide_event(member_event(EVE, EVE, "join"), facts)
    assert actions == [Kick(rule_id="class.internal.federate", reason=actions[0].reason,
                            actor=BOT, room="!r", user=EVE)]
    # the creator could kick (unlimited power in v12), Enclave could not: nothing is done
    # as her; the reactive layer records what it could not do, with the fix
    bare = room("internal", ALICE, EVE, creator=ALICE)
    actions = P.decide_event(member_event(EVE, EVE, "join"), bare)
    assert [type(a) for a in actions] == [NotDone]
    assert actions[0].rule_id == "builtin.enclave_power" and actions[0].user == EVE
    assert f"invite {BOT} and give it power 50" in actions[0].message


def test_reactive_withdraws_staff_invite_of_external_and_tells_the_inviter() -> None:
    facts = room("internal", BOB, BOT, creator=BOB, power={"users": {BOT: 100}})
    actions = P.decide_event(member_event(BOB, EVE, "invite"), facts)
    assert isinstance(actions[0], Kick) and actions[0].user == EVE and actions[0].actor == BOT
    assert isinstance(actions[1], NotifyUser) and actions[1].user == BOB
    # without Enclave's power the invitation stands: reported, and the inviter is told
    actions = P.decide_event(member_event(BOB, EVE, "invite"), room("internal", BOB))
    assert [type(a) for a in actions] == [NotDone, NotifyUser]
    assert "no power in this room" in actions[1].body


def test_invited_bot_joins_then_kicks() -> None:
    facts = replace(room("internal", BOB, EVE, creator=BOB, power={"users": {BOT: 100}}),
                    members={BOB: "join", EVE: "join", BOT: "invite"})
    actions = P.decide_event(member_event(EVE, EVE, "join"), facts)
    assert [(type(a), a.actor) for a in actions] == [(Join, BOT), (Kick, BOT)]


@pytest.mark.parametrize(("facts", "joins"), [
    pytest.param(room("internal", BOB, creator=BOB), True, id="group-room"),
    pytest.param(room(None, BOB, ALICE, is_direct=True), False, id="dm"),
    pytest.param(replace(room("internal", BOB), hosted=False), False, id="remote-room"),
])
def test_bot_joins_group_rooms_it_is_invited_into(facts: RoomFacts, joins: bool) -> None:
    actions = P.decide_event(member_event(BOB, BOT, "invite"), facts)
    assert actions == ([Join(rule_id="builtin.enclave_power", reason=actions[0].reason,
                             actor=BOT, room="!r")] if joins else [])


def test_bot_joining_puts_back_what_it_could_not_before() -> None:
    facts = replace(room("external", BOB, creator=BOB, history="shared",
                         power={"users": {BOT: 100}}), claimed_class="internal")
    actions = P.decide_event(member_event(BOB, BOT, "invite"), facts)
    assert [(type(a), a.actor) for a in actions] == [(Join, BOT), (SetState, BOT),
                                                     (SetState, BOT)]


def test_enclaves_other_bots_act_in_rooms_they_made() -> None:
    announce = u("enclave_announce")
    facts = room("internal", announce, ALICE, EVE, creator=announce)
    assert P.choose_remover(facts, EVE) == announce
    assert P.diff_enclave_power(facts, P.classify_room(facts)) == []
    # a member is never chosen, however powerful
    assert P.acting_users(facts) == (BOT, announce)


def test_a_local_users_own_membership_is_done_for_them_and_says_so() -> None:
    d = P.decide_membership(FRANK, room("internal", ALICE))
    [leave], finding = P.remove(room("internal", ALICE, FRANK), FRANK, d)
    assert isinstance(leave, Leave) and leave.actor == FRANK and finding is None
    assert leave.reason.startswith(f"done for {FRANK} by Enclave (their own membership) "
                                   f"under {d.rule_id}")


def test_remote_creator_cannot_be_kicked_so_local_staff_leave() -> None:
    facts = room("internal", EVE, BOB, creator=EVE)
    d = P.decide_membership(EVE, facts)
    actions, finding = P.remove(facts, EVE, d)
    assert [(type(a), a.actor) for a in actions] == [(Leave, BOB)]
    assert finding is not None and "cannot remove" in finding.message


def test_kicker_is_enclave_with_power_never_a_member() -> None:
    pl = {"users": {BOB: 100, ALICE: 0, BOT: 50}, "kick": 50}
    facts = room("internal", ALICE, BOB, BOT, EVE, version="10", power=pl)
    assert P.choose_remover(facts, EVE) == BOT
    # bob has the power, Enclave does not: nobody is chosen
    facts = room("internal", ALICE, BOB, BOT, EVE, version="10",
                 power={"users": {BOB: 100, BOT: 0}})
    assert P.choose_remover(facts, EVE) is None
    weak = room("internal", ALICE, BOT, EVE, version="10",
                power={"users": {EVE: 100, BOT: 100}})
    assert P.choose_remover(weak, EVE) is None  # not more than the target


def test_bot_is_preferred_as_kicker() -> None:
    pl = {"users": {BOT: 100, BOB: 100}}
    facts = room("internal", BOB, BOT, EVE, version="10", power=pl)
    assert P.choose_remover(facts, EVE) == BOT


def test_reactive_off() -> None:
    p = make_policy(reactive=False)
    assert p.decide_event(member_event(EVE, BOB, "invite", is_direct=True),
                          room(None, EVE)) == []


# -- reconciliation ------------------------------------------------------------------------
def test_reconcile_removes_outsiders_expired_guests_and_the_second_barrier_side() -> None:
    rooms = [
        room("internal", ALICE, BOB),  # clean
        room("internal", ALICE, EVE),  # external in internal
        room("external", ALICE, PAT, OLD),  # expired guest
        room("internal", CAROL, DAVE, BOB),  # barrier with existing: remove
        room("internal", LENA, OTTO),  # barrier with existing: report
        room(None, BOB, EVE, is_direct=True),  # staff-external DM: the outsider goes
    ]
    # Enclave's bot is in the group rooms with power (the gate's creation edits)
    rooms = [r if r.is_direct else replace(r, members={**r.members, BOT: "join"},
                                           power={"users": {BOT: 100}}) for r in rooms]
    rooms = [RoomFacts(**{**r.__dict__, "room_id": f"!r{i}"}) for i, r in enumerate(rooms)]
    plan = diff_separation(P, rooms)
    removals = [a for a in plan.actions if not isinstance(a, NotifyUser)]
    removed = sorted((a.room_id, getattr(a, "user", None) or a.actor) for a in removals)
    # in the DM Enclave's bot is absent, so the staff member leaves (their own membership)
    assert removed == [("!r1", EVE), ("!r2", OLD), ("!r3", DAVE), ("!r5", BOB)]
    # the expired guest's sponsor is told, once per room
    notes = [a for a in plan.actions if isinstance(a, NotifyUser)]
    assert [(n.user, n.once_key) for n in notes] == [(ALICE, f"guest-expired:{OLD}:!r2")]
    assert [f.rule_id for f in plan.findings] == ["barrier-legal-ops", "dms.staff_external"]
    assert plan.rooms == 6


def test_reconcile_reports_federating_internal_rooms_from_before_enclave() -> None:
    facts = RoomFacts(room_id="!old", room_version="10", members={ALICE: "join"},
                      federate=True)
    plan = diff_separation(P, [facts])
    # and Enclave has no power there (made before Enclave): reported with the fix
    assert [f.rule_id for f in plan.findings] == ["class.internal.federate",
                                                  "builtin.enclave_power"]


def test_room_facts_from_state() -> None:
    state = [
        {"type": "m.room.create", "sender": ALICE, "state_key": "",
         "content": {"room_version": "12", "m.federate": False,
                     "additional_creators": [BOB]}},
        {"type": CLASS_STATE_TYPE, "state_key": "", "content": {"class": "hr"}},
        {"type": "m.room.member", "state_key": ALICE, "content": {"membership": "join"}},
        {"type": "m.room.member", "state_key": EVE, "content": {"membership": "leave"}},
        {"type": "m.room.member", "state_key": BOB, "content": {"membership": "invite"}},
        {"type": "m.room.canonical_alias", "state_key": "",
         "content": {"alias": "#a:corp.test", "alt_aliases": ["#b:corp.test"]}},
        {"type": "m.room.encryption", "state_key": "", "content": {}},
    ]
    f = room_facts_from_state("!x", state)
    assert f.creators == {ALICE, BOB} and f.claimed_class == "hr" and not f.federate
    assert f.class_state is None  # the state's claim is not Enclave's record
    assert f.members == {ALICE: "join", BOB: "invite"} and f.encrypted
    assert f.aliases == ("#a:corp.test", "#b:corp.test") and f.room_version == "12"


# -- config validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "fragment"), [
    ({"default_class": "nope"}, "default_class 'nope' is not a room class"),
    ({"classify": [{"id": "x", "room_class": "nope", "alias": "a"}]}, "unknown room class"),
    ({"partners": [{"id": "p", "servers": ["a"], "room_classes": ["nope"]}]},
     "unknown room class"),
    ({"barriers": [{"id": "guest-gina", "between": [{"groups": ["a"]}, {"groups": ["b"]}]}]},
     "already used"),
    ({"room_classes": [{"id": "dm"}]}, "reserved"),
    ({"classify": [{"id": "x", "room_class": "internal"}]}, "at least one of"),
    ({"classify": [{"id": "x", "room_class": "internal", "alias": "("}]}, "regular expression"),
    ({"guests": [{"id": "g", "user": "gina", "sponsor": ALICE, "expires": "2026-01-01"}]},
     "not a Matrix user id"),
])
def test_policy_config_errors(change: dict, fragment: str) -> None:
    data = yaml.safe_load(POLICY_YAML)
    data.update(change)
    with pytest.raises(ValueError) as e:
        PolicyConfig.model_validate(data)
    assert fragment in str(e.value)


def test_class_exempt_from_barriers_still_keeps_dms_apart() -> None:
    classes = yaml.safe_load(POLICY_YAML)["room_classes"]
    classes.append({"id": "company", "barriers": False})
    p = make_policy(room_classes=classes)
    d = p.decide_invite(ALICE, DAVE, room("company", ALICE, CAROL))
    assert d.allow and d.rule_id == "class.company"
    assert p.diff_room(room("company", CAROL, DAVE, BOT,
                            power={"users": {BOT: 100}})) == ([], [])
    assert not p.decide_invite(CAROL, DAVE, room(None, CAROL, is_direct=True)).allow


def test_enclave_rooms_are_classified_too_and_edits_merge_like_the_gate() -> None:
    from bridge.policy.separation import apply_edits

    body = {"room_alias_name": "all-hands", "creation_content": {"type": "m.space"},
            "initial_state": [{"type": CLASS_STATE_TYPE, "state_key": "",
                               "content": {"class": "open"}},
                              {"type": "m.room.history_visibility", "state_key": "",
                               "content": {"history_visibility": "shared"}}]}
    c = P.decide_create_room(BOT, body)
    assert c.decision.rule_id == "builtin.enclave" and c.room_class.id == "internal"
    merged = apply_edits(body, c.edits)
    assert merged["creation_content"] == {"type": "m.space", "m.federate": False}
    classes = [e for e in merged["initial_state"] if e["type"] == CLASS_STATE_TYPE]
    assert [e["content"]["class"] for e in classes] == ["internal"]
    assert len(merged["initial_state"]) == 2


# -- every door (issue 15) ---------------------------------------------------------------------
UNKNOWN = RoomFacts(room_id="!party")  # a remote room this server has no state for


@pytest.mark.parametrize(("user", "room_id", "approved", "allow", "rule"), [
    (BOB, "!party", False, False, "builtin.unknown_remote_room"),
    (BOB, "!party:personal.example", False, False, "builtin.unknown_remote_room"),
    (BOB, "!party", True, True, "builtin.approved_invite"),
    (BOB, "!deal:acme.example", False, True, "partner-acme"),  # a partner's server's room
    (FRANK, "!deal:acme.example", False, False, "class.external"),  # not staff
    (BOT, "!party", False, True, "builtin.enclave"),
])
def test_join_of_a_room_the_server_does_not_know(user: str, room_id: str, approved: bool,
                                                 allow: bool, rule: str) -> None:
    d = P.decide_join(user, RoomFacts(room_id=room_id), invite_approved=approved)
    assert (d.allow, d.rule_id) == (allow, rule)
    if not allow:
        assert rule in d.message and "#it-help" in d.message


def test_join_of_a_known_room_is_the_membership_decision() -> None:
    known = room("external", ALICE, PAT)
    assert P.decide_join(BOB, known) == P.decide_membership(BOB, known)
    assert P.decide_join(BOB, room("internal", ALICE, EVE)).allow is False


def test_class_claimed_in_state_is_not_the_class() -> None:
    forged = RoomFacts(room_id="!f", room_version="12", creators=frozenset({BOB}),
                       claimed_class="external", members={BOB: "join"})
    assert P.classify_room(forged).id == "internal"  # the default, not the claim
    d = P.decide_invite(BOB, PAT, forged)
    assert not d.allow and d.rule_id == "class.internal.federate"
    # Enclave's record decides
    assert P.classify_room(replace(forged, class_state="external")).id == "external"


@pytest.mark.parametrize(("creators", "expected"), [
    ((PAT,), "external"),  # a partner's own room: the partner's federating class
    ((EVE,), "internal"),  # an outsider's room: the default (which refuses them)
    ((BOB,), "internal"),  # a local creator: local rules
])
def test_remote_rooms_are_classed_by_their_creator(creators: tuple[str, ...],
                                                   expected: str) -> None:
    facts = RoomFacts(room_id="!x", room_version="12", creators=frozenset(creators),
                      members={creators[0]: "join"})
    assert P.classify_room(facts).id == expected


@pytest.mark.parametrize(("facts", "content", "direct"), [
    (RoomFacts(room_id="!d", is_direct=True), None, True),
    (RoomFacts(room_id="!d", room_version="12", creators=frozenset({BOB}),
               members={BOB: "join"}), {"is_direct": True}, True),
    # trusted_private_chat in v12: both are creators
    (RoomFacts(room_id="!d", room_version="12", creators=frozenset({BOB, EVE}),
               join_rule="invite", name="Chat", members={BOB: "join", EVE: "invite"}),
     None, True),
    # an unnamed invite-only room of two
    (RoomFacts(room_id="!d", room_version="12", creators=frozenset({BOB}),
               join_rule="invite", members={BOB: "join", ALICE: "join"}), None, True),
    # named, or three people, or public: not a DM
    (RoomFacts(room_id="!d", room_version="12", creators=frozenset({BOB}), name="Plans",
               join_rule="invite", members={BOB: "join", ALICE: "join"}), None, False),
    (RoomFacts(room_id="!d", room_version="12", creators=frozenset({BOB}),
               join_rule="invite", members={BOB: "join", ALICE: "join", CAROL: "invite"}),
     None, False),
    (RoomFacts(room_id="!d", room_version="12", creators=frozenset({BOB}),
               join_rule="public", members={BOB: "join", ALICE: "join"}), None, False),
    # Enclave's record wins either way
    (RoomFacts(room_id="!d", class_state="internal", is_direct=True), None, False),
    (RoomFacts(room_id="!d", class_state="dm"), None, True),
])
def test_is_direct_chat(facts: RoomFacts, content: dict | None, direct: bool) -> None:
    assert is_direct_chat(facts, invite_content=content) is direct


def test_bot_dm_is_direct_even_without_is_direct() -> None:
    facts = RoomFacts(room_id="!n", room_version="12", creators=frozenset({BOT}),
                      name="Enclave", join_rule="invite", members={BOT: "join"})
    assert not is_direct_chat(facts) and is_direct_chat(facts, enclave_dm=True)


def test_creation_edits_set_history_visibility_where_remote_people_can_be() -> None:
    ext = P.decide_create_room(BOB, {"room_alias_name": "ext-deal"})
    hist = [e for e in ext.edits["initial_state"] if e["type"] == HISTORY_STATE_TYPE]
    assert hist == [{"type": HISTORY_STATE_TYPE, "state_key": "",
                     "content": {"history_visibility": "joined"}}]
    internal = P.decide_create_room(BOB, {"name": "Roadmap"})
    assert not [e for e in internal.edits["initial_state"] if e["type"] == HISTORY_STATE_TYPE]
    dm = P.decide_create_room(BOB, {"is_direct": True, "invite": [ALICE]})
    assert [e["content"] for e in dm.edits["initial_state"]
            if e["type"] == HISTORY_STATE_TYPE] == [{"history_visibility": "invited"}]


@pytest.mark.parametrize(("cls", "value", "allow"), [
    ("external", "shared", False), ("external", "world_readable", False),
    ("external", "invited", False), ("external", "joined", True),
    ("internal", "shared", True), ("internal", "world_readable", True),
    (None, "shared", True),  # no class record, default internal
])
def test_history_visibility_is_protected_in_federating_classes(cls: str | None, value: str,
                                                               allow: bool) -> None:
    d = P.decide_state_event(BOB, HISTORY_STATE_TYPE, "", {"history_visibility": value},
                             room(cls, BOB, PAT))
    assert d.allow is allow
    if not allow:
        assert d.rule_id == "builtin.history_visibility"


def test_reconcile_puts_back_class_and_history_state() -> None:
    facts = replace(room("external", BOB, PAT, BOT, history="shared"),
                    claimed_class="internal", power={"users": {BOB: 100, BOT: 100}})
    actions, findings = P.diff_room(facts)
    sets = {(a.event_type, str(a.content)) for a in actions if isinstance(a, SetState)}
    assert (CLASS_STATE_TYPE, str(class_content("external", "room.class_state"))) in sets
    assert (HISTORY_STATE_TYPE, str({"history_visibility": "joined"})) in sets
    assert all(a.actor == BOT for a in actions) and findings == []
    # bob (a member) has the power, Enclave does not: reported with the fix, not done as bob
    weak = replace(facts, room_version="10", power={"users": {BOB: 100, BOT: 10},
                                                    "state_default": 50})
    actions, findings = P.diff_room(weak)
    assert not [a for a in actions if isinstance(a, SetState)]
    assert {f.rule_id for f in findings} == {"builtin.class_record",
                                             "builtin.history_visibility",
                                             "builtin.enclave_power"}
    assert all(f"invite {BOT} and give it power 50" in f.message for f in findings)


def test_reactive_reverts_someone_elses_class_state() -> None:
    ev = {"type": CLASS_STATE_TYPE, "state_key": "", "sender": BOB, "room_id": "!r",
          "content": {"class": "internal"}}
    facts = replace(room("external", BOB, BOT, power={"users": {BOT: 100}}),
                    claimed_class="internal")
    [a] = P.decide_event(ev, facts)
    assert isinstance(a, SetState) and a.content["class"] == "external" and a.actor == BOT
    # bob (the v12 creator) could put it back; Enclave cannot here: recorded, not done
    [nd] = P.decide_event(ev, replace(room("external", BOB), claimed_class="internal"))
    assert isinstance(nd, NotDone) and nd.rule_id == "builtin.class_record"
    # Enclave's own change is left alone
    assert P.decide_event({**ev, "sender": BOT}, facts) == []


def test_notice_says_staff_left_when_the_invite_cannot_be_withdrawn() -> None:
    # the invitee is a room v12 creator (additional_creators): nobody can kick them
    facts = RoomFacts(room_id="!r", room_version="12", creators=frozenset({BOB, EVE}),
                      class_state="internal", claimed_class="internal",
                      members={BOB: "join"})
    actions = P.decide_event(member_event(BOB, EVE, "invite"), facts)
    assert [type(a) for a in actions] == [Leave, NotifyUser]
    assert actions[0].actor == BOB
    body = actions[1].body
    assert "could not withdraw" in body and "took you out of the room" in body
    assert "withdrew your invitation" not in body


def test_room_facts_read_history_grant_predecessor_and_is_direct() -> None:
    f = room_facts_from_state("!n", [
        {"type": "m.room.create", "sender": BOB, "state_key": "",
         "content": {"room_version": "12", "predecessor": {"room_id": "!old"}}},
        {"type": CLASS_STATE_TYPE, "sender": BOB, "state_key": "",
         "content": {"class": "external", "grant": "g-1"}},
        {"type": HISTORY_STATE_TYPE, "sender": BOB, "state_key": "",
         "content": {"history_visibility": "joined"}},
        {"type": "m.room.member", "sender": BOB, "state_key": ALICE,
         "content": {"membership": "invite", "is_direct": True}},
    ])
    assert (f.predecessor, f.claimed_class, f.claimed_grant, f.history_visibility) == (
        "!old", "external", "g-1", "joined")
    assert f.class_state is None and f.is_direct is True


def test_invite_facts_are_not_this_servers_state() -> None:
    ev = member_event(PAT, BOB, "invite")
    ev["unsigned"] = {"invite_room_state": [
        {"type": "m.room.create", "sender": PAT, "state_key": "",
         "content": {"room_version": "12"}},
        {"type": CLASS_STATE_TYPE, "sender": PAT, "state_key": "",
         "content": {"class": "external"}}]}
    f = room_facts_from_invite(ev)
    assert not f.known and f.room_version == "12" and f.class_state is None
    # nothing is reverted in a room this server does not hold
    assert P.diff_protected_state(f) == ([], [])
    # the partner's own room is the partner's class, whatever its state claims
    assert P.classify_room(f).id == "external" and P.decide_invite(PAT, BOB, f).allow


@pytest.mark.parametrize(("content", "allow"), [
    ({"class": "external", "rule_id": "x", "set_by": "enclave"}, True),  # the record back
    ({"class": "internal"}, False),
    ({}, False),
])
def test_class_state_may_only_be_set_to_enclaves_record(content: dict, allow: bool) -> None:
    # Enclave reverts as a local member when its own users are not in the room; the gate
    # must let exactly that through
    d = P.decide_state_event(BOB, CLASS_STATE_TYPE, "", content, room("external", BOB))
    assert d.allow is allow
    assert not P.decide_state_event(BOB, CLASS_STATE_TYPE, "", content, None).allow

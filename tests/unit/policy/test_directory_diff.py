"""The directory diff as a table: directory + memory + homeserver -> actions."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bridge.config.directory import DirectoryConfig
from bridge.model.people import DirectorySnapshot, Group, Person
from bridge.policy.actions import Invite, Join, Kick, SetState, action_from_dict
from bridge.policy.directory import (
    AccountState,
    CreateAccount,
    CreateManagedRoom,
    DeactivateAccount,
    EraseAccount,
    HandOverRoom,
    HomeserverView,
    JoinThroughParent,
    PersonRecord,
    ReactivateAccount,
    RoomView,
    UpdateAccount,
    check_safety,
    desired_rooms,
    diff_directory,
    slug,
)
from bridge.policy.mapping import map_people

HS = "corp.test"
BOT = "@enclave:corp.test"
NOW = 1_800_000_000_000
DAY = 86_400_000


def uid(name: str) -> str:
    return f"@{name}:{HS}"


def person(name: str, **kw: Any) -> Person:
    base = dict(id=f"id-{name}", username=name, display_name=name.title(),
                email=f"{name}@corp.example.com", department="Sales")
    base.update(kw)
    return Person(**base)


def config(**kw: Any) -> DirectoryConfig:
    data: dict[str, Any] = {"source": {"type": "file", "path": "d.yaml"}}
    data.update(kw)
    return DirectoryConfig.model_validate(data, strict=False)


def rec(name: str, status: str = "active", email: str | None = "", **kw: Any) -> PersonRecord:
    return PersonRecord(f"id-{name}", uid(name), status,
                        f"{name}@corp.example.com" if email == "" else email,
                        kw.pop("displayname", name.title()), **kw)


def acct(name: str, **kw: Any) -> AccountState:
    return AccountState(uid(name), kw.pop("displayname", name.title()), **kw)


def run(people: list[Person], known: list[PersonRecord], accounts: list[AccountState], *,
        groups: list[Group] = (), cfg: DirectoryConfig | None = None,
        rooms: dict[str, RoomView] | None = None,
        leaver_rooms: dict[str, list[RoomView]] | None = None, **kw: Any):
    cfg = cfg or config()
    snap = DirectorySnapshot.build(people, groups)
    known_map = {r.person_id: r for r in known}
    mapped = map_people(snap.people.values(), cfg.mapping, HS,
                        known={k: r.user_id for k, r in known_map.items()},
                        reserved=lambda lp: lp in ("enclave", "enclave-admin"))
    view = HomeserverView(accounts={a.user_id: a for a in accounts}, rooms=rooms or {},
                          leaver_rooms=leaver_rooms or {})
    return diff_directory(snap, mapped.users, known_map, view, cfg, now_ms=NOW,
                          bot_user_id=BOT,
                          is_enclave_user=lambda u: u in (BOT, "@enclave-admin:corp.test"),
                          **kw)


def kinds(plan) -> list[tuple[str, str]]:
    return [(a.kind, getattr(a, "user", None) or a.actor or getattr(a, "key", "")) for a in
            plan.actions]


# (case, directory people, remembered, homeserver accounts, expected (kind, user) actions)
CASES = [
    ("joiner gets an account", [person("alice")], [], [],
     [("create_account", uid("alice"))]),
    ("unchanged person costs nothing", [person("alice")], [rec("alice")], [acct("alice")], []),
    ("renamed display name: one update", [person("alice", display_name="Alice Smith")],
     [rec("alice")], [acct("alice")], [("update_account", uid("alice"))]),
    ("email changed: one update", [person("alice", email="new@corp.example.com")],
     [rec("alice")], [acct("alice")], [("update_account", uid("alice"))]),
    ("existing account adopted (email set once)", [person("alice")], [], [acct("alice")],
     [("update_account", uid("alice"))]),
    ("adopted account without email, same name: nothing", [person("alice", email=None)], [],
     [acct("alice")], []),
    ("deleted from directory: leaver", [], [rec("alice")], [acct("alice")],
     [("deactivate_account", uid("alice"))]),
    ("disabled in directory: leaver", [person("alice", disabled=True)], [rec("alice")],
     [acct("alice")], [("deactivate_account", uid("alice"))]),
    ("leaver already deactivated: nothing to do", [], [rec("alice")],
     [acct("alice", deactivated=True)], []),
    ("disabled and never provisioned: nothing", [person("alice", disabled=True)], [], [], []),
    ("comes back: reactivated", [person("alice")],
     [rec("alice", status="deactivated", deactivated_at=NOW - DAY)],
     [acct("alice", deactivated=True)], [("reactivate_account", uid("alice"))]),
    ("erased cannot come back: reported", [person("alice")],
     [rec("alice", status="erased")], [acct("alice", deactivated=True, erased=True)], []),
    ("a server admin's account is not adopted", [person("root")], [],
     [acct("root", displayname="Root", admin=True)], []),
    ("unknown accounts are never touched", [person("alice")], [rec("alice")],
     [acct("alice"), acct("root"), acct("carol", deactivated=True)], []),
]


@pytest.mark.parametrize(("people", "known", "accounts", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_people_table(people, known, accounts, expected) -> None:
    assert kinds(run(people, known, accounts)) == expected


def test_update_changes_only_what_differs() -> None:
    plan = run([person("alice", display_name="Alice Smith")], [rec("alice")], [acct("alice")])
    (a,) = plan.actions
    assert isinstance(a, UpdateAccount)
    assert (a.displayname, a.emails) == ("Alice Smith", None)
    plan = run([person("alice", email=None)], [rec("alice")], [acct("alice")])
    (a,) = plan.actions
    assert (a.displayname, a.emails) == (None, ())


def test_create_carries_profile_and_no_password_unless_allowed() -> None:
    p = person("alice", initial_password="pw-for-eval")
    (a,) = run([p], [], []).actions
    assert isinstance(a, CreateAccount)
    assert (a.displayname, a.email, a.initial_password) == ("Alice", "alice@corp.example.com",
                                                            None)
    (a,) = run([p], [], [], allow_initial_passwords=True).actions
    assert a.initial_password == "pw-for-eval"
    # never printed or serialised
    assert "pw-for-eval" not in a.describe() and "pw-for-eval" not in repr(a)
    assert a.to_dict()["initial_password"] == "***"


def test_records_follow_the_plan() -> None:
    plan = run([person("bob")], [rec("alice")], [acct("alice")])
    assert plan.records["id-bob"].status == "active"
    assert plan.records["id-alice"].status == "deactivated"
    assert plan.records["id-alice"].deactivated_at == NOW
    # unchanged people are not rewritten
    assert run([person("alice")], [rec("alice")], [acct("alice")]).records == {}


def test_erase_after_grace() -> None:
    cfg = config(leavers={"erase_after_days": 30})
    old = rec("alice", status="deactivated", deactivated_at=NOW - 31 * DAY)
    recent = rec("bob", status="deactivated", deactivated_at=NOW - 3 * DAY)
    plan = run([], [old, recent], [acct("alice", deactivated=True),
                                   acct("bob", deactivated=True)], cfg=cfg)
    assert [type(a) for a in plan.actions] == [EraseAccount]
    assert plan.actions[0].user == uid("alice")
    assert plan.records["id-alice"].status == "erased"
    # no grace configured: never
    assert run([], [old], [acct("alice", deactivated=True)]).actions == ()


def test_rules_and_reasons_are_named() -> None:
    plan = run([person("bob")], [rec("alice")], [acct("alice")])
    by_kind = {a.kind: a for a in plan.actions}
    assert by_kind["create_account"].rule_id == "directory.joiner"
    assert by_kind["deactivate_account"].rule_id == "directory.leaver"
    assert by_kind["deactivate_account"].reason == "deleted from the directory"


def room(rid: str, members: dict[str, str], users: dict[str, int] | None = None,
         creators: frozenset[str] = frozenset({BOT})) -> RoomView:
    return RoomView(room_id=rid, members=members,
                    power_levels={"users": users or {}, "users_default": 0},
                    creators=creators, room_version="12")


def test_leaver_hands_over_rooms_where_only_admin() -> None:
    boss = person("boss", department="Sales")
    alice = person("alice", manager="id-boss")
    only = room("!only", {uid("alice"): "join", uid("carol"): "join"}, {uid("alice"): 100},
                creators=frozenset())
    shared = room("!shared", {uid("alice"): "join", uid("dave"): "join"},
                  {uid("alice"): 100, uid("dave"): 100}, creators=frozenset())
    member = room("!member", {uid("alice"): "join"}, {}, creators=frozenset({uid("x")}))
    plan = run([boss, dataclasses.replace(alice, disabled=True)],
               [rec("alice"), rec("boss")], [acct("alice"), acct("boss")],
               leaver_rooms={uid("alice"): [only, shared, member]})
    assert kinds(plan) == [("hand_over_room", uid("alice")),
                           ("deactivate_account", uid("alice"))]
    h = plan.actions[0]
    assert isinstance(h, HandOverRoom)
    assert (h.room, h.successor, h.actor, h.successor_joined) == (
        "!only", uid("boss"), uid("alice"), False)


@pytest.mark.parametrize(("successors", "expected"), [
    (["manager", "bot"], uid("boss")),
    (["group_owner", "bot"], uid("owner")),
    (["bot"], BOT),
])
def test_successor_choice(successors, expected) -> None:
    people = [person("boss"), person("owner"),
              person("alice", manager="id-boss", disabled=True)]
    groups = [Group("team", "Team", frozenset({"id-alice"}), frozenset({"id-owner"}))]
    only = room("!r", {uid("alice"): "join"}, {uid("alice"): 100}, creators=frozenset())
    plan = run(people, [rec("alice"), rec("boss"), rec("owner")],
               [acct("alice"), acct("boss"), acct("owner")], groups=groups,
               cfg=config(leavers={"successors": successors}),
               leaver_rooms={uid("alice"): [only]})
    assert plan.actions[0].successor == expected


@pytest.mark.parametrize(("remembered", "people", "expected"), [
    ({uid("alice"): uid("boss")}, ["boss"], uid("boss")),  # remembered, active
    ({}, ["boss"], BOT),  # nothing remembered: the next choice
    ({uid("alice"): uid("boss")}, [], BOT),  # the manager left too
])
def test_a_deleted_leaver_hands_over_to_the_remembered_manager(remembered, people,
                                                               expected) -> None:
    only = room("!r", {uid("alice"): "join"}, {uid("alice"): 100}, creators=frozenset())
    plan = run([person(p) for p in people], [rec("alice"), rec("boss")],
               [acct("alice"), acct("boss")],
               cfg=config(leavers={"successors": ["manager", "bot"]}),
               leaver_rooms={uid("alice"): [only]}, remembered_managers=remembered)
    (h,) = [a for a in plan.actions if isinstance(a, HandOverRoom)]
    assert h.successor == expected


def test_an_email_another_entry_has_is_refused_as_a_finding() -> None:
    # ann has had it; a new entry (zed) and an existing one (bob) claim it too
    ann, bob = person("ann", email="ann@corp.example.com"), person("bob")
    zed = person("zed", email="ANN@corp.example.com")
    bob2 = dataclasses.replace(bob, email="ann@corp.example.com")
    plan = run([ann, bob2, zed], [rec("ann"), rec("bob")], [acct("ann"), acct("bob")])
    creates = [a for a in plan.actions if isinstance(a, CreateAccount)]
    assert [(a.user, a.email) for a in creates] == [(uid("zed"), None)]
    assert not [a for a in plan.actions if isinstance(a, UpdateAccount)], plan.actions
    dup = {f.subject: f.message for f in plan.findings
           if f.rule_id == "directory.email.duplicate"}
    assert set(dup) == {uid("bob"), uid("zed")} and f"({uid('ann')} keeps it)" in dup[uid("zed")]
    # bob keeps his own email (his record does not change)
    assert plan.records.get("id-bob", rec("bob")).email == "bob@corp.example.com"
    # the new entry removed again: ann never lost it, nothing to do
    plan = run([ann, bob], [rec("ann"), rec("bob")], [acct("ann"), acct("bob")])
    assert plan.actions == () and plan.findings == ()


def test_an_email_another_account_has_on_the_homeserver_is_refused() -> None:
    zed = person("zed", email="root@corp.example.com")
    snap_owner = {"root@corp.example.com": uid("root")}
    cfg = config()
    snap = DirectorySnapshot.build([zed], [])
    mapped = map_people(snap.people.values(), cfg.mapping, HS, known={},
                        reserved=lambda lp: False)
    view = HomeserverView(accounts={}, email_owners=snap_owner)
    plan = diff_directory(snap, mapped.users, {}, view, cfg, now_ms=NOW, bot_user_id=BOT)
    assert [(a.kind, a.email) for a in plan.actions] == [("create_account", None)]
    assert [(f.rule_id, f.subject) for f in plan.findings] == [
        ("directory.email.taken", uid("zed"))]


ROOMS = {
    "managed_rooms": [
        {"id": "dept", "kind": "space", "for_each": "department", "name": "{value}"},
        {"id": "dept-general", "for_each": "department", "parent": "dept",
         "name": "{value} general", "power": [{"managers": True, "level": 50},
                                               {"group": "admins", "level": 100}]},
        {"id": "leads", "groups": ["leads"], "name": "Leads"},
    ]
}


def test_desired_rooms_from_attributes_and_groups() -> None:
    cfg = config(**ROOMS)
    people = [person("boss", department="Sales"), person("ann", department="Sales",
                                                         manager="id-boss"),
              person("ops", department="Ops"), person("lead", department="Ops")]
    snap = DirectorySnapshot.build(people, [Group("leads", "Leads", frozenset({"id-lead"})),
                                            Group("admins", "A", frozenset({"id-ops"}))])
    users = map_people(snap.people.values(), cfg.mapping, HS, known={},
                       reserved=lambda _: False).users
    rooms = desired_rooms(cfg.managed_rooms, users)
    assert sorted(rooms) == ["dept-general/Ops", "dept-general/Sales", "dept/Ops",
                             "dept/Sales", "leads"]
    sales = rooms["dept-general/Sales"]
    assert sales.members == {uid("boss"), uid("ann")}
    assert sales.power == {uid("boss"): 50}
    assert sales.parent_key == "dept/Sales"
    assert sales.name == "Sales general"
    assert rooms["dept-general/Ops"].power == {uid("ops"): 100}
    assert rooms["leads"].members == {uid("lead")}
    assert slug("Research & Development") == "research-development"


def test_first_run_creates_rooms_then_members_in_order() -> None:
    cfg = config(**{"managed_rooms": ROOMS["managed_rooms"][:2]})
    plan = run([person("ann")], [], [], cfg=cfg)
    k = [a.kind for a in plan.actions]
    # the general room has its space's membership rule: members join it through the space
    assert k == ["create_account", "create_managed_room", "create_managed_room",
                 "invite", "join", "join_through_parent"]
    creates = [a for a in plan.actions if isinstance(a, CreateManagedRoom)]
    assert [(c.key, c.is_space, c.parent_key, c.join_through_parent) for c in creates] == [
        ("dept/Sales", True, None, False), ("dept-general/Sales", False, "dept/Sales", True)]
    inv = [a for a in plan.actions if isinstance(a, Invite)]
    assert {a.room for a in inv} == {"managed:dept/Sales"}
    joins = [a for a in plan.actions if isinstance(a, Join)]
    assert all(j.actor == uid("ann") for j in joins)


def _synced_rooms(members_general: dict[str, str], users: dict[str, int] | None = None):
    return {
        "dept/Sales": room("!space", {BOT: "join", uid("ann"): "join", uid("boss"): "join"}),
        "dept-general/Sales": room("!gen", {BOT: "join", **members_general},
                                   {BOT: 100, **(users or {})}),
    }


def test_in_step_rooms_cost_nothing() -> None:
    cfg = config(**{"managed_rooms": ROOMS["managed_rooms"][:2]})
    people = [person("boss"), person("ann", manager="id-boss")]
    rooms = _synced_rooms({uid("ann"): "join", uid("boss"): "join"}, {uid("boss"): 50})
    plan = run(people, [rec("ann"), rec("boss")], [acct("ann"), acct("boss")], cfg=cfg,
               rooms=rooms)
    assert plan.actions == ()
    assert plan.findings == ()


@pytest.mark.parametrize(("drift", "expect_kinds", "findings"), [
    ("revert", ["invite", "join", "kick", "set_state"], 0),
    ("report", [], 3),
])
def test_room_drift(drift, expect_kinds, findings) -> None:
    cfg = config(drift=drift, **{"managed_rooms": ROOMS["managed_rooms"][:2]})
    people = [person("boss"), person("ann", manager="id-boss")]
    # ann was kicked by hand, an outsider was added, someone got power by hand
    rooms = _synced_rooms({uid("ann"): "leave", uid("boss"): "join", uid("out"): "join"},
                          {uid("boss"): 50, uid("out"): 100})
    plan = run(people, [rec("ann"), rec("boss")], [acct("ann"), acct("boss")], cfg=cfg,
               rooms=rooms)
    assert [a.kind for a in plan.actions] == expect_kinds
    assert len(plan.findings) == findings
    if drift == "revert":
        ps = next(a for a in plan.actions if isinstance(a, SetState))
        assert ps.content["users"] == {BOT: 100, uid("boss"): 50}


def test_mover_changes_rooms_and_power() -> None:
    cfg = config(**{"managed_rooms": ROOMS["managed_rooms"][:2]})
    # boss moved from Sales to Ops: leaves Sales rooms (and their power), joins Ops
    people = [person("boss", department="Ops"), person("ann", manager="id-boss")]
    rooms = _synced_rooms({uid("ann"): "join", uid("boss"): "join"}, {uid("boss"): 50})
    plan = run(people, [rec("ann"), rec("boss")], [acct("ann"), acct("boss")], cfg=cfg,
               rooms=rooms)
    kicks = [(a.room, a.user) for a in plan.actions if isinstance(a, Kick)]
    assert sorted(kicks) == [("!gen", uid("boss")), ("!space", uid("boss"))]
    power = [a for a in plan.actions if isinstance(a, SetState)]
    assert power[0].content["users"] == {BOT: 100}
    created = [a.key for a in plan.actions if isinstance(a, CreateManagedRoom)]
    assert created == ["dept/Ops", "dept-general/Ops"]


def test_leavers_are_not_kicked_deactivation_removes_them() -> None:
    cfg = config(**{"managed_rooms": ROOMS["managed_rooms"][:2]})
    rooms = _synced_rooms({uid("ann"): "join", uid("boss"): "join"}, {uid("boss"): 50})
    plan = run([person("boss")], [rec("ann"), rec("boss")], [acct("ann"), acct("boss")],
               cfg=cfg, rooms=rooms)
    assert not [a for a in plan.actions if isinstance(a, Kick)]
    assert [a.user for a in plan.actions if isinstance(a, DeactivateAccount)] == [uid("ann")]


@pytest.mark.parametrize(("people", "active", "deact", "force", "ok"), [
    (100, 100, 0, False, True),
    (0, 100, 100, False, False),   # empty answer: always refused
    (0, 100, 100, True, False),
    (90, 100, 10, False, False),   # 10% > 5%
    (90, 100, 10, True, True),
    (974, 1000, 26, False, False),  # 26 > max 25 (2.6% is under 5%)
    (980, 1000, 20, False, True),
])
def test_safety(people, active, deact, force, ok) -> None:
    cfg = config()
    names = [f"p{i}" for i in range(max(people, active))]
    snap_people = [person(n) for n in names[:people]]
    known = [rec(n) for n in names[:active]]
    accounts = [acct(n) for n in names[:active]]
    plan = run(snap_people, known, accounts, cfg=cfg)
    assert plan.deactivations == deact  # remembered but gone from the answer
    snap = DirectorySnapshot.build(snap_people)
    assert (check_safety(plan, snap, cfg, force=force) == []) == ok


def test_actions_round_trip_through_dicts() -> None:
    for a in run([person("ann")], [rec("bob")], [acct("bob")], cfg=config(**ROOMS)).actions:
        if isinstance(a, CreateAccount):
            continue  # its password is masked on purpose
        assert action_from_dict(a.to_dict()) == a
    assert ReactivateAccount.kind == "reactivate_account"


def test_join_through_parent_only_where_the_room_admits_the_space() -> None:
    cfg = config(**{"managed_rooms": ROOMS["managed_rooms"][:2]})
    people = [person("boss"), person("ann", manager="id-boss")]
    restricted = {"join_rule": "restricted",
                  "allow": [{"type": "m.room_membership", "room_id": "!space"}]}
    for join_rules, expected in [
        (restricted, ["join_through_parent"]),
        ({"join_rule": "invite"}, ["invite", "join"]),  # created before: invite-only
        ({"join_rule": "restricted", "allow": [{"type": "m.room_membership",
                                                "room_id": "!other"}]}, ["invite", "join"]),
    ]:
        rooms = _synced_rooms({uid("boss"): "join"}, {uid("boss"): 50})
        rooms["dept-general/Sales"] = dataclasses.replace(rooms["dept-general/Sales"],
                                                          join_rules=join_rules)
        plan = run(people, [rec("ann"), rec("boss")], [acct("ann"), acct("boss")], cfg=cfg,
                   rooms=rooms)
        assert [a.kind for a in plan.actions] == expected, join_rules
    # a join through the space runs after every space membership of the run
    j = JoinThroughParent(rule_id="r", reason="x", actor=uid("ann"), room="!gen")
    assert isinstance(j, Join)


def test_rooms_with_another_membership_rule_than_their_space_keep_invites() -> None:
    cfg = config(**{"managed_rooms": [
        {"id": "org", "kind": "space", "members": "all", "name": "Org"},
        {"id": "leads", "groups": ["leads"], "parent": "org", "name": "Leads"},
        {"id": "everyone", "members": "all", "parent": "org", "name": "Everyone"},
    ]})
    plan = run([person("ann", groups=frozenset({"leads"}))], [], [], cfg=cfg)
    by_room = {}
    for a in plan.actions:
        if a.kind in ("invite", "join", "join_through_parent"):
            by_room.setdefault(a.room, []).append(a.kind)
    assert by_room == {
        "managed:org": ["invite", "join"],
        "managed:leads": ["invite", "join"],          # fewer members than the space
        "managed:everyone": ["join_through_parent"],  # the space's members exactly
    }


def test_admin_account_not_adopted_is_reported_and_not_remembered() -> None:
    plan = run([person("root")], [], [acct("root", admin=True)])
    assert plan.actions == () and plan.records == {}
    (f,) = plan.findings
    assert (f.rule_id, f.subject) == ("directory.adopt", uid("root"))
    # once linked (remembered), it is kept in step like anyone else
    plan = run([person("root", display_name="Root Renamed")], [rec("root")],
               [acct("root", admin=True)])
    assert [a.kind for a in plan.actions] == ["update_account"]


@pytest.mark.parametrize("deleted", [False, True])
def test_not_adopted_admin_is_never_touched_by_room_sync(deleted: bool) -> None:
    # an entry whose uid maps onto an existing server admin ("ädmin" -> "admin"): reported
    # as not adopted, so no invite/join into managed rooms, and no kick when it goes
    cfg = config(**{"managed_rooms": ROOMS["managed_rooms"][:2]})
    people = [person("ann")] + ([] if deleted else [person("admin", username="ädmin")])
    rooms = _synced_rooms({uid("ann"): "join", uid("admin"): "join"})
    plan = run(people, [rec("ann")], [acct("ann"), acct("admin", admin=True)], cfg=cfg,
               rooms=rooms)
    touched = [a for a in plan.actions if uid("admin") in (
        getattr(a, "user", None), a.actor)]
    assert touched == []
    if not deleted:
        assert [(f.rule_id, f.subject) for f in plan.findings] == [
            ("directory.adopt", uid("admin"))]

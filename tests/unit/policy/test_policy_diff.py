"""diff_policies: the same rooms judged by two policies, with reconciliation's functions."""

from __future__ import annotations

from typing import Any

from bridge.config.policy import PolicyConfig
from bridge.config.retention import RetentionConfig
from bridge.model.people import StaffRecord
from bridge.policy.policy_diff import diff_policies, named_users
from bridge.policy.retention import RetentionPolicy
from bridge.policy.separation import RoomFacts, SeparationPolicy

S = "corp.test"
BOT, ADMIN = f"@enclave:{S}", f"@enclave-admin:{S}"


def u(name: str, server: str = S) -> str:
    return f"@{name}:{server}"


def staff(name: str, *groups: str, department: str | None = None) -> StaffRecord:
    return StaffRecord(user_id=u(name), person_id=name, active=True, username=name,
                       display_name=name, department=department, groups=frozenset(groups))


STAFF = [staff("alice", "eng"), staff("rita", "research"), staff("tom", "trading"),
         staff("bob", "eng")]
BASE: dict[str, Any] = {
    "room_classes": [
        {"id": "internal"},
        {"id": "external", "federate": True, "allow": {"partners": True}},
    ],
    "classify": [{"id": "cls-ext", "room_class": "external", "alias": "^#ext-"}],
    "partners": [{"id": "partner-acme", "servers": ["acme.test"],
                  "room_classes": ["external"]}],
}


def policy(**changes: Any) -> SeparationPolicy:
    return SeparationPolicy(PolicyConfig.model_validate({**BASE, **changes}), STAFF,
                            server_name=S, service_users=[BOT, ADMIN],
                            service_prefix="enclave_", now_ms=0)


def room(room_id: str, *members: str, cls: str | None = None, name: str | None = None,
         aliases: tuple[str, ...] = ()) -> RoomFacts:
    # Enclave's bot is in the room with power, so removals are kicks by it
    ms = {m: "join" for m in (BOT, *members)}
    return RoomFacts(room_id=room_id, room_version="12", creators=frozenset({BOT}),
                     class_state=cls, claimed_class=cls, name=name, aliases=aliases,
                     members=ms, federate=cls != "internal", history_visibility="joined")


SHARED = room("!shared", u("alice"), u("dev", "acme.test"), cls="external", name="Shared")
MIXED = room("!mixed", u("alice"), u("rita"), u("tom"), cls="internal", name="Mixed")
# no record: classified by the rules (the alias), so a changed rule changes its class
UNRECORDED = room("!unrec", u("bob"), name="Ext talk", aliases=(f"#ext-talk:{S}",))
ROOMS = [SHARED, MIXED, UNRECORDED]


def test_same_policy_changes_nothing() -> None:
    d = diff_policies(policy(), policy(), ROOMS)
    assert d.rooms == 3 and not d.changed


def test_removing_a_partner_server_removes_its_users_and_changes_their_standing() -> None:
    new = policy(partners=[])
    d = diff_policies(policy(), new, ROOMS)
    assert [(r.room_id, r.user, r.rule_id) for r in d.removed] == [
        ("!shared", u("dev", "acme.test"), "class.external")]
    assert "external not admitted" in d.removed[0].reason
    assert [(c.user, c.old, c.new) for c in d.standing_changes] == [
        (u("dev", "acme.test"), "partner (partner-acme)", "external")]
    assert d.class_changes == [] and d.kept == []


def test_a_new_barrier_with_remove_takes_the_second_side_out() -> None:
    bar = {"id": "bar-rt", "between": [{"groups": ["research"]}, {"groups": ["trading"]}],
           "existing": "remove"}
    d = diff_policies(policy(), policy(barriers=[bar]), ROOMS)
    assert [(r.room_id, r.user, r.rule_id) for r in d.removed] == [("!mixed", u("tom"),
                                                                   "bar-rt")]
    # the other way round, the person is no longer removed
    back = diff_policies(policy(barriers=[bar]), policy(), ROOMS)
    assert back.removed == [] and [r.user for r in back.kept] == [u("tom")]


def test_a_new_barrier_that_reports_is_a_new_finding() -> None:
    bar = {"id": "bar-rt", "between": [{"groups": ["research"]}, {"groups": ["trading"]}]}
    d = diff_policies(policy(), policy(barriers=[bar]), ROOMS)
    assert d.removed == []
    assert [(f.rule_id, f.room_id) for f in d.new_findings] == [("bar-rt", "!mixed")]


def test_a_changed_rule_changes_the_class_of_rooms_without_a_record_only() -> None:
    new = policy(classify=[{"id": "cls-ext2", "room_class": "external", "alias": "^#x-"}])
    d = diff_policies(policy(), new, ROOMS)
    assert [(c.room_id, c.old_class, c.old_rule, c.new_class, c.new_rule)
            for c in d.class_changes] == [("!unrec", "external", "cls-ext", "internal",
                                           "default_class")]


def test_retention_follows_the_class() -> None:
    ret = RetentionPolicy(RetentionConfig.model_validate({
        "archive": {"path": "/tmp/x"}, "default": {"keep": "1y"},
        "classes": [{"id": "keep-ext", "room_class": "external", "keep": "30d"}]}))
    new = policy(classify=[])
    d = diff_policies(policy(), new, ROOMS, old_retention=ret, new_retention=ret)
    assert [(c.room_id, c.old, c.new) for c in d.retention_changes] == [
        ("!unrec", ret.period_for("external").describe(), ret.period_for("internal").describe())]
    assert d.retention_changes[0].old != d.retention_changes[0].new


def test_named_users_are_checked_even_outside_rooms() -> None:
    p = policy(partners=[{"id": "p-pat", "users": [u("pat", "partner.test")],
                          "room_classes": ["external"]}])
    d = diff_policies(p, policy(partners=[]), [], users=named_users(p))
    assert [(c.user, c.new) for c in d.standing_changes] == [(u("pat", "partner.test"),
                                                              "external")]
    assert d.rooms == 0

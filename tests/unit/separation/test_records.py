"""The separation service's own records (issue 15), on a real SQLite store: the class a
room has is the one Enclave recorded (gate grant, first sight), never its state's claim;
a join of a room the server does not know passes the gate only after an approved
invitation."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import yaml

from bridge.config.policy import PolicyConfig
from bridge.gate.protocol import gate_request_from_obj
from bridge.matrix.executor import Executor
from bridge.metrics import Metrics
from bridge.model.people import StaffRecord
from bridge.policy.separation import CLASS_STATE_TYPE, room_facts_from_state
from bridge.separation.service import GRANT_COMPONENT, SeparationService
from bridge.store import Stores

S = "corp.test"
BOB, PAT, EVE = f"@bob:{S}", "@pat:acme.example", "@eve:gmail.example"
POLICY = yaml.safe_load("""
default_class: internal
room_classes:
  - {id: internal}
  - {id: external, federate: true, allow: {partners: true}}
classify: [{id: cls-ext, room_class: external, alias: '^#ext-'}]
partners: [{id: partner-acme, servers: [acme.example], room_classes: [external]}]
""")


class NoClient:
    """The service reads rooms through the admin API only when asked; these tests pass
    facts in, so any homeserver call is a mistake."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected homeserver call {name}")


async def service(store: Stores) -> SeparationService:
    await store.directory.replace_directory_view([StaffRecord(
        user_id=BOB, person_id="b", active=True, username="bob", display_name="Bob",
        groups=frozenset())])
    client: Any = NoClient()
    ex = Executor(client, store.outbox, store.audit, bot_user_id=f"@enclave:{S}",
                  clock_ms=lambda: 1, metrics=Metrics())
    return SeparationService(PolicyConfig.model_validate(POLICY), audit=store.audit, kv=store.kv,
                             directory_store=store.directory, leases=store.leases,
                             client=client,
                             executor=ex, metrics=Metrics(), clock_ms=lambda: 1,
                             server_name=S, bot_user_id=f"@enclave:{S}",
                             admin_user_id=f"@enclave-admin:{S}", service_prefix="enclave_")


def state(creator: str, content: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "m.room.create", "sender": creator, "state_key": "",
             "content": {"room_version": "12"}},
            {"type": "m.room.member", "sender": creator, "state_key": creator,
             "content": {"membership": "join"}},
            {"type": CLASS_STATE_TYPE, "sender": creator, "state_key": "", "content": content}]


async def test_gate_grant_binds_once_to_the_room_its_creator_made(store: Stores) -> None:
    svc = await service(store)
    ans = await svc.decide_gate(gate_request_from_obj({
        "check": "create_room", "user": BOB, "create": {"room_alias_name": "ext-deal"}}))
    assert ans.allow and ans.edits is not None
    [cls] = [e for e in ans.edits["initial_state"] if e["type"] == CLASS_STATE_TYPE]
    grant = cls["content"]["grant"]
    assert cls["content"]["class"] == "external"
    assert await store.kv.component_get(GRANT_COMPONENT, grant) is not None
    f = await svc.with_record(room_facts_from_state("!a", state(BOB, dict(cls["content"]))))
    assert f.class_state == "external"
    assert await store.kv.component_get(GRANT_COMPONENT, grant) is None  # used up
    # the same grant copied into another room binds nothing
    g = await svc.with_record(room_facts_from_state("!b", state(BOB, dict(cls["content"]))))
    assert g.class_state is None


async def test_a_claimed_class_is_never_recorded(store: Stores) -> None:
    svc = await service(store)
    p = await svc.policy()
    forged = room_facts_from_state("!f", state(BOB, {"class": "external"}))
    f = await svc.record_first_sight(p, await svc.with_record(forged), "reactive")
    assert f.class_state == "internal" and await svc.class_record("!f") == "internal"
    actions, findings = p.diff_protected_state(f)
    # bob (the v12 creator) could put it back; Enclave is not in the room: reported
    assert actions == [] and [x.rule_id for x in findings] == ["builtin.class_record"]
    bot = f"@enclave:{S}"
    f = replace(f, members={**f.members, bot: "join"}, power={"users": {bot: 100}})
    actions, _ = p.diff_protected_state(f)
    assert [(a.content["class"], a.actor) for a in actions] == [("internal", bot)]


@pytest.mark.parametrize(("invited", "approved", "allow"), [
    (True, True, True), (True, False, False), (False, True, False)])
async def test_join_of_an_unknown_room_needs_an_approved_invitation(
        store: Stores, invited: bool, approved: bool, allow: bool) -> None:
    svc = await service(store)
    remote = {"room_id": "!remote", "room_version": "12", "creator": PAT,
              "creators": [PAT], "members": {PAT: "join", BOB: "invite"}}
    if approved:
        inv = await svc.decide_gate(gate_request_from_obj({
            "check": "invite", "user": PAT, "target": BOB, "federated": True,
            "room": remote}))
        assert inv.allow, inv  # a partner's own room: the partner's class
    join = await svc.decide_gate(gate_request_from_obj({
        "check": "join", "user": BOB, "invited": invited, "room": {"room_id": "!remote"}}))
    assert join.allow is allow
    if not allow:
        assert join.rule_id == "builtin.unknown_remote_room"


async def test_an_outsiders_invitation_is_not_approved(store: Stores) -> None:
    svc = await service(store)
    inv = await svc.decide_gate(gate_request_from_obj({
        "check": "invite", "user": EVE, "target": BOB, "federated": True,
        "room": {"room_id": "!party", "room_version": "12", "creator": EVE,
                 "creators": [EVE], "class": "external", "members": {EVE: "join"}}}))
    assert not inv.allow  # the claimed class counts for nothing
    assert not await svc.invite_approved("!party", BOB)


async def test_unused_grants_are_dropped_after_a_day(store: Stores) -> None:
    svc = await service(store)
    now = [1_000]
    svc.clock_ms = lambda: now[0]
    await svc.decide_gate(gate_request_from_obj({
        "check": "create_room", "user": BOB, "create": {"name": "never made"}}))
    assert len(await store.kv.component_list(GRANT_COMPONENT)) == 1
    await svc._prune_grants()
    assert len(await store.kv.component_list(GRANT_COMPONENT)) == 1
    now[0] += 86_400_001
    await svc._prune_grants()
    assert await store.kv.component_list(GRANT_COMPONENT) == {}


async def test_a_room_upgrade_keeps_its_predecessors_class(store: Stores) -> None:
    svc = await service(store)
    p = await svc.policy()
    await svc.record_class("!old", "external", "cls-ext", "gate")
    new_state = state(BOB, {"class": "external"})
    new_state[0]["content"]["predecessor"] = {"room_id": "!old"}
    f = await svc.record_first_sight(
        p, await svc.with_record(room_facts_from_state("!new", new_state)), "reactive")
    # no alias on the new room: the rules alone would make it internal
    assert f.class_state == "external" and await svc.class_record("!new") == "external"


async def test_a_plan_judges_an_unrecorded_upgrade_by_its_predecessors_class(
        store: Stores) -> None:
    """``enclave separation reconcile --dry-run`` and ``enclave policy diff`` judge a room
    as applying does: an upgraded room without a record keeps its predecessor's class."""
    svc = await service(store)
    p = await svc.policy()
    await svc.record_class("!old", "external", "cls-ext", "gate")
    st = state(BOB, {"class": "external"})
    st[0]["content"]["predecessor"] = {"room_id": "!old"}
    st.append({"type": "m.room.member", "sender": PAT, "state_key": PAT,
               "content": {"membership": "join"}})
    facts = await svc.with_record(room_facts_from_state("!new", st))
    assert facts.class_state is None

    def about_pat(f: Any) -> list[Any]:
        actions, findings = p.diff_room(f)
        return [x for x in [*actions, *findings]
                if PAT in (getattr(x, "user", None), getattr(x, "subject", None))]

    assert about_pat(p.with_class(facts))  # the rules alone: internal, the partner goes
    judged = await svc.as_applied(p, facts)
    assert judged.class_state == "external" and about_pat(judged) == []
    assert await svc.inherited_class(facts) == "external"
    assert await svc.class_record("!new") is None  # a plan writes nothing
    applied = await svc.record_first_sight(p, facts, "reconcile")
    assert applied.class_state == judged.class_state  # what applying then records

"""The one power-level rule (bridge.kernel.power), and every caller agreeing on it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bridge.kernel.power import (
    CREATOR_POWER,
    action_level,
    creators_have_unlimited_power,
    creators_of,
    state_level,
    user_level,
    user_level_in_state,
)
from bridge.policy.directory import RoomView
from bridge.policy.power import RoomPower, enclave_actor
from bridge.policy.separation import room_facts_from_state

ROOT = Path(__file__).resolve().parents[3]
A, B, C = "@alice:x", "@bob:x", "@carol:x"


@pytest.mark.parametrize(("version", "unlimited"), [
    (None, False), ("1", False), ("10", False), ("11", False), ("12", True), ("13", True),
    ("99", True), ("org.matrix.hydra.11", True), ("org.example.custom", False), ("", False),
])
def test_creators_have_unlimited_power(version: str | None, unlimited: bool) -> None:
    assert creators_have_unlimited_power(version) is unlimited


PL = {"users": {B: 50, C: "75"}, "users_default": 5}


@pytest.mark.parametrize(("user", "pl", "version", "creators", "level"), [
    # v12 and later: creators outrank everyone, listed in users or not
    (A, PL, "12", {A}, CREATOR_POWER),
    (A, PL, "13", {A, B}, CREATOR_POWER),
    (B, PL, "13", {A, B}, CREATOR_POWER),
    (A, PL, "org.matrix.hydra.11", {A}, CREATOR_POWER),
    # before v12 the creator is an ordinary user once power levels exist
    (A, PL, "11", {A}, 5),
    (A, {"users": {A: 100}}, "11", {A}, 100),
    (B, PL, "11", {A}, 50),
    (C, PL, "9", {A}, 75),  # string levels (room versions before 10)
    (B, {"users": {B: True}, "users_default": 3}, "11", {A}, 3),  # a bool is not a level
    (B, {"users": {B: 1.5}}, "11", {A}, 0),
    # no power levels event: creator 100, everyone else 0
    (A, None, "11", {A}, 100),
    (B, None, "11", {A}, 0),
    (A, None, "13", {A}, CREATOR_POWER),
])
def test_user_level(user: str, pl: dict[str, Any] | None, version: str, creators: set[str],
                    level: int) -> None:
    assert user_level(user, pl, room_version=version, creators=creators) == level


@pytest.mark.parametrize(("pl", "event_type", "needed"), [
    (None, "m.room.name", 0),
    ({}, "m.room.name", 50),
    ({"state_default": 80}, "m.room.name", 80),
    ({"state_default": 80, "events": {"m.room.name": 10}}, "m.room.name", 10),
    ({"events": {"m.room.topic": "20"}}, "m.room.topic", 20),
])
def test_state_level(pl: dict[str, Any] | None, event_type: str, needed: int) -> None:
    assert state_level(pl, event_type) == needed


@pytest.mark.parametrize(("pl", "action", "needed"), [
    (None, "kick", 50), ({}, "kick", 50), ({"kick": 20}, "kick", 20),
    # unlike state_default, the action levels keep their defaults without power levels
    (None, "redact", 50), ({"redact": 0}, "redact", 0), ({"ban": "75"}, "ban", 75),
    (None, "invite", 0), ({"invite": True}, "invite", 0),
])
def test_action_level(pl: dict[str, Any] | None, action: str, needed: int) -> None:
    assert action_level(pl, action) == needed


@pytest.mark.parametrize(("create", "creators"), [
    ({"sender": A, "content": {"room_version": "12", "additional_creators": [B, 7]}},
     {A, B}),
    ({"sender": A, "content": {"room_version": "1", "creator": A}}, {A}),
    ({"content": {}}, set()),
])
def test_creators_of(create: dict[str, Any], creators: set[str]) -> None:
    assert creators_of(create) == creators


def v13_state(extra_pl: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A room version 13 room created by alice with bob as additional creator; carol has 90."""
    return [
        {"type": "m.room.create", "state_key": "", "sender": A,
         "content": {"room_version": "13", "additional_creators": [B]}},
        {"type": "m.room.power_levels", "state_key": "",
         "content": {"users": {C: 90}, "users_default": 0, "state_default": 100,
                     **(extra_pl or {})}},
        *({"type": "m.room.member", "state_key": u, "sender": u,
           "content": {"membership": "join"}} for u in (A, B, C)),
    ]


def test_room_version_13_every_caller_agrees() -> None:
    """Bots (power_of) read levels with user_level_in_state; retention (its actor, the
    ``!retention`` command) with RoomPower.from_state; separation through its room facts;
    directory through its RoomView: in a v13 room all of them see alice and bob as
    creators above carol's 90."""
    state = v13_state()
    levels = {u: user_level_in_state(state, u) for u in (A, B, C)}
    assert levels == {A: CREATOR_POWER, B: CREATOR_POWER, C: 90}
    assert {u: RoomPower.from_state(state).of(u) for u in (A, B, C)} == levels
    facts = room_facts_from_state("!r:x", state)
    assert {u: facts.power_view.of(u) for u in (A, B, C)} == levels
    view = RoomView(room_id="!r:x", members={u: "join" for u in (A, B, C)},
                    power_levels=state[1]["content"], creators=creators_of(state[0]),
                    room_version="13")
    assert {u: view.level(u) for u in (A, B, C)} == levels
    assert view.privileged_creators == {A, B}
    # a creator cannot be kicked, and acts where a level of 100 is needed
    assert not facts.power_view.removable(B)
    assert enclave_actor(facts.members, facts.power_view, (C, A), 100) == A
    assert enclave_actor(facts.members, facts.power_view, (A,), 50, target=B) is None


def test_power_rule_written_once() -> None:
    """No module outside bridge/kernel carries its own creator rule (a room-version check
    for creators or its own creator power constant)."""
    offenders = []
    pattern = re.compile(r'room_version[^\n]*(==|in) *[\(\{]?"12"|CREATOR_POWER\s*=|'
                         r'CREATOR_POWER_VERSIONS|def _power_of|return 1000\b')
    for path in [*(ROOT / "bridge").rglob("*.py"), *(ROOT / "bots").rglob("*.py")]:
        # the gate module is one file copied into Synapse: it mirrors the rule, and
        # tests/unit/gate/test_module.py checks that the mirror agrees
        if "kernel" in path.parts or path == ROOT / "bridge" / "gate" / "module.py":
            continue
        if pattern.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []

"""The one power-level rule (bridge.kernel.power), and every caller agreeing on it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bridge.kernel.power import (
    CREATOR_POWER,
    creators_have_unlimited_power,
    creators_of,
    kick_level,
    redact_level,
    state_level,
    user_level,
    user_level_in_state,
)
from bridge.policy.directory import RoomView
from bridge.policy.separation import room_facts_from_state, state_actor

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


def test_kick_and_redact_levels() -> None:
    assert (kick_level(None), kick_level({}), kick_level({"kick": 20})) == (50, 50, 20)
    assert (redact_level(None), redact_level({}), redact_level({"redact": 0})) == (0, 50, 0)


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
    """Bots (power_of) and retention (service actor, !retention) read levels with
    user_level_in_state; separation and directory through their own views of the room: in a
    v13 room all of them see alice and bob as creators above carol's 90."""
    state = v13_state()
    levels = {u: user_level_in_state(state, u) for u in (A, B, C)}
    assert levels == {A: CREATOR_POWER, B: CREATOR_POWER, C: 90}
    facts = room_facts_from_state("!r:x", state)
    # only a creator can send state at level 100; carol (90) cannot
    assert state_actor(facts, "m.room.name", "x", prefer=lambda u: u == C) in (A, B)
    view = RoomView(room_id="!r:x", members={u: "join" for u in (A, B, C)},
                    power_levels=state[1]["content"], creators=creators_of(state[0]),
                    room_version="13")
    assert {u: view.level(u) for u in (A, B, C)} == levels
    assert view.privileged_creators == {A, B}


def test_power_rule_written_once() -> None:
    """No module outside bridge/kernel carries its own creator rule (a room-version check
    for creators or its own creator power constant)."""
    offenders = []
    pattern = re.compile(r'room_version[^\n]*(==|in) *[\(\{]?"12"|CREATOR_POWER\s*=|'
                         r'CREATOR_POWER_VERSIONS|def _power_of|return 1000\b')
    for path in [*(ROOT / "bridge").rglob("*.py"), *(ROOT / "bots").rglob("*.py")]:
        if "kernel" in path.parts:
            continue
        if pattern.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []

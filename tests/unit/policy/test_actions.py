"""Actions are data: they round-trip through JSON, describe themselves, stay frozen."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from bridge.policy.actions import (
    ACTION_TYPES,
    Action,
    Invite,
    Join,
    Kick,
    Leave,
    Redact,
    SendEvent,
    SetState,
    action_from_dict,
)

EXAMPLES: list[Action] = [
    SendEvent(rule_id="ann.post", reason="scheduled", room="!r", event_type="m.room.message",
              content={"msgtype": "m.notice", "body": "hi ✓"}),
    SetState(rule_id="ret.period", reason="class=chat", room="!r",
             event_type="m.room.retention", content={"max_lifetime": 86400000}),
    Invite(rule_id="sync.member", reason="dept=eng", room="!r", user="@bob:x"),
    Join(rule_id="sync.member", reason="dept=eng", room="!r", actor="@bob:x"),
    Leave(rule_id="sep.dm", reason="external invite", room="!r", actor="@bob:x"),
    Kick(rule_id="sep.room", reason="not staff", room="!r", user="@eve:evil.org",
         actor="@enclave-admin:x"),
    Redact(rule_id="retention-internal", reason="period over", room="!r", event_id="$e",
           actor="@alice:x"),
]


def test_every_action_type_has_an_example() -> None:
    # the core kinds (directory sync's own kinds are tested beside their diff)
    core = {k for k, cls in ACTION_TYPES.items() if cls.__module__ == "bridge.policy.actions"}
    assert {a.kind for a in EXAMPLES} == core - {"action"}


@pytest.mark.parametrize("action", EXAMPLES, ids=lambda a: a.kind)
def test_roundtrip_through_json(action: Action) -> None:
    data = orjson.loads(orjson.dumps(action.to_dict()))
    assert data["kind"] == action.kind
    assert action_from_dict(data) == action


@pytest.mark.parametrize("action", EXAMPLES, ids=lambda a: a.kind)
def test_frozen_and_room_id(action: Action) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        action.rule_id = "other"  # type: ignore[misc]
    assert action.room_id == "!r"


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (EXAMPLES[2], "invite(actor=None, room=!r, user=@bob:x) [sync.member: dept=eng]"
         .replace("actor=None, ", "")),
        (EXAMPLES[5], "kick(actor=@enclave-admin:x, room=!r, user=@eve:evil.org) "
                      "[sep.room: not staff]"),
        (EXAMPLES[0], "send_event(room=!r, event_type=m.room.message) [ann.post: scheduled]"),
    ],
)
def test_describe(action: Action, expected: str) -> None:
    assert action.describe() == expected


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"kind": "teleport", "rule_id": "r", "reason": "x"}, ValueError),
        ({"kind": "kick", "rule_id": "r", "reason": "x"}, TypeError),  # room/user missing
        ({"kind": "join", "rule_id": "r", "reason": "x", "room": "!r", "extra": 1}, TypeError),
        ({"rule_id": "r"}, KeyError),
    ],
)
def test_action_from_dict_rejects(data: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        action_from_dict(data)


def test_actions_need_rule_and_reason() -> None:
    with pytest.raises(TypeError):
        Join(room="!r")  # type: ignore[call-arg]

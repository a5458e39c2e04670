"""Membership read from m.room.member events."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.kernel.membership import (
    history_visibility_change,
    joined,
    membership_change,
    membership_of,
    memberships,
)


def member(user: Any, membership: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership},
            **extra}


EVENTS = [
    member("@a:x", "join"), member("@b:x", "invite"), member("@c:x", "join"),
    member("@c:x", "leave"),  # later wins
    member(5, "join"), member("@d:x", None),  # malformed: skipped
    {"type": "m.room.member", "state_key": "@e:x", "content": "junk"},
    {"type": "m.room.name", "state_key": "", "content": {"membership": "join"}},
]


def test_memberships() -> None:
    assert memberships(EVENTS) == {"@a:x": "join", "@b:x": "invite", "@c:x": "leave"}
    assert membership_of(EVENTS, "@b:x") == "invite"
    assert membership_of(EVENTS, "@d:x") is None
    assert joined(EVENTS) == {"@a:x"}


@pytest.mark.parametrize("event,expected", [
    ({"type": "m.room.history_visibility", "state_key": "",
      "content": {"history_visibility": "joined"}}, "joined"),
    ({"type": "m.room.history_visibility", "state_key": "",
      "content": {"history_visibility": "bogus"}}, "shared"),
    ({"type": "m.room.history_visibility", "state_key": "", "content": None}, "shared"),
    ({"type": "m.room.history_visibility", "state_key": "x",
      "content": {"history_visibility": "joined"}}, None),
    ({"type": "m.room.name", "state_key": "", "content": {}}, None),
])
def test_history_visibility_change(event: dict[str, Any], expected: str | None) -> None:
    assert history_visibility_change(event) == expected


def test_membership_change() -> None:
    assert membership_change(member("@a:x", "ban")) == ("@a:x", "ban")
    assert membership_change(member(5, "join")) is None
    assert membership_change({"type": "m.room.name", "state_key": "@a:x"}) is None

"""Membership read from m.room.member events."""

from __future__ import annotations

from typing import Any

from bridge.kernel.membership import joined, membership_of, memberships


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

"""Room membership read from state events (``m.room.member``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MEMBERSHIPS = frozenset({"join", "invite", "leave", "ban", "knock"})


def memberships(events: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """User id -> membership from ``m.room.member`` events (a room's state, or the
    ``chunk`` of ``/members``); later events win, malformed ones are skipped."""
    out: dict[str, str] = {}
    for ev in events:
        if ev.get("type") != "m.room.member":
            continue
        user, content = ev.get("state_key"), ev.get("content")
        m = content.get("membership") if isinstance(content, Mapping) else None
        if isinstance(user, str) and isinstance(m, str):
            out[user] = m
    return out


def membership_of(events: Iterable[Mapping[str, Any]], user: str) -> str | None:
    """``user``'s membership in these events; None if they have none."""
    return memberships(events).get(user)


def joined(events: Iterable[Mapping[str, Any]]) -> set[str]:
    """The users whose membership is ``join``."""
    return {u for u, m in memberships(events).items() if m == "join"}

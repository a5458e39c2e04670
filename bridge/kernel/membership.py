"""Room membership read from state events (``m.room.member``), and the room's
``m.room.history_visibility``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MEMBERSHIPS = frozenset({"join", "invite", "leave", "ban", "knock"})
HISTORY_VISIBILITY_TYPE = "m.room.history_visibility"
HISTORY_VISIBILITIES = frozenset({"world_readable", "shared", "invited", "joined"})
# The spec: a room without (a valid) m.room.history_visibility is treated as ``shared``.
DEFAULT_HISTORY_VISIBILITY = "shared"


def membership_change(event: Mapping[str, Any]) -> tuple[str, str] | None:
    """(user id, membership) an ``m.room.member`` event sets; None for any other event and
    for malformed ones."""
    if event.get("type") != "m.room.member":
        return None
    user, content = event.get("state_key"), event.get("content")
    m = content.get("membership") if isinstance(content, Mapping) else None
    if isinstance(user, str) and isinstance(m, str):
        return user, m
    return None


def memberships(events: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """User id -> membership from ``m.room.member`` events (a room's state, or the
    ``chunk`` of ``/members``); later events win, malformed ones are skipped."""
    out: dict[str, str] = {}
    for ev in events:
        change = membership_change(ev)
        if change is not None:
            out[change[0]] = change[1]
    return out


def membership_of(events: Iterable[Mapping[str, Any]], user: str) -> str | None:
    """``user``'s membership in these events; None if they have none."""
    return memberships(events).get(user)


def joined(events: Iterable[Mapping[str, Any]]) -> set[str]:
    """The users whose membership is ``join``."""
    return {u for u, m in memberships(events).items() if m == "join"}


def history_visibility_change(event: Mapping[str, Any]) -> str | None:
    """The visibility an ``m.room.history_visibility`` state event sets; None for any other
    event. An unknown or missing value counts as ``shared`` (the spec's default)."""
    if event.get("type") != HISTORY_VISIBILITY_TYPE or event.get("state_key") != "":
        return None
    content = event.get("content")
    value = content.get("history_visibility") if isinstance(content, Mapping) else None
    return value if value in HISTORY_VISIBILITIES else DEFAULT_HISTORY_VISIBILITY

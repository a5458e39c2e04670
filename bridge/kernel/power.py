"""Power levels and the room-creator rule (Matrix spec, room versions 1–12+).

One rule for everyone: in room version 12 and later (MSC4289, and its pre-release
``org.matrix.hydra.11``) the creators — the sender of ``m.room.create`` and the
``additional_creators`` — have unlimited power and are not in the ``users`` map; in every
version, a room without ``m.room.power_levels`` gives its creator 100 and everyone else 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Above any power level a room can hold (canonical JSON integers end at 2**53 - 1): the
# level of a creator in a room version where creators have unlimited power.
CREATOR_POWER = 2**53
# Versions with privileged creators that are not plain integers >= 12.
PRIVILEGED_CREATOR_VERSIONS = frozenset({"org.matrix.hydra.11"})
# Spec defaults when the power levels event lacks a key.
DEFAULT_STATE_LEVEL = 50
NO_POWER_LEVELS_CREATOR = 100


def creators_have_unlimited_power(room_version: str | None) -> bool:
    """True in room versions whose creators outrank every power level (v12 and later)."""
    v = "1" if room_version is None else str(room_version)
    if v in PRIVILEGED_CREATOR_VERSIONS:
        return True
    return v.isdigit() and int(v) >= 12


def level_value(value: Any, default: int) -> int:
    """A power level as stored: an integer, or (room versions before 10) a string of
    digits; anything else (bools, floats, junk) counts as absent and gives ``default``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    return default


def user_level(user: str, power_levels: Mapping[str, Any] | None, *,
               room_version: str | None, creators: Iterable[str]) -> int:
    """``user``'s power level.

    ``power_levels`` is the content of ``m.room.power_levels`` or None if the room has none;
    ``creators`` the create event's sender plus ``additional_creators``."""
    creators = frozenset(creators)
    if user in creators and creators_have_unlimited_power(room_version):
        return CREATOR_POWER
    if power_levels is None:
        return NO_POWER_LEVELS_CREATOR if user in creators else 0
    users = power_levels.get("users")
    users = users if isinstance(users, Mapping) else {}
    return level_value(users.get(user), level_value(power_levels.get("users_default"), 0))


def state_level(power_levels: Mapping[str, Any] | None, event_type: str) -> int:
    """The level needed to send ``event_type`` state (``events``, else ``state_default``;
    50 when the key is missing, 0 when the room has no power levels at all)."""
    if power_levels is None:
        return 0
    events = power_levels.get("events")
    events = events if isinstance(events, Mapping) else {}
    return level_value(events.get(event_type),
                       level_value(power_levels.get("state_default"), DEFAULT_STATE_LEVEL))


# Levels of the actions that have one (the spec: kick/ban/redact 50, invite 0) when the power
# levels do not name them, or the room has none (unlike ``state_default``, which is 0 then).
ACTION_DEFAULTS = {"kick": 50, "ban": 50, "redact": 50, "invite": 0}


def action_level(power_levels: Mapping[str, Any] | None, action: str) -> int:
    """The level ``kick``, ``ban``, ``redact`` or ``invite`` needs."""
    default = ACTION_DEFAULTS[action]
    if power_levels is None:
        return default
    return level_value(power_levels.get(action), default)


def creators_of(create_event: Mapping[str, Any]) -> frozenset[str]:
    """The creators named by an ``m.room.create`` event: its sender (``content.creator`` in
    room versions before 11) and ``additional_creators``."""
    content = create_event.get("content")
    content = content if isinstance(content, Mapping) else {}
    out: set[str] = set()
    for who in (create_event.get("sender"), content.get("creator")):
        if isinstance(who, str) and who:
            out.add(who)
    extra = content.get("additional_creators")
    if isinstance(extra, list):
        out.update(u for u in extra if isinstance(u, str))
    return frozenset(out)


def _state(state: Sequence[Mapping[str, Any]], event_type: str) -> Mapping[str, Any] | None:
    for ev in state:
        if ev.get("type") == event_type and ev.get("state_key", "") == "":
            return ev
    return None


def power_context(state: Sequence[Mapping[str, Any]],
                  ) -> tuple[Mapping[str, Any] | None, str | None, frozenset[str]]:
    """(power levels content or None, room version, creators) from a room's state events."""
    create = _state(state, "m.room.create") or {}
    ccontent = create.get("content")
    ccontent = ccontent if isinstance(ccontent, Mapping) else {}
    pl_ev = _state(state, "m.room.power_levels")
    pl = None
    if pl_ev is not None:
        c = pl_ev.get("content")
        pl = c if isinstance(c, Mapping) else {}
    version = str(ccontent.get("room_version", "1"))
    return pl, version, creators_of(create)


def user_level_in_state(state: Sequence[Mapping[str, Any]], user: str) -> int:
    """``user``'s power level from a room's full state (``/state`` or the admin API)."""
    pl, version, creators = power_context(state)
    return user_level(user, pl, room_version=version, creators=creators)


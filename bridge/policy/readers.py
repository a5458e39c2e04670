"""Who could read each archived event when it was sent: a replay of the room's membership
and ``m.room.history_visibility`` state in archive order (pure).

The rules are the spec's (client-server API, "History visibility"), with the visibility in
force at the event deciding:

- ``joined``: the users joined at the event;
- ``invited``: the users joined or invited at the event;
- ``shared``: the users joined at the event, and anyone who joins later (``later_joiners``);
- ``world_readable``: anyone at all (``anyone``); later joiners are listed too.

A user who left, was kicked or banned before the event is no reader; one who knocked is not
either. The archive starts each room with a snapshot of its state at the first event Enclave
saw (``unsigned["org.enclave.snapshot"]``), so the replay starts from the homeserver's truth
even for a room Enclave met late.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..kernel.membership import (
    DEFAULT_HISTORY_VISIBILITY,
    history_visibility_change,
    membership_change,
)

SNAPSHOT_KEY = "org.enclave.snapshot"  # unsigned mark of state the archive copied in


@dataclass(frozen=True)
class Readers:
    """Who could read one event when it was sent (user ids sorted)."""

    event_id: str
    history_visibility: str
    joined: tuple[str, ...]  # joined at the event
    invited: tuple[str, ...]  # invited at the event
    could_read: tuple[str, ...]  # readers at send under the visibility in force
    later_joiners: tuple[str, ...]  # shared/world_readable: joined after it, not before
    anyone: bool  # world_readable: anyone could read it, members or not


def replay_readers(events: Sequence[Mapping[str, Any]], *,
                   stands_for: Callable[[Mapping[str, Any]], str | None] | None = None,
                   ) -> dict[str, Readers]:
    """Event id -> :class:`Readers` for every non-state event of one room, ``events`` given
    in archive order (the room's state events with them: snapshot first, then as they came).

    A state event changes the state for the events after it; for the non-state events the
    state before them is what counts (they change none). ``stands_for(event)``: the id of
    the event a record stands for (the archive's plaintext of an encrypted message, written
    when it was decrypted, perhaps long after): such a record gets that event's readers,
    not those at its own place in the archive."""
    members: dict[str, str] = {}
    visibility = DEFAULT_HISTORY_VISIBILITY
    last_join: dict[str, int] = {}  # user -> position of their latest join
    at_send: list[tuple[int, str, str, tuple[str, ...], tuple[str, ...]]] = []
    aliases: list[tuple[str, str]] = []
    for pos, ev in enumerate(events):
        if "state_key" in ev:
            change = membership_change(ev)
            if change is not None:
                members[change[0]] = change[1]
                if change[1] == "join":
                    last_join[change[0]] = pos
            vis = history_visibility_change(ev)
            if vis is not None:
                visibility = vis
            continue
        eid = ev.get("event_id")
        if not isinstance(eid, str):
            continue
        original = stands_for(ev) if stands_for is not None else None
        if original is not None:
            aliases.append((eid, original))
            continue
        joined = tuple(sorted(u for u, m in members.items() if m == "join"))
        invited = tuple(sorted(u for u, m in members.items() if m == "invite"))
        at_send.append((pos, eid, visibility, joined, invited))
    out: dict[str, Readers] = {}
    for pos, eid, vis, joined, invited in at_send:
        could = tuple(sorted({*joined, *invited})) if vis == "invited" else joined
        later: tuple[str, ...] = ()
        if vis in ("shared", "world_readable"):
            was = set(joined)
            later = tuple(sorted(u for u, p in last_join.items() if p > pos and u not in was))
        out[eid] = Readers(event_id=eid, history_visibility=vis, joined=joined,
                           invited=invited, could_read=could, later_joiners=later,
                           anyone=vis == "world_readable")
    for eid, original in aliases:
        if original in out:
            out[eid] = replace(out[original], event_id=eid)
    return out

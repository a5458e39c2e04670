"""A room's facts as policy reads them, and the one answer to "is this a direct chat?".

:class:`RoomFacts` is built from a room's full state, an invitation's stripped state or what
the gate module read inside Synapse; :func:`is_direct_chat` is what every part of Enclave
asks to recognise a DM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ...kernel.power import creators_of
from ..power import RoomPower
from .rules import CLASS_STATE_TYPE, DM_CLASS, HISTORY_STATE_TYPE


@dataclass(frozen=True)
class RoomFacts:
    """What a decision needs to know about a room, from the gate, the admin API or an event."""

    room_id: str
    room_version: str | None = None
    creators: frozenset[str] = frozenset()
    class_state: str | None = None
    aliases: tuple[str, ...] = ()
    name: str | None = None
    federate: bool = True
    join_rule: str | None = None
    encrypted: bool = False
    is_direct: bool | None = None
    members: Mapping[str, str] = field(default_factory=dict)  # user -> join | invite | knock
    power: Mapping[str, Any] = field(default_factory=dict)
    # What the room's own org.enclave.room_class state says. Anyone able to send state (or a
    # remote server) can write it, so it never decides the class: ``class_state`` is
    # Enclave's own record (filled by the service from its store). ``claimed_grant`` is the
    # one-time grant the gate put into the class state at creation.
    claimed_class: str | None = None
    claimed_grant: str | None = None
    history_visibility: str | None = None
    predecessor: str | None = None  # the room this one replaced (a room upgrade)
    # False: facts from an invitation's stripped state (a remote room's own claims)
    hosted: bool = True

    @property
    def power_view(self) -> RoomPower:
        """The room's power facts (:mod:`bridge.policy.power`)."""
        return RoomPower(self.power or None, self.room_version, self.creators)

    @property
    def known(self) -> bool:
        """Whether this server has the room's state (a create event it stores itself)."""
        return self.room_version is not None and self.hosted

    def current(self) -> list[str]:
        """Joined and invited users, in id order."""
        return sorted(u for u, m in self.members.items() if m in ("join", "invite"))

    def with_member(self, user: str, membership: str | None) -> RoomFacts:
        members = dict(self.members)
        if membership is None:
            members.pop(user, None)
        else:
            members[user] = membership
        return replace(self, members=members)


def is_direct_chat(room: RoomFacts, *, invite_content: Mapping[str, Any] | None = None,
                   enclave_dm: bool = False) -> bool:
    """THE answer to "is this room a direct chat?" for every part of Enclave.

    Enclave's record decides when there is one. Otherwise any of: ``is_direct`` on an
    invitation (the room's, or ``invite_content``), a room Enclave's bot made as a DM
    (``enclave_dm``: the bot's own notices, whose invites may not carry ``is_direct``), a
    ``trusted_private_chat`` (room v12 ``additional_creators``: the invitee is a creator)
    with at most two people, or an unnamed invite-only room with at most two people and
    no alias. Nothing here needs the gate.
    """
    if room.class_state is not None:
        return room.class_state == DM_CLASS
    if room.is_direct or enclave_dm:
        return True
    if invite_content is not None and invite_content.get("is_direct") is True:
        return True
    people = room.current()
    if len(people) > 2 or not room.known:
        return False
    if len(room.creators) == 2 and set(people) <= set(room.creators):
        return True  # trusted_private_chat in room v12: both are creators
    return (room.join_rule == "invite" and room.name is None and not room.aliases
            and len(people) == 2)


# -- facts from the homeserver ---------------------------------------------------------------
def room_facts_from_state(room_id: str, state: Sequence[Mapping[str, Any]]) -> RoomFacts:
    """Build :class:`RoomFacts` from a room's full state (admin API or /state)."""
    members: dict[str, str] = {}
    creators: set[str] = set()
    version: str | None = None
    federate = True
    claimed: str | None = None
    grant: str | None = None
    history: str | None = None
    aliases: list[str] = []
    name = join_rule = None
    encrypted = False
    direct: bool | None = None
    predecessor: str | None = None
    power: Mapping[str, Any] = {}
    for ev in state:
        t, key, content = ev.get("type"), ev.get("state_key"), ev.get("content") or {}
        if t == "m.room.member" and isinstance(key, str):
            m = content.get("membership")
            if m in ("join", "invite", "knock"):
                members[key] = m
            if content.get("is_direct") is True:
                direct = True  # an invitation (or a join keeping it) marked as a DM
        elif t == "m.room.create":
            version = str(content.get("room_version", "1"))
            federate = content.get("m.federate", True) is not False
            creators.update(creators_of(ev))
            pred = content.get("predecessor")
            if isinstance(pred, dict) and isinstance(pred.get("room_id"), str):
                predecessor = pred["room_id"]
        elif t == CLASS_STATE_TYPE and key == "":
            c, g = content.get("class"), content.get("grant")
            claimed = c if isinstance(c, str) else None
            grant = g if isinstance(g, str) else None
        elif t == HISTORY_STATE_TYPE and key == "":
            h = content.get("history_visibility")
            history = h if isinstance(h, str) else None
        elif t == "m.room.canonical_alias" and key == "":
            if isinstance(content.get("alias"), str):
                aliases.append(content["alias"])
            alt = content.get("alt_aliases")
            if isinstance(alt, list):
                aliases.extend(a for a in alt if isinstance(a, str))
        elif t == "m.room.name" and key == "":
            name = content.get("name") if isinstance(content.get("name"), str) else None
        elif t == "m.room.join_rules" and key == "":
            join_rule = content.get("join_rule")
        elif t == "m.room.encryption" and key == "":
            encrypted = True
        elif t == "m.room.power_levels" and key == "":
            power = content
    return RoomFacts(room_id=room_id, room_version=version, creators=frozenset(creators),
                     claimed_class=claimed, claimed_grant=grant, history_visibility=history,
                     aliases=tuple(aliases), name=name, federate=federate,
                     join_rule=join_rule, encrypted=encrypted, members=members, power=power,
                     is_direct=direct, predecessor=predecessor)


def room_facts_from_invite(event: Mapping[str, Any]) -> RoomFacts:
    """Facts of a remote room we are not in, from an invite's stripped state."""
    stripped = ((event.get("unsigned") or {}).get("invite_room_state") or [])
    facts = room_facts_from_state(event.get("room_id", ""), stripped)
    content = event.get("content") or {}
    members = dict(facts.members)
    sender = event.get("sender")
    if isinstance(sender, str):
        members[sender] = "join"
    members[event.get("state_key", "")] = "invite"
    return replace(facts, members=members, is_direct=bool(content.get("is_direct")) or None,
                   hosted=False)


def room_facts_from_gate(room: Mapping[str, Any]) -> RoomFacts:
    """Facts the gate module read inside Synapse (see bridge.gate.protocol)."""
    creators = set(room.get("creators") or [])
    if room.get("creator"):
        creators.add(room["creator"])
    return RoomFacts(
        room_id=room.get("room_id") or "", room_version=room.get("room_version"),
        creators=frozenset(creators), claimed_class=room.get("class"),
        claimed_grant=room.get("class_grant"), history_visibility=room.get("history"),
        aliases=tuple(room.get("aliases") or ()), name=room.get("name"),
        federate=room.get("federate", True) is not False, join_rule=room.get("join_rule"),
        encrypted=bool(room.get("encrypted")), is_direct=room.get("is_direct"),
        members=dict(room.get("members") or {}), power=dict(room.get("power") or {}),
    )

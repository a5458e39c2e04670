"""The gate protocol: what the Synapse module asks Enclave and what Enclave answers.

Pure: parsing and validation only, no I/O, no clock. The module side lives in
:mod:`bridge.gate.module` (inside Synapse, which cannot import this package), the Enclave
side in :mod:`bridge.gate.service`; both follow the JSON shapes below.

Request (``POST /_enclave/gate/v1/check``)::

    {"check": "invite" | "join" | "create_room" | "state_event" | "user_search",
     "user": "@sender:server", "target": "@invitee:server" | null, "federated": false,
     "room": {...room facts...} | null, "create": {...createRoom body...} | null,
     "event": {"type": ..., "state_key": ..., "content": {...}} | null,
     "invited": false}      # join checks: the user holds an invitation

Answer: ``{"allow": bool, "rule_id": str, "reason": str, "message": str, "edits": {...} | null}``.

Unknown keys are ignored (a newer module may send more facts); a known key with the wrong
type, an unknown ``check`` or a missing field a check needs is a :class:`GateProtocolError`.
Parsed values are deeply frozen (mappings become read-only, lists become tuples), so a
request can be handed to pure decision code without anyone changing it underneath.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

__all__ = [
    "CHECKS",
    "CLASS_STATE_TYPE",
    "MEMBERSHIPS",
    "GateAnswer",
    "GateProtocolError",
    "GateRequest",
    "GateRoom",
    "freeze",
    "gate_request_from_obj",
    "parse_gate_answer",
    "parse_gate_request",
    "thaw",
]

Check = Literal["invite", "join", "create_room", "state_event", "user_search"]
CHECKS: frozenset[str] = frozenset({"invite", "join", "create_room", "state_event",
                                    "user_search"})
MEMBERSHIPS: frozenset[str] = frozenset({"join", "invite", "knock"})
CLASS_STATE_TYPE = "org.enclave.room_class"
EDIT_KEYS = frozenset({"creation_content", "initial_state", "invite", "power_users"})

# Loose on purpose: historical user ids contain characters the current grammar forbids.
_USER_ID_RE = re.compile(r"^@[^:\s]+:\S+$")

# Which optional parts each check cannot do without.
_NEEDS_TARGET = frozenset({"invite", "user_search"})
_NEEDS_ROOM = frozenset({"invite", "join", "state_event"})


class GateProtocolError(ValueError):
    """A request or answer that does not follow the protocol; ``str()`` says what is wrong.

    ``errcode`` is the Matrix error code the service answers with (``M_BAD_JSON`` when the
    body is not a JSON object at all, ``M_INVALID_PARAM`` or ``M_MISSING_PARAM`` otherwise).
    """

    def __init__(self, message: str, errcode: str = "M_INVALID_PARAM"):
        super().__init__(message)
        self.message = message
        self.errcode = errcode


# -- freezing -------------------------------------------------------------------------------
def freeze(value: Any) -> Any:
    """Deep read-only copy of JSON data: dicts -> mappingproxy, lists -> tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Reverse of :func:`freeze`: plain dicts and lists, ready for a JSON encoder."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


# -- the request ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GateRoom:
    """Facts the module read from Synapse about one room (JSON key ``class`` is
    ``room_class`` here). For a federated invite they come from the invite event and its
    ``invite_room_state``, so fewer are known."""

    room_id: str
    room_version: str | None = None
    creator: str | None = None
    creators: tuple[str, ...] = ()
    is_direct: bool | None = None
    room_class: str | None = None
    # the one-time grant in the gate-set class state, and m.room.history_visibility
    class_grant: str | None = None
    history: str | None = None
    aliases: tuple[str, ...] = ()
    name: str | None = None
    federate: bool = True
    join_rule: str | None = None
    encrypted: bool = False
    members: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    power: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def membership(self, user_id: str) -> str | None:
        """``join``, ``invite``, ``knock`` or None (not a current member)."""
        return self.members.get(user_id)

    def to_json(self) -> dict[str, Any]:
        """The protocol's JSON object (plain dicts and lists)."""
        return {
            "room_id": self.room_id, "room_version": self.room_version,
            "creator": self.creator, "creators": list(self.creators),
            "is_direct": self.is_direct, "class": self.room_class,
            "class_grant": self.class_grant, "history": self.history,
            "aliases": list(self.aliases), "name": self.name, "federate": self.federate,
            "join_rule": self.join_rule, "encrypted": self.encrypted,
            "members": dict(self.members), "power": thaw(self.power),
        }


@dataclass(frozen=True, kw_only=True)
class GateRequest:
    """One question from the module. ``create`` and ``event`` are frozen JSON mappings."""

    check: Check
    user: str
    target: str | None = None
    federated: bool = False
    room: GateRoom | None = None
    create: Mapping[str, Any] | None = None
    event: Mapping[str, Any] | None = None
    # join checks: Synapse says the user holds an invitation to the room
    invited: bool = False

    def to_json(self) -> dict[str, Any]:
        """The protocol's JSON object (what the module sends)."""
        return {
            "check": self.check, "user": self.user, "target": self.target,
            "federated": self.federated, "invited": self.invited,
            "room": self.room.to_json() if self.room is not None else None,
            "create": thaw(self.create) if self.create is not None else None,
            "event": thaw(self.event) if self.event is not None else None,
        }


# -- the answer -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GateAnswer:
    """Enclave's verdict. A refusal names its rule; ``message`` is what the person sees.

    ``edits`` (only on an allowed ``create_room``): ``creation_content`` keys the module
    merges into the request, ``initial_state`` events it appends (replacing any the user
    gave with the same type and state key), ``invite`` users it adds to the invitations
    and ``power_users`` levels it adds to the room's power levels (Enclave's bot).
    """

    allow: bool
    rule_id: str = ""
    reason: str = ""
    message: str = ""
    edits: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.allow and not self.rule_id:
            raise ValueError("a refusal must name its rule (rule_id)")
        if self.edits is not None:
            if not self.allow:
                raise ValueError("edits only go with an allowed create_room")
            _check_edits(self.edits)
            object.__setattr__(self, "edits", freeze(self.edits))

    @classmethod
    def allowed(cls, rule_id: str = "", reason: str = "",
                edits: Mapping[str, Any] | None = None) -> GateAnswer:
        """An allowing answer (with the rule that allowed it, if any)."""
        return cls(allow=True, rule_id=rule_id, reason=reason, edits=edits)

    @classmethod
    def denied(cls, rule_id: str, reason: str, message: str) -> GateAnswer:
        """A refusal: ``message`` is the sentence the refused person reads."""
        return cls(allow=False, rule_id=rule_id, reason=reason, message=message)

    def to_json(self) -> dict[str, Any]:
        """The protocol's JSON object (plain dicts and lists)."""
        return {"allow": self.allow, "rule_id": self.rule_id, "reason": self.reason,
                "message": self.message,
                "edits": thaw(self.edits) if self.edits is not None else None}


def _check_edits(edits: Mapping[str, Any]) -> None:
    if not isinstance(edits, Mapping):
        raise ValueError("edits must be an object")
    unknown = set(edits) - EDIT_KEYS
    if unknown:
        raise ValueError(f"unknown edits {sorted(unknown)}; allowed: {sorted(EDIT_KEYS)}")
    cc = edits.get("creation_content")
    if cc is not None and not isinstance(cc, Mapping):
        raise ValueError("edits.creation_content must be an object")
    inv = edits.get("invite")
    if inv is not None and (isinstance(inv, str | bytes) or not isinstance(inv, Sequence)
                            or not all(isinstance(u, str) and _USER_ID_RE.match(u)
                                       for u in inv)):
        raise ValueError("edits.invite must be a list of user ids")
    pu = edits.get("power_users")
    if pu is not None and not (isinstance(pu, Mapping) and all(
            isinstance(u, str) and _USER_ID_RE.match(u) and isinstance(v, int)
            and not isinstance(v, bool) for u, v in pu.items())):
        raise ValueError("edits.power_users must map user ids to power levels")
    init = edits.get("initial_state")
    if init is None:
        return
    if isinstance(init, str | bytes) or not isinstance(init, Sequence):
        raise ValueError("edits.initial_state must be a list of state events")
    for i, ev in enumerate(init):
        if not (isinstance(ev, Mapping) and isinstance(ev.get("type"), str)
                and isinstance(ev.get("state_key", ""), str)
                and isinstance(ev.get("content"), Mapping)):
            raise ValueError(f"edits.initial_state[{i}] must be "
                             "{type: str, state_key: str, content: object}")


# -- parsing --------------------------------------------------------------------------------
def _loads(body: bytes | str, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise GateProtocolError(f"{what} is not valid JSON: {e}", "M_BAD_JSON") from None


def parse_gate_request(body: bytes | str) -> GateRequest:
    """Parse and validate a request body; raise :class:`GateProtocolError` saying why not."""
    return gate_request_from_obj(_loads(body, "request body"))


def _opt(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str,
         type_name: str) -> Any:
    value = obj.get(key)
    if value is not None and not isinstance(value, types):
        raise GateProtocolError(f"{where}{key} must be {type_name} or null, "
                                f"not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


def _user_id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise GateProtocolError(f"{where} must be a user id string, not {_json_type(value)}")
    if not _USER_ID_RE.match(value):
        raise GateProtocolError(f"{where} must be a Matrix user id (@name:server), "
                                f"not {value!r}")
    return value


def _bool(obj: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise GateProtocolError(f"{where}{key} must be true or false, not {_json_type(value)}")
    return value


def _str_list(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GateProtocolError(f"{where}{key} must be a list of strings")
    return tuple(value)


def _room(obj: Any) -> GateRoom:
    where = "room."
    if not isinstance(obj, dict):
        raise GateProtocolError(f"room must be an object or null, not {_json_type(obj)}")
    room_id = obj.get("room_id")
    if not isinstance(room_id, str) or not room_id:
        raise GateProtocolError("room.room_id must be a non-empty string",
                                "M_MISSING_PARAM" if room_id is None else "M_INVALID_PARAM")
    members = obj.get("members")
    if members is None:
        members = {}
    if not isinstance(members, dict):
        raise GateProtocolError(f"room.members must be an object, not {_json_type(members)}")
    for uid, membership in members.items():
        if not isinstance(membership, str) or membership not in MEMBERSHIPS:
            raise GateProtocolError(
                f"room.members[{uid!r}] must be one of {sorted(MEMBERSHIPS)}, "
                f"not {membership!r}")
    power = obj.get("power")
    if power is None:
        power = {}
    if not isinstance(power, dict):
        raise GateProtocolError(f"room.power must be an object, not {_json_type(power)}")
    return GateRoom(
        room_id=room_id,
        room_version=_opt(obj, "room_version", str, where, "a string"),
        creator=_opt(obj, "creator", str, where, "a string"),
        creators=_str_list(obj, "creators", where),
        is_direct=_opt(obj, "is_direct", bool, where, "true/false"),
        room_class=_opt(obj, "class", str, where, "a string"),
        class_grant=_opt(obj, "class_grant", str, where, "a string"),
        history=_opt(obj, "history", str, where, "a string"),
        aliases=_str_list(obj, "aliases", where),
        name=_opt(obj, "name", str, where, "a string"),
        federate=_bool(obj, "federate", True, where),
        join_rule=_opt(obj, "join_rule", str, where, "a string"),
        encrypted=_bool(obj, "encrypted", False, where),
        members=MappingProxyType(dict(members)),
        power=freeze(power),
    )


def _event(obj: Any) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise GateProtocolError(f"event must be an object or null, not {_json_type(obj)}")
    if not isinstance(obj.get("type"), str) or not obj["type"]:
        raise GateProtocolError("event.type must be a non-empty string")
    if not isinstance(obj.get("state_key"), str):
        raise GateProtocolError("event.state_key must be a string")
    if not isinstance(obj.get("content"), dict):
        raise GateProtocolError("event.content must be an object")
    return cast(Mapping[str, Any], freeze(obj))


def gate_request_from_obj(obj: Any) -> GateRequest:
    """Validate already-decoded JSON (the service decodes with orjson) into a request."""
    if not isinstance(obj, dict):
        raise GateProtocolError(f"the request must be a JSON object, not {_json_type(obj)}",
                                "M_BAD_JSON")
    check = obj.get("check")
    if check is None:
        raise GateProtocolError("check is missing", "M_MISSING_PARAM")
    if not isinstance(check, str) or check not in CHECKS:
        raise GateProtocolError(f"unknown check {check!r}; expected one of {sorted(CHECKS)}")
    if obj.get("user") is None:
        raise GateProtocolError("user is missing", "M_MISSING_PARAM")
    user = _user_id(obj["user"], "user")
    target = obj.get("target")
    if target is not None:
        target = _user_id(target, "target")
    elif check in _NEEDS_TARGET:
        raise GateProtocolError(f"a {check} check needs target", "M_MISSING_PARAM")
    room = _room(obj["room"]) if obj.get("room") is not None else None
    if room is None and check in _NEEDS_ROOM:
        raise GateProtocolError(f"a {check} check needs room", "M_MISSING_PARAM")
    create = obj.get("create")
    if create is not None and not isinstance(create, dict):
        raise GateProtocolError(f"create must be an object or null, not {_json_type(create)}")
    if create is None and check == "create_room":
        raise GateProtocolError("a create_room check needs create", "M_MISSING_PARAM")
    event = _event(obj["event"]) if obj.get("event") is not None else None
    if event is None and check == "state_event":
        raise GateProtocolError("a state_event check needs event", "M_MISSING_PARAM")
    return GateRequest(
        check=cast(Check, check), user=user, target=target,
        federated=_bool(obj, "federated", False, ""), room=room,
        invited=_bool(obj, "invited", False, ""),
        create=freeze(create) if create is not None else None, event=event,
    )


def parse_gate_answer(body: bytes | str) -> GateAnswer:
    """Parse an answer (tests, bench, tools); raise :class:`GateProtocolError` if malformed."""
    obj = _loads(body, "answer")
    if not isinstance(obj, dict):
        raise GateProtocolError(f"the answer must be a JSON object, not {_json_type(obj)}",
                                "M_BAD_JSON")
    if not isinstance(obj.get("allow"), bool):
        raise GateProtocolError("answer.allow must be true or false")
    for key in ("rule_id", "reason", "message"):
        if not isinstance(obj.get(key, ""), str | None):
            raise GateProtocolError(f"answer.{key} must be a string")
    try:
        return GateAnswer(allow=obj["allow"], rule_id=obj.get("rule_id") or "",
                          reason=obj.get("reason") or "", message=obj.get("message") or "",
                          edits=obj.get("edits"))
    except ValueError as e:
        raise GateProtocolError(f"answer: {e}") from None

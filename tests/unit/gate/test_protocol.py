"""The gate protocol: requests parse into frozen dataclasses; malformed ones say why."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.gate.protocol import (
    GateAnswer,
    GateProtocolError,
    GateRequest,
    GateRoom,
    parse_gate_answer,
    parse_gate_request,
)

ROOM: dict[str, Any] = {
    "room_id": "!abc", "room_version": "12", "creator": "@c:corp.test",
    "creators": ["@c:corp.test", "@d:corp.test"], "is_direct": True, "class": "internal",
    "class_grant": "g1", "history": "joined",
    "aliases": ["#a:corp.test"], "name": "Plans", "federate": False, "join_rule": "invite",
    "encrypted": True, "members": {"@c:corp.test": "join", "@e:ext.test": "invite"},
    "power": {"users": {"@c:corp.test": 100}, "kick": 50},
}


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"check": "invite", "user": "@c:corp.test",
                            "target": "@e:ext.test", "federated": False, "room": ROOM,
                            "create": None, "event": None, "invited": False}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_invite_parses_every_room_fact() -> None:
    req = parse_gate_request(body())

    assert req.check == "invite" and req.user == "@c:corp.test"
    assert req.target == "@e:ext.test" and req.federated is False
    room = req.room
    assert room is not None
    assert room.room_id == "!abc" and room.room_version == "12"
    assert room.creator == "@c:corp.test"
    assert room.creators == ("@c:corp.test", "@d:corp.test")
    assert room.is_direct is True and room.room_class == "internal"
    assert room.aliases == ("#a:corp.test",) and room.name == "Plans"
    assert room.federate is False and room.join_rule == "invite" and room.encrypted is True
    assert room.membership("@e:ext.test") == "invite"
    assert room.membership("@nobody:corp.test") is None
    assert room.power["users"]["@c:corp.test"] == 100


def test_round_trip_through_to_json() -> None:
    req = parse_gate_request(body())
    assert req.to_json() == json.loads(body())
    assert parse_gate_request(json.dumps(req.to_json())) == req


def test_parsed_values_cannot_be_changed() -> None:
    req = parse_gate_request(body(check="state_event", target=None, event={
        "type": "m.room.topic", "state_key": "", "content": {"topic": "t", "tags": ["a"]}}))
    assert req.event is not None and req.room is not None
    with pytest.raises(TypeError):
        req.event["content"]["topic"] = "changed"  # type: ignore[index]
    assert req.event["content"]["tags"] == ("a",)
    with pytest.raises(TypeError):
        req.room.members["@x:corp.test"] = "join"  # type: ignore[index]


def test_defaults_for_a_sparse_room_and_unknown_keys_ignored() -> None:
    req = parse_gate_request(body(check="join", target=None,
                                  room={"room_id": "!r", "future_fact": 1}, extra="new"))
    assert req.room == GateRoom(room_id="!r")
    assert req.room.federate is True and req.room.encrypted is False
    assert req.room.members == {} and req.room.power == {}


def test_create_room_and_user_search_need_no_room() -> None:
    create = parse_gate_request(body(check="create_room", target=None, room=None,
                                     create={"preset": "private_chat", "invite": ["@x:s"],
                                             "creation_content": {"m.federate": True}}))
    assert create.create is not None and create.create["invite"] == ("@x:s",)
    search = parse_gate_request(body(check="user_search", room=None))
    assert search.target == "@e:ext.test" and search.room is None


MALFORMED: list[tuple[str, bytes, str, str]] = [
    ("not json", b"{nope", "M_BAD_JSON", "not valid JSON"),
    ("not utf-8", b"\xff\xfe", "M_BAD_JSON", "not valid JSON"),
    ("a list", b"[]", "M_BAD_JSON", "must be a JSON object"),
    ("no check", body(check=...), "M_MISSING_PARAM", "check is missing"),
    ("unknown check", body(check="kick"), "M_INVALID_PARAM", "unknown check 'kick'"),
    ("check not a string", body(check=["invite"]), "M_INVALID_PARAM", "unknown check"),
    ("no user", body(user=...), "M_MISSING_PARAM", "user is missing"),
    ("user not a string", body(user=5), "M_INVALID_PARAM", "user must be a user id string"),
    ("user not an id", body(user="alice"), "M_INVALID_PARAM", "must be a Matrix user id"),
    ("target not an id", body(target="#room:s"), "M_INVALID_PARAM", "target must be"),
    ("invite without target", body(target=None), "M_MISSING_PARAM", "needs target"),
    ("invite without room", body(room=None), "M_MISSING_PARAM", "needs room"),
    ("federated not bool", body(federated="yes"), "M_INVALID_PARAM", "federated must be"),
    ("room not an object", body(room=[1]), "M_INVALID_PARAM", "room must be an object"),
    ("room without id", body(room={"members": {}}), "M_MISSING_PARAM", "room.room_id"),
    ("room id empty", body(room={"room_id": ""}), "M_INVALID_PARAM", "room.room_id"),
    ("membership unknown", body(room={"room_id": "!r", "members": {"@a:s": "leave"}}),
     "M_INVALID_PARAM", "room.members['@a:s']"),
    ("membership not a string", body(room={"room_id": "!r", "members": {"@a:s": {}}}),
     "M_INVALID_PARAM", "room.members['@a:s']"),
    ("members a list", body(room={"room_id": "!r", "members": []}), "M_INVALID_PARAM",
     "room.members must be an object"),
    ("power a list", body(room={"room_id": "!r", "power": []}), "M_INVALID_PARAM",
     "room.power must be an object"),
    ("is_direct a string", body(room={"room_id": "!r", "is_direct": "true"}),
     "M_INVALID_PARAM", "room.is_direct must be true/false"),
    ("class a number", body(room={"room_id": "!r", "class": 3}), "M_INVALID_PARAM",
     "room.class must be a string"),
    ("aliases a string", body(room={"room_id": "!r", "aliases": "#a:s"}), "M_INVALID_PARAM",
     "room.aliases must be a list of strings"),
    ("encrypted a number", body(room={"room_id": "!r", "encrypted": 1}), "M_INVALID_PARAM",
     "room.encrypted must be true or false"),
    ("create_room without create", body(check="create_room", room=None), "M_MISSING_PARAM",
     "needs create"),
    ("create a list", body(check="create_room", create=[]), "M_INVALID_PARAM",
     "create must be an object"),
    ("state_event without event", body(check="state_event"), "M_MISSING_PARAM",
     "needs event"),
    ("event without type", body(check="state_event", event={"state_key": "", "content": {}}),
     "M_INVALID_PARAM", "event.type"),
    ("event state_key missing", body(check="state_event", event={"type": "t", "content": {}}),
     "M_INVALID_PARAM", "event.state_key"),
    ("event content a list",
     body(check="state_event", event={"type": "t", "state_key": "", "content": []}),
     "M_INVALID_PARAM", "event.content"),
]


@pytest.mark.parametrize(("raw", "errcode", "says"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_requests_say_what_is_wrong(raw: bytes, errcode: str, says: str) -> None:
    with pytest.raises(GateProtocolError) as err:
        parse_gate_request(raw)
    assert err.value.errcode == errcode
    assert says in str(err.value)


# -- answers -----------------------------------------------------------------------------------
EDITS = {"creation_content": {"m.federate": False},
         "initial_state": [{"type": "org.enclave.room_class", "state_key": "",
                            "content": {"class": "internal"}}]}


def test_answer_json_shapes() -> None:
    deny = GateAnswer.denied("policy.dms.staff_external", "external", "Enclave policy ...")
    assert deny.to_json() == {"allow": False, "rule_id": "policy.dms.staff_external",
                              "reason": "external", "message": "Enclave policy ...",
                              "edits": None}
    allow = GateAnswer.allowed("policy.rooms.internal", "internal", edits=EDITS)
    assert allow.to_json()["edits"] == EDITS
    assert parse_gate_answer(json.dumps(allow.to_json())) == allow
    assert parse_gate_answer(json.dumps(deny.to_json())) == deny


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"allow": False}, "must name its rule"),
    ({"allow": False, "rule_id": "r", "edits": EDITS}, "only go with an allowed"),
    ({"allow": True, "edits": {"power": {}}}, "unknown edits"),
    ({"allow": True, "edits": {"creation_content": []}}, "creation_content must be"),
    ({"allow": True, "edits": {"initial_state": {"type": "x"}}}, "must be a list"),
    ({"allow": True, "edits": {"initial_state": [{"type": "x"}]}}, "initial_state[0]"),
    ({"allow": True, "edits": {"invite": "@enclave:corp.test"}}, "invite must be"),
    ({"allow": True, "edits": {"invite": ["enclave"]}}, "invite must be"),
    ({"allow": True, "edits": {"power_users": {"@enclave:corp.test": "100"}}},
     "power_users must"),
    ({"allow": True, "edits": {"power_users": {"@enclave:corp.test": True}}},
     "power_users must"),
])
def test_answers_that_make_no_sense_are_refused(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError) as err:
        GateAnswer(**kwargs)
    assert says in str(err.value)


@pytest.mark.parametrize(("raw", "says"), [
    (b"nope", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"allow": "yes"}', "answer.allow"),
    (b'{"allow": false}', "must name its rule"),
    (b'{"allow": true, "message": 3}', "answer.message"),
])
def test_malformed_answers(raw: bytes, says: str) -> None:
    with pytest.raises(GateProtocolError) as err:
        parse_gate_answer(raw)
    assert says in str(err.value)


def test_request_is_frozen() -> None:
    req = GateRequest(check="user_search", user="@a:s", target="@b:s")
    with pytest.raises(AttributeError):
        req.user = "@x:s"  # type: ignore[misc]


def test_join_says_whether_the_user_holds_an_invitation() -> None:
    req = parse_gate_request(body(check="join", target=None, invited=True,
                                  room={"room_id": "!remote"}))
    assert req.invited is True and req.room is not None and req.room.room_version is None
    assert parse_gate_request(body(check="join", target=None)).invited is False
    with pytest.raises(GateProtocolError, match="invited must be true or false"):
        parse_gate_request(body(check="join", target=None, invited="yes"))

"""parse_transaction: a bad container is a 400, a bad event is quarantined with its reason."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from bridge.matrix.transactions import BadTransaction, parse_event, parse_transaction


def pdu(**over: Any) -> dict[str, Any]:
    ev = {"type": "m.room.message", "event_id": "$e1", "room_id": "!r1",
          "sender": "@alice:corp.example.com", "origin_server_ts": 1700000000000,
          "content": {"body": "hi"}}
    ev.update(over)
    return {k: v for k, v in ev.items() if v is not DROP}


DROP = object()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param([], "the body must be a JSON object, not a list", id="list"),
        pytest.param("x", "the body must be a JSON object, not a str", id="string"),
        pytest.param(None, "the body must be a JSON object, not a NoneType", id="null"),
        pytest.param(5, "not a int", id="number"),
        pytest.param({}, "'events' is missing", id="no-events"),
        pytest.param({"ephemeral": []}, "'events' is missing", id="only-ephemeral"),
        pytest.param({"events": {}}, "'events' must be a list", id="events-object"),
        pytest.param({"events": "x"}, "'events' must be a list", id="events-string"),
        pytest.param({"events": None}, "'events' must be a list, not null", id="events-null"),
        pytest.param({"events": [], "ephemeral": None}, "'ephemeral' must be a list, not null",
                     id="ephemeral-null"),
        pytest.param({"events": [], "ephemeral": {}}, "'ephemeral' must be a list",
                     id="ephemeral-object"),
        pytest.param({"events": [], "to_device": 1}, "'to_device' must be a list",
                     id="to-device-number"),
        pytest.param({"events": [], "de.sorunome.msc2409.to_device": "x"},
                     "'de.sorunome.msc2409.to_device' must be a list", id="msc-to-device"),
    ],
)
def test_bad_containers(body: Any, fragment: str) -> None:
    with pytest.raises(BadTransaction) as ei:
        parse_transaction(body)
    assert fragment in str(ei.value)


@pytest.mark.parametrize(
    ("section", "event", "reason"),
    [
        pytest.param("events", "not an event", "event is a JSON str, not an object", id="str"),
        pytest.param("events", [1], "event is a JSON list, not an object", id="list"),
        pytest.param("events", None, "event is a JSON NoneType, not an object", id="null"),
        pytest.param("events", pdu(type=DROP), "'type' must be a non-empty string",
                     id="no-type"),
        pytest.param("events", pdu(type=""), "'type' must be a non-empty string",
                     id="empty-type"),
        pytest.param("events", pdu(type=7), "'type' must be a non-empty string",
                     id="int-type"),
        pytest.param("events", pdu(type="t" * 256), "'type' must be a non-empty string",
                     id="long-type"),
        pytest.param("events", pdu(origin_server_ts="1"), "'origin_server_ts' must be an integer",
                     id="ts-string"),
        pytest.param("events", pdu(origin_server_ts=True),
                     "'origin_server_ts' must be an integer", id="ts-bool"),
        pytest.param("events", pdu(origin_server_ts=1.5),
                     "'origin_server_ts' must be an integer", id="ts-float"),
        pytest.param("events", pdu(event_id=DROP), "missing 'event_id'", id="no-event-id"),
        pytest.param("events", pdu(event_id="e1"),
                     "'event_id' must be a string starting with '$'", id="event-id-sigil"),
        pytest.param("events", pdu(event_id="$" + "e" * 255),
                     "'event_id' must be a string starting with '$' (max 255 chars)",
                     id="event-id-long"),
        pytest.param("events", pdu(room_id=DROP), "missing 'room_id'", id="no-room-id"),
        pytest.param("events", pdu(room_id="#alias:x"),
                     "'room_id' must be a string starting with '!'", id="room-id-sigil"),
        pytest.param("events", pdu(room_id=["!r"]),
                     "'room_id' must be a string starting with '!'", id="room-id-list"),
        pytest.param("events", pdu(sender=DROP), "missing 'sender'", id="no-sender"),
        pytest.param("events", pdu(sender="alice"),
                     "'sender' must be a string starting with '@'", id="sender-sigil"),
        pytest.param("events", pdu(content="hi"), "'content' must be an object",
                     id="content-string"),
        pytest.param("events", pdu(state_key=1), "'state_key' must be a string",
                     id="state-key-int"),
        pytest.param("to_device", {"type": "m.x", "content": {}}, "missing 'sender'",
                     id="to-device-no-sender"),
        pytest.param("ephemeral", {"type": "m.typing", "room_id": "r"},
                     "'room_id' must be a string starting with '!'", id="ephemeral-room-sigil"),
        pytest.param("ephemeral", {"room_id": "!r"}, "'type' must be a non-empty string",
                     id="ephemeral-no-type"),
    ],
)
def test_bad_events_are_quarantined(section: str, event: Any, reason: str) -> None:
    good = pdu(event_id="$good")
    body = {"events": [good] if section != "events" else [good, event]}
    if section != "events":
        body[section] = [event]
    parsed = parse_transaction(body)
    assert [e.event_id for e in parsed.events] == ["$good"]
    (q,) = parsed.quarantined
    assert q.section == section
    assert q.position == (1 if section == "events" else 0)
    assert reason in q.reason
    assert orjson.loads(q.raw) == event


@pytest.mark.parametrize(
    ("section", "event", "expected"),
    [
        pytest.param("events", pdu(), ("$e1", "!r1", "pdu", "@alice:corp.example.com"),
                     id="message"),
        pytest.param("events", pdu(origin_server_ts=DROP, content=DROP),
                     ("$e1", "!r1", "pdu", "@alice:corp.example.com"), id="minimal-pdu"),
        pytest.param("events", pdu(type="m.room.member", state_key="@bob:x",
                                   content={"membership": "invite", "is_direct": True}),
                     ("$e1", "!r1", "pdu", "@alice:corp.example.com"), id="dm-invite"),
        pytest.param("ephemeral", {"type": "m.typing", "room_id": "!r1",
                                   "content": {"user_ids": []}},
                     (None, "!r1", "ephemeral", None), id="typing"),
        pytest.param("ephemeral", {"type": "m.presence", "sender": "@a:x", "content": {}},
                     (None, "", "ephemeral", "@a:x"), id="presence-no-room"),
        pytest.param("to_device", {"type": "m.room_key_request", "sender": "@a:x",
                                   "to_user_id": "@enclave:x", "content": {}},
                     (None, "", "to_device", "@a:x"), id="to-device"),
        pytest.param("de.sorunome.msc2409.ephemeral", {"type": "m.receipt", "room_id": "!r2",
                                                       "content": {}},
                     (None, "!r2", "ephemeral", None), id="msc-only-ephemeral"),
    ],
)
def test_good_events(section: str, event: dict[str, Any], expected: tuple) -> None:
    body: dict[str, Any] = {"events": []}
    body[section] = [*body.get(section, []), event]
    parsed = parse_transaction(body)
    assert parsed.quarantined == []
    (ev,) = parsed.events
    assert (ev.event_id, ev.room_id, ev.kind, ev.sender) == expected
    assert ev.type == event["type"]
    assert ev.origin_server_ts == event.get("origin_server_ts")
    assert orjson.loads(ev.body) == event


@pytest.mark.parametrize(
    ("stable", "msc", "expected_types"),
    [
        pytest.param(["a"], ["a"], ["a"], id="both-same"),
        pytest.param(["a"], None, ["a"], id="stable-only"),
        pytest.param(None, ["a"], ["a"], id="msc-only"),
        pytest.param([], ["a"], [], id="stable-empty-wins"),
    ],
)
@pytest.mark.parametrize("name", ["ephemeral", "to_device"])
def test_stable_and_msc2409_sections_not_doubled(name: str, stable: list[str] | None,
                                                 msc: list[str] | None,
                                                 expected_types: list[str]) -> None:
    def evs(types: list[str]) -> list[dict[str, Any]]:
        return [{"type": t, "sender": "@a:x", "room_id": "!r", "content": {}} for t in types]

    body: dict[str, Any] = {"events": []}
    if stable is not None:
        body[name] = evs(stable)
    if msc is not None:
        body[f"de.sorunome.msc2409.{name}"] = evs(msc)
    parsed = parse_transaction(body)
    assert [e.type for e in parsed.events] == expected_types
    assert {e.kind for e in parsed.events} <= {name}


def test_sections_keep_order_and_positions() -> None:
    body = {
        "events": [pdu(event_id="$1"), 5, pdu(event_id="$2")],
        "ephemeral": [{"type": "m.typing", "room_id": "!r1", "content": {}}, []],
        "to_device": [{"type": "m.x", "sender": "@a:x", "content": {}}],
    }
    parsed = parse_transaction(body)
    assert [(e.kind, e.event_id) for e in parsed.events] == [
        ("pdu", "$1"), ("pdu", "$2"), ("ephemeral", None), ("to_device", None)]
    assert [(q.section, q.position) for q in parsed.quarantined] == [
        ("events", 1), ("ephemeral", 1)]


def test_unknown_sections_ignored() -> None:
    parsed = parse_transaction({"events": [pdu()], "org.example.future": {"x": 1},
                                "device_lists": {"changed": []}})
    assert len(parsed.events) == 1


def test_parse_event_body_is_compact_json() -> None:
    ev = parse_event(pdu(content={"body": "ünïcode"}), "pdu")
    assert ev.body == orjson.dumps(pdu(content={"body": "ünïcode"})).decode()


def nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = {"a": v}
    return v


@pytest.mark.parametrize("depth", [10, 200])
def test_deeply_nested_content_is_stored(depth: int) -> None:
    parsed = parse_transaction({"events": [pdu(content=nested(depth))]})
    assert len(parsed.events) == 1


def test_nesting_orjson_cannot_dump_is_still_stored() -> None:
    # orjson.loads takes 1024 levels, orjson.dumps only 254: such events must not 500
    parsed = parse_transaction({"events": [pdu(event_id="$ok"),
                                           pdu(event_id="$deep", content=nested(300))]})
    assert [e.event_id for e in parsed.events] == ["$ok", "$deep"]
    assert json.loads(parsed.events[1].body)["content"] == nested(300)
    assert parsed.quarantined == []


def test_unstorable_event_is_quarantined_not_fatal() -> None:
    parsed = parse_transaction({"events": [pdu(event_id="$ok"),
                                           pdu(event_id="$deep", content=nested(5000))]})
    assert [e.event_id for e in parsed.events] == ["$ok"]
    assert len(parsed.quarantined) == 1
    assert "cannot be stored" in parsed.quarantined[0].reason

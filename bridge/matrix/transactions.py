"""Parse a homeserver transaction body into inbox events and quarantined ones (pure).

A malformed *container* is the homeserver's bug and gets a 400; a malformed *event* inside a
valid container is kept aside with its reason, because refusing the whole transaction would
make Synapse resend it forever and stall every later event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from ..store import NewEvent, QuarantinedEvent

# Stable name first; Synapse still also sends the MSC2409 names.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("events", "pdu"),
    ("ephemeral", "ephemeral"),
    ("de.sorunome.msc2409.ephemeral", "ephemeral"),
    ("to_device", "to_device"),
    ("de.sorunome.msc2409.to_device", "to_device"),
)
MAX_ID_LENGTH = 255  # the spec's limit for event, room and user ids


class BadTransaction(ValueError):
    """The transaction container itself is malformed (answered with 400 M_BAD_JSON)."""


@dataclass(frozen=True)
class ParsedTransaction:
    events: list[NewEvent]
    quarantined: list[QuarantinedEvent]


def _check_id(ev: dict[str, Any], key: str, sigil: str, required: bool) -> str | None:
    v = ev.get(key)
    if v is None:
        if required:
            raise ValueError(f"missing '{key}'")
        return None
    if not isinstance(v, str) or not v.startswith(sigil) or len(v) > MAX_ID_LENGTH:
        raise ValueError(f"'{key}' must be a string starting with '{sigil}' (max 255 chars)")
    return v


def parse_event(ev: Any, kind: str) -> NewEvent:
    """Validate one event of a section; raise ValueError with a reason if it is unusable."""
    if not isinstance(ev, dict):
        raise ValueError(f"event is a JSON {type(ev).__name__}, not an object")
    etype = ev.get("type")
    if not isinstance(etype, str) or not etype or len(etype) > MAX_ID_LENGTH:
        raise ValueError("'type' must be a non-empty string")
    ts = ev.get("origin_server_ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int)):
        raise ValueError("'origin_server_ts' must be an integer")
    if kind == "pdu":
        event_id = _check_id(ev, "event_id", "$", True)
        room_id = _check_id(ev, "room_id", "!", True)
        sender = _check_id(ev, "sender", "@", True)
        if "content" in ev and not isinstance(ev["content"], dict):
            raise ValueError("'content' must be an object")
        if "state_key" in ev and not isinstance(ev["state_key"], str):
            raise ValueError("'state_key' must be a string")
    else:
        event_id = None
        room_id = _check_id(ev, "room_id", "!", False)
        sender = _check_id(ev, "sender", "@", kind == "to_device")
    try:
        body = dump_json(ev)
    except ValueError as e:
        raise ValueError(f"event cannot be stored: {e}") from None
    return NewEvent(
        event_id=event_id, room_id=room_id or "", kind=kind, type=etype, sender=sender,
        origin_server_ts=ts, body=body,
    )


def dump_json(value: Any) -> str:
    """Serialise like orjson, falling back to the stdlib for what orjson refuses.

    orjson.loads accepts 1024 levels of nesting but orjson.dumps only 254; any user can
    send such content, and refusing the transaction would stall the homeserver's queue.
    """
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        except (RecursionError, TypeError, ValueError) as e:
            raise ValueError(f"not serialisable ({type(e).__name__})") from None


def check_container(body: Any) -> None:
    """Raise :class:`BadTransaction` unless the transaction's container is well formed.

    This is all the homeserver's answer waits for; events are checked one by one when the
    journaled transaction is expanded into the inbox.
    """
    if not isinstance(body, dict):
        raise BadTransaction(f"the body must be a JSON object, not a {type(body).__name__}")
    if "events" not in body:
        raise BadTransaction("'events' is missing")
    for key, _kind in SECTIONS:
        # null is not an empty list: a homeserver (or anyone) sending it is refused, not
        # acknowledged as a transaction that carried nothing
        if key in body and not isinstance(body[key], list):
            raise BadTransaction(f"'{key}' must be a list, not "
                                 f"{'null' if body[key] is None else type(body[key]).__name__}")


def parse_transaction(body: Any) -> ParsedTransaction:
    """Split a decoded transaction into events to store and events to quarantine."""
    check_container(body)
    events: list[NewEvent] = []
    quarantined: list[QuarantinedEvent] = []
    seen_kinds: set[str] = set()
    for key, kind in SECTIONS:
        section = body.get(key)
        if section is None:
            continue
        if kind != "pdu" and kind in seen_kinds:
            continue  # both the stable and the MSC name: the same events twice
        seen_kinds.add(kind)
        for pos, ev in enumerate(section):
            try:
                events.append(parse_event(ev, kind))
            except ValueError as e:
                try:
                    raw = dump_json(ev)[:65536]
                except ValueError:
                    raw = "<not serialisable: nested too deeply>"
                quarantined.append(QuarantinedEvent(
                    position=pos, section=key, reason=str(e), raw=raw,
                ))
    return ParsedTransaction(events, quarantined)

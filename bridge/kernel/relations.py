"""Relations between events (reply, thread, edit, redaction) and the reply fallback.

Readers of event JSON from anywhere (federation, clients, the archive): every accessor
tolerates missing or wrongly typed fields and answers None rather than raising.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def content_of(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The event's ``content`` (empty when absent or not an object)."""
    c = event.get("content")
    return c if isinstance(c, Mapping) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def relates_to(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The event's ``m.relates_to`` (empty when absent)."""
    rel = content_of(event).get("m.relates_to")
    return rel if isinstance(rel, Mapping) else {}


def reply_to(event: Mapping[str, Any]) -> str | None:
    """The event id this event replies to (``m.in_reply_to``), thread fallbacks included."""
    irt = relates_to(event).get("m.in_reply_to")
    return _str(irt.get("event_id")) if isinstance(irt, Mapping) else None


def reply_relation(event_id: str) -> dict[str, Any]:
    """The ``m.relates_to`` of a reply to ``event_id`` (what :func:`reply_to` reads back)."""
    return {"m.in_reply_to": {"event_id": event_id}}


def is_thread_fallback(event: Mapping[str, Any]) -> bool:
    """True when ``m.in_reply_to`` is only a thread's fallback for clients without threads
    (``is_falling_back``), not a reply the sender chose."""
    return relates_to(event).get("is_falling_back") is True


def thread_root(event: Mapping[str, Any]) -> str | None:
    """The root event id when this event is in a thread (``rel_type`` ``m.thread``)."""
    rel = relates_to(event)
    return _str(rel.get("event_id")) if rel.get("rel_type") == "m.thread" else None


def edit_target(event: Mapping[str, Any]) -> str | None:
    """The event id this event edits (``rel_type`` ``m.replace``)."""
    rel = relates_to(event)
    return _str(rel.get("event_id")) if rel.get("rel_type") == "m.replace" else None


def replacement_problem(original: Mapping[str, Any], edit: Mapping[str, Any]) -> str | None:
    """Why ``edit`` (an ``m.replace`` of ``original``) is not a valid replacement, or None
    when it is. The spec's rules ("Validity of replacement events"): same sender and type,
    neither is a state event, the original is not itself an edit, and an unencrypted edit
    carries ``m.new_content``. Clients ignore invalid edits; so do the transcript and the
    export's lineage (which records them as rejected)."""
    if edit.get("sender") != original.get("sender"):
        return "not sent by the original sender"
    if edit.get("type") != original.get("type"):
        return "not the original's event type"
    if "state_key" in edit or "state_key" in original:
        return "a state event"
    if edit_target(original) is not None:
        return "the original is itself an edit"
    if (edit.get("type") != "m.room.encrypted"
            and not isinstance(content_of(edit).get("m.new_content"), Mapping)):
        return "no m.new_content"
    return None


def redaction_target(event: Mapping[str, Any]) -> str | None:
    """The event id an ``m.room.redaction`` removes (top level, or content from room v11)."""
    if event.get("type") != "m.room.redaction":
        return None
    return _str(event.get("redacts")) or _str(content_of(event).get("redacts"))


def is_redacted(event: Mapping[str, Any]) -> bool:
    """True when the event arrived already redacted (read back after a deletion)."""
    unsigned = event.get("unsigned")
    return isinstance(unsigned, Mapping) and "redacted_because" in unsigned


def strip_reply_fallback(body: str) -> str:
    """The plain ``body`` of a reply without the quote of its parent.

    The spec's fallback (rich replies; clients before Matrix 1.13 still send it) is the
    parent quoted as ``> <@sender> …`` and further ``>`` lines, then one blank line, then
    the reply. Only that exact shape is removed: text that merely starts with ``> `` (a
    quote the author typed, with no blank line after it) is the author's and is kept.
    """
    lines = body.split("\n")
    if not lines or not lines[0].startswith("> "):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    if i < len(lines) and lines[i] == "":
        return "\n".join(lines[i + 1:])
    return body

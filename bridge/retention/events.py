"""Pure helpers over archived event JSON shared by the export's renderers (HTML, EML) and
the archive feed.

Everything taken from an event is untrusted: only the plain ``body`` is read (never
``formatted_body``), and every accessor tolerates missing or wrongly typed fields.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..kernel.relations import (
    content_of,
    edit_target,
    is_thread_fallback,
    reply_to,
    strip_reply_fallback,
)
from ..kernel.timestamps import readable_utc

MESSAGE_TYPES = frozenset({"m.room.message", "m.sticker", "m.room.encrypted"})
ATTACHMENT_MSGTYPES = frozenset({"m.image", "m.file", "m.video", "m.audio"})
ENCRYPTED_TEXT = "encrypted message (not readable by the archive)"
DELETED_TEXT = "message deleted"
DECRYPTED_BELOW = ("encrypted message (its plaintext, decrypted by the Enclave archive device, "
                   "follows)")


# The archive's plaintext record of an encrypted event (the archive device decrypted it):
# its own archive entry, beside the ciphertext event it links to by event id.
DECRYPTED_KEY = "org.enclave.decrypted"
DECRYPTED_SUFFIX = "#decrypted"
# Event types that take effect only in the clear: the homeserver applies a redaction it
# stores unencrypted, never one inside a ciphertext (which is just a message). The
# plaintext of such a type is archived under a type that says what it claimed, so that no
# reader of the archive (transcript, export lineage) takes it for the real thing.
INERT_WHEN_ENCRYPTED = frozenset({"m.room.redaction"})
ENCRYPTED_CLAIM_PREFIX = "org.enclave.encrypted."


def decrypted_event_id(event_id: str) -> str:
    """The archive id of the plaintext record of ``event_id`` (never a homeserver id: those
    hold no ``#``)."""
    return event_id + DECRYPTED_SUFFIX


def decrypted_record(room_id: str, event: Mapping[str, Any], clear: Mapping[str, Any], *,
                     by: str, device: str | None, at_ms: int,
                     session_id: str | None = None, recovered: bool = False,
                     ) -> dict[str, Any]:
    """The archive record of an encrypted ``event`` the archive device decrypted to
    ``clear`` (nio's decrypted event: ``type``, ``content``).

    Sender, room and timestamp come from the envelope (what the homeserver vouches for),
    type and content from the plaintext; ``org.enclave.decrypted`` names the ciphertext
    event (``of``), who decrypted it (``by``, ``device``), the Megolm session, when, and
    whether it was a recovered capture gap."""
    event_id = str(event["event_id"])
    content = clear.get("content")
    etype = clear.get("type")
    etype = etype if isinstance(etype, str) and etype else "m.room.message"
    if etype in INERT_WHEN_ENCRYPTED:
        # a member can encrypt anything: an "m.room.redaction" in a ciphertext redacts
        # nothing, and must not look like one in the archive
        etype = ENCRYPTED_CLAIM_PREFIX + etype
    return {
        "event_id": decrypted_event_id(event_id),
        "room_id": room_id,
        "type": etype,
        "sender": event.get("sender"),
        "origin_server_ts": event.get("origin_server_ts"),
        "content": dict(content) if isinstance(content, Mapping) else {},
        DECRYPTED_KEY: {"of": event_id, "by": by, "device": device, "at": at_ms,
                        "session_id": session_id, "recovered": recovered},
    }


def decrypted_of(event: Mapping[str, Any]) -> str | None:
    """The ciphertext event id a plaintext record was decrypted from (None: not one).

    Only the archive writes records: their id is the ciphertext's id plus
    :data:`DECRYPTED_SUFFIX`, which no homeserver event id can be (they hold no ``#``). An
    event whose mark does not match its own id (a remote server can put any top-level key
    into an event it sends over federation; a client can put it into its content, which
    is never read here) is not a record."""
    mark = event.get(DECRYPTED_KEY)
    of = str_or_none(mark.get("of")) if isinstance(mark, Mapping) else None
    if of is None or event.get("event_id") != decrypted_event_id(of):
        return None
    return of


def str_or_none(value: Any) -> str | None:
    """The value if it is a string, else None (event JSON is untrusted)."""
    return value if isinstance(value, str) else None


def attachment_mxc(event: Mapping[str, Any]) -> str | None:
    """The ``mxc://`` URI of the event's file: ``content.url`` or ``content.file.url``."""
    content = content_of(event)
    url = str_or_none(content.get("url"))
    if url is None and isinstance(content.get("file"), Mapping):
        url = str_or_none(content["file"].get("url"))
    return url if url is not None and url.startswith("mxc://") else None


def media_refs(event: Mapping[str, Any]) -> list[str]:
    """mxc:// URIs an event's content points at (file, thumbnail; plain or encrypted)."""
    content = event.get("content")
    if not isinstance(content, Mapping):
        return []
    out: list[str] = []

    def take(v: Any) -> None:
        if isinstance(v, str) and v.startswith("mxc://") and v not in out:
            out.append(v)
        elif isinstance(v, Mapping):
            take(v.get("url"))

    take(content.get("url"))
    take(content.get("file"))
    info = content.get("info")
    if isinstance(info, Mapping):
        take(info.get("thumbnail_url"))
        take(info.get("thumbnail_file"))
    return out


def is_attachment(event: Mapping[str, Any]) -> bool:
    """A file, image, video, audio message or a sticker that carries an ``mxc://`` URI."""
    if attachment_mxc(event) is None:
        return False
    if event.get("type") == "m.sticker":
        return True
    return content_of(event).get("msgtype") in ATTACHMENT_MSGTYPES


def attachment_info(event: Mapping[str, Any]) -> tuple[str, str | None, int | None]:
    """(file name, mimetype, size) as the event states them (file name falls back to body)."""
    content = content_of(event)
    info = content.get("info") if isinstance(content.get("info"), Mapping) else {}
    name = str_or_none(content.get("filename")) or str_or_none(content.get("body")) or "attachment"
    size = info.get("size")
    return name, str_or_none(info.get("mimetype")), size if isinstance(size, int) else None


def plain_text(event: Mapping[str, Any]) -> str:
    """The readable text of a message: the plain ``body`` (never ``formatted_body``), reply
    fallback removed; for an edit, the new text; for an encrypted event, a fixed note."""
    if event.get("type") == "m.room.encrypted":
        return ENCRYPTED_TEXT
    content = content_of(event)
    if edit_target(event) is not None and isinstance(content.get("m.new_content"), Mapping):
        new = str_or_none(content["m.new_content"].get("body"))
        if new is not None:
            return new
    body = str_or_none(content.get("body")) or ""
    if edit_target(event) is not None and body.startswith("* "):
        return body[2:]
    if reply_to(event) is not None and not is_thread_fallback(event):
        body = strip_reply_fallback(body)
    return body


def display_names(events: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """User id -> display name from ``m.room.member`` events, later events winning.

    A leave without a display name keeps the last known one, so people who left are still
    named in the transcript."""
    names: dict[str, str] = {}
    for ev in events:
        if ev.get("type") != "m.room.member":
            continue
        user = str_or_none(ev.get("state_key"))
        name = str_or_none(content_of(ev).get("displayname"))
        if user and name and name.strip():
            names[user] = name.strip()
    return names


def room_name(events: Sequence[Mapping[str, Any]]) -> str | None:
    """The room's latest ``m.room.name`` (else its canonical alias), or None."""
    name: str | None = None
    alias: str | None = None
    for ev in events:
        if ev.get("state_key") != "":
            continue
        if ev.get("type") == "m.room.name":
            name = str_or_none(content_of(ev).get("name")) or None
        elif ev.get("type") == "m.room.canonical_alias":
            alias = str_or_none(content_of(ev).get("alias")) or None
    return name or alias


def readable_utc_label(ts_ms: int | None) -> str:
    """``2024-05-01 12:30:00 UTC`` for people reading a transcript or mail; ``?`` if unknown."""
    return readable_utc(ts_ms, "?") + (" UTC" if isinstance(ts_ms, int) else "")


def anchor(event_id: str) -> str:
    """The HTML id of an event's block (event ids hold characters unfit for fragments)."""
    return "e-" + hashlib.sha256(event_id.encode()).hexdigest()[:20]


def safe_name(text: str) -> str:
    """A file name for a room or event id: readable part plus a hash (distinct ids never meet)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "x"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def human_size(n: int | None) -> str:
    """``512 bytes``, ``1.5 KB``, ``2.0 MB``; empty when unknown."""
    if n is None:
        return ""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"

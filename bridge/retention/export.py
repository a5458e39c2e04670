"""eDiscovery export of the compliance archive: JSON Lines, an HTML transcript and EML per room.

The export reads the archive (never the homeserver), so it covers purged history too.
Selection is by room, sender, date range and/or legal hold; the index in the store picks the
events (keyset paging in archive order), the archive returns their stored JSON.

Layout of an export directory::

    events.jsonl                       every selected event, per room in archive order
    rooms/<room>/transcript.html       one self-contained, readable page per room
    rooms/<room>/eml/0001-<event>.eml  one mail per message, for tools that ingest mail
    media/<sha256>.<ext>               archived media referenced by the selected events
    manifest.json                      the request, counts and the SHA-256 of every file

The renderers (:func:`render_html`, :func:`render_eml`) are pure: they take the events and
the names and return text/bytes, so they are tested without any I/O. Everything taken from
an event is untrusted: HTML is escaped, ``formatted_body`` is never used (only the plain
``body``), and links point only at copied media files or ``mxc://`` URIs.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import mimetypes
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from ..policy.retention import Hold
    from ..store.base import ArchivedEvent, Store
    from .archive import ArchiveWriter

FORMATS = frozenset({"jsonl", "html", "eml"})
MESSAGE_TYPES = frozenset({"m.room.message", "m.sticker", "m.room.encrypted"})
ATTACHMENT_MSGTYPES = frozenset({"m.image", "m.file", "m.video", "m.audio"})
ENCRYPTED_TEXT = "encrypted message (not readable by the archive)"
DELETED_TEXT = "message deleted"
PAGE = 1000  # index rows per archive_query page (and events per archive.read)
SNIPPET = 120  # characters of a replied-to message quoted above a reply
SUBJECT_WORDS = 8
SUBJECT_CHARS = 70
MEDIA_HREF_PREFIX = "../../media/"  # from rooms/<room>/transcript.html to media/<sha>.<ext>


# -- request / report -----------------------------------------------------------------------
@dataclass(frozen=True)
class ExportRequest:
    """What to export. Empty ``rooms``/``users`` mean any; bounds are inclusive (ms).

    A ``hold_id`` selects what the hold covers (its users, rooms and range); the other
    fields then narrow that selection further."""

    rooms: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    hold_id: str | None = None
    formats: frozenset[str] = FORMATS


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote. ``files`` are paths relative to ``out_dir`` (manifest last)."""

    out_dir: Path
    rooms: int
    events: int
    media: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class Selection:
    """The effective filters after combining a request with its hold (None/empty = any)."""

    rooms: tuple[str, ...]
    users: tuple[str, ...]
    since_ms: int | None
    until_ms: int | None
    empty: bool = False  # request and hold do not overlap: nothing can match


# -- small helpers over event JSON (pure) ---------------------------------------------------
def _content(event: Mapping[str, Any]) -> Mapping[str, Any]:
    c = event.get("content")
    return c if isinstance(c, Mapping) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _relation(event: Mapping[str, Any]) -> Mapping[str, Any]:
    rel = _content(event).get("m.relates_to")
    return rel if isinstance(rel, Mapping) else {}


def reply_to(event: Mapping[str, Any]) -> str | None:
    """The event id this event replies to (``m.in_reply_to``), thread fallbacks included."""
    irt = _relation(event).get("m.in_reply_to")
    return _str(irt.get("event_id")) if isinstance(irt, Mapping) else None


def is_reply_fallback(event: Mapping[str, Any]) -> bool:
    """True when ``m.in_reply_to`` is only a thread's fallback for clients without threads."""
    return _relation(event).get("is_falling_back") is True


def thread_root(event: Mapping[str, Any]) -> str | None:
    """The root event id when this event is in a thread (``rel_type`` ``m.thread``)."""
    rel = _relation(event)
    return _str(rel.get("event_id")) if rel.get("rel_type") == "m.thread" else None


def edit_target(event: Mapping[str, Any]) -> str | None:
    """The event id this event edits (``rel_type`` ``m.replace``)."""
    rel = _relation(event)
    return _str(rel.get("event_id")) if rel.get("rel_type") == "m.replace" else None


def redaction_target(event: Mapping[str, Any]) -> str | None:
    """The event id an ``m.room.redaction`` removes (top level, or content from room v11)."""
    if event.get("type") != "m.room.redaction":
        return None
    return _str(event.get("redacts")) or _str(_content(event).get("redacts"))


def is_redacted(event: Mapping[str, Any]) -> bool:
    """True when the event arrived already redacted (read back after a deletion)."""
    unsigned = event.get("unsigned")
    return isinstance(unsigned, Mapping) and "redacted_because" in unsigned


def attachment_mxc(event: Mapping[str, Any]) -> str | None:
    """The ``mxc://`` URI of the event's file: ``content.url`` or ``content.file.url``."""
    content = _content(event)
    url = _str(content.get("url"))
    if url is None and isinstance(content.get("file"), Mapping):
        url = _str(content["file"].get("url"))
    return url if url is not None and url.startswith("mxc://") else None


def is_attachment(event: Mapping[str, Any]) -> bool:
    """A file, image, video, audio message or a sticker that carries an ``mxc://`` URI."""
    if attachment_mxc(event) is None:
        return False
    if event.get("type") == "m.sticker":
        return True
    return _content(event).get("msgtype") in ATTACHMENT_MSGTYPES


def attachment_info(event: Mapping[str, Any]) -> tuple[str, str | None, int | None]:
    """(file name, mimetype, size) as the event states them (file name falls back to body)."""
    content = _content(event)
    info = content.get("info") if isinstance(content.get("info"), Mapping) else {}
    name = _str(content.get("filename")) or _str(content.get("body")) or "attachment"
    size = info.get("size")
    return name, _str(info.get("mimetype")), size if isinstance(size, int) else None


def _strip_reply_fallback(body: str) -> str:
    # Replies made by older clients quote the parent as "> " lines and a blank line.
    lines = body.split("\n")
    if not lines or not lines[0].startswith("> "):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    if i < len(lines) and lines[i] == "":
        return "\n".join(lines[i + 1:])
    return body


def plain_text(event: Mapping[str, Any]) -> str:
    """The readable text of a message: the plain ``body`` (never ``formatted_body``), reply
    fallback removed; for an edit, the new text; for an encrypted event, a fixed note."""
    if event.get("type") == "m.room.encrypted":
        return ENCRYPTED_TEXT
    content = _content(event)
    if edit_target(event) is not None and isinstance(content.get("m.new_content"), Mapping):
        new = _str(content["m.new_content"].get("body"))
        if new is not None:
            return new
    body = _str(content.get("body")) or ""
    if edit_target(event) is not None and body.startswith("* "):
        return body[2:]
    if reply_to(event) is not None and not is_reply_fallback(event):
        body = _strip_reply_fallback(body)
    return body


def display_names(events: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """User id -> display name from ``m.room.member`` events, later events winning.

    A leave without a display name keeps the last known one, so people who left are still
    named in the transcript."""
    names: dict[str, str] = {}
    for ev in events:
        if ev.get("type") != "m.room.member":
            continue
        user = _str(ev.get("state_key"))
        name = _str(_content(ev).get("displayname"))
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
            name = _str(_content(ev).get("name")) or None
        elif ev.get("type") == "m.room.canonical_alias":
            alias = _str(_content(ev).get("alias")) or None
    return name or alias


def iso_utc(ts_ms: int | None) -> str:
    """``2024-05-01T12:30:00Z`` (second precision, UTC); ``?`` when unknown."""
    if not isinstance(ts_ms, int):
        return "?"
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _readable_utc(ts_ms: int | None) -> str:
    if not isinstance(ts_ms, int):
        return "?"
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def anchor(event_id: str) -> str:
    """The HTML id of an event's block (event ids hold characters unfit for fragments)."""
    return "e-" + hashlib.sha256(event_id.encode()).hexdigest()[:20]


def safe_name(text: str) -> str:
    """A file name for a room or event id: readable part plus a hash (distinct ids never meet)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "x"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _size(n: int | None) -> str:
    if n is None:
        return ""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


# -- HTML -----------------------------------------------------------------------------------
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 background:#f6f7f9;color:#1d2329}
header{background:#fff;border-bottom:1px solid #dde1e6;padding:16px 24px}
header h1{margin:0 0 4px;font-size:22px}
header dl{margin:8px 0 0;display:grid;grid-template-columns:max-content auto;gap:2px 12px;
 font-size:13px;color:#4a5560}
header dt{font-weight:600}header dd{margin:0}
main{max-width:920px;margin:0 auto;padding:12px 24px 48px}
.msg{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:8px 12px;margin:8px 0}
.msg:target{outline:2px solid #3b7ddd}
.meta{font-size:13px;color:#4a5560}
.name{font-weight:600;color:#1d2329}.uid,.eid{color:#7a8590}
.eid{font-size:11px;text-decoration:none;float:right}
.body{white-space:pre-wrap;overflow-wrap:anywhere;margin-top:2px}
.notice .body{color:#4a5560}
.reply{border-left:3px solid #b8c2cc;margin:4px 0;padding:2px 8px;color:#4a5560;font-size:13px}
.thread{margin-left:32px;border-left:2px solid #c9d3dd;padding-left:8px}
.thread-mark{font-size:12px;color:#6b7785;font-weight:600}
.edited{font-size:12px;color:#6b7785;font-style:italic}
.deleted .body,.encrypted .body{font-style:italic;color:#8a6d3b}
details{font-size:13px;color:#4a5560;margin-top:4px}
.archived{margin-top:6px;padding:4px 8px;border-left:3px solid #c9a227;background:#fffbea}
.archived-label{font-size:12px;font-weight:600;color:#8a6d3b}
.archived .body{font-style:normal;color:#1d2329}
.marks{margin-top:4px}.mark{display:inline-block;font-size:12px;font-weight:600;
 padding:1px 6px;border-radius:3px;margin-right:6px}
.mark.hold{background:#fde2e1;color:#8f1d18;border:1px solid #e8a29e}
.mark.gone{background:#e8edf2;color:#37414b;border:1px solid #b8c2cc}
.att{margin-top:4px;font-size:14px}.att img{display:block;max-width:360px;max-height:280px;
 margin-top:4px;border:1px solid #e3e6ea}
.system{font-size:13px;color:#6b7785;margin:6px 4px}
.reactions{font-size:12px;color:#6b7785;margin-top:4px}
"""


class _Room:
    """The relations among a room's events, computed once for the transcript."""

    def __init__(self, events: Sequence[Mapping[str, Any]],
                 marks: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> None:
        self.marks = marks or {}
        self.by_id: dict[str, Mapping[str, Any]] = {}
        for ev in events:
            eid = _str(ev.get("event_id"))
            if eid:
                self.by_id[eid] = ev
        self.redactions: dict[str, Mapping[str, Any]] = {}
        for ev in events:
            target = redaction_target(ev)
            if target is not None and target not in self.redactions:
                self.redactions[target] = ev
        self.edits: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        self.reactions: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        self.threads: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        self.top: list[Mapping[str, Any]] = []
        for ev in events:
            eid = _str(ev.get("event_id")) or ""
            if redaction_target(ev) in self.by_id:
                continue  # shown on the message it removed
            target = edit_target(ev)
            original = self.by_id.get(target) if target is not None else None
            # Clients ignore edits by anyone but the original sender; so does the transcript.
            if (target is not None and original is not None
                    and original.get("sender") == ev.get("sender")):
                if eid not in self.redactions:
                    self.edits[target].append(ev)
                continue
            rel = _relation(ev)
            if (ev.get("type") == "m.reaction" and rel.get("rel_type") == "m.annotation"
                    and _str(rel.get("event_id")) in self.by_id):
                if eid not in self.redactions:
                    self.reactions[rel["event_id"]].append(ev)
                continue
            root = thread_root(ev)
            if root is not None and root in self.by_id and root != eid:
                self.threads[root].append(ev)
                continue
            self.top.append(ev)


def _name_html(user: str | None, names: Mapping[str, str]) -> str:
    user = user or "?"
    name = names.get(user)
    if name and name != user:
        return (f'<span class="name">{html.escape(name)}</span> '
                f'<span class="uid">{html.escape(user)}</span>')
    return f'<span class="name">{html.escape(user)}</span>'


def _who(user: str | None, names: Mapping[str, str]) -> str:
    """Plain-text ``Name (@user:server)`` for system lines (escaped by the caller)."""
    user = user or "?"
    name = names.get(user)
    return f"{name} ({user})" if name and name != user else user


def membership_line(event: Mapping[str, Any], names: Mapping[str, str]) -> str:
    """One readable line for an ``m.room.member`` event (plain text, not escaped)."""
    content = _content(event)
    unsigned = event.get("unsigned") if isinstance(event.get("unsigned"), Mapping) else {}
    prev = unsigned.get("prev_content") or event.get("prev_content") or {}
    prev = prev if isinstance(prev, Mapping) else {}
    sender = _str(event.get("sender"))
    target = _str(event.get("state_key"))
    who, by = _who(target, names), _who(sender, names)
    new, old = content.get("membership"), prev.get("membership")
    if new == "join" and old == "join":
        name, old_name = _str(content.get("displayname")), _str(prev.get("displayname"))
        if name != old_name:
            line = (f"{who} changed their display name to {name}" if name
                    else f"{who} removed their display name")
        else:
            line = f"{who} changed their profile"
    elif new == "join":
        line = f"{who} joined"
    elif new == "invite":
        line = f"{by} invited {who}"
    elif new == "knock":
        line = f"{who} asked to join"
    elif new == "ban":
        line = f"{by} banned {who}"
    elif new == "leave" and sender == target:
        line = f"{who} rejected the invitation" if old == "invite" else f"{who} left"
    elif new == "leave":
        line = {"ban": f"{by} unbanned {who}", "invite": f"{by} withdrew the invitation of {who}"
                }.get(str(old), f"{by} removed {who}")
    else:
        line = f"{by} changed the membership of {who} to {new}"
    reason = _str(content.get("reason"))
    return f"{line}: {reason}" if reason else line


def system_line(event: Mapping[str, Any], names: Mapping[str, str]) -> str | None:
    """A one-line description of a state event (plain text), None for messages."""
    etype = event.get("type")
    if "state_key" not in event or etype in MESSAGE_TYPES:
        return None
    content = _content(event)
    by = _who(_str(event.get("sender")), names)
    if etype == "m.room.member":
        return membership_line(event, names)
    if etype == "m.room.create":
        return f"{by} created the room"
    if etype == "m.room.name":
        name = _str(content.get("name"))
        return f"{by} named the room {name}" if name else f"{by} removed the room name"
    if etype == "m.room.topic":
        topic = _str(content.get("topic"))
        return f"{by} set the topic to {topic}" if topic else f"{by} removed the topic"
    if etype == "m.room.encryption":
        return f"{by} turned on end-to-end encryption"
    if etype == "m.room.retention":
        return f"{by} set the retention state ({orjson.dumps(content).decode()})"
    return f"{by} changed {etype}"


def _attachment_html(event: Mapping[str, Any], media_href: Mapping[str, str]) -> str:
    mxc = attachment_mxc(event)
    if mxc is None:
        return ""
    name, mimetype, size = attachment_info(event)
    detail = ", ".join(x for x in (mimetype or "", _size(size)) if x)
    detail_html = f" ({html.escape(detail)})" if detail else ""
    href = media_href.get(mxc)
    if href is None:
        return (f'<div class="att">Attachment: <a href="{html.escape(mxc)}">{html.escape(name)}'
                f"</a>{detail_html} <span class=\"uid\">not in the archive: "
                f"{html.escape(mxc)}</span></div>")
    img = ""
    kind = _content(event).get("msgtype")
    if kind == "m.image" or event.get("type") == "m.sticker":
        img = f'<img src="{html.escape(href)}" alt="{html.escape(name)}" loading="lazy">'
    return (f'<div class="att">Attachment: <a href="{html.escape(href)}" '
            f'download="{html.escape(name)}">{html.escape(name)}</a>{detail_html}{img}</div>')


def _snippet(event: Mapping[str, Any], room: _Room) -> str:
    eid = _str(event.get("event_id")) or ""
    if eid in room.redactions or is_redacted(event):
        return DELETED_TEXT
    edits = room.edits.get(eid)
    text = plain_text(edits[-1] if edits else event)
    if is_attachment(event) and not text:
        text = attachment_info(event)[0]
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET else text[:SNIPPET - 1] + "…"


def _message_html(event: Mapping[str, Any], room: _Room, names: Mapping[str, str],
                  media_href: Mapping[str, str], *, in_thread: bool) -> str:
    eid = _str(event.get("event_id")) or ""
    etype = event.get("type")
    content = _content(event)
    classes = ["msg"]
    parts: list[str] = []
    redaction = room.redactions.get(eid)
    edits = room.edits.get(eid, [])
    meta = [_name_html(_str(event.get("sender")), names),
            f'<time datetime="{iso_utc(event.get("origin_server_ts"))}">'
            f'{_readable_utc(event.get("origin_server_ts"))}</time>']
    if edits and redaction is None:
        when = _readable_utc(edits[-1].get("origin_server_ts"))
        meta.append(f'<span class="edited">(edited {when})</span>')
    if in_thread:
        meta.insert(0, '<span class="thread-mark">&#8627; in thread</span>')
    parts.append(f'<div class="meta">{" ".join(meta)}<a class="eid" href="#{anchor(eid)}">'
                 f"{html.escape(eid)}</a></div>")

    parent = reply_to(event)
    if parent is not None and not is_reply_fallback(event):
        target = room.by_id.get(parent)
        if target is not None:
            who = html.escape(names.get(_str(target.get("sender")) or "", "")
                              or _str(target.get("sender")) or "?")
            parts.append(f'<blockquote class="reply">In reply to <a href="#{anchor(parent)}">'
                         f"{who}</a>: {html.escape(_snippet(target, room))}</blockquote>")
        else:
            parts.append(f'<blockquote class="reply">In reply to {html.escape(parent)} '
                         "(not in this export)</blockquote>")
    root = thread_root(event)
    if root is not None and root not in room.by_id:
        parts.append(f'<div class="thread-mark">in thread {html.escape(root)} '
                     "(root not in this export)</div>")
    target = edit_target(event)
    if target is not None:
        # An edit whose original is outside the export (or is not the sender's own message).
        parts.append(f'<div class="edited">edit of {html.escape(target)}</div>')

    text = plain_text(event)
    if redaction is not None or is_redacted(event):
        classes.append("deleted")
        by = redaction or event["unsigned"]["redacted_because"]
        by = by if isinstance(by, Mapping) else {}
        reason = _str(_content(by).get("reason"))
        line = (f"{DELETED_TEXT} by {_who(_str(by.get('sender')), names)} "
                f"at {_readable_utc(by.get('origin_server_ts'))}")
        if reason:
            line += f": {reason}"
        parts.append(f'<div class="body">{html.escape(line)}</div>')
        # The archive keeps what was said; an eDiscovery export must show it, marked, and
        # shown (not collapsed): a printout or a reviewer's first look must carry it
        if text.strip() or attachment_mxc(event):
            parts.append('<div class="archived"><div class="archived-label">archived content '
                         "before deletion</div>"
                         f'<div class="body">{html.escape(text)}</div>'
                         f"{_attachment_html(event, media_href)}</div>")
    elif etype == "m.room.encrypted":
        classes.append("encrypted")
        parts.append(f'<div class="body">{html.escape(ENCRYPTED_TEXT)}</div>')
    else:
        if content.get("msgtype") == "m.notice":
            classes.append("notice")
        shown = plain_text(edits[-1]) if edits else text
        if content.get("msgtype") == "m.emote":
            shown = f"* {names.get(_str(event.get('sender')) or '', event.get('sender'))} {shown}"
        if etype not in ("m.room.message", "m.sticker"):
            shown = f"[{etype}] {shown}".rstrip()
        if not is_attachment(event) or shown.strip() != attachment_info(event)[0]:
            parts.append(f'<div class="body">{html.escape(shown)}</div>')
        parts.append(_attachment_html(event, media_href))
        if content.get("msgtype") == "m.location" and _str(content.get("geo_uri")):
            parts.append(f'<div class="uid">{html.escape(content["geo_uri"])}</div>')
        if edits:
            history = [f"<div><b>original</b> {_readable_utc(event.get('origin_server_ts'))}:"
                       f' <span class="body">{html.escape(text)}</span></div>']
            for ed in edits[:-1]:
                history.append(f"<div><b>edit</b> {_readable_utc(ed.get('origin_server_ts'))}:"
                               f' <span class="body">{html.escape(plain_text(ed))}</span></div>')
            parts.append("<details><summary>original text and earlier versions</summary>"
                         + "".join(history) + "</details>")
    marks = room.marks.get(eid)
    if marks:
        parts.append('<div class="marks">' + "".join(
            f'<span class="mark {html.escape(kind)}">{html.escape(text)}</span>'
            for kind, text in marks) + "</div>")
    reactions = room.reactions.get(eid)
    if reactions:
        keyed: dict[str, list[str]] = defaultdict(list)
        for r in reactions:
            key = _str(_relation(r).get("key")) or "?"
            keyed[key].append(_who(_str(r.get("sender")), names))
        line = "; ".join(f"{k} {', '.join(v)}" for k, v in keyed.items())
        parts.append(f'<div class="reactions">Reactions: {html.escape(line)}</div>')
    return (f'<div class="{" ".join(classes)}" id="{anchor(eid)}">'
            + "".join(p for p in parts if p) + "</div>")


def _event_html(event: Mapping[str, Any], room: _Room, names: Mapping[str, str],
                media_href: Mapping[str, str], *, in_thread: bool = False) -> str:
    eid = _str(event.get("event_id")) or ""
    start = f'<div class="system" id="{anchor(eid)}">{_readable_utc(event.get("origin_server_ts"))}'
    line = system_line(event, names)
    if line is not None:
        return f"{start} &middot; {html.escape(line)}</div>"
    target = redaction_target(event)
    if target is not None:  # its message is not in the export
        return (f"{start} &middot; {html.escape(_who(_str(event.get('sender')), names))} deleted "
                f"{html.escape(target)} (not in this export)</div>")
    return _message_html(event, room, names, media_href, in_thread=in_thread)


def render_html(
    room_id: str,
    room_name: str | None,
    events: Sequence[Mapping[str, Any]],
    names: Mapping[str, str],
    media_href: Mapping[str, str],
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    generated_ms: int | None = None,
    marks: Mapping[str, Sequence[tuple[str, str]]] | None = None,
) -> str:
    """A self-contained HTML transcript of one room's events (given in archive order).

    ``names`` maps user ids to display names; ``media_href`` maps ``mxc://`` URIs to the
    (relative) links of copied media. Thread replies are indented under their root, edits
    show the latest text with the original kept, replies quote and link their parent.
    ``generated_ms`` is passed in (no clock read here) and shown in the header. ``marks``:
    event id -> (kind, text) labels shown on the message (``hold``: under a legal hold,
    ``gone``: no longer on the homeserver). The archived text of deleted messages is shown,
    not collapsed, so a printout carries it."""
    room = _Room(events, marks)
    title = room_name or room_id
    blocks: list[str] = []
    for ev in room.top:
        blocks.append(_event_html(ev, room, names, media_href))
        children = room.threads.get(_str(ev.get("event_id")) or "")
        if children:
            n = len(children)
            blocks.append(f'<div class="thread"><div class="thread-mark">Thread: {n} '
                          f'{"reply" if n == 1 else "replies"}</div>'
                          + "".join(_event_html(c, room, names, media_href, in_thread=True)
                                    for c in children)
                          + "</div>")
    span = f"{_readable_utc(since_ms) if since_ms is not None else 'beginning'} to " \
           f"{_readable_utc(until_ms) if until_ms is not None else 'end'}"
    header = [
        ("Room id", room_id),
        ("Export range", span),
        ("Events", str(len(events))),
    ]
    if generated_ms is not None:
        header.append(("Generated", _readable_utc(generated_ms)))
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in header)
    body = "\n".join(blocks) or '<p class="system">No events selected.</p>'
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} - transcript</title><style>{_CSS}</style></head>\n"
        f"<body><header><h1>{html.escape(title)}</h1><dl>{dl}</dl>"
        '<p class="uid">Text is shown as sent in plain form; rich formatting is not '
        "reproduced. Times are UTC.</p></header>\n<main>\n"
        f"{body}\n</main></body></html>\n"
    )


# -- EML ------------------------------------------------------------------------------------
_ATEXT = re.compile(r"[^A-Za-z0-9!#&'*+\-/=?^_`{|}~]")
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
INVALID_DOMAIN = "matrix.invalid"


def _header_text(text: str) -> str:
    # Header values from events: no line breaks or control characters (header injection).
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _mail_parts(matrix_id: str) -> tuple[str, str]:
    """``@alice:corp.example.com`` -> (``alice``, ``corp.example.com``); port dropped."""
    body = matrix_id[1:] if matrix_id[:1] in "@!#$" else matrix_id
    local, _, server = body.partition(":")
    domain = server.rsplit(":", 1)[0] if server.count(":") == 1 else server
    if not _DOMAIN.match(domain):
        domain = INVALID_DOMAIN
    return _ATEXT.sub("_", local) or "unknown", domain


def _directory_address(display: str, email: str | None) -> Address | None:
    """The sender's directory email as a mail address, or None if it is not a usable one."""
    if not email:
        return None
    local, at, domain = email.strip().rpartition("@")
    if not at or not local or _ATEXT.search(local.replace(".", "")) or not _DOMAIN.match(
            domain):
        return None
    try:
        return Address(display_name=display, username=local, domain=domain)
    except (ValueError, IndexError):
        return None


def message_id(event_id: str) -> str:
    """A stable RFC 5322 Message-ID for an event id (reversible: non-atext is %-escaped)."""
    left = "".join(ch if not _ATEXT.match(ch) and ch != "%" else f"%{ord(ch):02X}"
                   for ch in event_id.removeprefix("$"))
    return f"<{left or 'event'}@{INVALID_DOMAIN}>"


def _subject(room_label: str, event: Mapping[str, Any]) -> str:
    text = plain_text(event)
    if is_attachment(event):
        text = attachment_info(event)[0]
    words = _header_text(text).split(" ")
    first = " ".join(words[:SUBJECT_WORDS])
    if len(first) > SUBJECT_CHARS:
        first = first[:SUBJECT_CHARS - 1] + "…"
    elif len(words) > SUBJECT_WORDS:
        first += " …"
    return f"{_header_text(room_label)}: {first or '(no text)'}"


def render_eml(
    room_id: str,
    room_name: str | None,
    event: Mapping[str, Any],
    names: Mapping[str, str],
    attachment: tuple[bytes, str, str] | None,
    *,
    redaction: Mapping[str, Any] | None = None,
    emails: Mapping[str, str] | None = None,
) -> bytes:
    """One message as an RFC 5322 mail (CRLF line ends) for mail-ingesting review tools.

    From is the sender's display name with their directory email (``emails``: user id ->
    email) as address, or ``user@server`` for people the directory does not know;
    Message-ID comes from the event id; replies and thread messages carry
    In-Reply-To/References so mail tools thread them. ``attachment`` is (data, content
    type, file name) of the archived file. ``redaction`` (the event that deleted this one)
    adds a note and a header; the archived text is still included, as the archive kept
    it."""
    sender = _str(event.get("sender")) or "@unknown"
    local, domain = _mail_parts(sender)
    room_local, room_domain = _mail_parts(room_id)
    label = room_name or room_id
    msg = EmailMessage(policy=SMTP)
    display = _header_text(names.get(sender) or sender)
    msg["From"] = _directory_address(display, (emails or {}).get(sender)) or Address(
        display_name=display, username=local, domain=domain)
    msg["To"] = Address(display_name=_header_text(label), username=room_local,
                        domain=room_domain)
    ts = event.get("origin_server_ts")
    ts = ts if isinstance(ts, int) else 0
    msg["Date"] = format_datetime(datetime.fromtimestamp(ts / 1000, tz=UTC))
    msg["Subject"] = _subject(label, event)
    event_id = _str(event.get("event_id")) or ""
    msg["Message-ID"] = message_id(event_id)
    parent = reply_to(event)
    root = thread_root(event) or edit_target(event)
    related = [x for x in dict.fromkeys((root, parent)) if x]
    if related:
        msg["In-Reply-To"] = message_id(related[-1])  # the parent if any, else root
        msg["References"] = " ".join(message_id(x) for x in related)
    msg["X-Matrix-Room-ID"] = _header_text(room_id)
    msg["X-Matrix-Event-ID"] = _header_text(event_id)
    msg["X-Matrix-Sender"] = _header_text(sender)
    msg["X-Matrix-Event-Type"] = _header_text(str(event.get("type")))
    if edit_target(event):
        msg["X-Matrix-Edit-Of"] = _header_text(edit_target(event) or "")
    text = plain_text(event)
    if redaction is not None:
        msg["X-Matrix-Redacted-By"] = _header_text(_str(redaction.get("sender")) or "?")
        reason = _str(_content(redaction).get("reason"))
        note = (f"[{DELETED_TEXT} by {_str(redaction.get('sender')) or '?'} at "
                f"{iso_utc(redaction.get('origin_server_ts'))}{': ' + reason if reason else ''};"
                " archived content follows]\n\n")
        text = note + text
    if not text.endswith("\n"):
        text += "\n"
    msg.set_content(text)
    if attachment is not None:
        data, ctype, filename = attachment
        maintype, _, subtype = ctype.partition("/")
        if not re.fullmatch(r"[\w.+-]+", maintype) or not re.fullmatch(r"[\w.+-]+", subtype):
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(data, maintype=maintype, subtype=subtype,
                           filename=_header_text(filename) or "attachment")
    return msg.as_bytes()


def event_marks(room_id: str, rows: Sequence[ArchivedEvent],
                holds: Sequence[Hold]) -> dict[str, list[tuple[str, str]]]:
    """Labels a reviewer needs on each message: the active legal holds covering it, and
    whether the homeserver no longer has it (purged; the archive's copy is what is shown).
    Pure: the index rows and holds are given."""
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        marks = [("hold", f"legal hold {h.id} (case {h.case_id})") for h in holds
                 if h.active() and h.matches(room_id, r.sender, r.ts)]
        if r.purged_at is not None and r.state_key is None:
            marks.append(("gone", "gone from the homeserver (purged "
                                  f"{_readable_utc(r.purged_at)}); archived copy"))
        if marks:
            out[r.event_id] = marks
    return out


_EXT_RE = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


def media_extension(content_type: str | None, filename: str | None) -> str:
    """A file extension for an exported media file, so viewers open it: from the content
    type (``image/png`` -> ``.png``), else from the sender's file name, else ``.bin``."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    ext = mimetypes.guess_extension(ctype) if ctype else None
    if ext is None and filename:
        ext = PurePosixPath(filename).suffix.lower() or None
    return ext if ext is not None and _EXT_RE.match(ext) else ".bin"


# -- orchestration --------------------------------------------------------------------------
async def resolve_selection(store: Store, req: ExportRequest) -> Selection:
    """Combine the request with its hold (if any): the hold selects, the request narrows."""
    rooms, users = tuple(req.rooms), tuple(req.users)
    since, until = req.since_ms, req.until_ms
    if req.hold_id is None:
        return Selection(rooms, users, since, until)
    hold = await store.hold_get(req.hold_id)
    if hold is None:
        raise ValueError(f"no legal hold with id {req.hold_id!r}")
    empty = False

    def narrow(a: tuple[str, ...], b: Sequence[str]) -> tuple[str, ...]:
        nonlocal empty
        if not a:
            return tuple(b)
        if not b:
            return a
        both = tuple(x for x in a if x in set(b))
        empty = empty or not both
        return both

    rooms = narrow(rooms, tuple(hold.rooms))
    users = narrow(users, tuple(hold.users))
    if hold.since_ms is not None:
        since = hold.since_ms if since is None else max(since, hold.since_ms)
    if hold.until_ms is not None:
        until = hold.until_ms if until is None else min(until, hold.until_ms)
    if since is not None and until is not None and since > until:
        empty = True
    return Selection(rooms, users, since, until, empty)


async def directory_emails(store: Store) -> dict[str, str]:
    """User id -> the person's directory email (the last directory view, then what Enclave
    provisioned, so leavers keep theirs)."""
    out = {r.user_id: r.email for r in await store.directory_people() if r.email}
    out.update({r.user_id: r.email for r in await store.directory_view() if r.email})
    return out


async def _rows(store: Store, room_id: str, *, senders: Sequence[str] | None,
                since_ms: int | None, until_ms: int | None) -> list[ArchivedEvent]:
    """Every index row of a room matching the filters, in archive order (keyset pages)."""
    out: list[ArchivedEvent] = []
    after: tuple[int, str, int] | None = None
    while True:
        page = await store.archive_query(
            room_id=room_id, senders=senders, since_ms=since_ms, until_ms=until_ms,
            include_purged=True, after=after, limit=PAGE, archive_order=True,
        )
        out.extend(page)
        if len(page) < PAGE:
            return out
        last = page[-1]
        after = (last.ts, last.segment, last.line)


async def _read(archive: ArchiveWriter, rows: Sequence[ArchivedEvent]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(0, len(rows), PAGE):
        out.extend(await archive.read(rows[i:i + PAGE]))
    return out


class _Files:
    """Writes the export's files, remembering the SHA-256 and size of each (blocking I/O;
    called through :func:`asyncio.to_thread`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: dict[str, tuple[str, int]] = {}

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written[rel] = (hashlib.sha256(data).hexdigest(), len(data))

    def append(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(data)

    def finish(self, rel: str) -> None:
        """Record a file written in several appends (hashed once, at the end)."""
        path = self.root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.written[rel] = (h.hexdigest(), path.stat().st_size)

    def copy(self, rel: str, src: Path, sha256: str) -> bool:
        """Copy an archived media file; False (and nothing written) if it is not intact."""
        dst = self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        h = hashlib.sha256()
        with dst.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != sha256:
            dst.unlink()
            return False
        self.written[rel] = (sha256, dst.stat().st_size)
        return True

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def check_empty(self) -> None:
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"export directory {self.root} is not empty")
        self.root.mkdir(parents=True, exist_ok=True)


async def export_archive(
    archive: ArchiveWriter,
    store: Store,
    out_dir: Path,
    req: ExportRequest,
    *,
    clock_ms: Callable[[], int] | None = None,
) -> ExportReport:
    """Export the selected archived events to ``out_dir`` (which must be empty or absent).

    Rooms are exported in room id order, each room's events in archive order: the order
    of the room's hash chain (segment, line), i.e. the order Enclave received and archived
    them, which ``archive verify`` proves. Not by ``origin_server_ts``: that is the
    sending server's clock, which can be wrong or forged. Display names and the room name
    come from all of the room's archived member/name events, also those outside the
    selection. Media of selected events is copied when the archive holds it (verified
    against its SHA-256)."""
    unknown = set(req.formats) - FORMATS
    if unknown or not req.formats:
        raise ValueError(f"unknown export formats {sorted(unknown)}; use {sorted(FORMATS)}")
    now = clock_ms() if clock_ms is not None else int(time.time() * 1000)
    sel = await resolve_selection(store, req)
    files = _Files(out_dir)
    await asyncio.to_thread(files.check_empty)

    from .service import hold_from_record

    holds = [hold_from_record(h) for h in await store.holds()]
    emails = await directory_emails(store)
    room_ids = list(sel.rooms) if sel.rooms else sorted(await store.archive_rooms())
    room_ids = sorted(dict.fromkeys(room_ids))
    senders = list(sel.users) or None
    total_events = 0
    media_copied: dict[str, str] = {}  # sha256 -> relative path
    rooms_meta: list[dict[str, Any]] = []
    jsonl = "events.jsonl"
    for room_id in [] if sel.empty else room_ids:
        rows = await _rows(store, room_id, senders=senders, since_ms=sel.since_ms,
                           until_ms=sel.until_ms)
        if not rows:
            continue
        events = await _read(archive, rows)
        total_events += len(events)
        if "jsonl" in req.formats:
            data = b"".join(orjson.dumps(ev, option=orjson.OPT_SORT_KEYS) + b"\n"
                            for ev in events)
            await asyncio.to_thread(files.append, jsonl, data)

        # Names and the room name as the whole archived room knows them.
        context_rows = [r for r in await _rows(store, room_id, senders=None, since_ms=None,
                                               until_ms=None)
                        if r.type in ("m.room.member", "m.room.name", "m.room.canonical_alias")]
        context = await _read(archive, context_rows)
        names = display_names(context)
        name = room_name(context)

        media_href: dict[str, str] = {}
        attachments: dict[str, tuple[bytes, str, str]] = {}
        for ev in events:
            mxc = attachment_mxc(ev)
            if mxc is None or mxc in media_href:
                continue
            record = await store.archive_media_get(mxc)
            # deleted_at: gone from the homeserver; the archive's copy is what we export
            src = None if record is None else archive.media_path(record.sha256)
            if record is None or src is None:
                continue  # never archived, or pruned from the archive: link the mxc URI
            fname, mimetype, _ = attachment_info(ev)
            rel = media_copied.get(record.sha256) or (
                f"media/{record.sha256}"
                f"{media_extension(record.content_type or mimetype, fname)}")
            if record.sha256 not in media_copied:
                if not await asyncio.to_thread(files.copy, rel, src, record.sha256):
                    continue  # damaged copy: link the mxc URI; `archive verify` reports it
                media_copied[record.sha256] = rel
            media_href[mxc] = MEDIA_HREF_PREFIX + rel.removeprefix("media/")
            if "eml" in req.formats:
                data = await asyncio.to_thread(files.read, rel)
                attachments[mxc] = (data, record.content_type or mimetype
                                    or "application/octet-stream", fname)

        room_dir = f"rooms/{safe_name(room_id)}"
        if "html" in req.formats:
            page = render_html(room_id, name, events, names, media_href,
                               since_ms=sel.since_ms, until_ms=sel.until_ms, generated_ms=now,
                               marks=event_marks(room_id, rows, holds))
            await asyncio.to_thread(files.write, f"{room_dir}/transcript.html", page.encode())
        if "eml" in req.formats:
            redactions: dict[str, Mapping[str, Any]] = {}
            for ev in events:
                target = redaction_target(ev)
                if target is not None:
                    redactions.setdefault(target, ev)
            n = 0
            for ev in events:
                if ev.get("type") not in MESSAGE_TYPES:
                    continue
                n += 1
                eid = _str(ev.get("event_id")) or ""
                mxc = attachment_mxc(ev)
                mail = render_eml(room_id, name, ev, names,
                                  attachments.get(mxc) if mxc else None,
                                  redaction=redactions.get(eid), emails=emails)
                await asyncio.to_thread(
                    files.write, f"{room_dir}/eml/{n:04d}-{safe_name(eid)}.eml", mail)
        rooms_meta.append({
            "room_id": room_id, "name": name, "dir": room_dir, "events": len(events),
            "first_ts": rows[0].ts, "last_ts": rows[-1].ts,
            "purged": sum(1 for r in rows if r.purged_at is not None),
        })

    if "jsonl" in req.formats:
        await asyncio.to_thread(files.finish, jsonl)
    manifest = {
        "format": "enclave-export/1",
        "generated_at": iso_utc(now),
        "request": {
            "rooms": list(req.rooms), "users": list(req.users), "since_ms": req.since_ms,
            "until_ms": req.until_ms, "hold_id": req.hold_id, "formats": sorted(req.formats),
        },
        "selection": {
            "rooms": list(sel.rooms), "users": list(sel.users), "since_ms": sel.since_ms,
            "until_ms": sel.until_ms,
        },
        "counts": {"rooms": len(rooms_meta), "events": total_events,
                   "media": len(media_copied)},
        "rooms": rooms_meta,
        "files": {rel: {"sha256": sha, "bytes": size}
                  for rel, (sha, size) in sorted(files.written.items())},
    }
    listed = sorted(files.written)
    await asyncio.to_thread(
        files.write, "manifest.json",
        orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    return ExportReport(out_dir=out_dir, rooms=len(rooms_meta), events=total_events,
                        media=len(media_copied), files=(*listed, "manifest.json"))

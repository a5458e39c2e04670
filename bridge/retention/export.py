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

The renderers (:func:`bridge.retention.transcript.render_html`, :func:`render_eml`) are
pure: they take the events and the names and return text/bytes, so they are tested without
any I/O. Everything taken from an event is untrusted: the HTML comes from a Jinja2 template
with autoescape, ``formatted_body`` is never used (only the plain ``body``), and links point
only at copied media files or ``mxc://`` URIs.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import mimetypes
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import orjson

from ..kernel.relations import (
    content_of,
    edit_target,
    redaction_target,
    reply_to,
    thread_root,
)
from ..kernel.spreadsheet import csv_cell
from ..kernel.timestamps import iso_utc, utc_datetime
from ..policy.lineage import Lineage, Redaction, Version, message_lineage
from ..policy.readers import Readers, replay_readers
from .events import (
    DELETED_TEXT,
    MESSAGE_TYPES,
    attachment_info,
    attachment_mxc,
    decrypted_of,
    display_names,
    is_attachment,
    plain_text,
    readable_utc_label,
    room_name,
    safe_name,
)
from .events import str_or_none as _str
from .holds import hold_from_record
from .transcript import render_html

if TYPE_CHECKING:
    from ..policy.retention import Hold
    from ..store.base import ArchivedEvent
    from ..store.domains import ArchiveIndexStore, DirectoryStore, HoldStore
    from .archive import ArchiveWriter

FORMATS = frozenset({"jsonl", "html", "eml", "csv"})
DEFAULT_FORMATS = frozenset({"jsonl", "html", "eml"})
PAGE = 1000  # index rows per archive_query page (and events per archive.read)
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
    formats: frozenset[str] = DEFAULT_FORMATS


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


EML_READERS_LISTED = 100  # a header of thousands of ids helps nobody; events.jsonl has all


def _listed(users: Sequence[str]) -> str:
    text = ", ".join(users[:EML_READERS_LISTED])
    if len(users) > EML_READERS_LISTED:
        text += f", and {len(users) - EML_READERS_LISTED} more (see events.jsonl)"
    return _header_text(text)


def render_eml(
    room_id: str,
    room_name: str | None,
    event: Mapping[str, Any],
    names: Mapping[str, str],
    attachment: tuple[bytes, str, str] | None,
    *,
    redaction: Mapping[str, Any] | None = None,
    emails: Mapping[str, str] | None = None,
    readers: Readers | None = None,
    edits: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """One message as an RFC 5322 mail (CRLF line ends) for mail-ingesting review tools.

    From is the sender's display name with their directory email (``emails``: user id ->
    email) as address, or ``user@server`` for people the directory does not know;
    Message-ID comes from the event id; replies and thread messages carry
    In-Reply-To/References so mail tools thread them. ``attachment`` is (data, content
    type, file name) of the archived file. ``redaction`` (the event that deleted this one)
    adds a note and a header; the archived text is still included, as the archive kept
    it. ``readers`` (who could read it when sent) become ``X-Matrix-Readers`` headers;
    ``edits`` (its valid edits, in order) a count header and an edit history after the
    text."""
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
    msg["Date"] = format_datetime(utc_datetime(ts))
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
    if readers is not None:
        msg["X-Matrix-History-Visibility"] = _header_text(readers.history_visibility)
        msg["X-Matrix-Readers-Count"] = str(len(readers.could_read))
        msg["X-Matrix-Readers"] = _listed(readers.could_read) or "none"
        if readers.later_joiners:
            msg["X-Matrix-Later-Readers"] = _listed(readers.later_joiners)
    if edits:
        msg["X-Matrix-Edits"] = str(len(edits))
    text = plain_text(event)
    if edits:
        text = text.rstrip("\n") + "\n\n[edit history]\n" + "\n".join(
            f"{iso_utc(ed.get('origin_server_ts'))} edited to: {plain_text(ed)}"
            for ed in edits)
    if redaction is not None:
        msg["X-Matrix-Redacted-By"] = _header_text(_str(redaction.get("sender")) or "?")
        reason = _str(content_of(redaction).get("reason"))
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


# -- who could read it, and what it was before an edit ----------------------------------
def readers_record(readers: Readers) -> dict[str, Any]:
    """The ``readers`` object of a message's JSON Lines record."""
    return {"history_visibility": readers.history_visibility, "joined": list(readers.joined),
            "invited": list(readers.invited), "could_read": list(readers.could_read),
            "anyone": readers.anyone}


def _redaction_record(r: Redaction | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"event_id": r.event_id, "by": r.by, "ts": r.ts, "iso": iso_utc(r.ts),
            "reason": r.reason}


def _version_record(v: Version, by_id: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    ev = by_id.get(v.event_id)
    out: dict[str, Any] = {"event_id": v.event_id, "sender": v.sender, "ts": v.ts,
                           "iso": iso_utc(v.ts), "body": plain_text(ev) if ev else None,
                           "content": dict(v.content)}
    if v.redaction is not None:
        out["redaction"] = _redaction_record(v.redaction)
    if v.rejected is not None:
        out["rejected"] = v.rejected
    return out


def lineage_record(lineage: Lineage, by_id: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``lineage`` object of a message's JSON Lines record: the original (as archived),
    each valid edit, the edits clients ignore (with why), the redaction and the text
    clients show now (none once redacted)."""
    current = lineage.current
    cur_ev = by_id.get(current.event_id)
    return {
        "original": _version_record(lineage.original, by_id),
        "edits": [_version_record(v, by_id) for v in lineage.edits],
        "rejected_edits": [_version_record(v, by_id) for v in lineage.rejected_edits],
        "redaction": _redaction_record(lineage.redaction),
        "archived_redacted": lineage.archived_redacted,
        "current_body": (None if lineage.redaction is not None or cur_ev is None
                         else plain_text(cur_ev)),
    }


def export_record(event: Mapping[str, Any], room_name: str | None,
                  readers: Mapping[str, Readers], lineages: Mapping[str, Lineage],
                  by_id: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One JSON Lines record: the archived event as stored, and for a non-state event the
    room's name, ``readers`` (who could read it when it was sent), ``could_read_later``
    (``shared``/``world_readable``: who joined afterwards) and ``lineage`` (a message's
    original, edits and redaction; for an edit or a redaction, what it changed)."""
    out = dict(event)
    eid = _str(event.get("event_id")) or ""
    r = readers.get(eid)
    if r is None:
        return out
    out["room_name"] = room_name
    out["readers"] = readers_record(r)
    out["could_read_later"] = list(r.later_joiners)
    lin = lineages.get(eid)
    if lin is not None:
        out["lineage"] = lineage_record(lin, by_id)
    elif edit_target(event) is not None:
        target = edit_target(event) or ""
        original = lineages.get(target)
        rejected = (None if original is None else next(
            (v.rejected for v in original.rejected_edits if v.event_id == eid), None))
        out["lineage"] = {"edit_of": target, "rejected": rejected,
                          "original_archived": original is not None}
    elif redaction_target(event) is not None:
        out["lineage"] = {"redacts": redaction_target(event)}
    return out


CSV_COLUMNS = (
    "room_id", "room_name", "event_id", "ts_iso", "sender", "type", "body", "current_body",
    "history_visibility", "readers_count", "readers", "invited_at_send", "could_read_later",
    "world_readable", "edits", "rejected_edits", "redacted_by", "redacted_at",
    "redaction_reason", "attachment",
)
def csv_rows(room_id: str, room_name: str | None, events: Sequence[Mapping[str, Any]],
             readers: Mapping[str, Readers], lineages: Mapping[str, Lineage],
             by_id: Mapping[str, Mapping[str, Any]],
             media_rel: Mapping[str, str]) -> list[list[str]]:
    """One row per message (edits and redactions are columns of the message they change),
    every cell through :func:`csv_cell`. ``media_rel``: mxc -> the copied file's path."""
    rows: list[list[str]] = []
    for ev in events:
        eid = _str(ev.get("event_id")) or ""
        lin = lineages.get(eid)
        if ev.get("type") not in MESSAGE_TYPES or lin is None:
            continue
        r = readers.get(eid)
        cur = by_id.get(lin.current.event_id)
        red = lin.redaction
        mxc = attachment_mxc(ev)
        rows.append([csv_cell(v) for v in (
            room_id, room_name, eid, iso_utc(ev.get("origin_server_ts")), ev.get("sender"),
            ev.get("type"), plain_text(ev),
            None if red is not None or cur is None else plain_text(cur),
            r.history_visibility if r else None, len(r.could_read) if r else None,
            "; ".join(r.could_read) if r else None, "; ".join(r.invited) if r else None,
            "; ".join(r.later_joiners) if r else None,
            ("yes" if r.anyone else "no") if r else None, len(lin.edits),
            len(lin.rejected_edits), red.by if red else None,
            iso_utc(red.ts) if red else None, red.reason if red else None,
            (media_rel.get(mxc) or mxc) if mxc else None)])
    return rows


def render_csv(rows: Sequence[Sequence[str]]) -> bytes:
    """The CSV file: a header line then ``rows`` (RFC 4180 quoting, CRLF, UTF-8)."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    w.writerows(rows)
    return buf.getvalue().encode()


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
                                  f"{readable_utc_label(r.purged_at)}); archived copy"))
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
async def resolve_selection(holds: HoldStore, req: ExportRequest) -> Selection:
    """Combine the request with its hold (if any): the hold selects, the request narrows."""
    rooms, users = tuple(req.rooms), tuple(req.users)
    since, until = req.since_ms, req.until_ms
    if req.hold_id is None:
        return Selection(rooms, users, since, until)
    hold = await holds.hold_get(req.hold_id)
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


async def directory_emails(directory_store: DirectoryStore) -> dict[str, str]:
    """User id -> the person's directory email (the last directory view, then what Enclave
    provisioned, so leavers keep theirs)."""
    out = {r.user_id: r.email for r in await directory_store.directory_people() if r.email}
    out.update({r.user_id: r.email for r in await directory_store.directory_view() if r.email})
    return out


async def _rows(index: ArchiveIndexStore, room_id: str, *, senders: Sequence[str] | None,
                since_ms: int | None, until_ms: int | None) -> list[ArchivedEvent]:
    """Every index row of a room matching the filters, in archive order (keyset pages)."""
    out: list[ArchivedEvent] = []
    after: tuple[int, str, int] | None = None
    while True:
        page = await index.archive_query(
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

    def copy(self, rel: str, src: Path | bytes, sha256: str) -> bool:
        """Copy an archived media file (its path, or its bytes); False (and nothing
        written) if it is not intact."""
        dst = self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dst.write_bytes(src)
        else:
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
    index: ArchiveIndexStore,
    holds: HoldStore,
    directory_store: DirectoryStore,
    out_dir: Path,
    req: ExportRequest,
    *,
    clock_ms: Callable[[], int],
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
    now = clock_ms()
    sel = await resolve_selection(holds, req)
    files = _Files(out_dir)
    await asyncio.to_thread(files.check_empty)

    active_holds = [hold_from_record(h) for h in await holds.holds()]
    emails = await directory_emails(directory_store)
    room_ids = list(sel.rooms) if sel.rooms else sorted(await index.archive_rooms())
    room_ids = sorted(dict.fromkeys(room_ids))
    senders = list(sel.users) or None
    total_events = 0
    media_copied: dict[str, str] = {}  # sha256 -> relative path
    rooms_meta: list[dict[str, Any]] = []
    jsonl = "events.jsonl"
    csv_out: list[list[str]] = []
    subject_rooms: list[dict[str, Any]] = []
    for room_id in [] if sel.empty else room_ids:
        rows = await _rows(index, room_id, senders=senders, since_ms=sel.since_ms,
                           until_ms=sel.until_ms)
        if not rows:
            continue
        # The whole archived room: names, who could read each message (membership replayed
        # from the room's start) and each message's edits and redaction, also where they
        # are outside the selection (another sender, another date).
        all_events = await _read(archive, await _rows(index, room_id, senders=None,
                                                      since_ms=None, until_ms=None))
        by_id = {ev["event_id"]: ev for ev in all_events if isinstance(ev.get("event_id"), str)}
        events = [by_id[r.event_id] for r in rows if r.event_id in by_id]
        total_events += len(events)
        names = display_names(all_events)
        name = room_name(all_events)
        readers = replay_readers(all_events, stands_for=decrypted_of)
        lineages = message_lineage(all_events, stands_for=decrypted_of)
        if "jsonl" in req.formats:
            data = b"".join(orjson.dumps(export_record(ev, name, readers, lineages, by_id),
                                         option=orjson.OPT_SORT_KEYS) + b"\n"
                            for ev in events)
            await asyncio.to_thread(files.append, jsonl, data)

        media_href: dict[str, str] = {}
        media_rel: dict[str, str] = {}
        attachments: dict[str, tuple[bytes, str, str]] = {}
        for ev in events:
            mxc = attachment_mxc(ev)
            if mxc is None or mxc in media_href:
                continue
            record = await index.archive_media_get(mxc)
            # deleted_at: gone from the homeserver; the archive's copy is what we export
            if record is None:
                continue  # never archived: link the mxc URI
            # a local archive hands its file; an object store the bytes
            src: Path | bytes | None = archive.media_path(record.sha256)
            if src is None:
                src = await archive.read_media(record.sha256)
            if src is None:
                continue  # pruned from the archive: link the mxc URI
            fname, mimetype, _ = attachment_info(ev)
            rel = media_copied.get(record.sha256) or (
                f"media/{record.sha256}"
                f"{media_extension(record.content_type or mimetype, fname)}")
            if record.sha256 not in media_copied:
                if not await asyncio.to_thread(files.copy, rel, src, record.sha256):
                    continue  # damaged copy: link the mxc URI; `archive verify` reports it
                media_copied[record.sha256] = rel
            media_href[mxc] = MEDIA_HREF_PREFIX + rel.removeprefix("media/")
            media_rel[mxc] = rel
            if "eml" in req.formats:
                data = await asyncio.to_thread(files.read, rel)
                attachments[mxc] = (data, record.content_type or mimetype
                                    or "application/octet-stream", fname)

        room_dir = f"rooms/{safe_name(room_id)}"
        if "html" in req.formats:
            page = render_html(room_id, name, events, names, media_href,
                               since_ms=sel.since_ms, until_ms=sel.until_ms, generated_ms=now,
                               marks=event_marks(room_id, rows, active_holds),
                               readers=readers, context=all_events)
            await asyncio.to_thread(files.write, f"{room_dir}/transcript.html", page.encode())
        if "eml" in req.formats:
            redactions: dict[str, Mapping[str, Any]] = {}
            for ev in all_events:
                target = redaction_target(ev)
                if target is not None:
                    redactions.setdefault(target, ev)
            for ev in all_events:  # a plaintext record is deleted with its ciphertext
                of = decrypted_of(ev)
                if of is not None and of in redactions:
                    redactions.setdefault(str(ev["event_id"]), redactions[of])
            n = 0
            for ev in events:
                if ev.get("type") not in MESSAGE_TYPES:
                    continue
                n += 1
                eid = _str(ev.get("event_id")) or ""
                mxc = attachment_mxc(ev)
                lin = lineages.get(eid)
                mail = render_eml(room_id, name, ev, names,
                                  attachments.get(mxc) if mxc else None,
                                  redaction=redactions.get(eid), emails=emails,
                                  readers=readers.get(eid),
                                  edits=[by_id[v.event_id] for v in lin.edits]
                                  if lin is not None else ())
                await asyncio.to_thread(
                    files.write, f"{room_dir}/eml/{n:04d}-{safe_name(eid)}.eml", mail)
        if "csv" in req.formats:
            csv_out += csv_rows(room_id, name, events, readers, lineages, by_id, media_rel)
        if sel.users:
            subject_rooms.append({
                "room_id": room_id, "name": name,
                # one per message sent: the archive's plaintext of an encrypted one is
                # the same message as its ciphertext
                "messages": sum(1 for ev in events if ev.get("type") in MESSAGE_TYPES
                                and ev.get("event_id") in lineages
                                and decrypted_of(ev) is None),
                "events": len(events), "media": sorted(set(media_rel.values())),
            })
        rooms_meta.append({
            "room_id": room_id, "name": name, "dir": room_dir, "events": len(events),
            "first_ts": rows[0].ts, "last_ts": rows[-1].ts,
            "purged": sum(1 for r in rows if r.purged_at is not None),
        })

    if "csv" in req.formats:
        await asyncio.to_thread(files.write, "messages.csv", render_csv(csv_out))
    if sel.users:
        # a subject-access bundle: what these people sent, room by room, with the files
        await asyncio.to_thread(files.write, "subject.json", orjson.dumps(
            {"users": list(sel.users), "rooms": subject_rooms},
            option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
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

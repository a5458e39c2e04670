"""The archive's formats, pure: file layout, canonical JSON, the hash-chained manifest and
its entries, and how events are grouped into segment appends.

No file is read or written here (:mod:`.files` does that); see the package docstring for
the layout and the chain.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

ZERO_HASH = "0" * 64
MANIFEST = "manifest.jsonl"
SEGMENT_RE = re.compile(r"^seg-(\d{6,})\.jsonl$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
OPS = frozenset({"append", "media", "prune"})
# A quoted room id longer than this is replaced by its hash (file name limits are ~255).
MAX_DIR_NAME = 180


# -- pure helpers --------------------------------------------------------------------------
def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no whitespace)."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The chained hash of a manifest entry: sha256(prev + canonical entry without hash)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(str(entry["prev"]).encode() + canonical(body)).hexdigest()


def room_dir_name(room_id: str) -> str:
    """The directory name of a room: its id percent-quoted, or hashed when too long."""
    name = quote(room_id, safe="")
    if len(name) > MAX_DIR_NAME or name in {".", ".."}:
        return "h-" + hashlib.sha256(room_id.encode()).hexdigest()
    return name


def segment_name(number: int) -> str:
    return f"seg-{number:06d}.jsonl"


def segment_number(name: str) -> int:
    m = SEGMENT_RE.match(name)
    return int(m.group(1)) if m else 0


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def index_fields(ev: Mapping[str, Any]) -> tuple[str, str | None, str, str | None, int] | None:
    """(event_id, sender, type, state_key, ts) of an archivable event, else None."""
    eid, etype, ts = ev.get("event_id"), ev.get("type"), ev.get("origin_server_ts")
    if not isinstance(eid, str) or not eid or not isinstance(etype, str) or not is_int(ts):
        return None
    sender, state_key = ev.get("sender"), ev.get("state_key")
    return (eid, sender if isinstance(sender, str) else None, etype,
            state_key if isinstance(state_key, str) else None, ts)


def entry_error(obj: Any, n: int, room_id: str, prev: str) -> tuple[str, str] | None:
    """(kind, detail) when ``obj`` is not a valid manifest entry number ``n`` after ``prev``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("hash"), str) \
            or not isinstance(obj.get("prev"), str):
        return "manifest_entry", "not a manifest entry"
    if entry_hash(obj) != obj["hash"]:
        return "manifest_entry", "entry hash mismatch: the entry was changed"
    if obj.get("n") != n:
        return "chain", (f"entry number is {obj.get('n')!r} where {n} belongs: an entry was "
                         "removed, added or reordered")
    if obj["prev"] != prev:
        return "chain", f"prev does not link to entry {n - 1}: the chain is broken"
    if obj.get("room") != room_id:
        return "manifest_entry", f"entry belongs to room {obj.get('room')!r}"
    op = obj.get("op")
    if op not in OPS:
        return "manifest_entry", f"unknown op {op!r}"
    ok = True
    if op in ("append", "prune"):
        ok = isinstance(obj.get("segment"), str) and bool(SEGMENT_RE.match(obj["segment"]))
    if op == "append":
        ok = ok and all(is_int(obj.get(k)) and obj[k] >= 0
                        for k in ("offset", "length", "first_line", "count"))
    if op == "media":
        ok = isinstance(obj.get("mxc"), str) and is_int(obj.get("size"))
    if not ok or not isinstance(obj.get("sha256"), str) or not SHA_RE.match(obj["sha256"]):
        return "manifest_entry", f"malformed {op} entry"
    return None


@dataclass
class Manifest:
    entries: list[dict[str, Any]]  # the valid chain from the start
    valid_bytes: int  # bytes of those entries' lines
    lines: int  # complete lines in the file
    partial_tail: bool  # bytes after the last newline
    problem: tuple[int, str, str] | None  # (entry, kind, detail) of the first invalid line


def parse_manifest(data: bytes, room_id: str, *, first: int = 1,
                   prev: str = ZERO_HASH) -> Manifest:
    """Parse a manifest (or its lines from entry ``first`` on, chained to ``prev``); the
    chain stops at the first line that is not a valid link."""
    raw_lines = data.split(b"\n")
    tail = raw_lines.pop()
    entries: list[dict[str, Any]] = []
    pos, problem = 0, None
    for n, raw in enumerate(raw_lines, start=first):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problem = (n, "manifest_entry", "line is not valid JSON")
            break
        err = entry_error(obj, n, room_id, prev)
        if err is not None:
            problem = (n, *err)
            break
        entries.append(obj)
        prev, pos = obj["hash"], pos + len(raw) + 1
    return Manifest(entries, pos, len(raw_lines), bool(tail), problem)


@dataclass
class RoomState:
    """What the writer knows of a room after reconciling its files with the store."""

    entries: int
    head: str
    manifest_bytes: int
    segment: str | None  # where the next append goes; None: a new segment
    last_number: int  # highest segment number used so far
    ends: dict[str, int] = field(default_factory=dict)  # segment -> bytes covered
    lines: dict[str, int] = field(default_factory=dict)  # segment -> lines covered
    pruned: set[str] = field(default_factory=set)
    # segment -> (offset, length, sha256) of each append: where an object store keeps them
    parts: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)


@dataclass
class Chunk:
    segment: str
    offset: int
    first_line: int
    events: list[tuple[tuple[str, str | None, str, str | None, int], bytes]]


def room_path(root: Path, room_id: str) -> Path:
    """A room's directory under the archive root."""
    return root / "rooms" / room_dir_name(room_id)


def media_file(root: Path, sha256: str) -> Path:
    """Where the media file of ``sha256`` lives under the archive root."""
    return root / "media" / sha256[:2] / sha256


def manifest_entry(room_id: str, n: int, prev: str, op: str, at: int,
                   **fields: Any) -> dict[str, Any]:
    """Manifest entry number ``n`` of ``room_id``, chained to ``prev``."""
    entry = {"n": n, "op": op, "room": room_id, "at": at, "prev": prev, **fields}
    entry["hash"] = entry_hash(entry)
    return entry


def plan_chunks(state: RoomState, items: list[tuple[Any, bytes]],
                segment_max_bytes: int) -> list[Chunk]:
    """Group lines into per-segment appends, starting a new segment before one would
    grow past ``segment_max_bytes`` (a single larger event gets a segment of its own)."""
    chunks: list[Chunk] = []
    seg, number = state.segment, state.last_number
    size = state.ends.get(seg, 0) if seg else 0
    lines = state.lines.get(seg, 0) if seg else 0
    for fields_, line in items:
        if seg is None or (size > 0 and size + len(line) > segment_max_bytes):
            number += 1
            seg, size, lines = segment_name(number), 0, 0
        if not chunks or chunks[-1].segment != seg:
            chunks.append(Chunk(seg, size, lines + 1, []))
        chunks[-1].events.append((fields_, line))
        size += len(line)
        lines += 1
    return chunks


def room_state(m: Manifest) -> RoomState:
    """What a room's valid manifest chain says: its head, each segment's extent, the
    pruned segments and where the next append goes."""
    state = RoomState(entries=0, head=ZERO_HASH, manifest_bytes=m.valid_bytes, segment=None,
                      last_number=0)
    advance(state, m.entries)
    return state


def advance(state: RoomState, entries: list[dict[str, Any]]) -> None:
    """Move ``state`` past further valid entries of its chain (in place)."""
    last_append = state.segment
    for e in entries:
        if e["op"] == "append":
            seg = e["segment"]
            state.ends[seg] = e["offset"] + e["length"]
            state.lines[seg] = e["first_line"] + e["count"] - 1
            state.parts.setdefault(seg, []).append((e["offset"], e["length"], e["sha256"]))
            last_append = seg
        elif e["op"] == "prune":
            state.pruned.add(e["segment"])
        if "segment" in e:
            state.last_number = max(state.last_number, segment_number(e["segment"]))
    if entries:
        state.entries, state.head = entries[-1]["n"], entries[-1]["hash"]
    state.segment = last_append if last_append not in state.pruned else None


def append_items(room_id: str, events: Sequence[Mapping[str, Any]],
                 ) -> dict[str, tuple[tuple[str, str | None, str, str | None, int], bytes]]:
    """Event id -> (index fields, segment line) of the events an append is given, first
    copy of each id only, events without the fields to index left out; any writer's
    :meth:`ArchiveWriter.append`. An event naming another room raises ValueError."""
    items: dict[str, tuple[tuple[str, str | None, str, str | None, int], bytes]] = {}
    for ev in events:
        f = index_fields(ev)
        if f is None or f[0] in items:
            continue
        other = ev.get("room_id")
        if other is not None and other != room_id:
            raise ValueError(f"event {f[0]} belongs to {other}, not {room_id}")
        items[f[0]] = (f, canonical(dict(ev)) + b"\n")
    return items

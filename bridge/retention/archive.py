"""The compliance archive: append-only JSON Lines segments, content-addressed media and a
hash-chained manifest per room, indexed in the store.

Layout under the archive root::

    rooms/<quoted room id>/seg-000001.jsonl   one event per line, canonical JSON, append-only
    rooms/<quoted room id>/manifest.jsonl     one entry per write, each chained to the last
    media/<aa>/<sha256>                       media files, named by the hash of their bytes

Every manifest entry carries ``prev`` (the previous entry's hash, 64 zeros for the first)
and ``hash = sha256(prev + canonical JSON of the entry without "hash")``. An append entry
names the segment bytes it added and their sha256, a media entry the file's sha256, a prune
entry the sha256 of the whole segment it deleted. The store keeps the head (entry count and
hash) of every room, so a manifest truncated, extended or rewritten as a whole is detected
as well as an edited line or changed segment bytes.

Crash safety: segment bytes are written and fsynced first, then the manifest line, then
the store commits the index rows and the new head. On the first touch of a room in a
process the files are reconciled with the store: manifest entries past the store head are
indexed (after checking their bytes), a torn manifest line or segment bytes past the last
entry are cut off, and a manifest shorter than the store head refuses further writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import orjson

from ..store.base import ArchivedEvent, ArchivedMedia, ArchiveHead
from ..store.domains import ArchiveIndexStore

ZERO_HASH = "0" * 64
MANIFEST = "manifest.jsonl"
_SEGMENT_RE = re.compile(r"^seg-(\d{6,})\.jsonl$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_OPS = frozenset({"append", "media", "prune"})
# A quoted room id longer than this is replaced by its hash (file name limits are ~255).
_MAX_DIR_NAME = 180


class ArchiveCorrupt(RuntimeError):
    """The archive files do not match the store's head or their own manifest; writes to the
    room are refused (a RuntimeError, so a purge run stops on it like on other failures)."""


class ArchiveWriteError(OSError):
    """An archive write failed; nothing of it was indexed (an OSError: an I/O failure to
    whoever handles those, and a purge run stops on it)."""


@dataclass(frozen=True)
class AppendResult:
    written: int
    skipped: int  # already archived, repeated in the batch, or without an event id


@dataclass(frozen=True)
class VerifyProblem:
    room_id: str
    entry: int | None  # the manifest entry number (1-based), None when no entry applies
    kind: str
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    rooms: int
    entries: int
    events: int
    media: int
    problems: tuple[VerifyProblem, ...]  # per room in entry order: the first broken link first


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    events: int  # indexed events
    first_ts: int | None
    last_ts: int | None
    bytes: int
    sealed: bool  # no further appends go to it


class ArchiveWriter(ABC):
    """Where archived events and media are kept; a local directory today, an object store
    could follow behind the same interface."""

    @abstractmethod
    async def append(self, room_id: str, events: Sequence[Mapping[str, Any]]) -> AppendResult:
        """Archive events of one room, durably, before they are indexed.

        Idempotent by event id (the index and within the batch). Raises
        :class:`ArchiveWriteError` when a write fails; nothing of the batch is indexed then.
        """

    @abstractmethod
    async def put_media(self, room_id: str, event_id: str | None, mxc: str, data: bytes,
                        content_type: str | None, ts: int | None) -> str:
        """Archive a media file referenced by ``event_id``; return its sha256."""

    @abstractmethod
    async def has_media(self, mxc: str) -> bool:
        """Whether the media behind ``mxc`` is in the archive."""

    @abstractmethod
    async def read(self, events: Sequence[ArchivedEvent]) -> list[dict[str, Any]]:
        """The stored JSON of indexed events, in the order given."""

    @abstractmethod
    def media_path(self, sha256: str) -> Path | None:
        """The local file of an archived media hash, or None when absent."""

    @abstractmethod
    async def verify(self, room_id: str | None = None) -> VerifyReport:
        """Check every room's (or one room's) chain, segments, media and head."""

    @abstractmethod
    async def prune_segment(self, room_id: str, segment: str, reason: str) -> int:
        """Delete a segment for the archive's own retention; return index rows dropped."""

    @abstractmethod
    async def segments(self, room_id: str) -> list[SegmentInfo]:
        """The room's segments that are not pruned, by name."""


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
    if len(name) > _MAX_DIR_NAME or name in {".", ".."}:
        return "h-" + hashlib.sha256(room_id.encode()).hexdigest()
    return name


def segment_name(number: int) -> str:
    return f"seg-{number:06d}.jsonl"


def _segment_number(name: str) -> int:
    m = _SEGMENT_RE.match(name)
    return int(m.group(1)) if m else 0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _index_fields(ev: Mapping[str, Any]) -> tuple[str, str | None, str, str | None, int] | None:
    """(event_id, sender, type, state_key, ts) of an archivable event, else None."""
    eid, etype, ts = ev.get("event_id"), ev.get("type"), ev.get("origin_server_ts")
    if not isinstance(eid, str) or not eid or not isinstance(etype, str) or not _is_int(ts):
        return None
    sender, state_key = ev.get("sender"), ev.get("state_key")
    return (eid, sender if isinstance(sender, str) else None, etype,
            state_key if isinstance(state_key, str) else None, ts)


def _entry_error(obj: Any, n: int, room_id: str, prev: str) -> tuple[str, str] | None:
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
    if op not in _OPS:
        return "manifest_entry", f"unknown op {op!r}"
    ok = True
    if op in ("append", "prune"):
        ok = isinstance(obj.get("segment"), str) and bool(_SEGMENT_RE.match(obj["segment"]))
    if op == "append":
        ok = ok and all(_is_int(obj.get(k)) and obj[k] >= 0
                        for k in ("offset", "length", "first_line", "count"))
    if op == "media":
        ok = isinstance(obj.get("mxc"), str) and _is_int(obj.get("size"))
    if not ok or not isinstance(obj.get("sha256"), str) or not _SHA_RE.match(obj["sha256"]):
        return "manifest_entry", f"malformed {op} entry"
    return None


@dataclass
class _Manifest:
    entries: list[dict[str, Any]]  # the valid chain from the start
    valid_bytes: int  # bytes of those entries' lines
    lines: int  # complete lines in the file
    partial_tail: bool  # bytes after the last newline
    problem: tuple[int, str, str] | None  # (entry, kind, detail) of the first invalid line


def parse_manifest(data: bytes, room_id: str) -> _Manifest:
    """Parse a manifest; the chain stops at the first line that is not a valid link."""
    raw_lines = data.split(b"\n")
    tail = raw_lines.pop()
    entries: list[dict[str, Any]] = []
    prev, pos, problem = ZERO_HASH, 0, None
    for n, raw in enumerate(raw_lines, start=1):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problem = (n, "manifest_entry", "line is not valid JSON")
            break
        err = _entry_error(obj, n, room_id, prev)
        if err is not None:
            problem = (n, *err)
            break
        entries.append(obj)
        prev, pos = obj["hash"], pos + len(raw) + 1
    return _Manifest(entries, pos, len(raw_lines), bool(tail), problem)


# -- file I/O (runs in worker threads) -----------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_at(path: Path, offset: int, data: bytes) -> bool:
    """Write ``data`` at ``offset`` (the file's current end) and fsync; True if created."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        size = os.fstat(fd).st_size
        if size != offset:
            raise ArchiveCorrupt(f"{path} is {size} bytes, expected {offset}: "
                                 "changed outside this archive writer")
        os.lseek(fd, offset, os.SEEK_SET)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)
    return created


def _ensure_dir(path: Path) -> None:
    """Create ``path`` and missing parents, each made durable in its parent directory."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    path.mkdir(exist_ok=True)
    _fsync_dir(path.parent)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Room:
    """What the writer knows of a room after reconciling its files with the store."""

    entries: int
    head: str
    manifest_bytes: int
    segment: str | None  # where the next append goes; None: a new segment
    last_number: int  # highest segment number used so far
    ends: dict[str, int] = field(default_factory=dict)  # segment -> bytes covered
    lines: dict[str, int] = field(default_factory=dict)  # segment -> lines covered
    pruned: set[str] = field(default_factory=set)


@dataclass
class _Chunk:
    segment: str
    offset: int
    first_line: int
    events: list[tuple[tuple[str, str | None, str, str | None, int], bytes]]


class LocalArchive(ArchiveWriter):
    """The archive in a local directory. One writer process per directory (the caller
    holds a lease); within the process, writes to a room are serialized by a lock."""

    def __init__(self, root: Path, store: ArchiveIndexStore, *, segment_max_bytes: int = 8 << 20,
                 clock_ms: Callable[[], int] | None = None):
        self.root = Path(root)
        self.store = store
        self.segment_max_bytes = segment_max_bytes
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._locks: dict[str, asyncio.Lock] = {}
        self._rooms: dict[str, _Room] = {}

    # -- paths ---------------------------------------------------------------------------
    def room_dir(self, room_id: str) -> Path:
        return self.root / "rooms" / room_dir_name(room_id)

    def _media_file(self, sha256: str) -> Path:
        return self.root / "media" / sha256[:2] / sha256

    def media_path(self, sha256: str) -> Path | None:
        if not _SHA_RE.match(sha256):
            return None
        path = self._media_file(sha256)
        return path if path.is_file() else None

    def _lock(self, room_id: str) -> asyncio.Lock:
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _exclusive(self, room_id: str, *, write: bool = True) -> AsyncIterator[None]:
        """The room for this task alone, across processes too: ``enclave run``'s live feed
        and a CLI run (``retention --apply``, ``archive verify``) share the archive. An
        advisory file lock (``locks/<room>.lock``) beside the in-process lock; under it a
        state cached by this process is checked against the store's head, since another
        process may have written since. ``write=False`` (verification) goes on without the
        file lock where the archive cannot be written."""
        async with self._lock(room_id):
            fd: int | None = None
            path = self.root / "locks" / (room_dir_name(room_id) + ".lock")

            def take() -> int:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(f, fcntl.LOCK_EX)
                except BaseException:
                    os.close(f)
                    raise
                return f

            try:
                fd = await asyncio.to_thread(take)
            except OSError as e:
                if write:
                    raise ArchiveWriteError(f"archive of {room_id}: cannot lock {path}: {e}") \
                        from e
            try:
                cached = self._rooms.get(room_id)
                if cached is not None:
                    head = await self.store.archive_head(room_id)
                    if (head.entries if head else 0) != cached.entries or (
                            head is not None and head.head != cached.head):
                        self._rooms.pop(room_id, None)  # another process wrote: re-read
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # releases the flock

    # -- reconciliation on first touch -----------------------------------------------------
    async def _room(self, room_id: str) -> _Room:
        """The room's state; reconciles files and store the first time (caller holds the
        room's lock)."""
        state = self._rooms.get(room_id)
        if state is None:
            try:
                state = await self._recover(room_id)
            except ArchiveCorrupt:
                raise
            except Exception as e:  # files unreadable, or the store failed: nothing indexed
                raise ArchiveWriteError(f"archive of {room_id} unusable: {e}") from e
            self._rooms[room_id] = state
        return state

    async def _recover(self, room_id: str) -> _Room:
        head = await self.store.archive_head(room_id)
        committed = head.entries if head is not None else 0
        rdir = self.room_dir(room_id)
        data = await asyncio.to_thread(_read_or_none, rdir / MANIFEST) or b""
        m = parse_manifest(data, room_id)
        valid = len(m.entries)
        if valid < committed:
            why = (f"; entry {m.problem[0]}: {m.problem[2]}" if m.problem else "")
            raise ArchiveCorrupt(
                f"archive of {room_id}: the manifest has {valid} valid entries, the store "
                f"head says {committed}{why}; writes refused until it is repaired")
        if committed and m.entries[committed - 1]["hash"] != head.head:  # type: ignore[union-attr]
            raise ArchiveCorrupt(
                f"archive of {room_id}: manifest entry {committed} differs from the store "
                "head (the manifest was rewritten); writes refused")
        state = _Room(entries=valid, head=m.entries[-1]["hash"] if m.entries else ZERO_HASH,
                      manifest_bytes=m.valid_bytes, segment=None, last_number=0)
        last_append: str | None = None
        for e in m.entries:
            if e["op"] == "append":
                seg = e["segment"]
                state.ends[seg] = e["offset"] + e["length"]
                state.lines[seg] = e["first_line"] + e["count"] - 1
                last_append = seg
            elif e["op"] == "prune":
                state.pruned.add(e["segment"])
            if "segment" in e:
                state.last_number = max(state.last_number, _segment_number(e["segment"]))
        if last_append is not None and last_append not in state.pruned:
            state.segment = last_append
        await asyncio.to_thread(self._cut_tails, rdir, m, state)
        if valid > committed:
            await self._reindex(room_id, rdir, m.entries[committed:], state)
        return state

    def _cut_tails(self, rdir: Path, m: _Manifest, state: _Room) -> None:
        """Cut what a crash left past the last valid entry: a torn manifest line, segment
        bytes never recorded, a segment file created but never recorded."""
        manifest = rdir / MANIFEST
        if manifest.exists() and manifest.stat().st_size > m.valid_bytes:
            _truncate(manifest, m.valid_bytes)
        if not rdir.is_dir():
            return
        for path in rdir.iterdir():
            number = _segment_number(path.name)
            if not number or path.name in state.pruned:
                continue
            if number > state.last_number:
                path.unlink()
                _fsync_dir(rdir)
            elif path.name == state.segment and path.stat().st_size > state.ends[path.name]:
                _truncate(path, state.ends[path.name])

    async def _reindex(self, room_id: str, rdir: Path, pending: list[dict[str, Any]],
                       state: _Room) -> None:
        """Index manifest entries that were written but never committed to the store."""

        def load() -> tuple[list[ArchivedEvent], list[ArchivedMedia]]:
            rows: list[ArchivedEvent] = []
            media: list[ArchivedMedia] = []
            for e in pending:
                if e["op"] == "append" and e["segment"] not in state.pruned:
                    content = _read_or_none(rdir / e["segment"]) or b""
                    chunk = content[e["offset"]:e["offset"] + e["length"]]
                    if len(chunk) != e["length"] or \
                            hashlib.sha256(chunk).hexdigest() != e["sha256"]:
                        raise ArchiveCorrupt(
                            f"archive of {room_id}: entry {e['n']}: bytes of {e['segment']} "
                            "do not match the manifest")
                    for i, line in enumerate(chunk.split(b"\n")[:-1]):
                        f = _index_fields(orjson.loads(line))
                        if f is None:
                            raise ArchiveCorrupt(f"archive of {room_id}: entry {e['n']}: "
                                                 "a line is not an archivable event")
                        rows.append(ArchivedEvent(f[0], room_id, f[1], f[2], f[3], f[4],
                                                  e["segment"], e["first_line"] + i, e["at"]))
                elif e["op"] == "media":
                    if _sha256_file(self._media_file(e["sha256"])) != e["sha256"]:
                        raise ArchiveCorrupt(f"archive of {room_id}: entry {e['n']}: media "
                                             f"file {e['sha256']} is missing or changed")
                    media.append(ArchivedMedia(
                        e["mxc"], e["sha256"], e["size"], e.get("content_type"), room_id,
                        e.get("event_id"), e.get("ts"), e["at"]))
                elif e["op"] == "prune":
                    path = rdir / e["segment"]
                    if path.exists():
                        path.unlink()
                        _fsync_dir(rdir)
            return rows, media

        rows, media = await asyncio.to_thread(load)
        for e in pending:
            if e["op"] == "prune":  # idempotent; the head moves with the rows below
                await self.store.archive_drop_segment(room_id, e["segment"])
        await self.store.archive_commit(rows, self._head(room_id, state), media)

    def _head(self, room_id: str, state: _Room) -> ArchiveHead:
        return ArchiveHead(room_id, state.entries, state.head, state.segment,
                           state.ends.get(state.segment, 0) if state.segment else 0,
                           self.clock_ms())

    # -- writing ---------------------------------------------------------------------------
    def _entry(self, room_id: str, n: int, prev: str, op: str, at: int,
               **fields: Any) -> dict[str, Any]:
        entry = {"n": n, "op": op, "room": room_id, "at": at, "prev": prev, **fields}
        entry["hash"] = entry_hash(entry)
        return entry

    def _chunks(self, state: _Room, items: list[tuple[Any, bytes]]) -> list[_Chunk]:
        """Group lines into per-segment appends, starting a new segment before one would
        grow past ``segment_max_bytes`` (a single larger event gets a segment of its own)."""
        chunks: list[_Chunk] = []
        seg, number = state.segment, state.last_number
        size = state.ends.get(seg, 0) if seg else 0
        lines = state.lines.get(seg, 0) if seg else 0
        for fields_, line in items:
            if seg is None or (size > 0 and size + len(line) > self.segment_max_bytes):
                number += 1
                seg, size, lines = segment_name(number), 0, 0
            if not chunks or chunks[-1].segment != seg:
                chunks.append(_Chunk(seg, size, lines + 1, []))
            chunks[-1].events.append((fields_, line))
            size += len(line)
            lines += 1
        return chunks

    async def _write_entries(self, room_id: str, state: _Room, entries: list[dict[str, Any]],
                             files: Callable[[list[tuple[Path, int, bool]]], None]) -> _Room:
        """Write the data files (``files`` notes (path, size before, created) for undo),
        then the manifest lines, each fsynced; return the room's state after them (the
        caller commits the store next). On failure the files are cut back and the room is
        reconciled again on its next touch."""
        rdir = self.room_dir(room_id)
        data = b"".join(canonical(e) + b"\n" for e in entries)

        def write() -> None:
            undo: list[tuple[Path, int, bool]] = []
            try:
                _ensure_dir(rdir)
                files(undo)
                path = rdir / MANIFEST
                undo.append((path, state.manifest_bytes, not path.exists()))
                _write_at(path, state.manifest_bytes, data)
            except BaseException:
                for path, size, created in reversed(undo):
                    with contextlib.suppress(OSError):
                        if created:
                            path.unlink()
                        else:
                            _truncate(path, size)
                raise

        try:
            await asyncio.to_thread(write)
        except (OSError, ArchiveCorrupt) as e:
            self._rooms.pop(room_id, None)
            if isinstance(e, ArchiveCorrupt):
                raise
            raise ArchiveWriteError(f"archive write for {room_id} failed: {e}") from e
        new = _Room(entries=state.entries + len(entries), head=entries[-1]["hash"],
                    manifest_bytes=state.manifest_bytes + len(data), segment=state.segment,
                    last_number=state.last_number, ends=dict(state.ends),
                    lines=dict(state.lines), pruned=set(state.pruned))
        return new

    async def _store_commit(self, room_id: str, new: _Room, commit: Awaitable[Any]) -> Any:
        """Await the store commit of written entries; on success ``new`` is the state."""
        try:
            result = await commit
        except Exception as e:
            # the files are durable; the next touch indexes them from the manifest
            self._rooms.pop(room_id, None)
            raise ArchiveWriteError(
                f"archive of {room_id} written but not indexed: {e}") from e
        self._rooms[room_id] = new
        return result

    async def append(self, room_id: str, events: Sequence[Mapping[str, Any]]) -> AppendResult:
        items: dict[str, tuple[tuple[str, str | None, str, str | None, int], bytes]] = {}
        for ev in events:
            f = _index_fields(ev)
            if f is None or f[0] in items:
                continue
            other = ev.get("room_id")
            if other is not None and other != room_id:
                raise ValueError(f"event {f[0]} belongs to {other}, not {room_id}")
            items[f[0]] = (f, canonical(dict(ev)) + b"\n")
        async with self._exclusive(room_id):
            state = await self._room(room_id)
            known = await self.store.archive_known(list(items)) if items else set()
            fresh = [v for k, v in items.items() if k not in known]
            if not fresh:
                return AppendResult(0, len(events))
            chunks = self._chunks(state, fresh)
            at = self.clock_ms()
            entries: list[dict[str, Any]] = []
            prev = state.head
            for i, c in enumerate(chunks):
                blob = b"".join(line for _, line in c.events)
                entries.append(self._entry(
                    room_id, state.entries + i + 1, prev, "append", at, segment=c.segment,
                    offset=c.offset, length=len(blob), first_line=c.first_line,
                    count=len(c.events), sha256=hashlib.sha256(blob).hexdigest()))
                prev = entries[-1]["hash"]
            rdir = self.room_dir(room_id)

            def files(undo: list[tuple[Path, int, bool]]) -> None:
                for c in chunks:
                    path = rdir / c.segment
                    undo.append((path, c.offset, not path.exists()))
                    _write_at(path, c.offset, b"".join(line for _, line in c.events))

            new = await self._write_entries(room_id, state, entries, files)
            rows: list[ArchivedEvent] = []
            for c in chunks:
                new.ends[c.segment] = c.offset + sum(len(line) for _, line in c.events)
                new.lines[c.segment] = c.first_line + len(c.events) - 1
                new.last_number = max(new.last_number, _segment_number(c.segment))
                new.segment = c.segment
                rows.extend(ArchivedEvent(f[0], room_id, f[1], f[2], f[3], f[4], c.segment,
                                          c.first_line + i, at)
                            for i, (f, _) in enumerate(c.events))
            await self._store_commit(room_id, new, self.store.archive_commit(
                rows, self._head(room_id, new)))
            return AppendResult(len(rows), len(events) - len(rows))

    async def put_media(self, room_id: str, event_id: str | None, mxc: str, data: bytes,
                        content_type: str | None, ts: int | None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        async with self._exclusive(room_id):
            state = await self._room(room_id)
            existing = await self.store.archive_media_get(mxc)
            if existing is not None and self.media_path(existing.sha256) is not None:
                return existing.sha256
            at = self.clock_ms()
            entry = self._entry(room_id, state.entries + 1, state.head, "media", at, mxc=mxc,
                                sha256=sha, size=len(data), content_type=content_type,
                                event_id=event_id, ts=ts)
            target = self._media_file(sha)

            def files(undo: list[tuple[Path, int, bool]]) -> None:
                # content-addressed: a file with the right bytes is shared, never rewritten
                if _sha256_file(target) == sha:
                    return
                _ensure_dir(target.parent)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
                try:
                    try:
                        _write_all(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, target)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                _fsync_dir(target.parent)

            new = await self._write_entries(room_id, state, [entry], files)
            media = ArchivedMedia(mxc, sha, len(data), content_type, room_id, event_id, ts, at)
            if existing is not None:
                # the index knew the mxc but its file was gone: the file is back now
                await self._store_commit(room_id, new, self.store.archive_commit(
                    [], self._head(room_id, new)))
            else:
                await self._store_commit(room_id, new, self.store.archive_commit(
                    [], self._head(room_id, new), [media]))
            return sha

    async def has_media(self, mxc: str) -> bool:
        row = await self.store.archive_media_get(mxc)
        return row is not None and self.media_path(row.sha256) is not None

    async def prune_segment(self, room_id: str, segment: str, reason: str) -> int:
        async with self._exclusive(room_id):
            state = await self._room(room_id)
            if segment in state.pruned:
                return 0
            if segment not in state.ends:
                raise ValueError(f"{segment} is not a segment of the archive of {room_id}")
            rdir = self.room_dir(room_id)
            sha = await asyncio.to_thread(_sha256_file, rdir / segment)
            if sha is None:
                raise ArchiveCorrupt(f"archive of {room_id}: {segment} is missing")
            entry = self._entry(room_id, state.entries + 1, state.head, "prune",
                                self.clock_ms(), segment=segment, sha256=sha, reason=reason)
            new = await self._write_entries(room_id, state, [entry], lambda undo: None)
            new.pruned.add(segment)
            if new.segment == segment:
                new.segment = None

            def delete() -> None:
                # before the store commit: a crash in between is finished by reconciliation
                (rdir / segment).unlink(missing_ok=True)
                _fsync_dir(rdir)

            try:
                await asyncio.to_thread(delete)
            except OSError as e:
                self._rooms.pop(room_id, None)
                raise ArchiveWriteError(f"cannot delete {segment} of {room_id}: {e}") from e
            return int(await self._store_commit(room_id, new, self.store.archive_drop_segment(
                room_id, segment, self._head(room_id, new))))

    # -- reading ---------------------------------------------------------------------------
    async def read(self, events: Sequence[ArchivedEvent]) -> list[dict[str, Any]]:
        wanted = {(e.room_id, e.segment) for e in events}

        def load() -> dict[tuple[str, str], list[bytes]]:
            out = {}
            for room_id, seg in wanted:
                content = _read_or_none(self.room_dir(room_id) / seg)
                if content is None:
                    raise ArchiveCorrupt(f"archive of {room_id}: {seg} is missing")
                out[(room_id, seg)] = content.split(b"\n")
            return out

        segments = await asyncio.to_thread(load)
        result = []
        for e in events:
            lines = segments[(e.room_id, e.segment)]
            obj = orjson.loads(lines[e.line - 1]) if 0 < e.line < len(lines) else None
            if not isinstance(obj, dict) or obj.get("event_id") != e.event_id:
                raise ArchiveCorrupt(f"archive of {e.room_id}: {e.segment} line {e.line} "
                                     f"is not event {e.event_id}")
            result.append(obj)
        return result

    async def segments(self, room_id: str) -> list[SegmentInfo]:
        async with self._exclusive(room_id):
            state = await self._room(room_id)
        stats = {s[0]: s for s in await self.store.archive_segments(room_id)}
        out = []
        for name in sorted(state.ends):
            if name in state.pruned:
                continue
            s = stats.get(name)
            out.append(SegmentInfo(name, s[1] if s else 0, s[2] if s else None,
                                   s[3] if s else None, state.ends[name],
                                   name != state.segment))
        return out

    # -- verification ----------------------------------------------------------------------
    async def verify(self, room_id: str | None = None) -> VerifyReport:
        heads = {h.room_id: h for h in await self.store.archive_heads()}
        counts = await self.store.archive_rooms()
        if room_id is not None:
            rooms = [room_id]
        else:
            rooms = sorted(set(heads) | set(counts)
                           | set(await asyncio.to_thread(self._rooms_on_disk)))
        problems: list[VerifyProblem] = []
        entries = events = media = 0
        for rid in rooms:
            async with self._exclusive(rid, write=False):
                found, n, ev, md = await asyncio.to_thread(
                    self._verify_room, rid, heads.get(rid), counts.get(rid, 0))
            problems.extend(sorted(found, key=lambda p: (p.entry is None, p.entry or 0)))
            entries, events, media = entries + n, events + ev, media + md
        return VerifyReport(not problems, len(rooms), entries, events, media, tuple(problems))

    def _rooms_on_disk(self) -> list[str]:
        base = self.root / "rooms"
        if not base.is_dir():
            return []
        out = []
        for d in base.iterdir():
            if not d.is_dir():
                continue
            first = b""
            with contextlib.suppress(OSError), (d / MANIFEST).open("rb") as f:
                first = f.readline()
            try:
                room = orjson.loads(first).get("room")
            except (orjson.JSONDecodeError, AttributeError):
                room = None
            if isinstance(room, str):
                out.append(room)
            elif not d.name.startswith("h-"):
                out.append(unquote(d.name))
        return out

    def _verify_room(self, room_id: str, head: ArchiveHead | None,
                     indexed: int) -> tuple[list[VerifyProblem], int, int, int]:
        """(problems, entries, events, media files) of one room; reads files only."""
        out: list[VerifyProblem] = []

        def problem(entry: int | None, kind: str, detail: str) -> None:
            out.append(VerifyProblem(room_id, entry, kind, detail))

        rdir = self.room_dir(room_id)
        committed = head.entries if head is not None else 0
        data = _read_or_none(rdir / MANIFEST)
        if data is None:
            if committed:
                problem(1, "manifest_missing",
                        f"{MANIFEST} is missing; the store head says {committed} entries")
            elif indexed:
                problem(None, "index", f"the store indexes {indexed} events of a room "
                                       "without archive files")
            return out, 0, 0, 0
        m = parse_manifest(data, room_id)
        if m.problem is not None:
            problem(*m.problem)
        pruned = {e["segment"] for e in m.entries if e["op"] == "prune"}
        contents: dict[str, bytes | None] = {}
        ends: dict[str, tuple[int, int]] = {}  # segment -> (bytes covered, last entry)
        media_ok: dict[str, str | None] = {}
        events = media = expected_index = 0
        for e in m.entries:
            n = e["n"]
            if e["op"] == "append" and e["segment"] not in pruned:
                seg, off, length = e["segment"], e["offset"], e["length"]
                if off != ends.get(seg, (0, 0))[0]:
                    problem(n, "segment_gap", f"{seg}: entry starts at byte {off}, the "
                                              f"previous entry of it ends at "
                                              f"{ends.get(seg, (0, 0))[0]}")
                ends[seg] = (off + length, n)
                events += e["count"]
                if n <= committed:
                    expected_index += e["count"]
                if seg not in contents:
                    contents[seg] = _read_or_none(rdir / seg)
                content = contents[seg]
                if content is None:
                    problem(n, "segment_missing", f"{seg} is missing")
                    continue
                chunk = content[off:off + length]
                if len(chunk) != length or hashlib.sha256(chunk).hexdigest() != e["sha256"] \
                        or chunk.count(b"\n") != e["count"]:
                    problem(n, "segment_hash", f"{seg} bytes {off}..{off + length} do not "
                                               "match the manifest's sha256")
            elif e["op"] == "media":
                media += 1
                sha = e["sha256"]
                if sha not in media_ok:
                    media_ok[sha] = _sha256_file(self._media_file(sha))
                if media_ok[sha] is None:
                    problem(n, "media_missing", f"media file {sha} ({e['mxc']}) is missing")
                elif media_ok[sha] != sha:
                    problem(n, "media_hash", f"media file {sha} ({e['mxc']}) was changed")
        # past a broken link or a cut-off manifest the rest of the chain is unknown: bytes
        # and files it would cover are not reported as extra
        whole = m.problem is None and m.lines >= committed
        for seg, (end, last) in ends.items() if whole else ():
            content = contents.get(seg)
            if content is not None and len(content) > end:
                problem(last, "segment_tail", f"{seg} has {len(content) - end} bytes after "
                                              "the last entry (an interrupted write, or "
                                              "added outside Enclave)")
        if rdir.is_dir() and whole:
            for path in sorted(rdir.iterdir()):
                if _segment_number(path.name) and path.name not in ends \
                        and path.name not in pruned:
                    problem(None, "segment_unreferenced",
                            f"{path.name} is in no manifest entry")
        if m.lines < committed:
            problem(m.lines + 1, "manifest_short",
                    f"the manifest has {m.lines} entries, the store head says {committed}: "
                    f"entries {m.lines + 1}..{committed} were removed")
        elif committed and len(m.entries) >= committed \
                and m.entries[committed - 1]["hash"] != head.head:  # type: ignore[union-attr]
            problem(committed, "head_mismatch",
                    f"entry {committed} differs from the store head: the manifest was "
                    "rewritten")
        if m.lines > committed:
            problem(committed + 1, "uncommitted",
                    f"{m.lines - committed} entries past the store head ({committed}): an "
                    "interrupted write (reconciled on the next write to the room), or "
                    "entries added outside Enclave")
        if m.partial_tail:
            problem(m.lines + 1, "manifest_tail",
                    "a partial line at the end of the manifest (an interrupted write)")
        if whole and indexed != expected_index:
            problem(None, "index", f"the store indexes {indexed} events, the manifest's "
                                   f"committed entries hold {expected_index}")
        return out, len(m.entries), events, media

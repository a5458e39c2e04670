"""The archive in a local directory (:class:`LocalArchive`): locks, reconciliation of the
files with the store on a room's first touch, writing, reading and verification.

Formats come from :mod:`.layout`, file I/O from :mod:`.files` (run in worker threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...store.base import ArchivedEvent, ArchivedMedia, ArchiveHead
from ...store.domains import ArchiveIndexStore
from .files import (
    cut_tails,
    ensure_dir,
    fsync_dir,
    load_uncommitted,
    read_or_none,
    sha256_file,
    truncate,
    write_all,
    write_at,
)
from .layout import (
    MANIFEST,
    SHA_RE,
    RoomState,
    append_items,
    canonical,
    manifest_entry,
    media_file,
    parse_manifest,
    plan_chunks,
    room_dir_name,
    room_path,
    room_state,
    segment_number,
)
from .verify import LocalSource, rooms_on_disk, verify_room
from .writer import (
    AppendResult,
    ArchiveCorrupt,
    ArchiveWriteError,
    ArchiveWriter,
    SegmentInfo,
    VerifyProblem,
    VerifyReport,
    pick_events,
    segment_infos,
)


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
        self._rooms: dict[str, RoomState] = {}

    # -- paths ---------------------------------------------------------------------------
    def room_dir(self, room_id: str) -> Path:
        return room_path(self.root, room_id)

    def _media_file(self, sha256: str) -> Path:
        return media_file(self.root, sha256)

    def media_path(self, sha256: str) -> Path | None:
        if not SHA_RE.match(sha256):
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
    async def _room(self, room_id: str) -> RoomState:
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

    async def _recover(self, room_id: str) -> RoomState:
        head = await self.store.archive_head(room_id)
        committed = head.entries if head is not None else 0
        rdir = self.room_dir(room_id)
        data = await asyncio.to_thread(read_or_none, rdir / MANIFEST) or b""
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
        state = room_state(m)
        await asyncio.to_thread(cut_tails, rdir, m, state)
        if valid > committed:
            await self._reindex(room_id, rdir, m.entries[committed:], state)
        return state

    async def _reindex(self, room_id: str, rdir: Path, pending: list[dict[str, Any]],
                       state: RoomState) -> None:
        """Index manifest entries that were written but never committed to the store."""
        rows, media = await asyncio.to_thread(
            load_uncommitted, self.root, room_id, pending, state.pruned)
        for e in pending:
            if e["op"] == "prune":  # idempotent; the head moves with the rows below
                await self.store.archive_drop_segment(room_id, e["segment"])
        await self.store.archive_commit(rows, self._head(room_id, state), media)

    def _head(self, room_id: str, state: RoomState) -> ArchiveHead:
        return ArchiveHead(room_id, state.entries, state.head, state.segment,
                           state.ends.get(state.segment, 0) if state.segment else 0,
                           self.clock_ms())

    # -- writing ---------------------------------------------------------------------------
    async def _write_entries(self, room_id: str, state: RoomState, entries: list[dict[str, Any]],
                             files: Callable[[list[tuple[Path, int, bool]]], None]) -> RoomState:
        """Write the data files (``files`` notes (path, size before, created) for undo),
        then the manifest lines, each fsynced; return the room's state after them (the
        caller commits the store next). On failure the files are cut back and the room is
        reconciled again on its next touch."""
        rdir = self.room_dir(room_id)
        data = b"".join(canonical(e) + b"\n" for e in entries)

        def write() -> None:
            undo: list[tuple[Path, int, bool]] = []
            try:
                ensure_dir(rdir)
                files(undo)
                path = rdir / MANIFEST
                undo.append((path, state.manifest_bytes, not path.exists()))
                write_at(path, state.manifest_bytes, data)
            except BaseException:
                for path, size, created in reversed(undo):
                    with contextlib.suppress(OSError):
                        if created:
                            path.unlink()
                        else:
                            truncate(path, size)
                raise

        try:
            await asyncio.to_thread(write)
        except (OSError, ArchiveCorrupt) as e:
            self._rooms.pop(room_id, None)
            if isinstance(e, ArchiveCorrupt):
                raise
            raise ArchiveWriteError(f"archive write for {room_id} failed: {e}") from e
        new = RoomState(entries=state.entries + len(entries), head=entries[-1]["hash"],
                        manifest_bytes=state.manifest_bytes + len(data),
                        segment=state.segment, last_number=state.last_number,
                        ends=dict(state.ends), lines=dict(state.lines),
                        pruned=set(state.pruned),
                        parts={k: list(v) for k, v in state.parts.items()})
        return new

    async def _store_commit(self, room_id: str, new: RoomState, commit: Awaitable[Any]) -> Any:
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
        items = append_items(room_id, events)
        async with self._exclusive(room_id):
            state = await self._room(room_id)
            known = await self.store.archive_known(list(items)) if items else set()
            fresh = [v for k, v in items.items() if k not in known]
            if not fresh:
                return AppendResult(0, len(events))
            chunks = plan_chunks(state, fresh, self.segment_max_bytes)
            at = self.clock_ms()
            entries: list[dict[str, Any]] = []
            prev = state.head
            for i, c in enumerate(chunks):
                blob = b"".join(line for _, line in c.events)
                entries.append(manifest_entry(
                    room_id, state.entries + i + 1, prev, "append", at, segment=c.segment,
                    offset=c.offset, length=len(blob), first_line=c.first_line,
                    count=len(c.events), sha256=hashlib.sha256(blob).hexdigest()))
                prev = entries[-1]["hash"]
            rdir = self.room_dir(room_id)

            def files(undo: list[tuple[Path, int, bool]]) -> None:
                for c in chunks:
                    path = rdir / c.segment
                    undo.append((path, c.offset, not path.exists()))
                    write_at(path, c.offset, b"".join(line for _, line in c.events))

            new = await self._write_entries(room_id, state, entries, files)
            rows: list[ArchivedEvent] = []
            for c in chunks:
                new.ends[c.segment] = c.offset + sum(len(line) for _, line in c.events)
                new.lines[c.segment] = c.first_line + len(c.events) - 1
                new.last_number = max(new.last_number, segment_number(c.segment))
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
            entry = manifest_entry(room_id, state.entries + 1, state.head, "media", at, mxc=mxc,
                                sha256=sha, size=len(data), content_type=content_type,
                                event_id=event_id, ts=ts)
            target = self._media_file(sha)

            def files(undo: list[tuple[Path, int, bool]]) -> None:
                # content-addressed: a file with the right bytes is shared, never rewritten
                if sha256_file(target) == sha:
                    return
                ensure_dir(target.parent)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
                try:
                    try:
                        write_all(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, target)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                fsync_dir(target.parent)

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
            sha = await asyncio.to_thread(sha256_file, rdir / segment)
            if sha is None:
                raise ArchiveCorrupt(f"archive of {room_id}: {segment} is missing")
            entry = manifest_entry(room_id, state.entries + 1, state.head, "prune",
                                self.clock_ms(), segment=segment, sha256=sha, reason=reason)
            new = await self._write_entries(room_id, state, [entry], lambda undo: None)
            new.pruned.add(segment)
            if new.segment == segment:
                new.segment = None

            def delete() -> None:
                # before the store commit: a crash in between is finished by reconciliation
                (rdir / segment).unlink(missing_ok=True)
                fsync_dir(rdir)

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
                content = read_or_none(self.room_dir(room_id) / seg)
                if content is None:
                    raise ArchiveCorrupt(f"archive of {room_id}: {seg} is missing")
                out[(room_id, seg)] = content.split(b"\n")
            return out

        segments = await asyncio.to_thread(load)
        return pick_events(events, segments)

    async def segments(self, room_id: str) -> list[SegmentInfo]:
        async with self._exclusive(room_id):
            state = await self._room(room_id)
        return segment_infos(state, await self.store.archive_segments(room_id))

    # -- verification ----------------------------------------------------------------------
    async def verify(self, room_id: str | None = None) -> VerifyReport:
        heads = {h.room_id: h for h in await self.store.archive_heads()}
        counts = await self.store.archive_rooms()
        if room_id is not None:
            rooms = [room_id]
        else:
            rooms = sorted(set(heads) | set(counts)
                           | set(await asyncio.to_thread(rooms_on_disk, self.root)))
        problems: list[VerifyProblem] = []
        entries = events = media = 0
        for rid in rooms:
            async with self._exclusive(rid, write=False):
                found, n, ev, md = await verify_room(
                    LocalSource(self.root, rid), rid, heads.get(rid), counts.get(rid, 0))
            problems.extend(sorted(found, key=lambda p: (p.entry is None, p.entry or 0)))
            entries, events, media = entries + n, events + ev, media + md
        return VerifyReport(not problems, len(rooms), entries, events, media, tuple(problems))

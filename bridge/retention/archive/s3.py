"""The archive in an S3 bucket with Object Lock (:class:`S3Archive`).

Every object is written once, with Object Lock (retain-until = now + the room's archive
keep period) and, while a legal hold covers the room, an S3 legal hold; the key layout is
in :mod:`.objects`, the entries and the chain are those of the local archive.

Crash safety: the segment part objects are put first, then the manifest object of the
write, then the store commits the index rows and the head. A PUT is atomic, so a killed
writer leaves whole objects only: a part without its manifest object is named by no entry
and read by nobody; a manifest object past the store head is indexed on the room's next
touch (its parts checked), like manifest lines past the head in the local archive.

Replicas share the bucket: a manifest object is put with ``If-None-Match: *``, so of two
writers that both want entry ``n`` of a room one wins and the other catches up with the
objects and writes after them: the chain cannot fork. The store's head only moves forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from ...policy.archive_lock import decide_deletable, decide_object_lock, room_held
from ...policy.retention import Hold
from ...store.base import ArchiveConflict, ArchivedEvent, ArchivedMedia, ArchiveHead
from ...store.domains import ArchiveIndexStore
from .layout import (
    SHA_RE,
    RoomState,
    advance,
    canonical,
    index_fields,
    manifest_entry,
    parse_manifest,
    plan_chunks,
)
from .objects import (
    contiguous,
    manifest_first_entry,
    manifest_key,
    manifest_prefix,
    media_key,
    part_key,
    prune_intent_key,
    room_prefix,
    segment_prefix,
)
from .verify import verify_room
from .writer import (
    AppendResult,
    ArchiveCorrupt,
    ArchivePruneDeferred,
    ArchiveWriteError,
    ArchiveWriter,
    SegmentInfo,
    VerifyProblem,
    VerifyReport,
)

log = logging.getLogger(__name__)
_RETRIES = 30  # catch-ups after losing a manifest object to another writer


class ArchiveBucketError(RuntimeError):
    """The bucket cannot hold a compliance archive (missing, versioning or Object Lock
    off, no access): Enclave refuses to start on it."""


def _code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code") or
                   resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    return ""


def _missing(e: BaseException) -> bool:
    return _code(e) in ("NoSuchKey", "404", "NoSuchVersion", "NotFound")


class S3Archive(ArchiveWriter):
    """The archive in an S3 bucket. ``client`` is an async context manager making an
    aiobotocore S3 client (entered once, on first use); ``keep_ms`` says how long a room's
    archive is kept (None: forever), ``holds`` lists the legal holds."""

    def __init__(self, client: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
                 bucket: str, store: ArchiveIndexStore, *, prefix: str = "",
                 lock_mode: str = "compliance",
                 keep_ms: Callable[[str], Awaitable[int | None]],
                 holds: Callable[[], Awaitable[Sequence[Hold]]],
                 segment_max_bytes: int = 8 << 20, concurrency: int = 16,
                 clock_ms: Callable[[], int] | None = None):
        self._make_client = client
        self.bucket = bucket
        self.prefix = prefix
        self.store = store
        self.lock_mode = lock_mode
        self.keep_ms = keep_ms
        self.holds = holds
        self.segment_max_bytes = segment_max_bytes
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._sem = asyncio.Semaphore(concurrency)
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._open_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._rooms: dict[str, RoomState] = {}
        self._held: dict[str, bool] = {}  # room -> legal hold as last applied here
        self._holds_cache: tuple[float, Sequence[Hold]] | None = None
        self._keep_cache: dict[str, tuple[float, int | None]] = {}

    # -- the client and the start-up check -------------------------------------------------
    async def _s3(self) -> Any:
        if self._client is None:
            async with self._open_lock:
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    client = await stack.enter_async_context(self._make_client())
                    try:
                        await self._check(client)
                    except BaseException:
                        await stack.aclose()
                        raise
                    self._stack, self._client = stack, client
        return self._client

    async def check(self) -> None:
        """Refuse a bucket that is missing, unreachable, or without versioning and Object
        Lock (raises :class:`ArchiveBucketError`)."""
        await self._s3()

    async def _check(self, c: Any) -> None:
        b = self.bucket
        try:
            await c.head_bucket(Bucket=b)
        except Exception as e:
            raise ArchiveBucketError(f"archive bucket {b!r}: not reachable or no access "
                                     f"({_code(e) or type(e).__name__})") from None
        try:
            versioning = (await c.get_bucket_versioning(Bucket=b)).get("Status")
        except Exception as e:
            raise ArchiveBucketError(f"archive bucket {b!r}: cannot read its versioning "
                                     f"({_code(e) or type(e).__name__})") from None
        if versioning != "Enabled":
            raise ArchiveBucketError(
                f"archive bucket {b!r}: versioning is {versioning or 'off'}, it must be "
                "Enabled (create the bucket with Object Lock enabled)")
        try:
            lock = (await c.get_object_lock_configuration(Bucket=b)).get(
                "ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        except Exception as e:
            if _code(e) != "ObjectLockConfigurationNotFoundError":
                raise ArchiveBucketError(f"archive bucket {b!r}: cannot read its Object Lock "
                                         f"configuration ({_code(e) or type(e).__name__})"
                                         ) from None
            lock = None
        if lock != "Enabled":
            raise ArchiveBucketError(
                f"archive bucket {b!r}: Object Lock is not enabled; a compliance archive "
                "needs a bucket created with Object Lock")

    async def aclose(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = self._client = None

    # -- object I/O ------------------------------------------------------------------------
    async def _keep_ms(self, room_id: str) -> int | None:
        # the room's class rarely changes: asked again after a minute
        now = time.monotonic()
        hit = self._keep_cache.get(room_id)
        if hit is None or now - hit[0] > 60:
            hit = self._keep_cache[room_id] = (now, await self.keep_ms(room_id))
        return hit[1]

    async def _lock_args(self, room_id: str) -> dict[str, Any]:
        d = decide_object_lock(now_ms=self.clock_ms(), keep_ms=await self._keep_ms(room_id),
                               mode=self.lock_mode, held=await self._room_held(room_id))
        return {"ObjectLockMode": d.mode, "ObjectLockRetainUntilDate": d.retain_until,
                "ObjectLockLegalHoldStatus": "ON" if d.legal_hold else "OFF"}

    async def _put_new(self, key: str, data: bytes, lock: Mapping[str, Any]) -> bool:
        """Put an object that must not exist yet; False when a version already does."""
        c = await self._s3()
        async with self._sem:
            try:
                await c.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*",
                                   **lock)
            except Exception as e:
                if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise
        return True

    async def _get(self, key: str) -> bytes | None:
        c = await self._s3()
        async with self._sem:
            try:
                resp = await c.get_object(Bucket=self.bucket, Key=key)
                async with resp["Body"] as body:
                    return bytes(await body.read())
            except Exception as e:
                if _missing(e):
                    return None
                raise

    async def _get_all(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for i in range(0, len(keys), 1000):  # not a million tasks at once
            out.extend(await asyncio.gather(*(self._get(k) for k in keys[i:i + 1000])))
        return out

    async def _list(self, prefix: str, start_after: str = "") -> list[str]:
        c = await self._s3()
        keys: list[str] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kw["StartAfter"] = start_after
        async for page in c.get_paginator("list_objects_v2").paginate(**kw):
            keys.extend(o["Key"] for o in page.get("Contents", ()))
        return keys

    async def _versions(self, prefix: str, *, markers: bool = True) -> list[tuple[str, str]]:
        """(key, version id) of every version (and delete marker) under ``prefix``."""
        c = await self._s3()
        out: list[tuple[str, str]] = []
        async for page in c.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=prefix):
            for v in (*page.get("Versions", ()),
                      *(page.get("DeleteMarkers", ()) if markers else ())):
                out.append((v["Key"], v["VersionId"]))
        return out

    # -- rooms -----------------------------------------------------------------------------
    def _lock(self, room_id: str) -> asyncio.Lock:
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _exclusive(self, room_id: str, *, fresh: bool = True) -> AsyncIterator[None]:
        """The room for this task within the process; other processes and replicas are
        kept apart by the conditional put of manifest objects. With ``fresh``, a cached
        state behind the store's head catches up with the objects another writer added
        (a reader must see them; a writer learns of them when its manifest put is
        refused, so it skips that read of the store)."""
        async with self._lock(room_id):
            cached = self._rooms.get(room_id)
            if cached is not None and fresh:
                head = await self.store.archive_head(room_id)
                if head is not None and head.entries != cached.entries:
                    self._rooms.pop(room_id, None)
                    try:
                        self._rooms[room_id] = await self._sync(room_id, cached)
                    except ArchiveCorrupt:
                        raise
                    except Exception as e:
                        raise ArchiveWriteError(f"archive of {room_id} unusable: {e}") from e
            yield

    async def _room(self, room_id: str) -> RoomState:
        state = self._rooms.get(room_id)
        if state is None:
            try:
                state = await self._sync(room_id, None)
            except (ArchiveCorrupt, ArchiveBucketError):
                raise
            except Exception as e:
                raise ArchiveWriteError(f"archive of {room_id} unusable: {e}") from e
            self._rooms[room_id] = state
        return state

    async def _sync(self, room_id: str, base: RoomState | None) -> RoomState:
        """The room's state after the manifest objects past ``base`` (all of them when
        None), and the store indexing any entry it lacks."""
        head = await self.store.archive_head(room_id)
        committed = head.entries if head is not None else 0
        if base is not None and committed < base.entries:
            base = None  # the store went back (a restore): read the room again
        state = base or RoomState(entries=0, head="0" * 64, manifest_bytes=0, segment=None,
                                  last_number=0)
        state = RoomState(entries=state.entries, head=state.head, manifest_bytes=0,
                          segment=state.segment, last_number=state.last_number,
                          ends=dict(state.ends), lines=dict(state.lines),
                          pruned=set(state.pruned),
                          parts={k: list(v) for k, v in state.parts.items()})
        start = manifest_key(self.prefix, room_id, state.entries) if state.entries else ""
        keys = await self._list(manifest_prefix(self.prefix, room_id), start)
        firsts = [manifest_first_entry(self.prefix, room_id, k) for k in keys]
        named = [(f, k) for f, k in zip(firsts, keys, strict=True) if f is not None]
        if not contiguous([f for f, _ in named], state.entries + 1):
            raise ArchiveCorrupt(f"archive of {room_id}: manifest objects past entry "
                                 f"{state.entries} do not follow it")
        data = b"".join(d or b"" for d in await self._get_all([k for _, k in named]))
        m = parse_manifest(data, room_id, first=state.entries + 1, prev=state.head)
        if m.problem is not None or m.partial_tail:
            why = f"entry {m.problem[0]}: {m.problem[2]}" if m.problem else "a partial line"
            raise ArchiveCorrupt(f"archive of {room_id}: the manifest objects are broken "
                                 f"({why}); writes refused until it is repaired")
        old = state.entries
        advance(state, m.entries)
        if state.entries < committed:
            raise ArchiveCorrupt(
                f"archive of {room_id}: the manifest has {state.entries} valid entries, the "
                f"store head says {committed}; writes refused until it is repaired")
        # the entry at the store head must be the head's (entries before ``old`` were
        # checked when ``base`` was read)
        at_head = m.entries[committed - old - 1]["hash"] if committed > old else None
        if at_head is not None and head is not None and at_head != head.head:
            raise ArchiveCorrupt(
                f"archive of {room_id}: manifest entry {committed} differs from the store "
                "head (the manifest was rewritten); writes refused")
        pending = [e for e in m.entries if e["n"] > committed]
        if pending:
            await self._reindex(room_id, pending, state)
        return state

    async def _reindex(self, room_id: str, pending: list[dict[str, Any]],
                       state: RoomState) -> None:
        """Index manifest entries that were written but never committed to the store."""
        rows: list[ArchivedEvent] = []
        media: list[ArchivedMedia] = []
        for e in pending:
            if e["op"] == "append" and e["segment"] not in state.pruned:
                chunk = await self._get(part_key(self.prefix, room_id, e["segment"],
                                                 e["offset"], e["sha256"])) or b""
                if len(chunk) != e["length"] or hashlib.sha256(chunk).hexdigest() != e["sha256"]:
                    raise ArchiveCorrupt(f"archive of {room_id}: entry {e['n']}: bytes of "
                                         f"{e['segment']} do not match the manifest")
                for i, line in enumerate(chunk.split(b"\n")[:-1]):
                    f = index_fields(orjson.loads(line))
                    if f is None:
                        raise ArchiveCorrupt(f"archive of {room_id}: entry {e['n']}: a line "
                                             "is not an archivable event")
                    rows.append(ArchivedEvent(f[0], room_id, f[1], f[2], f[3], f[4],
                                              e["segment"], e["first_line"] + i, e["at"]))
            elif e["op"] == "media":
                if await self._media_sha(e["sha256"]) != e["sha256"]:
                    raise ArchiveCorrupt(f"archive of {room_id}: entry {e['n']}: media "
                                         f"{e['sha256']} is missing or changed")
                media.append(ArchivedMedia(e["mxc"], e["sha256"], e["size"],
                                           e.get("content_type"), room_id, e.get("event_id"),
                                           e.get("ts"), e["at"]))
            elif e["op"] == "prune":
                await self.store.archive_drop_segment(room_id, e["segment"])
        await self._commit(room_id, state, self.store.archive_commit(
            rows, self._head(room_id, state), media))

    def _head(self, room_id: str, state: RoomState) -> ArchiveHead:
        return ArchiveHead(room_id, state.entries, state.head, state.segment,
                           state.ends.get(state.segment, 0) if state.segment else 0,
                           self.clock_ms())

    async def _commit(self, room_id: str, state: RoomState, commit: Awaitable[Any]) -> Any:
        """The store commit of entries already in the bucket. Another writer that indexed
        them first (its catch-up) leaves the head where ours would go: that is success."""
        try:
            return await commit
        except ArchiveConflict:
            head = await self.store.archive_head(room_id)
            if head is not None and head.entries >= state.entries:
                return 0
            self._rooms.pop(room_id, None)
            raise
        except Exception as e:
            self._rooms.pop(room_id, None)
            raise ArchiveWriteError(f"archive of {room_id} written but not indexed: {e}") from e

    # -- writing ---------------------------------------------------------------------------
    async def _write(self, room_id: str, state: RoomState, entries: list[dict[str, Any]],
                     objects: Sequence[tuple[str, bytes]]) -> RoomState | None:
        """Put the data objects, then the manifest object of ``entries``; the state after
        them, or None when another writer took those entry numbers first."""
        lock = await self._lock_args(room_id)
        try:
            await asyncio.gather(*(self._put_new(k, d, lock) for k, d in objects))
            won = await self._put_new(manifest_key(self.prefix, room_id, state.entries + 1),
                                      b"".join(canonical(e) + b"\n" for e in entries), lock)
        except Exception as e:
            self._rooms.pop(room_id, None)
            raise ArchiveWriteError(f"archive write for {room_id} failed: {e}") from e
        if not won:
            # another writer has entry state.entries + 1: catch up with its objects
            log.debug("archive of %s: entry %d taken by another writer", room_id,
                      state.entries + 1)
            self._rooms.pop(room_id, None)
            try:
                self._rooms[room_id] = await self._sync(room_id, state)
            except ArchiveCorrupt:
                raise
            except Exception as e:
                raise ArchiveWriteError(f"archive of {room_id} unusable: {e}") from e
            return None
        new = RoomState(entries=state.entries, head=state.head, manifest_bytes=0,
                        segment=state.segment, last_number=state.last_number,
                        ends=dict(state.ends), lines=dict(state.lines),
                        pruned=set(state.pruned),
                        parts={k: list(v) for k, v in state.parts.items()})
        advance(new, entries)
        return new

    async def append(self, room_id: str, events: Sequence[Mapping[str, Any]]) -> AppendResult:
        items: dict[str, tuple[tuple[str, str | None, str, str | None, int], bytes]] = {}
        for ev in events:
            f = index_fields(ev)
            if f is None or f[0] in items:
                continue
            other = ev.get("room_id")
            if other is not None and other != room_id:
                raise ValueError(f"event {f[0]} belongs to {other}, not {room_id}")
            items[f[0]] = (f, canonical(dict(ev)) + b"\n")
        lost = 0
        for _ in range(_RETRIES):
            if lost:  # outside the room's lock: a random pause so two writers stop colliding
                await asyncio.sleep(random.uniform(0, 0.005 * lost))
            async with self._exclusive(room_id, fresh=False):
                state = await self._room(room_id)
                known = await self.store.archive_known(list(items)) if items else set()
                fresh = [v for k, v in items.items() if k not in known]
                if not fresh:
                    return AppendResult(0, len(events))
                chunks = plan_chunks(state, fresh, self.segment_max_bytes)
                at = self.clock_ms()
                entries: list[dict[str, Any]] = []
                objects: list[tuple[str, bytes]] = []
                prev = state.head
                for i, c in enumerate(chunks):
                    blob = b"".join(line for _, line in c.events)
                    sha = hashlib.sha256(blob).hexdigest()
                    entries.append(manifest_entry(
                        room_id, state.entries + i + 1, prev, "append", at, segment=c.segment,
                        offset=c.offset, length=len(blob), first_line=c.first_line,
                        count=len(c.events), sha256=sha))
                    objects.append((part_key(self.prefix, room_id, c.segment, c.offset, sha),
                                    blob))
                    prev = entries[-1]["hash"]
                new = await self._write(room_id, state, entries, objects)
                if new is None:
                    lost += 1
                    continue  # another writer took the entry: caught up, write after it
                rows = [ArchivedEvent(f[0], room_id, f[1], f[2], f[3], f[4], c.segment,
                                      c.first_line + i, at)
                        for c in chunks for i, (f, _) in enumerate(c.events)]
                await self._commit(room_id, new, self.store.archive_commit(
                    rows, self._head(room_id, new)))
                self._rooms[room_id] = new
                return AppendResult(len(rows), len(events) - len(rows))
        raise ArchiveWriteError(f"archive of {room_id}: other writers kept taking the next "
                                f"entry ({_RETRIES} tries)")

    async def put_media(self, room_id: str, event_id: str | None, mxc: str, data: bytes,
                        content_type: str | None, ts: int | None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        for _ in range(_RETRIES):
            async with self._exclusive(room_id):
                state = await self._room(room_id)
                existing = await self.store.archive_media_get(mxc)
                if existing is not None and await self._media_sha(existing.sha256, hash_it=False):
                    return existing.sha256
                at = self.clock_ms()
                entry = manifest_entry(room_id, state.entries + 1, state.head, "media", at,
                                       mxc=mxc, sha256=sha, size=len(data),
                                       content_type=content_type, event_id=event_id, ts=ts)
                # content-addressed: an object already there with that name is shared, and
                # kept locked at least as long as this room keeps it
                await self._extend_lock(room_id, media_key(self.prefix, sha))
                new = await self._write(room_id, state, [entry],
                                        [(media_key(self.prefix, sha), data)])
                if new is None:
                    continue
                media = [] if existing is not None else [ArchivedMedia(
                    mxc, sha, len(data), content_type, room_id, event_id, ts, at)]
                await self._commit(room_id, new, self.store.archive_commit(
                    [], self._head(room_id, new), media))
                self._rooms[room_id] = new
                return sha
        raise ArchiveWriteError(f"archive of {room_id}: other writers kept taking the next "
                                f"entry ({_RETRIES} tries)")

    async def _extend_lock(self, room_id: str, key: str) -> None:
        """Lengthen the retention of every version of an existing ``key`` to what
        ``room_id`` needs (a lock can be extended, never shortened); nothing if absent."""
        lock = await self._lock_args(room_id)
        c = await self._s3()
        for k, vid in await self._versions(key, markers=False):
            if k != key:
                continue
            async with self._sem:
                h = await c.head_object(Bucket=self.bucket, Key=k, VersionId=vid)
                until = h.get("ObjectLockRetainUntilDate")
                if until is None or until < lock["ObjectLockRetainUntilDate"]:
                    await c.put_object_retention(
                        Bucket=self.bucket, Key=k, VersionId=vid,
                        Retention={"Mode": h.get("ObjectLockMode") or lock["ObjectLockMode"],
                                   "RetainUntilDate": lock["ObjectLockRetainUntilDate"]})

    async def _media_sha(self, sha256: str, *, hash_it: bool = True) -> str | None:
        """The sha256 of the stored media object (or, without ``hash_it``, its name when it
        exists); None when absent."""
        if not hash_it:
            c = await self._s3()
            try:
                async with self._sem:
                    await c.head_object(Bucket=self.bucket, Key=media_key(self.prefix, sha256))
            except Exception as e:
                if _missing(e):
                    return None
                raise
            return sha256
        data = await self._get(media_key(self.prefix, sha256))
        return None if data is None else hashlib.sha256(data).hexdigest()

    async def has_media(self, mxc: str) -> bool:
        row = await self.store.archive_media_get(mxc)
        return row is not None and await self._media_sha(row.sha256, hash_it=False) is not None

    def media_path(self, sha256: str) -> Path | None:
        return None  # no local file: read_media gives the bytes

    async def read_media(self, sha256: str) -> bytes | None:
        if not SHA_RE.match(sha256):
            return None
        return await self._get(media_key(self.prefix, sha256))

    # -- legal holds and the archive's own retention -----------------------------------------
    async def _room_held(self, room_id: str) -> bool:
        now = time.monotonic()
        if self._holds_cache is None or now - self._holds_cache[0] > 30:
            self._holds_cache = (now, list(await self.holds()))
        return room_held(room_id, self._holds_cache[1])

    async def _set_legal_hold(self, key: str, version: str, on: bool) -> None:
        c = await self._s3()
        async with self._sem:
            await c.put_object_legal_hold(Bucket=self.bucket, Key=key, VersionId=version,
                                          LegalHold={"Status": "ON" if on else "OFF"})

    async def apply_holds(self, holds: Sequence[Hold], rooms: Sequence[str]) -> None:
        """Put an S3 legal hold on every version of the objects of rooms a hold covers (and
        their media), and take it off where no hold covers them any more.

        Per room, when its state differs from what this process last applied. A process
        that has not applied it yet asks the room's first manifest object: it is set last
        in every pass, so its status is that of the room's last complete pass (a process
        start does not touch every object of every room)."""
        self._holds_cache = (time.monotonic(), list(holds))
        held_media: set[str] = set()
        changes: list[tuple[str, bool]] = []
        for room_id in rooms:
            held = room_held(room_id, holds)
            if held:
                held_media.update(m.sha256 for m in await self.store.archive_media_list(room_id))
            if self._held.get(room_id) == held:
                continue
            if room_id not in self._held:
                status = await self._legal_hold_of(manifest_key(self.prefix, room_id, 1))
                if status is None or status == held:  # no objects, or the last pass holds
                    self._held[room_id] = held
                    continue
            changes.append((room_id, held))
        for room_id, held in changes:
            sentinel = manifest_key(self.prefix, room_id, 1)
            versions = [v for v in await self._versions(room_prefix(self.prefix, room_id),
                                                        markers=False)
                        if not v[0].endswith(".prune")]
            for m in await self.store.archive_media_list(room_id):
                if held or m.sha256 not in held_media:
                    versions += await self._versions(media_key(self.prefix, m.sha256),
                                                     markers=False)
            others = [v for v in versions if v[0] != sentinel]
            for i in range(0, len(others), 1000):
                await asyncio.gather(*(self._set_legal_hold(k, v, held)
                                       for k, v in others[i:i + 1000]))
            for k, v in versions:
                if k == sentinel:
                    await self._set_legal_hold(k, v, held)
            self._held[room_id] = held
            log.info("archive legal hold %s on %d object versions of %s",
                     "placed" if held else "lifted", len(versions), room_id)

    async def _legal_hold_of(self, key: str) -> bool | None:
        """Whether the newest version of ``key`` has a legal hold; None when absent."""
        c = await self._s3()
        try:
            async with self._sem:
                got = await c.get_object_legal_hold(Bucket=self.bucket, Key=key)
        except Exception as e:
            if _missing(e) or _code(e) in ("NoSuchObjectLockConfiguration",):
                return None if _missing(e) else False
            raise
        return bool(got.get("LegalHold", {}).get("Status") == "ON")

    async def prune_segment(self, room_id: str, segment: str, reason: str) -> int:
        """Delete every version of a segment's parts, then record the prune. Each version
        is checked first (retention passed, no legal hold); a refusal, by that check or by
        the storage, raises :class:`ArchivePruneDeferred` and records no prune."""
        for _ in range(_RETRIES):
            async with self._exclusive(room_id):
                state = await self._room(room_id)
                if segment in state.pruned:
                    return 0
                if segment not in state.ends:
                    raise ValueError(f"{segment} is not a segment of the archive of {room_id}")
                c = await self._s3()
                intent = prune_intent_key(self.prefix, room_id, segment)
                recorded = await self._get(intent)
                if recorded is not None:
                    sha = orjson.loads(recorded)["sha256"]
                else:
                    content = await self._segment_bytes(room_id, segment, state)
                    if content is None:
                        raise ArchiveCorrupt(f"archive of {room_id}: {segment} is missing")
                    sha = hashlib.sha256(content).hexdigest()
                versions = await self._versions(segment_prefix(self.prefix, room_id, segment))
                now = self.clock_ms()
                for key, vid in versions:
                    try:
                        async with self._sem:
                            h = await c.head_object(Bucket=self.bucket, Key=key, VersionId=vid)
                    except Exception as e:
                        if _missing(e) or _code(e) in ("405", "MethodNotAllowed"):
                            continue  # a delete marker, or gone meanwhile
                        raise
                    if not decide_deletable(
                            retain_until=h.get("ObjectLockRetainUntilDate"),
                            legal_hold=h.get("ObjectLockLegalHoldStatus") == "ON", now_ms=now):
                        raise ArchivePruneDeferred(
                            f"{segment} of {room_id}: {key} is locked until "
                            f"{h.get('ObjectLockRetainUntilDate')} (legal hold "
                            f"{h.get('ObjectLockLegalHoldStatus') or 'OFF'})")
                if recorded is None:
                    await c.put_object(Bucket=self.bucket, Key=intent,
                                       Body=orjson.dumps({"sha256": sha, "at": now}))
                for key, vid in versions:
                    try:
                        async with self._sem:
                            await c.delete_object(Bucket=self.bucket, Key=key, VersionId=vid)
                    except Exception as e:
                        if _code(e) in ("AccessDenied", "403"):
                            raise ArchivePruneDeferred(
                                f"{segment} of {room_id}: the storage refused to delete "
                                f"{key} ({_code(e)}): not pruned yet") from None
                        raise ArchiveWriteError(f"cannot delete {key}: {e}") from e
                entry = manifest_entry(room_id, state.entries + 1, state.head, "prune",
                                       self.clock_ms(), segment=segment, sha256=sha,
                                       reason=reason)
                new = await self._write(room_id, state, [entry], [])
                if new is None:
                    continue
                dropped = await self._commit(room_id, new, self.store.archive_drop_segment(
                    room_id, segment, self._head(room_id, new)))
                self._rooms[room_id] = new
                for key, vid in await self._versions(intent):
                    with contextlib.suppress(Exception):
                        await c.delete_object(Bucket=self.bucket, Key=key, VersionId=vid)
                return int(dropped)
        raise ArchiveWriteError(f"archive of {room_id}: other writers kept taking the next "
                                f"entry ({_RETRIES} tries)")

    # -- reading ---------------------------------------------------------------------------
    async def _segment_bytes(self, room_id: str, segment: str,
                             state: RoomState) -> bytes | None:
        return await self._parts(room_id, segment, state.parts.get(segment, []))

    async def _parts(self, room_id: str, segment: str,
                     parts: Sequence[tuple[int, int, str]]) -> bytes | None:
        got = await self._get_all([part_key(self.prefix, room_id, segment, off, sha)
                                   for off, _, sha in sorted(parts)])
        if not got or any(g is None for g in got):
            return None
        return b"".join(g for g in got if g is not None)

    async def read(self, events: Sequence[ArchivedEvent]) -> list[dict[str, Any]]:
        wanted = sorted({(e.room_id, e.segment) for e in events})
        segments: dict[tuple[str, str], list[bytes]] = {}
        for room_id, seg in wanted:
            async with self._exclusive(room_id):
                state = await self._room(room_id)
            content = None if seg in state.pruned else \
                await self._segment_bytes(room_id, seg, state)
            if content is None:
                raise ArchiveCorrupt(f"archive of {room_id}: {seg} is missing")
            segments[(room_id, seg)] = content.split(b"\n")
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
    async def rooms_in_bucket(self) -> list[str]:
        """The rooms that have manifest objects, by id (from each first entry)."""
        c = await self._s3()
        out = []
        async for page in c.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}rooms/", Delimiter="/"):
            for p in page.get("CommonPrefixes", ()):
                first = await self._get(f"{p['Prefix']}manifest/{1:012d}.jsonl")
                try:
                    room = orjson.loads(first.split(b"\n", 1)[0]).get("room") if first else None
                except (orjson.JSONDecodeError, AttributeError):
                    room = None
                if isinstance(room, str):
                    out.append(room)
        return out

    async def verify(self, room_id: str | None = None) -> VerifyReport:
        heads = {h.room_id: h for h in await self.store.archive_heads()}
        counts = await self.store.archive_rooms()
        rooms = [room_id] if room_id is not None else sorted(
            set(heads) | set(counts) | set(await self.rooms_in_bucket()))
        problems: list[VerifyProblem] = []
        entries = events = media = 0
        for rid in rooms:
            head, indexed = heads.get(rid), counts.get(rid, 0)
            for attempt in range(3):
                found, n, ev, md = await verify_room(_S3Source(self, rid), rid, head, indexed)
                # other replicas may write while this runs (no lock spans them): entries
                # past the head read a moment ago are checked again with a newer head
                if attempt == 2 or not found or any(
                        p.kind not in ("uncommitted", "index") for p in found):
                    break
                await asyncio.sleep(0.5 * (attempt + 1))
                head = await self.store.archive_head(rid)
                indexed = sum(c for _, c, _, _ in await self.store.archive_segments(rid))
            problems.extend(sorted(found, key=lambda p: (p.entry is None, p.entry or 0)))
            entries, events, media = entries + n, events + ev, media + md
        return VerifyReport(not problems, len(rooms), entries, events, media, tuple(problems))


class _S3Source:
    """A room of an :class:`S3Archive`, as verification reads it."""

    def __init__(self, archive: S3Archive, room_id: str):
        self.a = archive
        self.room_id = room_id

    async def manifest(self) -> bytes | None:
        a = self.a
        keys = [k for k in await a._list(manifest_prefix(a.prefix, self.room_id))
                if manifest_first_entry(a.prefix, self.room_id, k) is not None]
        if not keys:
            return None
        return b"".join(d or b"" for d in await a._get_all(keys))

    async def segment(self, name: str, parts: Sequence[tuple[int, int, str]]) -> bytes | None:
        # the parts the entries name, each whole or missing: a missing part leaves a hole
        # that the hash of that entry's bytes reports
        got = await self.a._get_all([part_key(self.a.prefix, self.room_id, name, off, sha)
                                     for off, _, sha in sorted(parts)])
        if all(g is None for g in got):
            return None
        out = bytearray()
        for (_, length, _), g in zip(sorted(parts), got, strict=True):
            out += g if g is not None else b"\0" * length
        return bytes(out)

    async def media_sha256(self, sha256: str) -> str | None:
        return await self.a._media_sha(sha256)

    async def segment_names(self) -> list[str]:
        # a part no entry names is a write that never got its entry (PUT is atomic, and
        # locked objects cannot be cleaned up): it is never read, so it is not reported
        return []

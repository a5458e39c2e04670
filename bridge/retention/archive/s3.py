"""The archive in an S3 bucket with Object Lock (:class:`S3Archive`).

Every object is written once, with Object Lock (retain-until = now + the room's archive
keep period) and, while a legal hold covers the room, an S3 legal hold; the key layout is
in :mod:`.objects`, the entries and the chain are those of the local archive.

Staging and sealing: an append computes its manifest entries as the local archive does and
commits them, with their segment bytes, the index rows and the new head, to the store's
``archive_staged`` table in one transaction: that is the durable point (the live feed gets
store speed, not one PUT round trip per event). A sealer (:meth:`S3Archive.seal`, a task of
every process; any replica may seal any room) writes a room's staged entries when they
reach ``segment_max_bytes`` or the oldest is ``seal_seconds`` old (and all of them on a
clean shutdown): one part object per segment, then one manifest object, then deletes the
rows. The staged entries and the sealed objects together are the room's chain: reading,
export and verification see both.

Crash safety: a killed seal leaves whole objects (a PUT is atomic) and the staged rows; the
next seal finds the manifest object of the first staged entry, checks that it holds
exactly those entries, and only deletes the rows; a part without its manifest object is
named by nothing and read by nobody.

Replicas share the store and the bucket: the head moves by compare-and-set, so of two
writers that both want entry ``n`` of a room one commits and the other reads the room
again and writes after it (the chain cannot fork); a manifest object is put with
``If-None-Match: *``, so two sealers of the same entries write it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ...policy.archive_lock import decide_deletable, decide_object_lock, room_held
from ...policy.retention import Hold
from ...store.base import ArchiveConflict, ArchivedEvent, ArchivedMedia, ArchiveHead
from ...store.domains import ArchiveIndexStore
from .layout import (
    SHA_RE,
    ZERO_HASH,
    RoomState,
    advance,
    append_items,
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
    object_parts,
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
    pick_events,
    segment_infos,
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


@dataclass
class _Sealed:
    """What a room's manifest objects say: the chain so far and, per segment, the part
    objects that hold its bytes as (offset, length, key)."""

    state: RoomState
    parts: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)


def _copy(state: RoomState) -> RoomState:
    return RoomState(entries=state.entries, head=state.head, manifest_bytes=0,
                     segment=state.segment, last_number=state.last_number,
                     ends=dict(state.ends), lines=dict(state.lines), pruned=set(state.pruned),
                     parts={k: list(v) for k, v in state.parts.items()})


class S3Archive(ArchiveWriter):
    """The archive in an S3 bucket. ``client`` is an async context manager making an
    aiobotocore S3 client (entered once, on first use); ``keep_ms`` says how long a room's
    archive is kept (None: forever), ``holds`` lists the legal holds; staged entries are
    sealed after ``seal_seconds`` (None: only by :meth:`seal`, no task)."""

    def __init__(self, client: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
                 bucket: str, store: ArchiveIndexStore, *, prefix: str = "",
                 lock_mode: str = "compliance",
                 keep_ms: Callable[[str], Awaitable[int | None]],
                 holds: Callable[[], Awaitable[Sequence[Hold]]],
                 segment_max_bytes: int = 8 << 20, concurrency: int = 16,
                 seal_seconds: float | None = 30.0,
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
        self.seal_ms = None if seal_seconds is None else int(seal_seconds * 1000)
        self._sealed: dict[str, _Sealed] = {}  # room -> its manifest objects as last read
        self._staged_bytes: dict[str, int] = {}  # room -> bytes staged here since its seal
        self._sealer: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._dirty = False  # entries were staged here: a clean shutdown seals

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
        Lock (raises :class:`ArchiveBucketError`); then start the sealer, which also seals
        what other processes staged and left."""
        await self._s3()
        self._start_sealer()

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
        """Stop the sealer and, when this process staged entries, seal every room (a clean
        shutdown leaves nothing staged); then close the client."""
        if self._sealer is not None:
            self._sealer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sealer
            self._sealer = None
        if self._dirty:
            try:
                await self.seal()
                self._dirty = False
            except Exception as e:  # the rows stay staged: any process seals them later
                log.warning("archive: sealing at shutdown failed: %s", e)
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
        kept apart by the compare-and-set of the store's head when entries are staged, and
        by the conditional put of manifest objects when they are sealed. With ``fresh``, a
        cached state behind the store's head catches up with what another writer added (a
        reader must see it; a writer learns of it when its head move is refused)."""
        async with self._lock(room_id):
            cached = self._rooms.get(room_id)
            if cached is not None and fresh:
                head = await self.store.archive_head(room_id)
                if head is not None and head.entries != cached.entries:
                    self._rooms.pop(room_id, None)
                    await self._room(room_id)
            yield

    async def _room(self, room_id: str) -> RoomState:
        state = self._rooms.get(room_id)
        if state is None:
            try:
                state = await self._sync(room_id)
            except (ArchiveCorrupt, ArchiveBucketError):
                raise
            except Exception as e:
                raise ArchiveWriteError(f"archive of {room_id} unusable: {e}") from e
            self._rooms[room_id] = state
        return state

    async def _sealed_sync(self, room_id: str, base: _Sealed | None,
                           ) -> tuple[_Sealed, list[dict[str, Any]]]:
        """The sealed part of the room after the manifest objects past ``base`` (all of them
        when None), and the entries those objects added."""
        old = base.state if base is not None else RoomState(
            entries=0, head=ZERO_HASH, manifest_bytes=0, segment=None, last_number=0)
        start = manifest_key(self.prefix, room_id, old.entries) if old.entries else ""
        keys = await self._list(manifest_prefix(self.prefix, room_id), start)
        firsts = [manifest_first_entry(self.prefix, room_id, k) for k in keys]
        named = [(f, k) for f, k in zip(firsts, keys, strict=True) if f is not None]
        if not named:
            return base or _Sealed(old, {}), []
        if not contiguous([f for f, _ in named], old.entries + 1):
            raise ArchiveCorrupt(f"archive of {room_id}: manifest objects past entry "
                                 f"{old.entries} do not follow it")
        blobs = [d or b"" for d in await self._get_all([k for _, k in named])]
        m = parse_manifest(b"".join(blobs), room_id, first=old.entries + 1, prev=old.head)
        if m.problem is not None or m.partial_tail:
            why = f"entry {m.problem[0]}: {m.problem[2]}" if m.problem else "a partial line"
            raise ArchiveCorrupt(f"archive of {room_id}: the manifest objects are broken "
                                 f"({why}); writes refused until it is repaired")
        state = _copy(old)
        parts = {k: list(v) for k, v in (base.parts if base is not None else {}).items()}
        at = 0
        for blob in blobs:  # the parts of each manifest object
            lines = blob.count(b"\n")
            for seg, off, length, key in object_parts(self.prefix, room_id,
                                                      m.entries[at:at + lines]):
                parts.setdefault(seg, []).append((off, length, key))
            at += lines
        advance(state, m.entries)
        return _Sealed(state, parts), m.entries

    async def _view(self, room_id: str) -> tuple[_Sealed, list[dict[str, Any]],
                                                 list[tuple[int, str, str, int]]]:
        """(sealed part, entries it added now, staged rows past it) of the room. The staged
        rows are read first: a row deleted after that read was sealed before the listing
        that follows, so sealed + staged leave no gap (a seal in between is seen as one
        and the listing repeated)."""
        added: list[dict[str, Any]] = []
        for attempt in range(5):
            staged = await self.store.archive_staged(room_id)
            base = self._sealed.get(room_id)
            sealed, more = await self._sealed_sync(room_id, base)
            self._sealed[room_id] = sealed
            added += more
            rest = [r for r in staged if r[0] > sealed.state.entries]
            if not rest or rest[0][0] == sealed.state.entries + 1:
                return sealed, added, rest
            if attempt == 4:
                raise ArchiveCorrupt(
                    f"archive of {room_id}: the staged entries start at {rest[0][0]}, the "
                    f"sealed manifest ends at {sealed.state.entries}: entries are missing")
        raise AssertionError("unreachable")

    async def _sync(self, room_id: str) -> RoomState:
        """The room's whole chain (sealed + staged), checked against the store's head, and
        the store indexing any sealed entry it lacks (a write of the unstaged archive
        killed before its store commit)."""
        head = await self.store.archive_head(room_id)
        committed = head.entries if head is not None else 0
        base = self._sealed.get(room_id)
        if base is not None and committed < base.state.entries:
            self._sealed.pop(room_id, None)  # the store went back (a restore): read again
        sealed, added, rest = await self._view(room_id)
        m = parse_manifest(b"".join(r[1].encode() + b"\n" for r in rest), room_id,
                           first=sealed.state.entries + 1, prev=sealed.state.head)
        if m.problem is not None:
            raise ArchiveCorrupt(f"archive of {room_id}: staged entry {m.problem[0]}: "
                                 f"{m.problem[2]}; writes refused until it is repaired")
        state = _copy(sealed.state)
        advance(state, m.entries)
        if state.entries < committed:
            raise ArchiveCorrupt(
                f"archive of {room_id}: the manifest has {state.entries} valid entries, the "
                f"store head says {committed}; writes refused until it is repaired")
        known = {e["n"]: e for e in (*added, *m.entries)}
        at_head = known.get(committed)
        if at_head is not None and head is not None and at_head["hash"] != head.head:
            raise ArchiveCorrupt(
                f"archive of {room_id}: manifest entry {committed} differs from the store "
                "head (the manifest was rewritten); writes refused")
        pending = [e for e in added if e["n"] > committed]
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

    # -- writing: entries are staged in the store, then sealed into objects -----------------
    async def _stage(self, room_id: str, state: RoomState, entries: list[dict[str, Any]],
                     data: Sequence[bytes], events: Sequence[ArchivedEvent], at: int, *,
                     media: Sequence[ArchivedMedia] = (), drop_segment: str | None = None,
                     absent: Sequence[str] = ()) -> tuple[RoomState, int] | None:
        """Commit ``entries`` (with the segment bytes of each) as staged, with their index
        rows and the new head, in one store transaction: the durable point of a write. The
        state after them and the events inserted; None when another writer moved the head
        first, or one of the ``absent`` events is indexed (the cached state is dropped: the
        caller reads the room again and retries)."""
        new = _copy(state)
        advance(new, entries)
        staged = [(e["n"], canonical(e).decode(), d.decode())
                  for e, d in zip(entries, data, strict=True)]
        try:
            inserted = await self.store.archive_stage(
                room_id, staged, events, self._head(room_id, new), prev_entries=state.entries,
                prev_head=state.head, staged_at=at, media=media, drop_segment=drop_segment,
                absent=absent)
        except ArchiveConflict:
            now = await self.store.archive_head(room_id)
            if now is not None and (now.entries, now.head) == (state.entries, state.head):
                return None  # the head is ours: events of the write were archived already
            log.debug("archive of %s: entry %d taken by another writer", room_id,
                      state.entries + 1)
            self._rooms.pop(room_id, None)
            return None
        except Exception as e:
            self._rooms.pop(room_id, None)
            raise ArchiveWriteError(f"archive write for {room_id} failed: {e}") from e
        self._rooms[room_id] = new
        self._dirty = True
        size = self._staged_bytes.get(room_id, 0) + sum(len(d) for d in data)
        self._staged_bytes[room_id] = size
        if size >= self.segment_max_bytes and self._wake is not None:
            self._wake.set()
        self._start_sealer()
        return new, inserted

    async def append(self, room_id: str, events: Sequence[Mapping[str, Any]]) -> AppendResult:
        items = append_items(room_id, events)
        lost = 0
        for _ in range(_RETRIES):
            if lost:  # outside the room's lock: a random pause so two writers stop colliding
                await asyncio.sleep(random.uniform(0, 0.005 * lost))
            async with self._exclusive(room_id, fresh=False):
                state = await self._room(room_id)
                # the live feed's events are new: the staging commit itself checks that
                # (one query less); a new room, or a retry after a refusal, asks first
                ask = lost > 0 or state.entries == 0 or len(items) > 500
                known = await self.store.archive_known(list(items)) if items and ask \
                    else set()
                fresh = [v for k, v in items.items() if k not in known]
                if not fresh:
                    return AppendResult(0, len(events))
                chunks = plan_chunks(state, fresh, self.segment_max_bytes)
                at = self.clock_ms()
                entries: list[dict[str, Any]] = []
                blobs: list[bytes] = []
                prev = state.head
                for i, c in enumerate(chunks):
                    blob = b"".join(line for _, line in c.events)
                    entries.append(manifest_entry(
                        room_id, state.entries + i + 1, prev, "append", at, segment=c.segment,
                        offset=c.offset, length=len(blob), first_line=c.first_line,
                        count=len(c.events), sha256=hashlib.sha256(blob).hexdigest()))
                    blobs.append(blob)
                    prev = entries[-1]["hash"]
                rows = [ArchivedEvent(f[0], room_id, f[1], f[2], f[3], f[4], c.segment,
                                      c.first_line + i, at)
                        for c in chunks for i, (f, _) in enumerate(c.events)]
                if await self._stage(room_id, state, entries, blobs, rows, at,
                                     absent=() if ask else list(items)) is None:
                    lost += 1
                    continue  # another writer took the entry: read again, write after it
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
                # the media object is put (locked) before its entry is staged; it is
                # content-addressed: an object already there with that name is shared, and
                # kept locked at least as long as this room keeps it
                try:
                    await self._extend_lock(room_id, media_key(self.prefix, sha))
                    await self._put_new(media_key(self.prefix, sha), data,
                                        await self._lock_args(room_id))
                except Exception as e:
                    raise ArchiveWriteError(f"archive write for {room_id} failed: {e}") from e
                media = [] if existing is not None else [ArchivedMedia(
                    mxc, sha, len(data), content_type, room_id, event_id, ts, at)]
                if await self._stage(room_id, state, [entry], [b""], [], at,
                                     media=media) is None:
                    continue
                return sha
        raise ArchiveWriteError(f"archive of {room_id}: other writers kept taking the next "
                                f"entry ({_RETRIES} tries)")

    # -- sealing ---------------------------------------------------------------------------
    async def seal_room(self, room_id: str) -> int:
        """Write the room's staged entries as objects (one part per segment, then one
        manifest object, all with Object Lock) and delete the staged rows; returns the
        entries sealed.

        Any replica may seal any room: the manifest object is put with ``If-None-Match``,
        so of two sealers of the same entries one writes it and the other finds it. A
        manifest object already there (another sealer, or a seal killed before it deleted
        the rows) must hold exactly the staged entries from its first one on; then only
        the rows it covers are deleted. A part is named by what the chain fixes (its
        offset and length, or its one entry's sha256), so every sealer writes the same
        bytes under a name."""
        sealed = 0
        async with self._lock(room_id):
            while True:
                rows = await self.store.archive_staged(room_id)
                if not rows:
                    self._staged_bytes.pop(room_id, None)
                    return sealed
                sealed += await self._seal_rows(room_id, rows)

    async def _seal_rows(self, room_id: str, rows: list[tuple[int, str, str, int]]) -> int:
        """Seal staged rows from the first on (one manifest object); the rows it covers."""
        first = rows[0][0]
        entries = [orjson.loads(r[1]) for r in rows]
        if [e.get("n") for e in entries] != list(range(first, first + len(rows))):
            raise ArchiveCorrupt(f"archive of {room_id}: the staged entries from "
                                 f"{first} on are not contiguous")
        key = manifest_key(self.prefix, room_id, first)
        try:
            existing = await self._get(key)
            if existing is None:
                lock = await self._lock_args(room_id)
                data = {e["n"]: r[2].encode() for e, r in zip(entries, rows, strict=True)}
                by_part: list[tuple[str, bytes]] = []
                for seg, off, length, part in object_parts(self.prefix, room_id, entries):
                    blob = b"".join(data[e["n"]] for e in entries
                                    if e["op"] == "append" and e["segment"] == seg
                                    and off <= e["offset"] < off + length)
                    if len(blob) != length:
                        raise ArchiveCorrupt(f"archive of {room_id}: staged bytes of "
                                             f"{seg} at {off} are not {length} bytes")
                    by_part.append((part, blob))
                await asyncio.gather(*(self._put_new(k, b, lock) for k, b in by_part))
                body = b"".join(r[1].encode() + b"\n" for r in rows)
                if not await self._put_new(key, body, lock):
                    existing = await self._get(key)
        except ArchiveCorrupt:
            raise
        except Exception as e:
            raise ArchiveWriteError(f"archive seal of {room_id} failed: {e}") from e
        upto = rows[-1][0]
        if existing is not None:
            # another sealer's object, or this seal's from a run killed before the delete
            m = parse_manifest(existing, room_id, first=first, prev=entries[0]["prev"])
            same = [a["hash"] == b["hash"] for a, b in zip(m.entries, entries, strict=False)]
            if m.problem is not None or m.partial_tail or not m.entries or not all(same):
                raise ArchiveCorrupt(
                    f"archive of {room_id}: manifest object {key} is not the staged "
                    "entries it should hold; staged rows kept")
            upto = m.entries[-1]["n"]
        await self.store.archive_unstage(room_id, upto)
        return upto - first + 1

    async def seal(self, *, everything: bool = True) -> int:
        """Seal every room with staged entries (``everything``), or those due: staged
        bytes at ``segment_max_bytes``, or the oldest staged entry ``seal_seconds`` old;
        several rooms at once. Returns the entries sealed; the first failure is raised
        after the other rooms were tried."""
        now = self.clock_ms()
        due = [room for room, size, oldest, _ in await self.store.archive_staged_rooms()
               if everything or size >= self.segment_max_bytes
               or now - oldest >= self.seal_ms]
        sem = asyncio.Semaphore(8)

        async def one(room: str) -> int:
            async with sem:
                return await self.seal_room(room)

        if everything:
            self._dirty = False  # an append meanwhile sets it again
        got = await asyncio.gather(*(one(r) for r in due), return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException):
                self._dirty = self._dirty or everything
                raise g
        return sum(g for g in got if isinstance(g, int))

    def _start_sealer(self) -> None:
        if self.seal_ms is None or (self._sealer is not None and not self._sealer.done()):
            return
        self._wake = asyncio.Event()
        self._sealer = asyncio.create_task(self._seal_loop(), name="archive-sealer")

    async def _seal_loop(self) -> None:
        assert self._wake is not None and self.seal_ms is not None
        tick = min(1.0, self.seal_ms / 4000)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=tick)
            self._wake.clear()
            try:
                await self.seal(everything=False)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the rows stay staged: the next round tries again
                log.warning("archive seal failed: %s", e)
                await asyncio.sleep(tick)

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
        the storage, raises :class:`ArchivePruneDeferred` and records no prune. The room is
        sealed first: a prune touches sealed objects only (a segment that still has staged
        entries, written by another replica meanwhile, is deferred)."""
        for _ in range(_RETRIES):
            await self.seal_room(room_id)
            async with self._exclusive(room_id):
                state = await self._room(room_id)
                if segment in state.pruned:
                    return 0
                if segment not in state.ends:
                    raise ValueError(f"{segment} is not a segment of the archive of {room_id}")
                sealed, _, rest = await self._view(room_id)
                if any(orjson.loads(r[1]).get("segment") == segment for r in rest):
                    raise ArchivePruneDeferred(f"{segment} of {room_id} has entries not "
                                               "sealed yet: not pruned yet")
                c = await self._s3()
                intent = prune_intent_key(self.prefix, room_id, segment)
                recorded = await self._get(intent)
                if recorded is not None:
                    sha = orjson.loads(recorded)["sha256"]
                else:
                    content = await self._parts(sealed.parts.get(segment, []))
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
                at = self.clock_ms()
                entry = manifest_entry(room_id, state.entries + 1, state.head, "prune", at,
                                       segment=segment, sha256=sha, reason=reason)
                before = await self.store.archive_segments(room_id)
                dropped = sum(n for s, n, _, _ in before if s == segment)
                if await self._stage(room_id, state, [entry], [b""], [], at,
                                     drop_segment=segment) is None:
                    continue
                for key, vid in await self._versions(intent):
                    with contextlib.suppress(Exception):
                        await c.delete_object(Bucket=self.bucket, Key=key, VersionId=vid)
                return dropped
        raise ArchiveWriteError(f"archive of {room_id}: other writers kept taking the next "
                                f"entry ({_RETRIES} tries)")

    # -- reading ---------------------------------------------------------------------------
    async def _parts(self, parts: Sequence[tuple[int, int, str]]) -> bytes | None:
        got = await self._get_all([key for _, _, key in sorted(parts)])
        if any(g is None for g in got):
            return None
        return b"".join(g for g in got if g is not None)

    async def _segment_bytes(self, room_id: str, segment: str) -> bytes | None:
        """A segment's bytes: its sealed parts, then its staged appends (caller holds the
        room)."""
        sealed, _, rest = await self._view(room_id)
        content = await self._parts(sealed.parts.get(segment, []))
        if content is None:
            return None
        staged = []
        for n, entry, data, _ in rest:
            e = orjson.loads(entry)
            if e.get("op") == "append" and e.get("segment") == segment:
                staged.append((e["offset"], n, data.encode()))
        return content + b"".join(d for _, _, d in sorted(staged))

    async def read(self, events: Sequence[ArchivedEvent]) -> list[dict[str, Any]]:
        wanted = sorted({(e.room_id, e.segment) for e in events})
        segments: dict[tuple[str, str], list[bytes]] = {}
        for room_id, seg in wanted:
            async with self._exclusive(room_id):
                state = await self._room(room_id)
                content = None if seg in state.pruned else \
                    await self._segment_bytes(room_id, seg)
            if content is None:
                raise ArchiveCorrupt(f"archive of {room_id}: {seg} is missing")
            segments[(room_id, seg)] = content.split(b"\n")
        return pick_events(events, segments)

    async def segments(self, room_id: str) -> list[SegmentInfo]:
        async with self._exclusive(room_id):
            state = await self._room(room_id)
        return segment_infos(state, await self.store.archive_segments(room_id))

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
    """A room of an :class:`S3Archive`, as verification reads it: its sealed manifest
    objects, then its staged entries (the staged rows are read first, so a seal meanwhile
    leaves no gap; rows that a sealed object already holds are left out)."""

    def __init__(self, archive: S3Archive, room_id: str):
        self.a = archive
        self.room_id = room_id
        self.parts: dict[str, list[tuple[int, int, str]]] = {}
        self.staged: dict[str, list[tuple[int, bytes]]] = {}

    async def manifest(self) -> bytes | None:
        a, room = self.a, self.room_id
        rows = await a.store.archive_staged(room)
        keys = [k for k in await a._list(manifest_prefix(a.prefix, room))
                if manifest_first_entry(a.prefix, room, k) is not None]
        blobs = [d or b"" for d in await a._get_all(keys)]
        for blob in blobs:
            objs = []
            for line in blob.split(b"\n")[:-1]:
                try:
                    objs.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    objs.append(None)
            for seg, off, length, key in object_parts(a.prefix, room, objs):
                self.parts.setdefault(seg, []).append((off, length, key))
        data = b"".join(blobs)
        sealed = data.count(b"\n")
        staged = []
        for n, entry, seg_bytes, _ in rows:
            if n <= sealed:
                continue
            staged.append(entry.encode() + b"\n")
            e = orjson.loads(entry)
            if isinstance(e, dict) and e.get("op") == "append" \
                    and isinstance(e.get("offset"), int):
                self.staged.setdefault(str(e.get("segment")), []).append(
                    (e["offset"], seg_bytes.encode()))
        if not keys and not staged:
            return None
        return data + b"".join(staged)

    async def segment(self, name: str, parts: Sequence[tuple[int, int, str]]) -> bytes | None:
        # the part objects the manifest objects name, each whole or missing (a missing part
        # leaves a hole that the hash of its entries' bytes reports), and the staged bytes
        sealed = sorted(self.parts.get(name, []))
        staged = sorted(self.staged.get(name, []))
        got = await self.a._get_all([key for _, _, key in sealed])
        if all(g is None for g in got) and not staged:
            return None
        pieces = [(off, g if g is not None else b"\0" * length)
                  for (off, length, _), g in zip(sealed, got, strict=True)] + staged
        out = bytearray()
        for off, blob in sorted(pieces, key=lambda p: p[0]):
            if len(out) < off:
                out += b"\0" * (off - len(out))
            out[off:off + len(blob)] = blob
        return bytes(out)

    async def media_sha256(self, sha256: str) -> str | None:
        return await self.a._media_sha(sha256)

    async def segment_names(self) -> list[str]:
        # a part no entry names is a write that never got its entry (PUT is atomic, and
        # locked objects cannot be cleaned up): it is never read, so it is not reported
        return []

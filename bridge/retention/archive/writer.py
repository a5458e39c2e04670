"""What an archive writer promises: the :class:`ArchiveWriter` interface, its results and
its two errors (a corrupt archive, a failed write)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ...policy.retention import Hold
from ...store.base import ArchivedEvent
from .layout import RoomState


class ArchiveCorrupt(RuntimeError):
    """The archive files do not match the store's head or their own manifest; writes to the
    room are refused (a RuntimeError, so a purge run stops on it like on other failures)."""


class ArchiveWriteError(OSError):
    """An archive write failed; nothing of it was indexed (an OSError: an I/O failure to
    whoever handles those, and a purge run stops on it)."""


class ArchivePruneDeferred(ArchiveWriteError):
    """The storage refused to delete a segment yet (its Object Lock retention has not
    passed, or a legal hold is on it): nothing was recorded as pruned; a later run tries
    again."""


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

    async def read_media(self, sha256: str) -> bytes | None:
        """The bytes of an archived media hash, or None when absent (a writer without
        local files overrides this)."""
        path = self.media_path(sha256)
        if path is None:
            return None
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def check(self) -> None:  # noqa: B027
        """Refuse storage that cannot hold a compliance archive (raises); called at
        start-up. A local directory is made on first write."""

    async def aclose(self) -> None:  # noqa: B027
        """Release connections (an object store's client)."""

    async def apply_holds(self, holds: Sequence[Hold], rooms: Sequence[str]) -> None:  # noqa: B027
        """Mirror the active legal holds onto the stored objects of ``rooms`` where the
        storage has holds of its own (S3 legal holds); nothing for a local directory."""

    @abstractmethod
    async def verify(self, room_id: str | None = None) -> VerifyReport:
        """Check every room's (or one room's) chain, segments, media and head."""

    @abstractmethod
    async def prune_segment(self, room_id: str, segment: str, reason: str) -> int:
        """Delete a segment for the archive's own retention; return index rows dropped."""

    @abstractmethod
    async def segments(self, room_id: str) -> list[SegmentInfo]:
        """The room's segments that are not pruned, by name."""


def pick_events(events: Sequence[ArchivedEvent],
                segments: Mapping[tuple[str, str], list[bytes]]) -> list[dict[str, Any]]:
    """The archived events ``events`` names, read from their segments' lines (``segments``:
    (room, segment) -> the segment's bytes split at newlines), in the order asked; any
    writer's :meth:`ArchiveWriter.read`. A line that is not the event the index names
    raises :class:`ArchiveCorrupt`."""
    result = []
    for e in events:
        lines = segments[(e.room_id, e.segment)]
        obj = orjson.loads(lines[e.line - 1]) if 0 < e.line < len(lines) else None
        if not isinstance(obj, dict) or obj.get("event_id") != e.event_id:
            raise ArchiveCorrupt(f"archive of {e.room_id}: {e.segment} line {e.line} "
                                 f"is not event {e.event_id}")
        result.append(obj)
    return result


def segment_infos(state: RoomState,
                  stats: Sequence[tuple[str, int, int | None, int | None]]) -> list[SegmentInfo]:
    """A room's live segments (pruned ones left out), named in order, from the writer's
    reconciled ``state`` and the index's per-segment ``stats`` (name, events, first and
    last timestamp); any writer's :meth:`ArchiveWriter.segments`."""
    by_name = {s[0]: s for s in stats}
    out = []
    for name in sorted(state.ends):
        if name in state.pruned:
            continue
        s = by_name.get(name)
        out.append(SegmentInfo(name, s[1] if s else 0, s[2] if s else None,
                               s[3] if s else None, state.ends[name],
                               name != state.segment))
    return out

"""The index of the compliance archive (:class:`~bridge.store.domains.ArchiveIndexStore`):
where each archived event's line is, each room's chained head, archived media."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import ArchiveConflict, ArchivedEvent, ArchivedMedia, ArchiveHead
from .db import Step
from .shared import SharedDatabase


class SQLArchiveIndexStore:
    """The archive index, on the shared database."""

    _AEV_COLS = ("event_id, room_id, sender, type, state_key, ts, segment, line, archived_at,"
                 " purged_at")
    _HEAD_COLS = "room_id, entries, head, segment, segment_bytes, updated_at"
    _MEDIA_COLS = ("mxc, sha256, size, content_type, room_id, event_id, ts, archived_at,"
                   " deleted_at")
    # Rows per multi-row INSERT: a plain (not ``many``) step reports its row count on both
    # engines, and 500 x 10 parameters stays far below either engine's parameter limit.
    _CHUNK = 500

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    def _head_step(self, head: ArchiveHead) -> Step:
        # Only forward: a head that is not past the stored one changes no row, and the
        # batch (require_first) then writes nothing.
        return (
            f"INSERT INTO archive_heads ({self._HEAD_COLS}) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (room_id) DO UPDATE SET entries = excluded.entries,"
            " head = excluded.head, segment = excluded.segment,"
            " segment_bytes = excluded.segment_bytes, updated_at = excluded.updated_at"
            " WHERE archive_heads.entries < excluded.entries",
            (head.room_id, head.entries, head.head, head.segment, head.segment_bytes,
             head.updated_at), False)

    async def _batch_with_head(self, head: ArchiveHead | None, steps: list[Step]) -> list[int]:
        if head is None:
            return await self.db.batch(steps) if steps else []
        counts = await self.db.batch([self._head_step(head), *steps], require_first=True)
        if counts[0] == 0:
            raise ArchiveConflict(
                f"archive head of {head.room_id} is already at or past entry {head.entries}")
        return counts[1:]

    async def archive_commit(self, events: Sequence[ArchivedEvent], head: ArchiveHead,
                             media: Sequence[ArchivedMedia] = ()) -> int:
        event_steps = self._event_steps(events)
        counts = await self._batch_with_head(head, event_steps + self._media_steps(media))
        return sum(counts[:len(event_steps)])

    def _event_steps(self, events: Sequence[ArchivedEvent]) -> list[Step]:
        # multi-row inserts, one statement per chunk; an event indexed already is left as is
        steps: list[Step] = []
        width = len(self._AEV_COLS.split(","))
        for i in range(0, len(events), self._CHUNK):
            chunk = events[i:i + self._CHUNK]
            values = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(chunk))
            args = [v for e in chunk for v in (
                e.event_id, e.room_id, e.sender, e.type, e.state_key, e.ts, e.segment, e.line,
                e.archived_at, e.purged_at)]
            steps.append((f"INSERT INTO archive_events ({self._AEV_COLS}) VALUES {values}"
                          " ON CONFLICT (event_id) DO NOTHING", args, False))
        return steps

    def _media_steps(self, media: Sequence[ArchivedMedia]) -> list[Step]:
        if not media:
            return []
        return [(f"INSERT INTO archive_media ({self._MEDIA_COLS})"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (mxc) DO NOTHING",
                 [(m.mxc, m.sha256, m.size, m.content_type, m.room_id, m.event_id, m.ts,
                   m.archived_at, m.deleted_at) for m in media], True)]

    async def archive_known(self, event_ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(event_ids))
        out: set[str] = set()
        for i in range(0, len(ids), self._CHUNK):
            chunk = ids[i:i + self._CHUNK]
            rows = await self.db.fetch(
                "SELECT event_id FROM archive_events WHERE event_id IN ("
                + ", ".join("?" * len(chunk)) + ")", *chunk)
            out.update(r[0] for r in rows)
        return out

    async def archive_events_by_id(self, event_ids: Sequence[str]) -> list[ArchivedEvent]:
        ids = list(dict.fromkeys(event_ids))
        out: list[ArchivedEvent] = []
        for i in range(0, len(ids), self._CHUNK):
            chunk = ids[i:i + self._CHUNK]
            rows = await self.db.fetch(
                f"SELECT {self._AEV_COLS} FROM archive_events WHERE event_id IN ("
                + ", ".join("?" * len(chunk)) + ")", *chunk)
            out.extend(ArchivedEvent(*tuple(r)) for r in rows)
        out.sort(key=lambda e: (e.ts, e.segment, e.line, e.room_id))
        return out

    async def archive_head(self, room_id: str) -> ArchiveHead | None:
        rows = await self.db.fetch(
            f"SELECT {self._HEAD_COLS} FROM archive_heads WHERE room_id = ?", room_id)
        return ArchiveHead(*tuple(rows[0])) if rows else None

    async def archive_heads(self) -> list[ArchiveHead]:
        rows = await self.db.fetch(
            f"SELECT {self._HEAD_COLS} FROM archive_heads ORDER BY room_id")
        return [ArchiveHead(*tuple(r)) for r in rows]

    async def archive_query(
        self, *, room_id: str | None = None, senders: Sequence[str] | None = None,
        since_ms: int | None = None, until_ms: int | None = None,
        include_purged: bool = True,
        after: tuple[int, str, int] | tuple[int, str, int, str] | None = None,
        limit: int = 10000, archive_order: bool = False,
    ) -> list[ArchivedEvent]:
        if archive_order and room_id is None:
            raise ValueError("archive order is a room's order: give room_id")
        where: list[str] = []
        args: list[Any] = []
        if room_id is not None:
            where.append("room_id = ?")
            args.append(room_id)
        if senders is not None:
            if not senders:
                return []
            where.append("sender IN (" + ", ".join("?" * len(senders)) + ")")
            args.extend(senders)
        if since_ms is not None:
            where.append("ts >= ?")
            args.append(since_ms)
        if until_ms is not None:
            where.append("ts <= ?")
            args.append(until_ms)
        if not include_purged:
            where.append("purged_at IS NULL")
        if after is not None:
            # row values: SQLite >= 3.15 and PostgreSQL compare them lexicographically
            if archive_order:
                where.append("(segment, line) > (?, ?)")
                args.extend(after[1:3])
            elif len(after) == 4:
                where.append("(ts, segment, line, room_id) > (?, ?, ?, ?)")
            else:
                where.append("(ts, segment, line) > (?, ?, ?)")
            if not archive_order:
                args.extend(after)
        sql = f"SELECT {self._AEV_COLS} FROM archive_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        order = "segment, line" if archive_order else "ts, segment, line, room_id"
        rows = await self.db.fetch(sql + f" ORDER BY {order} LIMIT ?", *args, limit)
        return [ArchivedEvent(*tuple(r)) for r in rows]

    async def archive_timestamps(self, room_id: str, *, unpurged_only: bool = True,
                                 messages_only: bool = False) -> list[tuple[int, str | None]]:
        sql = "SELECT ts, sender FROM archive_events WHERE room_id = ?"
        if unpurged_only:
            sql += " AND purged_at IS NULL"
        if messages_only:
            sql += " AND state_key IS NULL"
        rows = await self.db.fetch(sql + " ORDER BY ts, segment, line", room_id)
        return [(int(r[0]), r[1]) for r in rows]

    async def archive_rooms(self) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT room_id, COUNT(*) FROM archive_events GROUP BY room_id ORDER BY room_id")
        return {r[0]: int(r[1]) for r in rows}

    async def archive_segments(self, room_id: str) -> list[tuple[str, int, int, int]]:
        rows = await self.db.fetch(
            "SELECT segment, COUNT(*), MIN(ts), MAX(ts) FROM archive_events"
            " WHERE room_id = ? GROUP BY segment ORDER BY segment", room_id)
        return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def archive_mark_purged(self, room_id: str, up_to_ts: int, now_ms: int) -> int:
        counts = await self.db.batch([(
            "UPDATE archive_events SET purged_at = ?"
            " WHERE room_id = ? AND ts < ? AND purged_at IS NULL AND state_key IS NULL",
            (now_ms, room_id, up_to_ts), False)])
        return counts[0]

    async def archive_mark_gone(self, room_id: str, event_ids: Sequence[str],
                                now_ms: int) -> int:
        if not event_ids:
            return 0
        marks = ", ".join("?" * len(event_ids))
        counts = await self.db.batch([(
            "UPDATE archive_events SET purged_at = ? WHERE room_id = ? AND event_id IN "
            f"({marks}) AND purged_at IS NULL AND state_key IS NULL",
            (now_ms, room_id, *event_ids), False)])
        return counts[0]

    async def archive_drop_segment(self, room_id: str, segment: str,
                                   head: ArchiveHead | None = None) -> int:
        counts = await self._batch_with_head(head, [(
            "DELETE FROM archive_events WHERE room_id = ? AND segment = ?",
            (room_id, segment), False)])
        return counts[0]

    async def archive_media_get(self, mxc: str) -> ArchivedMedia | None:
        rows = await self.db.fetch(
            f"SELECT {self._MEDIA_COLS} FROM archive_media WHERE mxc = ?", mxc)
        return ArchivedMedia(*tuple(rows[0])) if rows else None

    async def archive_media_list(self, room_id: str | None = None, *,
                                 sha256: str | None = None) -> list[ArchivedMedia]:
        where, args = [], []
        for col, val in (("room_id", room_id), ("sha256", sha256)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {self._MEDIA_COLS} FROM archive_media"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self.db.fetch(sql + " ORDER BY ts, mxc", *args)
        return [ArchivedMedia(*tuple(r)) for r in rows]

    async def archive_media_mark_deleted(self, mxcs: Sequence[str], now_ms: int) -> None:
        if mxcs:
            await self.db.batch([(
                "UPDATE archive_media SET deleted_at = ? WHERE mxc = ? AND deleted_at IS NULL",
                [(now_ms, m) for m in mxcs], True)])

    # -- staged entries of an object-store archive (sealed later) ----------------------------
    async def archive_stage(self, room_id: str, staged: Sequence[tuple[int, str, str]],
                            events: Sequence[ArchivedEvent], head: ArchiveHead, *,
                            prev_entries: int, prev_head: str, staged_at: int,
                            media: Sequence[ArchivedMedia] = (),
                            drop_segment: str | None = None,
                            absent: Sequence[str] = ()) -> int:
        # compare-and-set on the head: exactly one writer moves it from a given entry, so
        # two replicas staging the same entry number cannot both commit (no fork); a new
        # room (prev 0) inserts its row, a second insert finds it and matches nothing
        cas: Step = (
            f"INSERT INTO archive_heads ({self._HEAD_COLS}) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (room_id) DO UPDATE SET entries = excluded.entries,"
            " head = excluded.head, segment = excluded.segment,"
            " segment_bytes = excluded.segment_bytes, updated_at = excluded.updated_at"
            " WHERE archive_heads.entries = ? AND archive_heads.head = ?"
            # the events must not be indexed yet (spares the writer a query before it)
            + (" AND NOT EXISTS (SELECT 1 FROM archive_events WHERE event_id IN ("
               + ", ".join("?" * len(absent)) + "))" if absent else ""),
            (head.room_id, head.entries, head.head, head.segment, head.segment_bytes,
             head.updated_at, prev_entries, prev_head, *absent), False)
        steps: list[Step] = [cas]
        if drop_segment is not None:
            steps.append(("DELETE FROM archive_events WHERE room_id = ? AND segment = ?",
                          (room_id, drop_segment), False))
        for i in range(0, len(staged), self._CHUNK):  # multi-row: one statement, not many
            chunk = staged[i:i + self._CHUNK]
            steps.append((
                "INSERT INTO archive_staged (room_id, entry_index, entry, data, staged_at)"
                " VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk)),
                [v for n, entry, data in chunk for v in (room_id, n, entry, data, staged_at)],
                False))
        first_event = len(steps)
        steps += self._event_steps(events)
        last_event = len(steps)
        steps += self._media_steps(media)
        counts = await self.db.batch(steps, require_first=True)
        if counts[0] == 0:
            raise ArchiveConflict(f"archive head of {room_id} is no longer at entry "
                                  f"{prev_entries}, or one of the events is indexed")
        return sum(counts[first_event:last_event])

    async def archive_staged(self, room_id: str) -> list[tuple[int, str, str, int]]:
        rows = await self.db.fetch(
            "SELECT entry_index, entry, data, staged_at FROM archive_staged"
            " WHERE room_id = ? ORDER BY entry_index", room_id)
        return [(int(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]

    async def archive_staged_rooms(self) -> list[tuple[str, int, int, int]]:
        rows = await self.db.fetch(
            "SELECT room_id, SUM(LENGTH(data)), MIN(staged_at), COUNT(*) FROM archive_staged"
            " GROUP BY room_id ORDER BY room_id")
        return [(r[0], int(r[1] or 0), int(r[2]), int(r[3])) for r in rows]

    async def archive_unstage(self, room_id: str, up_to: int) -> int:
        counts = await self.db.batch([(
            "DELETE FROM archive_staged WHERE room_id = ? AND entry_index <= ?",
            (room_id, up_to), False)])
        return counts[0]

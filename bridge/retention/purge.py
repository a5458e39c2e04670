"""Archive before purge: a room's history is read back through the admin API, whatever the
archive lacks is written, and only then is the homeserver's copy purged, in bounded steps up
to the cutoff the policy plans; then expired media, and the archive's own retention.

Plans and cutoffs come from :class:`~bridge.policy.retention.RetentionPolicy`, what the holds
keep from :mod:`bridge.policy.retention_rooms`; this module reads and purges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..config.retention import RetentionConfig
from ..matrix.client import HomeserverUnavailable, MatrixClient, MatrixRequestError
from ..metrics import Metrics
from ..policy.retention import Hold, Period, PurgePlan, RetentionPolicy
from ..policy.retention_rooms import held_messages, segment_held, with_unarchived
from ..store.base import AuditRecord
from ..store.domains import ArchiveIndexStore, AuditStore, RetentionRoomStore
from .archive import ArchivePruneDeferred, ArchiveWriter
from .feed import ArchiveFeed
from .redaction import DeferredRedactor
from .rooms import RoomRetention, room_row

log = logging.getLogger(__name__)

_ADMIN_PAGE = 1000
_BOUNDARY_TRIES = 50  # archived events tried as a purge boundary before using the time


@dataclass
class PurgeStep:
    up_to_ts: int
    seconds: float
    status: str


@dataclass
class RoomRun:
    """What a retention run did (or would do) in one room."""

    room_id: str
    plan: PurgePlan | None = None
    read: int = 0  # events read back through the admin API
    archived: int = 0  # of those, missing from the archive and written now
    media_archived: int = 0
    steps: list[PurgeStep] = field(default_factory=list)
    purged: int = 0
    redacted: int = 0  # due events a hold kept from the purge, whose content was redacted
    not_redacted: int = 0  # of those, left: Enclave could not redact them under its name
    not_redacted_reason: str | None = None
    media_deleted: int = 0
    error: str | None = None


class Purger:
    """Archives what a room's history lacks, then purges what is due."""

    def __init__(self, config: RetentionConfig, policy: RetentionPolicy, *,
                 room_retention: RoomRetention, feed: ArchiveFeed,
                 redactor: DeferredRedactor, index: ArchiveIndexStore, archive: ArchiveWriter,
                 client: MatrixClient, audit: AuditStore, retention_rooms: RetentionRoomStore,
                 metrics: Metrics, clock_ms: Callable[[], int], server_name: str,
                 admin_user_id: str,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.config = config
        self.policy = policy
        self.room_retention = room_retention
        self.feed = feed
        self.redactor = redactor
        self.index = index
        self.archive = archive
        self.client = client
        self.audit = audit
        self.retention_rooms = retention_rooms
        self.metrics = metrics
        self.clock_ms = clock_ms
        self.server_name = server_name
        self.admin_user_id = admin_user_id
        self._sleep = sleep


    async def backfill(self, room_id: str, up_to_ts: int, *,
                       write: bool) -> tuple[int, list[tuple[int, str | None, bool]]]:
        """Read the room's history from its beginning through the admin API until past
        ``up_to_ts``; archive what the archive lacks (``write``). Returns (read, missing).

        Reading stops after the first page whose events are all at or after ``up_to_ts``,
        so events a little out of timestamp order around the cutoff are archived too. Returns
        (events read, (ts, sender, is_state) of those the archive lacked)."""
        token: str | None = None
        read = 0
        lacked: list[tuple[int, str | None, bool]] = []
        while True:
            chunk, token = await self.client.admin_room_messages(
                room_id, admin=self.admin_user_id, from_token=token, limit=_ADMIN_PAGE)
            events = [e for e in chunk if isinstance(e.get("event_id"), str)]
            read += len(events)
            known = await self.index.archive_known([e["event_id"] for e in events])
            lacking = [e for e in events if e["event_id"] not in known]
            lacked += [(int(e.get("origin_server_ts") or 0), e.get("sender"), "state_key" in e)
                       for e in lacking]
            if write and lacking:
                for e in lacking:
                    e.setdefault("room_id", room_id)
                res = await self.archive.append(room_id, lacking)
                self.metrics.archived_events.labels(path="backfill").inc(res.written)
                await self.feed.copy_media(room_id, lacking)
                again = await self.index.archive_known([e["event_id"] for e in lacking])
                if len(again) != len(lacking):
                    raise RuntimeError(f"archive of {room_id} is missing "
                                       f"{len(lacking) - len(again)} events after writing")
            if token is None or not events or all(
                    int(e.get("origin_server_ts") or 0) >= up_to_ts for e in events):
                return read, lacked
            if self.config.purge.pause_seconds > 0:
                # reading back a big room is heavy for the homeserver too (bench/)
                await self._sleep(self.config.purge.pause_seconds)

    async def plan_room(self, room_id: str, now: int, holds: Sequence[Hold], period: Period,
                        extra: Sequence[tuple[int, str | None, bool]] = ()) -> PurgePlan:
        """The room's purge plan from the archive index (plus ``extra`` (ts, sender,
        is_state) events a dry run read but did not archive) and the holds.

        Only messages count: the homeserver keeps state events through a purge (they make
        up the room), so they are never due, and a held user's join does not hold the
        room."""
        messages = [*await self.index.archive_timestamps(room_id, messages_only=True),
                    *((ts, sender) for ts, sender, is_state in extra if not is_state)]
        stamps = sorted(ts for ts, _ in messages)
        held = held_messages(room_id, messages, holds)
        return self.policy.plan_purge(room_id, period, now, stamps, held.timestamps,
                                      held.hold_ids, self.config.purge.window_events)

    async def rooms(self) -> list[str]:
        """Every room the homeserver knows, and every room in the archive."""
        out: set[str] = set(await self.index.archive_rooms())
        start: int | None = 0
        while start is not None:
            page, start = await self.client.admin_list_rooms(admin=self.admin_user_id,
                                                             start=start)
            out.update(r["room_id"] for r in page if isinstance(r.get("room_id"), str))
        return sorted(out)

    async def _start_purge(self, room_id: str, up_to_ts: int) -> str:
        """Start Synapse's purge of the room's events before ``up_to_ts``; its purge id.

        The boundary is the archive's first unpurged event at or after the time. The
        homeserver may no longer have it (an earlier purge took it: events of one
        millisecond, or concurrent sends, are not ordered the same in the archive and in
        the room's DAG; or an operator purged by hand): Synapse answers 404, the event is
        marked gone in the archive index and the next one is tried. With no usable event
        the time itself is used (Synapse keeps the room's last event in any case)."""
        gone: list[str] = []
        try:
            after: tuple[int, str, int] | None = None
            for _ in range(_BOUNDARY_TRIES):
                rows = await self.index.archive_query(
                    room_id=room_id, since_ms=up_to_ts, include_purged=False, after=after,
                    limit=1)
                if not rows:
                    break
                row = rows[0]
                after = (row.ts, row.segment, row.line)
                try:
                    return await self.client.admin_purge_history(
                        room_id, admin=self.admin_user_id, up_to_event_id=row.event_id)
                except MatrixRequestError as e:
                    if e.status != 404:
                        raise
                    log.info("retention: purge boundary %s of %s is gone from the "
                             "homeserver (%s); trying the next event", row.event_id,
                             room_id, e.error)
                    if row.state_key is None:
                        gone.append(row.event_id)
            return await self.client.admin_purge_history(
                room_id, admin=self.admin_user_id, up_to_ts=up_to_ts)
        finally:
            if gone:
                await self.index.archive_mark_gone(room_id, gone, self.clock_ms())

    async def _purge_step(self, room_id: str, up_to_ts: int) -> PurgeStep:
        """Purge the room's events with ts < ``up_to_ts``.

        Synapse's ``purge_up_to_ts`` stops at the room's last event before the first event
        of *any* room after that time (and measures received time), so it can keep a due
        event; the step names the room's first event to keep instead, and Synapse purges
        everything before it. With no later event in the archive the time is used (Synapse
        keeps a room's last event in any case)."""
        pcfg = self.config.purge
        started = time.monotonic()
        purge_id = await self._start_purge(room_id, up_to_ts)
        while True:
            status, error = await self.client.admin_purge_status(purge_id,
                                                                 admin=self.admin_user_id)
            if status in ("complete", "failed"):
                break
            if time.monotonic() - started > pcfg.step_timeout_seconds:
                raise TimeoutError(f"purge {purge_id} of {room_id} still {status} after "
                                   f"{pcfg.step_timeout_seconds:.0f}s")
            await self._sleep(pcfg.poll_seconds)
        seconds = time.monotonic() - started
        self.metrics.purge_step_seconds.observe(seconds)
        if status == "failed":
            raise RuntimeError(f"purge {purge_id} of {room_id} failed: {error}")
        return PurgeStep(up_to_ts, seconds, status)

    async def run_room(self, room_id: str, *, apply: bool, now: int, holds: Sequence[Hold],
                       progress: Callable[[str], None] | None = None) -> RoomRun:
        """Plan (and with ``apply`` carry out) retention for one room: archive whatever is
        missing, then purge in bounded steps up to the cutoff, then expired media."""
        rr = RoomRun(room_id)
        room_class = await self.room_retention.room_class(room_id)
        period = await self.room_retention.period(room_id, room_class)
        try:
            due_before = None if period.keep_ms is None else now - period.keep_ms
            lacked: list[tuple[int, str | None, bool]] = []
            if due_before is not None:
                rr.read, lacked = await self.backfill(room_id, due_before, write=apply)
            if apply:
                rr.archived = len(lacked)
                rr.plan = await self.plan_room(room_id, now, holds, period)
            else:
                rr.plan = await self.plan_room(room_id, now, holds, period, lacked)
                if lacked:
                    rr.plan = with_unarchived(rr.plan, len(lacked))
                return rr
            for w in rr.plan.windows:
                step = await self._purge_step(room_id, w)
                rr.steps.append(step)
                n = await self.index.archive_mark_purged(room_id, w, self.clock_ms())
                rr.purged += n
                self.metrics.purged_events.inc(n)
                if progress is not None:
                    progress(f"{room_id}: purged up to {w} ({rr.purged} events, "
                             f"step {step.seconds:.2f}s)")
                if self.config.purge.pause_seconds > 0:
                    await self._sleep(self.config.purge.pause_seconds)
            if rr.plan.held_from_ms is not None and rr.plan.deferred_events:
                rr.redacted, rr.not_redacted, rr.not_redacted_reason = (
                    await self.redactor.redact(room_id, rr.plan, holds))
            rr.media_deleted = await self.purge_media(room_id, period, now, holds)
            if rr.steps or rr.media_deleted or rr.redacted:
                old = await self.retention_rooms.retention_room_get(room_id)
                await self.retention_rooms.retention_room_put(room_row(
                    old, room_id, room_class, self.clock_ms(),
                    purged_up_to=rr.plan.cutoff_ms, last_purge_at=self.clock_ms()))
                await self.audit.add_audit(AuditRecord(
                    ts=self.clock_ms(), source="retention", kind="purge", outcome="applied",
                    room_id=room_id, rule_id=period.rule_id, reason=rr.plan.reason,
                    detail=(f"purged {rr.purged} events up to {rr.plan.cutoff_ms} in "
                            f"{len(rr.steps)} steps; {rr.plan.held_events} held, "
                            f"{rr.plan.deferred_events} deferred by holds "
                            f"{list(rr.plan.hold_ids)} ({rr.redacted} of them redacted now"
                            + (f", {rr.not_redacted} not: {rr.not_redacted_reason}"
                               if rr.not_redacted else "") + "); "
                            f"media deleted {rr.media_deleted}")))
        except (HomeserverUnavailable, MatrixRequestError, OSError, RuntimeError,
                TimeoutError) as e:
            # the archive write failed or the homeserver did: nothing more is purged here
            rr.error = f"{type(e).__name__}: {e}"
            log.error("retention of %s stopped: %s", room_id, rr.error)
            await self.audit.add_audit(AuditRecord(
                ts=self.clock_ms(), source="retention", kind="purge", outcome="failed",
                room_id=room_id, rule_id=period.rule_id, reason="retention run stopped",
                detail=rr.error))
        return rr


    async def purge_media(self, room_id: str, period: Period, now: int,
                          holds: Sequence[Hold]) -> int:
        """Delete the room's local media whose period is over and that no hold covers;
        only media that is safely in the archive."""
        deleted = []
        for m in await self.index.archive_media_list(room_id=room_id):
            if m.deleted_at is not None or not m.mxc.startswith(f"mxc://{self.server_name}/"):
                continue
            if not self.policy.media_due(period, m.ts, now):
                continue
            if any(h.active() and h.matches(room_id, None, m.ts) and not h.users
                   for h in holds):
                continue
            sender = await self._media_sender(m.event_id)
            if any(h.active() and h.matches(room_id, sender, m.ts) for h in holds):
                continue
            await self.client.admin_delete_media(m.mxc, admin=self.admin_user_id)
            deleted.append(m.mxc)
        if deleted:
            await self.index.archive_media_mark_deleted(deleted, self.clock_ms())
        return len(deleted)

    async def prune_archive(self, now: int, holds: Sequence[Hold],
                            rooms: Sequence[str] | None = None) -> int:
        """The archive's own retention: delete sealed segments whose events are past
        ``archive.keep`` (or the class's ``archive_keep``) and can no longer be on the
        homeserver. A segment is kept whole while any active hold could cover part of it
        (its room and time range; a hold on users keeps the segments of their time too).
        Returns segments pruned."""
        pruned = 0
        targets = list(rooms) if rooms is not None else list(await self.index.archive_rooms())
        # storage with holds of its own (S3 legal holds) gets the holds first: a version
        # under a hold is refused deletion by the storage too
        await self.archive.apply_holds(holds, targets)
        for room_id in targets:
            room_class = await self.room_retention.room_class(room_id)
            for seg in await self.archive.segments(room_id):
                if not seg.sealed or seg.last_ts is None or seg.first_ts is None:
                    continue
                held = segment_held(room_id, seg.first_ts, seg.last_ts, holds)
                if not self.policy.decide_archive_prune(newest_ts=seg.last_ts,
                                                        room_class=room_class, held=held,
                                                        now_ms=now):
                    continue
                try:
                    await self.archive.prune_segment(room_id, seg.name, "archive retention")
                except ArchivePruneDeferred as e:
                    # not yet: the storage's own lock outlasts the decision; never a success
                    await self.audit.add_audit(AuditRecord(
                        ts=self.clock_ms(), source="retention", kind="archive_prune",
                        outcome="deferred", room_id=room_id, rule_id="retention.archive",
                        reason="the archive storage refused the delete (Object Lock)",
                        detail=f"{seg.name}: {e}"))
                    continue
                await self.audit.add_audit(AuditRecord(
                    ts=self.clock_ms(), source="retention", kind="archive_prune",
                    outcome="applied", room_id=room_id, rule_id="retention.archive",
                    reason="archive retention period over",
                    detail=f"{seg.name}: {seg.events} events {seg.first_ts}..{seg.last_ts}"))
                pruned += 1
        return pruned

    async def _media_sender(self, event_id: str | None) -> str | None:
        if not event_id:
            return None
        rows = await self.index.archive_events_by_id([event_id])
        return rows[0].sender if rows else None

"""Retention as a running service: the live archive feed, archive-before-purge runs, legal
holds and the period's visibility in rooms.

Decisions (periods, cutoffs, windows, holds, adjustments, visibility) come from the pure
:mod:`bridge.policy.retention` and :mod:`bridge.policy.retention_rooms`; the parts this
service is made of read the homeserver and the archive, and carry the decisions out:
:mod:`.holds` (legal holds), :mod:`.feed` (the live feed), :mod:`.rooms` (a room's period,
``m.room.retention``, ``!retention``, visibility), :mod:`.purge` (archive before purge,
media, the archive's own retention) and :mod:`.redaction` (due messages a hold keeps).
This class builds them and runs a retention pass over the rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config.retention import RetentionConfig
from ..matrix.client import HomeserverUnavailable, MatrixClient, MatrixRequestError
from ..matrix.executor import Executor
from ..metrics import Metrics
from ..policy.actions import Action
from ..policy.retention import RETENTION_STATE_TYPE, Hold, Period, PurgePlan, RetentionPolicy
from ..policy.retention_rooms import EnclaveUsers
from ..store.base import HoldRecord
from ..store.domains import (
    ArchiveIndexStore,
    AuditStore,
    DirectoryStore,
    HoldStore,
    KVStore,
    LeaseStore,
    RetentionRoomStore,
)
from ..store.lease import held_lease, new_lease_owner
from .archive import ArchiveWriter
from .feed import ArchiveFeed
from .holds import LegalHolds
from .purge import Purger, RoomRun
from .redaction import DeferredRedactor
from .rooms import RoomRetention

log = logging.getLogger(__name__)

LEASE_NAME = "retention-purge"


@dataclass
class RetentionRun:
    rooms: list[RoomRun] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    visibility: int = 0
    archive_pruned: int = 0  # archive segments deleted by the archive's own retention

    @property
    def failed(self) -> list[RoomRun]:
        return [r for r in self.rooms if r.error is not None]


class RetentionService:
    """Archives every event it is given, purges what is due, and keeps holds."""

    def __init__(self, config: RetentionConfig, *, audit: AuditStore, index: ArchiveIndexStore,
                 holds: HoldStore, retention_rooms: RetentionRoomStore, kv: KVStore,
                 directory_store: DirectoryStore, leases: LeaseStore, client: MatrixClient,
                 executor: Executor, archive: ArchiveWriter, metrics: Metrics,
                 clock_ms: Callable[[], int], server_name: str, bot_user_id: str,
                 admin_user_id: str, service_prefix: str,
                 classify: Callable[[str], Awaitable[str | None]] | None = None,
                 lease_ttl_ms: int = 120_000,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.audit = audit
        self.index = index
        self.holds = holds
        self.retention_rooms = retention_rooms
        self.kv = kv
        self.directory_store = directory_store
        self.leases = leases
        self.client = client
        self.executor = executor
        self.archive = archive
        self.metrics = metrics
        self.clock_ms = clock_ms
        self.server_name = server_name
        self.bot_user_id = bot_user_id
        self.admin_user_id = admin_user_id
        self.service_prefix = service_prefix
        self.classify = classify
        self._sleep = sleep
        self.lease_owner = new_lease_owner()
        self.lease_ttl_ms = lease_ttl_ms  # the root passes the cluster's lease ttl
        self.users = EnclaveUsers(server_name=server_name, bot_user_id=bot_user_id,
                                  admin_user_id=admin_user_id, service_prefix=service_prefix)
        self.legal_holds = LegalHolds(holds=holds, directory_store=directory_store,
                                      index=index, client=client, clock_ms=clock_ms,
                                      server_name=server_name, admin_user_id=admin_user_id)
        self._build(config)

    def _build(self, config: RetentionConfig) -> None:
        """The parts that read the ``retention:`` config, built from it (again on a reload:
        a pass already running goes on with the parts it started with)."""
        self.config = config
        self.policy = RetentionPolicy(config)
        self.room_retention = RoomRetention(
            config, self.policy, users=self.users, retention_rooms=self.retention_rooms,
            kv=self.kv, audit=self.audit, client=self.client, executor=self.executor,
            clock_ms=self.clock_ms, classify=self.classify)
        self.feed = ArchiveFeed(
            config, room_retention=self.room_retention, archive=self.archive,
            client=self.client, audit=self.audit, metrics=self.metrics,
            clock_ms=self.clock_ms, index=self.index, admin_user_id=self.admin_user_id)
        self.redactor = DeferredRedactor(
            users=self.users, room_retention=self.room_retention, index=self.index,
            kv=self.kv, audit=self.audit, executor=self.executor, clock_ms=self.clock_ms)
        self.purger = Purger(
            config, self.policy, room_retention=self.room_retention, feed=self.feed,
            redactor=self.redactor, index=self.index, archive=self.archive,
            client=self.client, audit=self.audit, retention_rooms=self.retention_rooms,
            metrics=self.metrics, clock_ms=self.clock_ms, server_name=self.server_name,
            admin_user_id=self.admin_user_id, sleep=self._sleep)

    def replace_config(self, config: RetentionConfig) -> None:
        self._build(config)

    def is_service(self, user: str | None) -> bool:
        return self.users.is_service(user)

    def creation_state(self, room_class: str) -> list[dict[str, Any]]:
        """Initial state a new room of ``room_class`` gets: its ``m.room.retention``."""
        if not self.config.enabled or not self.config.visibility.set_state:
            return []
        period = self.policy.period_for(room_class)
        return [{"type": RETENTION_STATE_TYPE, "state_key": "",
                 "content": dict(self.policy.retention_state(period))}]

    # -- periods and holds -------------------------------------------------------------
    async def room_class(self, room_id: str) -> str | None:
        return await self.room_retention.room_class(room_id)

    async def period(self, room_id: str, room_class: str | None = None) -> Period:
        return await self.room_retention.period(room_id, room_class)

    async def active_holds(self) -> list[Hold]:
        return await self.legal_holds.active_holds()

    async def unknown_hold_subjects(self, users: Sequence[str],
                                    rooms: Sequence[str]) -> list[str]:
        """See :meth:`LegalHolds.unknown_hold_subjects`."""
        return await self.legal_holds.unknown_hold_subjects(users, rooms)

    async def add_hold(self, record: HoldRecord, *, source: str = "cli") -> bool:
        """See :meth:`LegalHolds.add_hold`."""
        return await self.legal_holds.add_hold(record, source=source)

    async def release_hold(self, hold_id: str, *, by: str, reason: str,
                           source: str = "cli") -> bool:
        """See :meth:`LegalHolds.release_hold`."""
        return await self.legal_holds.release_hold(hold_id, by=by, reason=reason,
                                                   source=source)

    # -- the live feed -----------------------------------------------------------------
    async def handle_event(self, event: dict[str, Any], meta: Any) -> Sequence[Action]:
        """The inbox handler (:meth:`ArchiveFeed.handle_event`): archive first."""
        return await self.feed.handle_event(event, meta)

    async def copy_media(self, room_id: str, events: Sequence[Mapping[str, Any]]) -> int:
        return await self.feed.copy_media(room_id, events)

    async def capture_plaintext(self, room_id: str, event: Mapping[str, Any],
                                clear: Mapping[str, Any], *, by: str, device: str | None,
                                session_id: str | None = None,
                                recovered: bool = False) -> bool:
        """The public seam for an archive device (the bots' ``archive`` bot): archive the
        plaintext of the encrypted ``event`` beside its ciphertext, linked by event id
        (:meth:`ArchiveFeed.capture_plaintext`). True when written now."""
        return await self.feed.capture_plaintext(room_id, event, clear, by=by, device=device,
                                                 session_id=session_id, recovered=recovered)

    async def archived_event(self, event_id: str) -> bool:
        """Whether ``event_id`` (or a plaintext record's id) is in the archive."""
        return bool(await self.index.archive_known([event_id]))

    # -- m.room.retention, adjustments and visibility --------------------------------------
    async def on_retention_state(self, room_id: str, event: Mapping[str, Any]) -> list[Action]:
        return await self.room_retention.on_retention_state(room_id, event)

    async def on_command(self, room_id: str, event: Mapping[str, Any],
                         body: str) -> list[Action]:
        return await self.room_retention.on_command(room_id, event, body)

    async def ensure_visibility(self, room_id: str, period: Period,
                                state: Sequence[Mapping[str, Any]], *,
                                apply: bool, unable: list[str] | None = None) -> list[Action]:
        """See :meth:`RoomRetention.ensure_visibility`."""
        return await self.room_retention.ensure_visibility(room_id, period, state,
                                                           apply=apply, unable=unable)

    # -- archive before purge ------------------------------------------------------------
    async def backfill(self, room_id: str, up_to_ts: int, *,
                       write: bool) -> tuple[int, list[tuple[int, str | None, bool]]]:
        return await self.purger.backfill(room_id, up_to_ts, write=write)

    async def plan_room(self, room_id: str, now: int, holds: Sequence[Hold], period: Period,
                        extra: Sequence[tuple[int, str | None, bool]] = ()) -> PurgePlan:
        return await self.purger.plan_room(room_id, now, holds, period, extra)

    async def rooms(self) -> list[str]:
        """Every room the homeserver knows, and every room in the archive."""
        return await self.purger.rooms()

    async def run_room(self, room_id: str, *, apply: bool, now: int, holds: Sequence[Hold],
                       progress: Callable[[str], None] | None = None) -> RoomRun:
        return await self.purger.run_room(room_id, apply=apply, now=now, holds=holds,
                                          progress=progress)

    async def redact_deferred(self, room_id: str, plan: PurgePlan,
                              holds: Sequence[Hold]) -> tuple[int, int, str | None]:
        return await self.redactor.redact(room_id, plan, holds)

    async def purge_media(self, room_id: str, period: Period, now: int,
                          holds: Sequence[Hold]) -> int:
        return await self.purger.purge_media(room_id, period, now, holds)

    async def prune_archive(self, now: int, holds: Sequence[Hold],
                            rooms: Sequence[str] | None = None) -> int:
        """See :meth:`Purger.prune_archive`."""
        return await self.purger.prune_archive(now, holds, rooms)

    # -- a retention pass ------------------------------------------------------------------
    def _lease(self) -> contextlib.AbstractAsyncContextManager[None]:
        return held_lease(self.leases, LEASE_NAME, self.lease_owner, self.clock_ms,
                          self.lease_ttl_ms,
                          lambda: RuntimeError("another Enclave process is running retention"))

    async def run(self, *, apply: bool, rooms: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None,
                  visibility: bool = True) -> RetentionRun:
        """A retention pass over every room (or ``rooms``): plan, or archive and purge."""
        result = RetentionRun()
        if not self.config.enabled:
            result.findings.append("retention is disabled (retention.enabled: false)")
            return result
        ctx = self._lease() if apply else contextlib.nullcontext()
        async with ctx:
            holds = await self.active_holds()
            now = self.clock_ms()
            for room_id in rooms if rooms is not None else await self.rooms():
                rr = await self.run_room(room_id, apply=apply, now=now, holds=holds,
                                         progress=progress)
                result.rooms.append(rr)
                if visibility and rr.error is None:
                    try:
                        period = await self.period(room_id)
                        state = await self.room_retention.room_state(room_id)
                        unable: list[str] = []
                        acts = await self.ensure_visibility(room_id, period, state,
                                                            apply=apply, unable=unable)
                        result.findings += [f"{room_id}: {u}" for u in unable]
                        if apply and acts:
                            result.visibility += await self.room_retention.run_visibility(
                                room_id, acts, "run") > 0
                        elif acts:
                            result.findings.append(
                                f"{room_id}: would show the period "
                                f"({', '.join(a.kind for a in acts)})")
                    except (HomeserverUnavailable, MatrixRequestError) as e:
                        result.findings.append(f"{room_id}: period not shown: {e}")
            if apply:
                try:
                    result.archive_pruned = await self.prune_archive(now, holds, rooms)
                except (OSError, RuntimeError, ValueError) as e:
                    result.findings.append(f"archive retention stopped: {e}")
                    log.error("archive retention stopped: %s", e)
        if apply and not result.failed:
            self.metrics.retention_last_success.set(self.clock_ms() / 1000)
        return result

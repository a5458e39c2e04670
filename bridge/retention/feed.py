"""The live feed: every event the inbox hands retention goes into the archive (with its
media) before any other handler sees it; ``m.room.retention`` changes and ``!retention``
commands go on to the room's retention (:mod:`bridge.retention.rooms`).

The first event of a room the archive has not seen is preceded by a snapshot of the room's
state at that event (marked ``unsigned["org.enclave.snapshot"]``): Enclave may meet a room
late, and who could read each message is replayed from the archived membership
(:mod:`bridge.policy.readers`), which must start from the homeserver's truth."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..config.retention import RetentionConfig
from ..matrix.client import MatrixClient, MatrixRequestError, parse_mxc
from ..metrics import Metrics
from ..policy.actions import Action
from ..policy.readers import SNAPSHOT_KEY
from ..policy.retention import RETENTION_STATE_TYPE
from ..store.base import AuditRecord
from ..store.domains import ArchiveIndexStore, AuditStore
from .archive import ArchiveWriter
from .events import decrypted_record, media_refs
from .rooms import RoomRetention

log = logging.getLogger(__name__)


class ArchiveFeed:
    """Archives events and the media they point at; hands room commands on."""

    def __init__(self, config: RetentionConfig, *, room_retention: RoomRetention,
                 archive: ArchiveWriter, client: MatrixClient, audit: AuditStore,
                 metrics: Metrics, clock_ms: Callable[[], int],
                 index: ArchiveIndexStore | None = None, admin_user_id: str | None = None):
        self.config = config
        self.index = index
        self.admin_user_id = admin_user_id
        self._archived_rooms: set[str] = set()  # rooms known to have an archive head
        self.room_retention = room_retention
        self.archive = archive
        self.client = client
        self.audit = audit
        self.metrics = metrics
        self.clock_ms = clock_ms

    async def handle_event(self, event: dict[str, Any], meta: Any) -> Sequence[Action]:
        """The inbox handler: archive the event (and its media) before anything else.

        An archive failure raises, so the inbox retries the event later: nothing is lost and
        the archive's index keeps a retry from writing it twice."""
        if not self.config.enabled:
            return []
        room_id = event.get("room_id") or getattr(meta, "room_id", "") or ""
        if not room_id or not isinstance(event.get("event_id"), str):
            return []
        if getattr(meta, "kind", "pdu") != "pdu":
            return []
        if self.index is not None and room_id not in self._archived_rooms:
            # one index read per room and process, not per event
            if await self.index.archive_head(room_id) is None:
                await self.snapshot(room_id, event)
        res = await self.archive.append(room_id, [event])
        self._archived_rooms.add(room_id)
        self.metrics.archived_events.labels(path="live").inc(res.written)
        await self.copy_media(room_id, [event])
        actions: list[Action] = []
        etype = event.get("type")
        if etype == RETENTION_STATE_TYPE and event.get("state_key") == "":
            actions += await self.room_retention.on_retention_state(room_id, event)
        elif etype == "m.room.message":
            body = (event.get("content") or {}).get("body")
            if isinstance(body, str) and body.startswith("!retention"):
                actions += await self.room_retention.on_command(room_id, event, body)
        return actions

    async def snapshot(self, room_id: str, first: Mapping[str, Any]) -> int:
        """Archive the room's state at ``first`` (the first event of the room the archive
        sees) before it, each event marked as a snapshot; returns events written.

        A room's ``m.room.create`` needs none (nothing came before it). A homeserver outage
        raises (the inbox retries the event); a refusal is logged and audited, and the room
        is archived without the snapshot (its readers then start from what was archived)."""
        eid = first.get("event_id")
        if self.admin_user_id is None or first.get("type") == "m.room.create" or not isinstance(
                eid, str):
            return 0
        try:
            state = await self.client.admin_event_state(room_id, eid, admin=self.admin_user_id)
        except MatrixRequestError as e:
            state, why = None, str(e)
        else:
            why = "the homeserver does not know the event"
        if state is None:
            log.warning("no state snapshot of %s at %s: %s", room_id, eid, why)
            await self.audit.add_audit(AuditRecord(
                ts=self.clock_ms(), source="retention", kind="archive_snapshot",
                outcome="failed", room_id=room_id, rule_id="builtin.archive",
                reason="the room's state could not be read", detail=f"{eid}: {why}"))
            return 0
        snap: list[dict[str, Any]] = []
        for ev in state:
            if not isinstance(ev.get("event_id"), str) or ev.get("event_id") == eid:
                continue
            ev = dict(ev)
            ev.setdefault("room_id", room_id)
            unsigned = dict(ev.get("unsigned") or {})
            unsigned[SNAPSHOT_KEY] = {"at": eid}
            ev["unsigned"] = unsigned
            snap.append(ev)
        # the create event first, as in the room; the rest in the server's order
        snap.sort(key=lambda ev: ev.get("type") != "m.room.create")
        if not snap:
            return 0
        res = await self.archive.append(room_id, snap)
        self.metrics.archived_events.labels(path="snapshot").inc(res.written)
        return res.written

    async def capture_plaintext(self, room_id: str, event: Mapping[str, Any],
                                clear: Mapping[str, Any], *, by: str, device: str | None,
                                session_id: str | None = None,
                                recovered: bool = False) -> bool:
        """Archive the plaintext of an encrypted ``event`` (decrypted by the archive device
        ``by``/``device``) beside its ciphertext, which is archived too: True when written
        now, False when it was archived already (or retention is disabled). An archive
        failure raises (the caller retries)."""
        if not self.config.enabled:
            # retention.enabled: false archives nothing, plaintext included
            return False
        if not isinstance(event.get("event_id"), str):
            raise ValueError("an encrypted event without an event id")
        other = event.get("room_id")
        if other is not None and other != room_id:
            raise ValueError(f"event {event['event_id']} belongs to {other}, not {room_id}")
        # the ciphertext first (idempotent): the record links to an archived event
        await self.archive.append(room_id, [{**event, "room_id": room_id}])
        record = decrypted_record(room_id, event, clear, by=by, device=device,
                                  at_ms=self.clock_ms(), session_id=session_id,
                                  recovered=recovered)
        res = await self.archive.append(room_id, [record])
        self.metrics.archived_events.labels(path="decrypted").inc(res.written)
        await self.copy_media(room_id, [record])
        return res.written > 0

    async def copy_media(self, room_id: str, events: Sequence[Mapping[str, Any]]) -> int:
        """Copy media the events refer to into the archive; returns files copied.

        A homeserver outage raises (the caller retries); media the homeserver refuses or no
        longer has is logged and audited, and does not block the room."""
        acfg = self.config.archive
        if not acfg.media:
            return 0
        copied = 0
        for ev in events:
            for mxc in media_refs(ev):
                if await self.archive.has_media(mxc):
                    continue
                try:
                    parse_mxc(mxc)
                    data, ctype = await self.client.download_media(
                        mxc, max_bytes=acfg.max_media_bytes)
                except (ValueError, MatrixRequestError) as e:
                    self.metrics.archived_media.labels(outcome="unavailable").inc()
                    log.warning("media %s of %s not archived: %s", mxc, ev.get("event_id"), e)
                    await self.audit.add_audit(AuditRecord(
                        ts=self.clock_ms(), source="retention", kind="archive_media",
                        outcome="failed", room_id=room_id, rule_id="builtin.archive",
                        reason="media could not be copied", detail=f"{mxc}: {e}"))
                    continue
                await self.archive.put_media(room_id, str(ev.get("event_id")), mxc, data,
                                             ctype, int(ev.get("origin_server_ts") or 0))
                self.metrics.archived_media.labels(outcome="copied").inc()
                copied += 1
        return copied

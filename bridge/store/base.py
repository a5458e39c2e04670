"""The store interface: durable inbox, action outbox, audit log, quarantine and key/value.

One interface, one schema, two engines (SQLite default, PostgreSQL). Callers depend on
:class:`Store` only; :func:`bridge.store.open_store` picks the engine from the database URL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..model.people import StaffRecord
from .db import Database


class SchemaError(Exception):
    """The database schema does not match this version of Enclave."""


@dataclass(frozen=True)
class NewEvent:
    """An event accepted from a transaction, before it gets its inbox sequence number."""

    event_id: str | None
    room_id: str  # "" for events that belong to no room (to-device, presence)
    kind: str  # "pdu" | "ephemeral" | "to_device"
    type: str
    sender: str | None
    origin_server_ts: int | None
    body: str  # the event as JSON text


@dataclass(frozen=True)
class QuarantinedEvent:
    position: int
    section: str
    reason: str
    raw: str


@dataclass(frozen=True)
class JournalEntry:
    """A transaction as the homeserver sent it, not yet expanded into the inbox."""

    seq: int
    txn_id: str
    body: bytes
    received_at: int


@dataclass(frozen=True)
class InboxEvent:
    seq: int
    txn_id: str
    event_id: str | None
    room_id: str
    kind: str
    type: str
    sender: str | None
    body: str
    attempts: int
    received_at: int


@dataclass(frozen=True)
class StoredAction:
    id: int
    event_seq: int
    position: int
    lane: str
    payload: str
    attempts: int


@dataclass(frozen=True)
class AuditRecord:
    ts: int
    source: str  # what produced it: "inbox", "cli", "sync", ...
    kind: str
    outcome: str  # "applied" | "skipped" | "failed" | "parked" | ...
    actor: str | None = None
    user_id: str | None = None
    room_id: str | None = None
    rule_id: str | None = None
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class DirectoryRecord:
    """A provisioned person: their Matrix user id for life and what was last applied.

    ``status`` is ``active``, ``deactivated`` or ``erased``.
    """

    person_id: str
    user_id: str
    status: str
    email: str | None
    displayname: str | None
    updated_at: int
    deactivated_at: int | None = None


@dataclass(frozen=True)
class ScimResource:
    resource_type: str  # "User" | "Group"
    id: str
    external_id: str | None
    data: str  # the resource as JSON
    version: int
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class AuditFilter:
    since_ms: int | None = None
    until_ms: int | None = None
    user_id: str | None = None
    room_id: str | None = None
    rule_id: str | None = None
    outcome: str | None = None
    limit: int = 1000


@dataclass(frozen=True)
class ArchivedEvent:
    """The index row of one archived event: where its JSON line is (segment, 1-based line)."""

    event_id: str
    room_id: str
    sender: str | None
    type: str
    state_key: str | None
    ts: int  # origin_server_ts
    segment: str
    line: int
    archived_at: int
    purged_at: int | None = None  # the homeserver's copy was purged then


@dataclass(frozen=True)
class ArchiveHead:
    """The last committed manifest entry of a room's archive (count and chained hash)."""

    room_id: str
    entries: int
    head: str
    segment: str | None
    segment_bytes: int
    updated_at: int


@dataclass(frozen=True)
class ArchivedMedia:
    mxc: str
    sha256: str
    size: int
    content_type: str | None
    room_id: str
    event_id: str | None
    ts: int | None
    archived_at: int
    deleted_at: int | None = None


@dataclass(frozen=True)
class HoldRecord:
    """A legal hold as stored (``bridge.retention`` converts it to the policy's ``Hold``).

    Empty ``users`` / ``rooms``: any sender / any room."""

    id: str
    case_id: str
    reason: str
    placed_by: str
    users: tuple[str, ...]
    rooms: tuple[str, ...]
    since_ms: int | None
    until_ms: int | None
    created_at: int
    released_at: int | None = None
    released_by: str | None = None


@dataclass(frozen=True)
class RetentionRoom:
    room_id: str
    room_class: str | None
    override_ms: int | None  # a moderator's adjustment of the period
    override_by: str | None
    purged_up_to: int | None  # history before this origin_server_ts is purged
    last_purge_at: int | None
    notice_event_id: str | None
    state_set_at: int | None
    updated_at: int


class ArchiveConflict(Exception):
    """The archive head in the store is already at or past the head being committed
    (a second writer on the same archive, or a stale one)."""


class Store(ABC):
    """Durable state of one Enclave installation."""

    dialect: str
    # the database itself: extensions build their own stores on it (bots/store.py)
    db: Database

    # -- lifecycle -----------------------------------------------------------------------
    @abstractmethod
    async def open(self) -> None:
        """Connect. Does not migrate; call :meth:`migrate` or :meth:`check_schema`."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def schema_version(self) -> int:
        """The version recorded in the database (0 for an empty database)."""

    @abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending numbered migrations; return the versions applied.

        Raises :class:`SchemaError` when the database is newer than this code.
        """

    @abstractmethod
    async def check_schema(self) -> None:
        """Raise :class:`SchemaError` unless the schema is exactly this code's version."""

    @abstractmethod
    async def ping(self) -> None:
        """A trivial query; raises if the database is unreachable."""

    # -- transaction journal -------------------------------------------------------------
    @abstractmethod
    async def journal_append(self, txn_id: str, body: bytes, now_ms: int) -> bool:
        """Durably record a transaction body as received (the only write before ``{}``).

        False when the id is still in the journal. Ids already expanded are deduplicated
        later by :meth:`save_transaction`.
        """

    @abstractmethod
    async def journal_pending(self, limit: int) -> list[JournalEntry]:
        """Journaled transactions not yet expanded into the inbox, oldest first."""

    @abstractmethod
    async def journal_remove(self, seqs: Sequence[int]) -> None:
        """Drop expanded entries (after :meth:`save_transaction` committed them)."""

    @abstractmethod
    async def journal_stats(self) -> tuple[int, int | None]:
        """(entries waiting, oldest receive time in ms)."""

    # -- inbox ---------------------------------------------------------------------------
    @abstractmethod
    async def save_transaction(
        self, txn_id: str, events: Sequence[NewEvent], quarantined: Sequence[QuarantinedEvent],
        now_ms: int,
    ) -> bool:
        """Durably record a homeserver transaction and its events in one commit.

        Returns False (and writes nothing) when ``txn_id`` was seen before. Events whose
        ``event_id`` is already in the inbox are ignored, so a redelivery never doubles work.
        """

    @abstractmethod
    async def inbox_known(self, event_ids: Sequence[str]) -> set[str]:
        """The ids among ``event_ids`` that are already in the inbox (any status)."""

    @abstractmethod
    async def save_recovered(self, txn_id: str, events: Sequence[NewEvent],
                             audit: AuditRecord, now_ms: int) -> int:
        """Put events the homeserver never pushed into the inbox, with their audit record,
        in one commit; an event id already there is skipped. Returns how many went in
        (the audit record is written only when some did)."""

    @abstractmethod
    async def fetch_due_events(self, now_ms: int, limit: int) -> list[InboxEvent]:
        """Pending events, oldest first, of rooms whose oldest pending event is due."""

    @abstractmethod
    async def complete_events(
        self, seqs: Sequence[int], actions: Sequence[tuple[int, int, str, str, str, str, str]],
        now_ms: int,
    ) -> None:
        """Mark events done and enqueue their actions, atomically.

        ``actions`` rows: (event_seq, position, lane, kind, payload, rule_id, reason).
        """

    @abstractmethod
    async def fail_event(
        self, seq: int, attempts: int, next_attempt_at: int, error: str, park: bool,
        audit: AuditRecord | None = None,
    ) -> None:
        """Record a failed handling attempt; ``park`` takes it out of the queue for good.

        ``audit`` is written in the same commit (a parked event always has its record).
        """

    @abstractmethod
    async def requeue_parked(self, seqs: Sequence[int] | None = None) -> int:
        """Put parked events back in the queue (all of them when ``seqs`` is None)."""

    @abstractmethod
    async def list_events(self, status: str, limit: int = 100) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def list_quarantine(self, limit: int = 100) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def inbox_stats(self) -> dict[str, Any]:
        """Counts by status, quarantine size and the oldest pending event's receive time."""

    # -- action outbox -------------------------------------------------------------------
    @abstractmethod
    async def pending_actions(self, lane: str | None, limit: int) -> list[StoredAction]:
        """Pending actions, oldest first; of one lane (room), or of all lanes."""

    @abstractmethod
    async def finish_action(
        self, action_id: int, status: str, outcome: str, attempts: int,
        audit: AuditRecord | None, now_ms: int,
    ) -> None:
        """Set an action's final or retry status and write its audit record atomically."""

    @abstractmethod
    async def last_action_id(self) -> int:
        """The highest action id written so far (0 when none): every action at or below it
        was written before this call, so possibly begun by an earlier process."""

    # -- audit ---------------------------------------------------------------------------
    @abstractmethod
    async def add_audit(self, record: AuditRecord) -> None: ...

    @abstractmethod
    async def query_audit(self, flt: AuditFilter) -> list[dict[str, Any]]: ...

    # -- key/value -----------------------------------------------------------------------
    @abstractmethod
    async def get_kv(self, key: str) -> str | None: ...

    @abstractmethod
    async def set_kv(self, key: str, value: str) -> None: ...

    # -- directory sync ----------------------------------------------------------------
    @abstractmethod
    async def directory_people(self) -> list[DirectoryRecord]:
        """Every person Enclave has provisioned (any status)."""

    @abstractmethod
    async def save_directory_people(self, records: Sequence[DirectoryRecord]) -> None:
        """Insert or replace these records (by person id) in one transaction."""

    @abstractmethod
    async def managed_rooms(self) -> dict[str, str]:
        """Managed room key -> room id, for every managed space and room created so far."""

    @abstractmethod
    async def save_managed_room(self, key: str, room_id: str, now_ms: int) -> None:
        """Remember the room created for a managed room key (replaces an older one)."""

    @abstractmethod
    async def directory_view(self) -> list[StaffRecord]:
        """The directory view of the last sync: one record per provisioned user id."""

    @abstractmethod
    async def replace_directory_view(self, records: Sequence[StaffRecord]) -> int:
        """Make the view exactly ``records`` in one transaction; return rows written.

        Unchanged rows are not rewritten, so a resync of an unchanged directory writes
        nothing."""

    # -- per-component key/value --------------------------------------------------------
    @abstractmethod
    async def component_get(self, component: str, key: str) -> str | None:
        """The value ``component`` stored under ``key``, or None."""

    @abstractmethod
    async def component_put(self, component: str, key: str, value: str, now_ms: int) -> None:
        """Insert or replace ``component``'s value under ``key``."""

    @abstractmethod
    async def component_put_new(self, component: str, key: str, value: str,
                                now_ms: int) -> bool:
        """Insert only if ``key`` is absent; True if this call inserted it (a once-only
        guard that holds across processes and crashes)."""

    @abstractmethod
    async def component_list(self, component: str, prefix: str = "") -> dict[str, str]:
        """Every key of ``component`` starting with ``prefix`` and its value."""

    @abstractmethod
    async def component_delete(self, component: str, key: str) -> bool:
        """Delete ``component``'s ``key``; False when it did not exist."""

    # -- SCIM --------------------------------------------------------------------------
    @abstractmethod
    async def scim_get(self, resource_type: str, resource_id: str) -> ScimResource | None:
        """One SCIM resource, or None."""

    @abstractmethod
    async def scim_list(self, resource_type: str) -> list[ScimResource]:
        """Every SCIM resource of one type, in id order."""

    @abstractmethod
    async def scim_put(self, resource: ScimResource) -> None:
        """Insert or replace a SCIM resource."""

    @abstractmethod
    async def scim_delete(self, resource_type: str, resource_id: str) -> bool:
        """Delete a SCIM resource; False when it did not exist."""

    # -- leases ------------------------------------------------------------------------
    @abstractmethod
    async def acquire_lease(self, name: str, owner: str, now_ms: int, ttl_ms: int) -> bool:
        """Take or renew lease ``name`` for ``owner`` until ``now_ms + ttl_ms``.

        True if ``owner`` now holds it: it was free, expired, or already ``owner``'s."""

    @abstractmethod
    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it."""

    @abstractmethod
    async def lease_holder(self, name: str) -> tuple[str, int] | None:
        """``(owner, expires_at)`` of lease ``name``, or None when nobody holds it."""

    @abstractmethod
    async def take_over_lease(self, name: str, dead_owner: str, owner: str, now_ms: int,
                              ttl_ms: int) -> bool:
        """Give lease ``name`` to ``owner`` if ``dead_owner`` still holds it (expired or
        not); True if ``owner`` now holds it. Only for a holder known to be dead."""

    async def watch_journal(self, on_append: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        """Call ``on_append`` when another process journals a transaction; return a stopper.

        Only a shared engine (PostgreSQL: LISTEN/NOTIFY) needs it; by default nothing is
        watched (one process writes a SQLite store)."""

        async def stop() -> None:
            return None

        return stop

    # -- retention -----------------------------------------------------------------------
    @abstractmethod
    async def archive_commit(self, events: Sequence[ArchivedEvent], head: ArchiveHead,
                             media: Sequence[ArchivedMedia] = ()) -> int:
        """Index archived events and media and move the room's head, in one commit.

        Events already indexed and media already known (by mxc) are left as they are;
        returns the events inserted. Raises :class:`ArchiveConflict` (writing nothing)
        unless ``head.entries`` is past the stored head."""

    @abstractmethod
    async def archive_known(self, event_ids: Sequence[str]) -> set[str]:
        """The ids among ``event_ids`` that are already indexed."""

    @abstractmethod
    async def archive_events_by_id(self, event_ids: Sequence[str]) -> list[ArchivedEvent]:
        """The index rows of these events (unknown ids left out), in archive order."""

    @abstractmethod
    async def archive_head(self, room_id: str) -> ArchiveHead | None:
        """The room's committed archive head, or None before its first entry."""

    @abstractmethod
    async def archive_heads(self) -> list[ArchiveHead]:
        """Every room's archive head, in room id order."""

    @abstractmethod
    async def archive_query(
        self, *, room_id: str | None = None, senders: Sequence[str] | None = None,
        since_ms: int | None = None, until_ms: int | None = None,
        include_purged: bool = True,
        after: tuple[int, str, int] | tuple[int, str, int, str] | None = None,
        limit: int = 10000, archive_order: bool = False,
    ) -> list[ArchivedEvent]:
        """Indexed events in (ts, segment, line, room id) order; since/until inclusive.

        ``after``: keyset paging from the last row of the previous page, (ts, segment,
        line) within one room, (ts, segment, line, room id) across rooms.
        ``archive_order`` (one room only): in the order of the room's archive, i.e. its hash
        chain (segment, line), and ``after`` is (0, segment, line)."""

    @abstractmethod
    async def archive_timestamps(self, room_id: str, *, unpurged_only: bool = True,
                                 messages_only: bool = False) -> list[tuple[int, str | None]]:
        """(origin_server_ts, sender) of the room's indexed events, in archive order;
        ``messages_only``: only non-state events."""

    @abstractmethod
    async def archive_rooms(self) -> dict[str, int]:
        """Room id -> indexed events (purged ones included)."""

    @abstractmethod
    async def archive_segments(self, room_id: str) -> list[tuple[str, int, int, int]]:
        """(segment, events, first ts, last ts) of the room's indexed segments, by name."""

    @abstractmethod
    async def archive_mark_purged(self, room_id: str, up_to_ts: int, now_ms: int) -> int:
        """Mark the room's non-state events with ts < ``up_to_ts`` purged (the homeserver
        keeps state events through a purge); return how many changed."""

    @abstractmethod
    async def archive_mark_gone(self, room_id: str, event_ids: Sequence[str],
                                now_ms: int) -> int:
        """Mark these non-state events of the room purged: the homeserver no longer has
        them (found gone while purging); return how many changed."""

    @abstractmethod
    async def archive_drop_segment(self, room_id: str, segment: str,
                                   head: ArchiveHead | None = None) -> int:
        """Drop the index rows of a pruned segment (and move the head, same commit)."""

    @abstractmethod
    async def archive_media_get(self, mxc: str) -> ArchivedMedia | None: ...

    @abstractmethod
    async def archive_media_list(self, room_id: str | None = None, *,
                                 sha256: str | None = None) -> list[ArchivedMedia]:
        """Archived media (of one room, with one hash), by ts then mxc."""

    @abstractmethod
    async def archive_media_mark_deleted(self, mxcs: Sequence[str], now_ms: int) -> None:
        """Mark media deleted from the homeserver (the archive's copy stays)."""

    @abstractmethod
    async def hold_add(self, hold: HoldRecord, audit: AuditRecord) -> bool:
        """Insert a hold and its audit record in one commit; False if the id exists."""

    @abstractmethod
    async def hold_release(self, hold_id: str, by: str, now_ms: int,
                           audit: AuditRecord) -> bool:
        """Release an active hold (audit in the same commit); False if none was active."""

    @abstractmethod
    async def holds(self, *, include_released: bool = False) -> list[HoldRecord]:
        """Holds by creation time (active ones only unless ``include_released``)."""

    @abstractmethod
    async def hold_get(self, hold_id: str) -> HoldRecord | None: ...

    @abstractmethod
    async def retention_room_get(self, room_id: str) -> RetentionRoom | None: ...

    @abstractmethod
    async def retention_room_put(self, room: RetentionRoom) -> None:
        """Insert or replace the room's retention state."""

    @abstractmethod
    async def retention_rooms(self) -> list[RetentionRoom]:
        """Every room's retention state, by room id."""

"""The store by domain: one narrow protocol per kind of state, on one shared database.

Each protocol has one SQL class in a module of its own (``journal.py``, ``inbox.py``, ...),
built on the one :class:`~bridge.store.shared.SharedDatabase` (which is the
:class:`SchemaStore`); :class:`~bridge.store.stores.Stores` holds one of each. A consumer
takes only the protocols of what it uses (``held_lease`` a :class:`LeaseStore`, the SCIM
service a :class:`ScimStore`, ...), so what touches which state is visible in its
signature. No method belongs to two protocols (``tests/store/test_domains.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ..model.people import StaffRecord
from .base import (
    ArchivedEvent,
    ArchivedMedia,
    ArchiveHead,
    AuditFeedPage,
    AuditFilter,
    AuditRecord,
    AuditSearch,
    ConsoleSession,
    DirectoryRecord,
    HoldRecord,
    InboxEvent,
    JournalEntry,
    NewEvent,
    QuarantinedEvent,
    RetentionRoom,
    ScimResource,
    StoredAction,
)


@runtime_checkable
class SchemaStore(Protocol):
    """The schema and the connection."""

    dialect: str

    async def open(self) -> None:
        """Connect. Does not migrate; call :meth:`migrate` or :meth:`check_schema`."""

    async def close(self) -> None: ...

    async def schema_version(self) -> int:
        """The version recorded in the database (0 for an empty database)."""

    async def migrate(self) -> list[int]:
        """Apply pending numbered migrations; return the versions applied.

        Raises :class:`SchemaError` when the database is newer than this code.
        """

    async def check_schema(self) -> None:
        """Raise :class:`SchemaError` unless the schema is exactly this code's version."""

    async def ping(self) -> None:
        """A trivial query; raises if the database is unreachable."""

    async def component_version(self, component: str) -> int:
        """The schema version of an extension's own tables (0: none yet)."""


@runtime_checkable
class JournalStore(Protocol):
    """The raw transaction journal (the homeserver's answer waits on it only)."""

    async def journal_append(self, txn_id: str, body: bytes, now_ms: int) -> bool:
        """Durably record a transaction body as received (the only write before ``{}``).

        False when the id is still in the journal. Ids already expanded are deduplicated
        later by :meth:`save_transaction`.
        """

    async def journal_pending(self, limit: int) -> list[JournalEntry]:
        """Journaled transactions not yet expanded into the inbox, oldest first."""

    async def journal_remove(self, seqs: Sequence[int]) -> None:
        """Drop expanded entries (after :meth:`save_transaction` committed them)."""

    async def journal_stats(self) -> tuple[int, int | None]:
        """(entries waiting, oldest receive time in ms)."""

    async def watch_journal(
        self, on_append: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        """Call ``on_append`` when another process journals a transaction; return a stopper.

        Only a shared engine (PostgreSQL: LISTEN/NOTIFY) needs it; by default nothing is
        watched (one process writes a SQLite store)."""


@runtime_checkable
class InboxStore(Protocol):
    """The durable inbox: events in, processed once, retried, parked."""

    async def save_transaction(
        self, txn_id: str, events: Sequence[NewEvent], quarantined: Sequence[QuarantinedEvent],
        now_ms: int,
    ) -> bool:
        """Durably record a homeserver transaction and its events in one commit.

        Returns False (and writes nothing) when ``txn_id`` was seen before. Events whose
        ``event_id`` is already in the inbox are ignored, so a redelivery never doubles work.
        """

    async def fetch_due_events(self, now_ms: int, limit: int) -> list[InboxEvent]:
        """Pending events, oldest first, of rooms whose oldest pending event is due."""

    async def complete_events(
        self, seqs: Sequence[int], actions: Sequence[tuple[int, int, str, str, str, str, str]],
        now_ms: int,
    ) -> None:
        """Mark events done and enqueue their actions, atomically.

        ``actions`` rows: (event_seq, position, lane, kind, payload, rule_id, reason).
        """

    async def fail_event(
        self, seq: int, attempts: int, next_attempt_at: int, error: str, park: bool,
        audit: AuditRecord | None = None,
    ) -> None:
        """Record a failed handling attempt; ``park`` takes it out of the queue for good.

        ``audit`` is written in the same commit (a parked event always has its record).
        """

    async def requeue_parked(self, seqs: Sequence[int] | None = None) -> int:
        """Put parked events back in the queue (all of them when ``seqs`` is None)."""

    async def list_events(self, status: str, limit: int = 100) -> list[dict[str, Any]]: ...

    async def list_quarantine(self, limit: int = 100) -> list[dict[str, Any]]: ...

    async def inbox_stats(self) -> dict[str, Any]:
        """Counts by status, quarantine size and the oldest pending event's receive time."""

    async def inbox_known(self, event_ids: Sequence[str]) -> set[str]:
        """The ids among ``event_ids`` that are already in the inbox (any status)."""

    async def save_recovered(self, txn_id: str, events: Sequence[NewEvent],
                             audit: AuditRecord, now_ms: int) -> int:
        """Put events the homeserver never pushed into the inbox, with their audit record,
        in one commit; an event id already there is skipped. Returns how many went in
        (the audit record is written only when some did)."""


@runtime_checkable
class OutboxStore(Protocol):
    """Actions decided and not yet applied."""

    async def pending_actions(self, lane: str | None, limit: int) -> list[StoredAction]:
        """Pending actions, oldest first; of one lane (room), or of all lanes."""

    async def finish_action(
        self, action_id: int, status: str, outcome: str, attempts: int,
        audit: AuditRecord | None, now_ms: int,
    ) -> None:
        """Set an action's final or retry status and write its audit record atomically."""

    async def last_action_id(self) -> int:
        """The highest action id written so far (0 when none): every action at or below it
        was written before this call, so possibly begun by an earlier process."""


@runtime_checkable
class AuditStore(Protocol):
    """The audit log."""

    async def add_audit(self, record: AuditRecord) -> None: ...

    async def query_audit(self, flt: AuditFilter) -> list[dict[str, Any]]: ...

    async def audit_page(self, search: AuditSearch) -> list[dict[str, Any]]:
        """One page, newest first (ts, id), before the keyset ``(before_ts, before_id)``."""


@runtime_checkable
class KVStore(Protocol):
    """Installation-wide and per-component key/value."""

    async def get_kv(self, key: str) -> str | None: ...

    async def set_kv(self, key: str, value: str) -> None: ...

    async def component_get(self, component: str, key: str) -> str | None:
        """The value ``component`` stored under ``key``, or None."""

    async def component_put(self, component: str, key: str, value: str, now_ms: int) -> None:
        """Insert or replace ``component``'s value under ``key``."""

    async def component_put_new(self, component: str, key: str, value: str,
                                now_ms: int) -> bool:
        """Insert only if ``key`` is absent; True if this call inserted it (a once-only
        guard that holds across processes and crashes)."""

    async def component_list(self, component: str, prefix: str = "") -> dict[str, str]:
        """Every key of ``component`` starting with ``prefix`` and its value."""

    async def component_delete(self, component: str, key: str) -> bool:
        """Delete ``component``'s ``key``; False when it did not exist."""


@runtime_checkable
class LeaseStore(Protocol):
    """Leases: one holder at a time across processes."""

    async def acquire_lease(self, name: str, owner: str, now_ms: int, ttl_ms: int) -> bool:
        """Take or renew lease ``name`` for ``owner`` until ``now_ms + ttl_ms``.

        True if ``owner`` now holds it: it was free, expired, or already ``owner``'s."""

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it."""

    async def lease_holder(self, name: str) -> tuple[str, int] | None:
        """``(owner, expires_at)`` of lease ``name``, or None when nobody holds it."""

    async def take_over_lease(self, name: str, dead_owner: str, owner: str, now_ms: int,
                              ttl_ms: int) -> bool:
        """Give lease ``name`` to ``owner`` if ``dead_owner`` still holds it (expired or
        not); True if ``owner`` now holds it. Only for a holder known to be dead."""


@runtime_checkable
class DirectoryStore(Protocol):
    """What directory sync provisioned, and the directory view others read."""

    async def directory_people(self) -> list[DirectoryRecord]:
        """Every person Enclave has provisioned (any status)."""

    async def save_directory_people(self, records: Sequence[DirectoryRecord]) -> None:
        """Insert or replace these records (by person id) in one transaction."""

    async def managed_rooms(self) -> dict[str, str]:
        """Managed room key -> room id, for every managed space and room created so far."""

    async def save_managed_room(self, key: str, room_id: str, now_ms: int) -> None:
        """Remember the room created for a managed room key (replaces an older one)."""

    async def directory_view(self) -> list[StaffRecord]:
        """The directory view of the last sync: one record per provisioned user id."""

    async def directory_person(self, user_id: str) -> StaffRecord | None:
        """One person of the directory view (None: not provisioned)."""

    async def replace_directory_view(self, records: Sequence[StaffRecord]) -> int:
        """Make the view exactly ``records`` in one transaction; return rows written.

        Unchanged rows are not rewritten, so a resync of an unchanged directory writes
        nothing."""


@runtime_checkable
class ScimStore(Protocol):
    """Resources identity providers pushed over SCIM."""

    async def scim_get(self, resource_type: str, resource_id: str) -> ScimResource | None:
        """One SCIM resource, or None."""

    async def scim_list(self, resource_type: str) -> list[ScimResource]:
        """Every SCIM resource of one type, in id order."""

    async def scim_put(self, resource: ScimResource) -> None:
        """Insert or replace a SCIM resource."""

    async def scim_delete(self, resource_type: str, resource_id: str) -> bool:
        """Delete a SCIM resource; False when it did not exist."""


@runtime_checkable
class ArchiveIndexStore(Protocol):
    """The index of the compliance archive (events and media)."""

    async def archive_commit(self, events: Sequence[ArchivedEvent], head: ArchiveHead,
                             media: Sequence[ArchivedMedia] = ()) -> int:
        """Index archived events and media and move the room's head, in one commit.

        Events already indexed and media already known (by mxc) are left as they are;
        returns the events inserted. Raises :class:`ArchiveConflict` (writing nothing)
        unless ``head.entries`` is past the stored head."""

    async def archive_known(self, event_ids: Sequence[str]) -> set[str]:
        """The ids among ``event_ids`` that are already indexed."""

    async def archive_events_by_id(self, event_ids: Sequence[str]) -> list[ArchivedEvent]:
        """The index rows of these events (unknown ids left out), in archive order."""

    async def archive_head(self, room_id: str) -> ArchiveHead | None:
        """The room's committed archive head, or None before its first entry."""

    async def archive_heads(self) -> list[ArchiveHead]:
        """Every room's archive head, in room id order."""

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

    async def archive_timestamps(self, room_id: str, *, unpurged_only: bool = True,
                                 messages_only: bool = False) -> list[tuple[int, str | None]]:
        """(origin_server_ts, sender) of the room's indexed events, in archive order;
        ``messages_only``: only non-state events."""

    async def archive_rooms(self) -> dict[str, int]:
        """Room id -> indexed events (purged ones included)."""

    async def archive_segments(self, room_id: str) -> list[tuple[str, int, int, int]]:
        """(segment, events, first ts, last ts) of the room's indexed segments, by name."""

    async def archive_mark_purged(self, room_id: str, up_to_ts: int, now_ms: int) -> int:
        """Mark the room's non-state events with ts < ``up_to_ts`` purged (the homeserver
        keeps state events through a purge); return how many changed."""

    async def archive_mark_gone(self, room_id: str, event_ids: Sequence[str],
                                now_ms: int) -> int:
        """Mark these non-state events of the room purged: the homeserver no longer has
        them (found gone while purging); return how many changed."""

    async def archive_drop_segment(self, room_id: str, segment: str,
                                   head: ArchiveHead | None = None) -> int:
        """Drop the index rows of a pruned segment (and move the head, same commit)."""

    async def archive_media_get(self, mxc: str) -> ArchivedMedia | None: ...

    async def archive_media_list(self, room_id: str | None = None, *,
                                 sha256: str | None = None) -> list[ArchivedMedia]:
        """Archived media (of one room, with one hash), by ts then mxc."""

    async def archive_media_mark_deleted(self, mxcs: Sequence[str], now_ms: int) -> None:
        """Mark media deleted from the homeserver (the archive's copy stays)."""

    async def archive_stage(self, room_id: str, staged: Sequence[tuple[int, str, str]],
                            events: Sequence[ArchivedEvent], head: ArchiveHead, *,
                            prev_entries: int, prev_head: str, staged_at: int,
                            media: Sequence[ArchivedMedia] = (),
                            drop_segment: str | None = None,
                            absent: Sequence[str] = ()) -> int:
        """Stage manifest entries ``(entry number, entry JSON, segment bytes)`` of a room
        with their index rows (and media rows, and the drop of a pruned segment's rows),
        moving the head from exactly (``prev_entries``, ``prev_head``) to ``head``, in one
        commit; returns the events inserted. Raises :class:`ArchiveConflict` (writing
        nothing) when the stored head is not the expected one (another writer moved it),
        or, past a room's first entry, when an event id in ``absent`` is already indexed
        (at most 500 ids)."""

    async def archive_staged(self, room_id: str) -> list[tuple[int, str, str, int]]:
        """(entry number, entry JSON, segment bytes, staged at) of the room's staged
        entries, in entry order."""

    async def archive_staged_rooms(self) -> list[tuple[str, int, int, int]]:
        """(room, staged size, oldest staged at, staged entries) of every room with staged
        entries, by room id; the size counts the characters of the segment bytes (UTF-8
        text: bytes for ASCII)."""

    async def archive_unstage(self, room_id: str, up_to: int) -> int:
        """Delete the room's staged entries numbered up to ``up_to`` (they are sealed);
        returns how many."""


@runtime_checkable
class HoldStore(Protocol):
    """Legal holds."""

    async def hold_add(self, hold: HoldRecord, audit: AuditRecord) -> bool:
        """Insert a hold and its audit record in one commit; False if the id exists."""

    async def hold_release(self, hold_id: str, by: str, now_ms: int,
                           audit: AuditRecord) -> bool:
        """Release an active hold (audit in the same commit); False if none was active."""

    async def holds(self, *, include_released: bool = False) -> list[HoldRecord]:
        """Holds by creation time (active ones only unless ``include_released``)."""

    async def hold_get(self, hold_id: str) -> HoldRecord | None: ...


@runtime_checkable
class RetentionRoomStore(Protocol):
    """Per-room retention state (class, adjustments, purge progress)."""

    async def retention_room_get(self, room_id: str) -> RetentionRoom | None: ...

    async def retention_room_put(self, room: RetentionRoom) -> None:
        """Insert or replace the room's retention state."""

    async def retention_rooms(self, limit: int | None = None) -> list[RetentionRoom]:
        """Every room's retention state, by room id (the first ``limit`` when given)."""


@runtime_checkable
class ConsoleSessionStore(Protocol):
    """The operators' console sessions (server-side; the cookie holds a random id whose
    sha256 is the key)."""

    async def session_create(self, session: ConsoleSession) -> None: ...

    async def session_get(self, id_hash: str) -> ConsoleSession | None: ...

    async def session_touch(self, id_hash: str, now_ms: int, roles: tuple[str, ...]) -> bool:
        """Record a request and the roles re-decided for it; False if the session is gone."""

    async def session_delete(self, id_hash: str) -> bool: ...

    async def sessions_expire(self, seen_before_ms: int) -> int:
        """Drop sessions idle since before ``seen_before_ms``; how many went."""

    async def sessions_of(self, user_id: str) -> list[ConsoleSession]: ...


@runtime_checkable
class AuditFeedStore(Protocol):
    """The audit log read as a feed (the audit stream's source)."""

    async def audit_feed(self, after_id: int, limit: int) -> AuditFeedPage:
        """Up to ``limit`` audit rows with id > ``after_id`` in id order, and the horizon
        that tells whether a missing id may still commit (:class:`AuditFeedPage`)."""

    async def audit_last_id(self) -> int:
        """The highest audit id committed so far (0 when the log is empty)."""

    def watch_audit(self, on_write: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_write`` after each commit of this process that wrote an audit record
        in a batch; return a function that stops it. A wake-up hint only: records other
        processes write are found by reading the feed again."""

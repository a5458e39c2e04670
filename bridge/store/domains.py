"""The store by domain: one narrow protocol per kind of state, on one shared database.

:class:`~bridge.store.base.Store` (one implementation, ``SQLStore``) provides them all; a
consumer names only the protocol of what it uses (``held_lease`` needs a
:class:`LeaseStore`, the SCIM service a :class:`ScimStore`, ...), so what touches which
state is visible in its signature. Every method of ``Store`` belongs to exactly one
protocol here (``tests/store/test_domains.py``). The signatures are ``Store``'s; see its
docstrings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ..model.people import StaffRecord
from .base import (
    ArchivedEvent,
    ArchivedMedia,
    ArchiveHead,
    AuditFilter,
    AuditRecord,
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

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def schema_version(self) -> int: ...

    async def migrate(self) -> list[int]: ...

    async def check_schema(self) -> None: ...

    async def ping(self) -> None: ...


@runtime_checkable
class JournalStore(Protocol):
    """The raw transaction journal (the homeserver's answer waits on it only)."""

    async def journal_append(self, txn_id: str, body: bytes, now_ms: int) -> bool: ...

    async def journal_pending(self, limit: int) -> list[JournalEntry]: ...

    async def journal_remove(self, seqs: Sequence[int]) -> None: ...

    async def journal_stats(self) -> tuple[int, int | None]: ...

    async def watch_journal(
        self, on_append: Callable[[], None]) -> Callable[[], Awaitable[None]]: ...


@runtime_checkable
class InboxStore(Protocol):
    """The durable inbox: events in, processed once, retried, parked."""

    async def save_transaction(
        self, txn_id: str, events: Sequence[NewEvent], quarantined: Sequence[QuarantinedEvent],
        now_ms: int,
    ) -> bool: ...

    async def fetch_due_events(self, now_ms: int, limit: int) -> list[InboxEvent]: ...

    async def complete_events(
        self, seqs: Sequence[int], actions: Sequence[tuple[int, int, str, str, str, str, str]],
        now_ms: int,
    ) -> None: ...

    async def fail_event(
        self, seq: int, attempts: int, next_attempt_at: int, error: str, park: bool,
        audit: AuditRecord | None = None,
    ) -> None: ...

    async def requeue_parked(self, seqs: Sequence[int] | None = None) -> int: ...

    async def list_events(self, status: str, limit: int = 100) -> list[dict[str, Any]]: ...

    async def list_quarantine(self, limit: int = 100) -> list[dict[str, Any]]: ...

    async def inbox_stats(self) -> dict[str, Any]: ...

    async def inbox_known(self, event_ids: Sequence[str]) -> set[str]: ...

    async def save_recovered(self, txn_id: str, events: Sequence[NewEvent],
                             audit: AuditRecord, now_ms: int) -> int: ...


@runtime_checkable
class OutboxStore(Protocol):
    """Actions decided and not yet applied."""

    async def pending_actions(self, lane: str | None, limit: int) -> list[StoredAction]: ...

    async def finish_action(
        self, action_id: int, status: str, outcome: str, attempts: int,
        audit: AuditRecord | None, now_ms: int,
    ) -> None: ...

    async def last_action_id(self) -> int: ...


@runtime_checkable
class AuditStore(Protocol):
    """The audit log."""

    async def add_audit(self, record: AuditRecord) -> None: ...

    async def query_audit(self, flt: AuditFilter) -> list[dict[str, Any]]: ...


@runtime_checkable
class KVStore(Protocol):
    """Installation-wide and per-component key/value."""

    async def get_kv(self, key: str) -> str | None: ...

    async def set_kv(self, key: str, value: str) -> None: ...

    async def component_get(self, component: str, key: str) -> str | None: ...

    async def component_put(self, component: str, key: str, value: str, now_ms: int) -> None: ...

    async def component_put_new(self, component: str, key: str, value: str,
                                now_ms: int) -> bool: ...

    async def component_list(self, component: str, prefix: str = "") -> dict[str, str]: ...

    async def component_delete(self, component: str, key: str) -> bool: ...


@runtime_checkable
class LeaseStore(Protocol):
    """Leases: one holder at a time across processes."""

    async def acquire_lease(self, name: str, owner: str, now_ms: int, ttl_ms: int) -> bool: ...

    async def release_lease(self, name: str, owner: str) -> None: ...

    async def lease_holder(self, name: str) -> tuple[str, int] | None: ...

    async def take_over_lease(self, name: str, dead_owner: str, owner: str, now_ms: int,
                              ttl_ms: int) -> bool: ...


@runtime_checkable
class DirectoryStore(Protocol):
    """What directory sync provisioned, and the directory view others read."""

    async def directory_people(self) -> list[DirectoryRecord]: ...

    async def save_directory_people(self, records: Sequence[DirectoryRecord]) -> None: ...

    async def managed_rooms(self) -> dict[str, str]: ...

    async def save_managed_room(self, key: str, room_id: str, now_ms: int) -> None: ...

    async def directory_view(self) -> list[StaffRecord]: ...

    async def replace_directory_view(self, records: Sequence[StaffRecord]) -> int: ...


@runtime_checkable
class ScimStore(Protocol):
    """Resources identity providers pushed over SCIM."""

    async def scim_get(self, resource_type: str, resource_id: str) -> ScimResource | None: ...

    async def scim_list(self, resource_type: str) -> list[ScimResource]: ...

    async def scim_put(self, resource: ScimResource) -> None: ...

    async def scim_delete(self, resource_type: str, resource_id: str) -> bool: ...


@runtime_checkable
class ArchiveIndexStore(Protocol):
    """The index of the compliance archive (events and media)."""

    async def archive_commit(self, events: Sequence[ArchivedEvent], head: ArchiveHead,
                             media: Sequence[ArchivedMedia] = ()) -> int: ...

    async def archive_known(self, event_ids: Sequence[str]) -> set[str]: ...

    async def archive_events_by_id(self, event_ids: Sequence[str]) -> list[ArchivedEvent]: ...

    async def archive_head(self, room_id: str) -> ArchiveHead | None: ...

    async def archive_heads(self) -> list[ArchiveHead]: ...

    async def archive_query(
        self, *, room_id: str | None = None, senders: Sequence[str] | None = None,
        since_ms: int | None = None, until_ms: int | None = None,
        include_purged: bool = True,
        after: tuple[int, str, int] | tuple[int, str, int, str] | None = None,
        limit: int = 10000, archive_order: bool = False,
    ) -> list[ArchivedEvent]: ...

    async def archive_timestamps(self, room_id: str, *, unpurged_only: bool = True,
                                 messages_only: bool = False) -> list[tuple[int, str | None]]: ...

    async def archive_rooms(self) -> dict[str, int]: ...

    async def archive_segments(self, room_id: str) -> list[tuple[str, int, int, int]]: ...

    async def archive_mark_purged(self, room_id: str, up_to_ts: int, now_ms: int) -> int: ...

    async def archive_mark_gone(self, room_id: str, event_ids: Sequence[str],
                                now_ms: int) -> int: ...

    async def archive_drop_segment(self, room_id: str, segment: str,
                                   head: ArchiveHead | None = None) -> int: ...

    async def archive_media_get(self, mxc: str) -> ArchivedMedia | None: ...

    async def archive_media_list(self, room_id: str | None = None, *,
                                 sha256: str | None = None) -> list[ArchivedMedia]: ...

    async def archive_media_mark_deleted(self, mxcs: Sequence[str], now_ms: int) -> None: ...


@runtime_checkable
class HoldStore(Protocol):
    """Legal holds."""

    async def hold_add(self, hold: HoldRecord, audit: AuditRecord) -> bool: ...

    async def hold_release(self, hold_id: str, by: str, now_ms: int,
                           audit: AuditRecord) -> bool: ...

    async def holds(self, *, include_released: bool = False) -> list[HoldRecord]: ...

    async def hold_get(self, hold_id: str) -> HoldRecord | None: ...


@runtime_checkable
class RetentionRoomStore(Protocol):
    """Per-room retention state (class, adjustments, purge progress)."""

    async def retention_room_get(self, room_id: str) -> RetentionRoom | None: ...

    async def retention_room_put(self, room: RetentionRoom) -> None: ...

    async def retention_rooms(self) -> list[RetentionRoom]: ...

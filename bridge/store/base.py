"""The records the stores read and write, and the store's errors.

The stores themselves are one class per domain (``bridge/store/*.py``) behind the narrow
protocols of :mod:`bridge.store.domains`, on one shared database (:mod:`.shared`).
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in console session (``id_hash``: sha256 of the cookie's random id)."""

    id_hash: str
    user_id: str
    roles: tuple[str, ...]
    csrf: str
    created_at: int
    last_seen: int


@dataclass(frozen=True)
class AuditSearch:
    """A page of the audit log, newest first (by time, then id): rows before the keyset
    ``(before_ts, before_id)`` matching every filter given (the console's search)."""

    since_ms: int | None = None
    until_ms: int | None = None
    user_id: str | None = None
    room_id: str | None = None
    rule_id: str | None = None
    outcome: str | None = None
    actor: str | None = None
    before_ts: int | None = None
    before_id: int | None = None
    limit: int = 100


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log with its id (what the audit stream sends)."""

    id: int
    record: AuditRecord


@dataclass(frozen=True)
class AuditFeedPage:
    """Audit rows after a cursor, in id order, read on one snapshot.

    ``horizon``: on PostgreSQL the snapshot's (xmin, xmax) transaction ids: a row whose id is
    missing may still appear later (identity values are taken before commit, so a
    transaction can commit a lower id after a higher one was read) until every transaction
    below that snapshot's xmax has ended. None on SQLite: its one writer commits ids in
    order, so a missing id never appears later."""

    entries: tuple[AuditEntry, ...]
    horizon: tuple[int, int] | None

"""Legal holds as the retention service keeps them: placed and released with their audit
record in one commit, after checking that who and what a hold names exists.

What a hold keeps is decided by :class:`~bridge.policy.retention.Hold` and the functions of
:mod:`bridge.policy.retention_rooms`; this module reads and writes the holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..matrix.client import MatrixClient, MatrixRequestError
from ..policy.retention import HOLD_RULE, Hold, validate_hold
from ..store.base import AuditRecord, HoldRecord
from ..store.domains import ArchiveIndexStore, DirectoryStore, HoldStore


def hold_from_record(r: HoldRecord) -> Hold:
    return Hold(id=r.id, case_id=r.case_id, reason=r.reason, placed_by=r.placed_by,
                users=frozenset(r.users), rooms=frozenset(r.rooms), since_ms=r.since_ms,
                until_ms=r.until_ms, created_at=r.created_at, released_at=r.released_at,
                released_by=r.released_by)


class HoldCheckFailed(RuntimeError):
    """The users and rooms a hold names could not be checked (the homeserver cannot be
    asked): no hold is placed."""


class UnknownHoldSubjects(ValueError):
    """A hold names users or rooms nobody knows: no hold is placed."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def _hold_audit(rec: HoldRecord, now: int, kind: str, by: str, reason: str,
                source: str) -> AuditRecord:
    return AuditRecord(
        ts=now, source=source, kind=kind, outcome="applied", actor=by,
        rule_id=HOLD_RULE, reason=reason,
        detail=(f"hold {rec.id} case {rec.case_id}: users={list(rec.users)} "
                f"rooms={list(rec.rooms)} since={rec.since_ms} until={rec.until_ms}"))


class LegalHolds:
    """The one place holds are placed and released (the CLI goes through it)."""

    def __init__(self, *, holds: HoldStore, directory_store: DirectoryStore,
                 index: ArchiveIndexStore, client: MatrixClient, clock_ms: Callable[[], int],
                 server_name: str, admin_user_id: str):
        self.holds = holds
        self.directory_store = directory_store
        self.index = index
        self.client = client
        self.clock_ms = clock_ms
        self.server_name = server_name
        self.admin_user_id = admin_user_id

    async def active_holds(self) -> list[Hold]:
        return [hold_from_record(r) for r in await self.holds.holds()]

    async def unknown_hold_subjects(self, users: Sequence[str],
                                    rooms: Sequence[str]) -> list[str]:
        """What a hold names that nobody knows: a user neither the homeserver (deactivated
        accounts included), the directory nor the archive (a remote sender) knows, a room
        neither the homeserver nor the archive has. A typo must not place a hold that
        leaves the real custodian unheld."""
        problems: list[str] = []
        if users:
            known = {p.user_id for p in await self.directory_store.directory_people()}
            known |= {r.user_id for r in await self.directory_store.directory_view()}
            for u in users:
                if u in known:
                    continue
                if u.endswith(":" + self.server_name):
                    try:
                        if await self.client.admin_get_user(u, admin=self.admin_user_id):
                            continue
                    except MatrixRequestError as e:
                        if e.status != 400:  # 400: not a valid local user id
                            raise
                elif await self.index.archive_query(senders=[u], limit=1):
                    continue
                problems.append(f"unknown user {u!r}: not on the homeserver, in the "
                                "directory or in the archive")
        if rooms:
            archived = await self.index.archive_rooms()
            for r in rooms:
                if r in archived:
                    continue
                state = None
                try:
                    state = await self.client.admin_room_state(r, admin=self.admin_user_id)
                except MatrixRequestError as e:
                    if e.status not in (400, 404):
                        raise
                if not state:
                    problems.append(f"unknown room {r!r}: not on the homeserver or in the "
                                    "archive")
        return problems

    async def add_hold(self, record: HoldRecord, *, source: str = "cli") -> bool:
        """Place a legal hold; the audit record is written in the same commit. False when a
        hold with its id exists.

        Raises :class:`HoldCheckFailed` when who and what it names cannot be checked (no
        hold on a guess), :class:`UnknownHoldSubjects` when it names a user or room nobody
        knows, ``ValueError`` when the hold itself is invalid."""
        try:
            problems = await self.unknown_hold_subjects(record.users, record.rooms)
        except Exception as e:  # the homeserver cannot be asked
            raise HoldCheckFailed(str(e)) from e
        if problems:
            raise UnknownHoldSubjects(problems)
        validate_hold(hold_from_record(record))
        audit = _hold_audit(record, self.clock_ms(), "hold_add", record.placed_by,
                            record.reason, source)
        return await self.holds.hold_add(record, audit)

    async def release_hold(self, hold_id: str, *, by: str, reason: str,
                           source: str = "cli") -> bool:
        """Release an active hold (audited); False when there is no active hold by that id.
        Its events follow the retention policy again."""
        record = await self.holds.hold_get(hold_id)
        if record is None or record.released_at is not None:
            return False
        now = self.clock_ms()
        audit = _hold_audit(record, now, "hold_release", by, reason, source)
        return await self.holds.hold_release(hold_id, by, now, audit)


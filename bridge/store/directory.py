"""Directory state (:class:`~bridge.store.domains.DirectoryStore`): the people directory
sync provisioned, the managed rooms it created, and the directory view others read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ..model.people import StaffRecord
from .base import DirectoryRecord
from .shared import SharedDatabase


def _staff_row(r: StaffRecord) -> tuple[Any, ...]:
    return (r.user_id, r.person_id, 1 if r.active else 0, r.username, r.display_name, r.email,
            r.title, r.department, r.location, r.manager_user_id,
            orjson.dumps(sorted(r.groups)).decode(), r.updated_at)


def _staff_from_row(row: tuple[Any, ...]) -> StaffRecord:
    return StaffRecord(
        user_id=row[0], person_id=row[1], active=bool(row[2]), username=row[3],
        display_name=row[4], email=row[5], title=row[6], department=row[7], location=row[8],
        manager_user_id=row[9], groups=frozenset(orjson.loads(row[10])), updated_at=row[11])



class SQLDirectoryStore:
    """Directory state, on the shared database."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    async def directory_people(self) -> list[DirectoryRecord]:
        rows = await self.db.fetch(
            "SELECT person_id, user_id, status, email, displayname, updated_at, deactivated_at"
            " FROM directory_people ORDER BY person_id")
        return [DirectoryRecord(*tuple(r)) for r in rows]

    async def save_directory_people(self, records: Sequence[DirectoryRecord]) -> None:
        if not records:
            return
        await self.db.batch([(
            "INSERT INTO directory_people (person_id, user_id, status, email, displayname,"
            " updated_at, deactivated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (person_id) DO UPDATE SET user_id = excluded.user_id,"
            " status = excluded.status, email = excluded.email,"
            " displayname = excluded.displayname, updated_at = excluded.updated_at,"
            " deactivated_at = excluded.deactivated_at",
            [(r.person_id, r.user_id, r.status, r.email, r.displayname, r.updated_at,
              r.deactivated_at) for r in records],
            True,
        )])

    async def managed_rooms(self) -> dict[str, str]:
        rows = await self.db.fetch("SELECT key, room_id FROM managed_rooms")
        return {r[0]: r[1] for r in rows}

    async def save_managed_room(self, key: str, room_id: str, now_ms: int) -> None:
        await self.db.batch([
            ("DELETE FROM managed_rooms WHERE room_id = ? AND key <> ?", (room_id, key), False),
            ("INSERT INTO managed_rooms (key, room_id, created_at) VALUES (?, ?, ?)"
             " ON CONFLICT (key) DO UPDATE SET room_id = excluded.room_id,"
             " created_at = excluded.created_at", (key, room_id, now_ms), False),
        ])

    _VIEW_COLS = ("user_id, person_id, active, username, display_name, email, title,"
                  " department, location, manager_user_id, groups, updated_at")

    async def directory_view(self) -> list[StaffRecord]:
        rows = await self.db.fetch(
            f"SELECT {self._VIEW_COLS} FROM directory_view ORDER BY user_id")
        return [_staff_from_row(tuple(r)) for r in rows]

    async def directory_person(self, user_id: str) -> StaffRecord | None:
        rows = await self.db.fetch(
            f"SELECT {self._VIEW_COLS} FROM directory_view WHERE user_id = ?", user_id)
        return _staff_from_row(tuple(rows[0])) if rows else None

    async def replace_directory_view(self, records: Sequence[StaffRecord]) -> int:
        old = {r.user_id: r for r in await self.directory_view()}
        new = {r.user_id: r for r in records}
        gone = [(uid,) for uid in old if uid not in new]

        def same(a: StaffRecord, b: StaffRecord) -> bool:
            # updated_at alone changing is not a change worth a write
            return _staff_row(a)[:-1] == _staff_row(b)[:-1]

        changed = [_staff_row(r) for uid, r in new.items()
                   if uid not in old or not same(old[uid], r)]
        if not gone and not changed:
            return 0
        await self.db.batch([
            ("DELETE FROM directory_view WHERE user_id = ?", gone, True),
            (f"INSERT INTO directory_view ({self._VIEW_COLS})"
             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
             " ON CONFLICT (user_id) DO UPDATE SET person_id = excluded.person_id,"
             " active = excluded.active, username = excluded.username,"
             " display_name = excluded.display_name, email = excluded.email,"
             " title = excluded.title, department = excluded.department,"
             " location = excluded.location, manager_user_id = excluded.manager_user_id,"
             " groups = excluded.groups, updated_at = excluded.updated_at", changed, True),
        ])
        return len(gone) + len(changed)


"""SCIM resources (:class:`~bridge.store.domains.ScimStore`) identity providers pushed."""

from __future__ import annotations

from .base import ScimResource
from .shared import SharedDatabase


class SQLScimStore:
    """SCIM resources, on the shared database."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    _SCIM_COLS = "resource_type, id, external_id, data, version, created_at, updated_at"

    async def scim_get(self, resource_type: str, resource_id: str) -> ScimResource | None:
        rows = await self.db.fetch(
            f"SELECT {self._SCIM_COLS} FROM scim_resources WHERE resource_type = ? AND id = ?",
            resource_type, resource_id)
        return ScimResource(*tuple(rows[0])) if rows else None

    async def scim_list(self, resource_type: str) -> list[ScimResource]:
        rows = await self.db.fetch(
            f"SELECT {self._SCIM_COLS} FROM scim_resources WHERE resource_type = ?"
            " ORDER BY id", resource_type)
        return [ScimResource(*tuple(r)) for r in rows]

    async def scim_put(self, resource: ScimResource) -> None:
        r = resource
        await self.db.batch([(
            f"INSERT INTO scim_resources ({self._SCIM_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (resource_type, id) DO UPDATE SET external_id = excluded.external_id,"
            " data = excluded.data, version = excluded.version,"
            " updated_at = excluded.updated_at",
            (r.resource_type, r.id, r.external_id, r.data, r.version, r.created_at,
             r.updated_at), False,
        )])

    async def scim_delete(self, resource_type: str, resource_id: str) -> bool:
        counts = await self.db.batch([(
            "DELETE FROM scim_resources WHERE resource_type = ? AND id = ?",
            (resource_type, resource_id), False,
        )])
        return counts[0] > 0


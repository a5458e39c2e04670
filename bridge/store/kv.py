"""Key/value (:class:`~bridge.store.domains.KVStore`): installation-wide keys, and one
key space per component (a service, a bot) with a once-only insert."""

from __future__ import annotations

from .shared import SharedDatabase


class SQLKVStore:
    """Both key/value tables, on the shared database."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    async def get_kv(self, key: str) -> str | None:
        rows = await self.db.fetch("SELECT value FROM kv WHERE key = ?", key)
        return rows[0][0] if rows else None

    async def set_kv(self, key: str, value: str) -> None:
        await self.db.batch([(
            "INSERT INTO kv (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value), False,
        )])

    async def component_get(self, component: str, key: str) -> str | None:
        rows = await self.db.fetch(
            "SELECT value FROM component_kv WHERE component = ? AND key = ?", component, key)
        return rows[0][0] if rows else None

    async def component_put(self, component: str, key: str, value: str, now_ms: int) -> None:
        await self.db.batch([(
            "INSERT INTO component_kv (component, key, value, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (component, key) DO UPDATE SET value = excluded.value,"
            " updated_at = excluded.updated_at", (component, key, value, now_ms), False)])

    async def component_put_new(self, component: str, key: str, value: str,
                                now_ms: int) -> bool:
        counts = await self.db.batch([(
            "INSERT INTO component_kv (component, key, value, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (component, key) DO NOTHING", (component, key, value, now_ms),
            False)])
        return counts[0] == 1

    async def component_list(self, component: str, prefix: str = "") -> dict[str, str]:
        rows = await self.db.fetch(
            "SELECT key, value FROM component_kv WHERE component = ? AND substr(key, 1, ?) = ?"
            " ORDER BY key", component, len(prefix), prefix)
        return {r[0]: r[1] for r in rows}

    async def component_delete(self, component: str, key: str) -> bool:
        counts = await self.db.batch([(
            "DELETE FROM component_kv WHERE component = ? AND key = ?", (component, key),
            False)])
        return counts[0] == 1


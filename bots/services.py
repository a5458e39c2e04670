"""What the bots share (:class:`BotServices`, built once by :func:`bots.wiring.build_bots`),
the cached directory view they read (:class:`StaffDirectory`) and each bot's key/value
space in the store (:class:`BotStorage`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bridge.matrix.client import MatrixClient
from bridge.matrix.executor import Executor
from bridge.metrics import Metrics
from bridge.model.people import StaffRecord
from bridge.store.domains import AuditStore, DirectoryStore, KVStore, LeaseStore

from .sending import MessageSender, RoomEncryption, RoomSender
from .store import AnnouncementStore


class StaffDirectory:
    """The directory view (what the last directory sync knew), cached for a few seconds:
    a command or a reaction must not read the whole table each time."""

    def __init__(self, store: DirectoryStore, ttl_seconds: float = 5.0):
        self.store = store
        self.ttl = ttl_seconds
        self._at = -1e9
        self._records: list[StaffRecord] = []
        self._by_id: dict[str, StaffRecord] = {}
        self._lock = asyncio.Lock()

    async def _load(self) -> None:
        async with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return
            self._records = await self.store.directory_view()
            self._by_id = {r.user_id: r for r in self._records}
            self._at = time.monotonic()

    def invalidate(self) -> None:
        self._at = -1e9

    async def all(self) -> list[StaffRecord]:
        await self._load()
        return self._records

    async def by_id(self) -> dict[str, StaffRecord]:
        await self._load()
        return self._by_id

    async def get(self, user_id: str) -> StaffRecord | None:
        await self._load()
        return self._by_id.get(user_id)


@dataclass
class BotServices:
    """What the bots share; built once in :func:`bots.wiring.build_bots`."""

    # the core stores the bots use (their own tables: ``announcements``)
    audit: AuditStore
    kv: KVStore
    leases: LeaseStore
    directory_store: DirectoryStore
    client: MatrixClient
    executor: Executor
    metrics: Metrics
    clock_ms: Callable[[], int]
    sender: MessageSender
    encryption: RoomEncryption
    directory: StaffDirectory
    server_name: str
    namespace_prefix: str
    main_bot_user_id: str
    # Enclave's admin identity (never a recipient, never answered)
    admin_user_id: str
    # the bots' own tables (announcements), on the same database as the core stores
    announcements: AnnouncementStore
    encrypted_sender: RoomSender | None = None
    # (bot user id, room id, m.room.encrypted event) -> the cleartext event, or None: lets
    # bots read commands and reactions in encrypted rooms (the E2EE side provides it)
    decrypt: Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any] | None]] | None = None
    # (bot user id, room id, user id) when someone joins one of the bot's rooms: the E2EE
    # side sends them the keys of messages sent while they were invited
    member_joined: Callable[[str, str, str], Awaitable[None]] | None = None
    # the root's one APScheduler (the bots' wake-up timers); None: each Waker has its own
    scheduler: AsyncIOScheduler | None = None

    def installation_key(self, key: str) -> str:
        """A send key unique to this database (see Executor.action_key)."""
        iid = self.executor.installation_id
        return f"{iid}/{key}" if iid else key


class BotStorage:
    """One bot's key/value space in the store, with JSON values."""

    def __init__(self, store: KVStore, component: str, clock_ms: Callable[[], int]):
        self.store = store
        self.component = component
        self.clock_ms = clock_ms

    async def get(self, key: str) -> Any:
        raw = await self.store.component_get(self.component, key)
        return None if raw is None else json.loads(raw)

    async def put(self, key: str, value: Any) -> None:
        await self.store.component_put(self.component, key, json.dumps(value),
                                       self.clock_ms())

    async def put_new(self, key: str, value: Any) -> bool:
        """Insert only if absent; True if this call did (once-only across processes)."""
        return await self.store.component_put_new(self.component, key, json.dumps(value),
                                                  self.clock_ms())

    async def list(self, prefix: str = "") -> dict[str, Any]:
        raw = await self.store.component_list(self.component, prefix)
        return {k: json.loads(v) for k, v in raw.items()}

    async def delete(self, key: str) -> bool:
        return await self.store.component_delete(self.component, key)

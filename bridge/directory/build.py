"""Build the directory source and sync service from config (used by app.py and the CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from ..config import LoadedConfig, Secret
from ..config.directory import DirectoryConfig
from ..matrix.client import MatrixClient
from ..matrix.executor import Executor
from ..metrics import Metrics
from ..store import Store
from .source import DirectorySource
from .sync import DirectorySync

log = logging.getLogger(__name__)


def build_source(dcfg: DirectoryConfig, *, base_dir: Path, secrets: dict[str, Secret],
                 store: Store) -> DirectorySource:
    """The configured source. Imports lazily: a file-source install needs no ldap3."""
    src = dcfg.source
    if src.type == "file":
        from .file_source import FileSource

        path = src.path if src.path.is_absolute() else base_dir / src.path
        return FileSource(path, format=src.format,
                          allow_initial_passwords=src.allow_initial_passwords)
    if src.type == "ldap":
        from .ldap_source import LdapSource

        pw = secrets.get("directory.source.bind_password")
        return LdapSource(src, bind_password=pw.get() if pw else None, store=store,
                          base_dir=base_dir)
    from .scim import ScimSource

    return ScimSource(store)


def build_directory_sync(loaded: LoadedConfig, secrets: dict[str, Secret], *, store: Store,
                         client: MatrixClient, executor: Executor, metrics: Metrics,
                         clock_ms: Callable[[], int]) -> DirectorySync | None:
    cfg = loaded.config
    dcfg = cfg.directory
    if dcfg is None:
        return None
    source = build_source(dcfg, base_dir=loaded.base_dir, secrets=secrets, store=store)
    return DirectorySync(
        dcfg, source, client=client, executor=executor, store=store, metrics=metrics,
        clock_ms=clock_ms, server_name=cfg.homeserver.server_name,
        bot_user_id=cfg.bot_user_id, admin_user_id=cfg.admin_user_id,
        namespace_prefix=cfg.appservice.namespace_prefix,
        admin_localpart=cfg.appservice.admin_localpart,
        bot_localpart=cfg.appservice.bot_localpart,
        allow_initial_passwords=getattr(dcfg.source, "allow_initial_passwords", False),
    )


class Debouncer:
    """Calls ``fn`` once, ``delay`` seconds after the last of a burst of triggers."""

    def __init__(self, delay: float, fn: Callable[[], Awaitable[Any]]):
        self.delay = delay
        self.fn = fn
        self._task: asyncio.Task[Any] | None = None
        self._again = False

    def trigger(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            await asyncio.sleep(self.delay)
            if self._again:
                continue  # more changes arrived while waiting: wait for the burst to end
            try:
                await self.fn()
            except Exception:
                log.exception("directory sync after a SCIM change failed")
            if not self._again:
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.asynccontextmanager
async def standalone_services(loaded: LoadedConfig, secrets: dict[str, Secret], *,
                              clock_ms: Callable[[], int],
                              ) -> AsyncIterator[tuple[Store, MatrixClient, Executor, Metrics]]:
    """A store, homeserver client and executor of the CLI's own (no running service):
    what ``enclave sync`` and ``enclave separation``/``explain`` build their service on."""
    from ..app import build_store

    cfg = loaded.config
    store = build_store(loaded, secrets)
    await store.open()
    try:
        await store.check_schema()
        iid = await store.get_kv("installation_id") or ""
        async with aiohttp.ClientSession(json_serialize=None) as session:
            metrics = Metrics()
            client = MatrixClient(
                session, cfg.homeserver.url, secrets["appservice.as_token"].get(),
                max_retries=cfg.homeserver.max_retries, timeout=cfg.homeserver.timeout_seconds,
                on_rate_limited=metrics.rate_limited.inc)
            executor = Executor(client, store, bot_user_id=cfg.bot_user_id, clock_ms=clock_ms,
                                metrics=metrics,
                                admin_user_id=cfg.admin_user_id)
            executor.installation_id = iid
            try:
                yield store, client, executor, metrics
            finally:
                # the admin's own session (user list) dies with the run: no token left over
                # (bounded: a homeserver that is down must not hold the CLI's exit)
                try:
                    await asyncio.wait_for(client.close_sessions(), timeout=10)
                except Exception as e:
                    log.warning("the admin session was not logged out: %s", e)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def standalone_sync(loaded: LoadedConfig, secrets: dict[str, Secret], *,
                          clock_ms: Callable[[], int]) -> AsyncIterator[DirectorySync]:
    """A sync service with its own store and homeserver client (for the CLI)."""
    from ..separation.build import build_separation

    async with standalone_services(loaded, secrets, clock_ms=clock_ms) as (
            store, client, executor, metrics):
        sync = build_directory_sync(loaded, secrets, store=store, client=client,
                                    executor=executor, metrics=metrics, clock_ms=clock_ms)
        if sync is None:
            raise LookupError("the configuration has no directory: section")
        separation = build_separation(loaded, store=store, client=client, executor=executor,
                                      metrics=metrics, clock_ms=clock_ms)
        if separation is not None:  # as in the running service (app.py)
            sync.room_edits = separation.managed_room_edits
        yield sync

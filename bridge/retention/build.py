"""Build the retention service once (the app and the CLI share this)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from ..config import LoadedConfig, Secret
from ..matrix.client import MatrixClient
from ..matrix.executor import Executor
from ..metrics import Metrics
from ..store import Store
from .archive import LocalArchive
from .service import RetentionService


def archive_root(loaded: LoadedConfig) -> Path:
    """The archive directory; a relative path is relative to the config file's folder."""
    path = Path(loaded.config.retention.archive.path)
    return path if path.is_absolute() else loaded.base_dir / path


def build_archive(loaded: LoadedConfig, store: Store,
                  clock_ms: Callable[[], int]) -> LocalArchive:
    rcfg = loaded.config.retention
    return LocalArchive(archive_root(loaded), store,
                        segment_max_bytes=rcfg.archive.segment_max_bytes, clock_ms=clock_ms)


def build_retention(loaded: LoadedConfig, *, store: Store, client: MatrixClient,
                    executor: Executor, metrics: Metrics, clock_ms: Callable[[], int],
                    classify: Callable[[str], Awaitable[str | None]] | None = None,
                    ) -> RetentionService | None:
    """The retention service, or None when the config has no ``retention:`` section."""
    cfg = loaded.config
    if cfg.retention is None:
        return None
    return RetentionService(
        cfg.retention, store=store, client=client, executor=executor,
        archive=build_archive(loaded, store, clock_ms), metrics=metrics, clock_ms=clock_ms,
        server_name=cfg.homeserver.server_name, bot_user_id=cfg.bot_user_id,
        admin_user_id=cfg.admin_user_id, service_prefix=cfg.appservice.namespace_prefix,
        classify=classify)


def classifier_of(separation: object | None) -> Callable[[str], Awaitable[str | None]] | None:
    """A room -> class function from the separation service (None without a policy)."""
    if separation is None:
        return None

    async def classify(room_id: str) -> str | None:
        facts = await separation.room_facts(room_id)  # type: ignore[attr-defined]
        policy = await separation.policy()  # type: ignore[attr-defined]
        return str(policy.classify_room(facts).id)

    return classify


@contextlib.asynccontextmanager
async def standalone_retention(loaded: LoadedConfig, secrets: dict[str, Secret], *,
                               clock_ms: Callable[[], int],
                               ) -> AsyncIterator[RetentionService]:
    """A retention service with its own store and homeserver client (for the CLI)."""
    from ..directory.build import standalone_services
    from ..separation.build import build_separation

    async with standalone_services(loaded, secrets, clock_ms=clock_ms) as (
            store, client, executor, metrics):
        sep = build_separation(loaded, store=store, client=client, executor=executor,
                               metrics=metrics, clock_ms=clock_ms)
        svc = build_retention(loaded, store=store, client=client, executor=executor,
                              metrics=metrics, clock_ms=clock_ms, classify=classifier_of(sep))
        if svc is None:
            raise LookupError("the configuration has no retention: section")
        yield svc

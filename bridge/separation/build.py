"""Build the separation service once (the app and the CLI share this)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from ..config import LoadedConfig, Secret
from ..matrix.client import MatrixClient
from ..matrix.executor import Executor
from ..metrics import Metrics
from ..store import Store
from .service import SeparationService


def build_separation(loaded: LoadedConfig, *, store: Store, client: MatrixClient,
                     executor: Executor, metrics: Metrics,
                     clock_ms: Callable[[], int]) -> SeparationService | None:
    """The separation service, or None when the config has no ``policy:`` section."""
    cfg = loaded.config
    if cfg.policy is None:
        return None
    return SeparationService(
        cfg.policy, store=store, client=client, executor=executor, metrics=metrics,
        clock_ms=clock_ms, server_name=cfg.homeserver.server_name,
        bot_user_id=cfg.bot_user_id, admin_user_id=cfg.admin_user_id,
        service_prefix=cfg.appservice.namespace_prefix)


@contextlib.asynccontextmanager
async def standalone_separation(loaded: LoadedConfig, secrets: dict[str, Secret], *,
                                clock_ms: Callable[[], int],
                                ) -> AsyncIterator[SeparationService]:
    """A separation service with its own store and homeserver client (for the CLI)."""
    from ..directory.build import standalone_services

    async with standalone_services(loaded, secrets, clock_ms=clock_ms) as (
            store, client, executor, metrics):
        svc = build_separation(loaded, store=store, client=client, executor=executor,
                               metrics=metrics, clock_ms=clock_ms)
        if svc is None:
            raise LookupError("the configuration has no policy: section")
        yield svc

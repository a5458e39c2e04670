"""A store lease held for the length of a ``with`` block: one run at a time across the
processes that share a database (a CLI run beside ``enclave run``, or several replicas)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from .base import Store


@contextlib.asynccontextmanager
async def held_lease(store: Store, name: str, owner: str, clock_ms: Callable[[], int],
                     ttl_ms: int, busy: Callable[[], Exception]) -> AsyncIterator[None]:
    """Take lease ``name`` for ``owner`` or raise ``busy()``; renew it every third of its
    ttl while the block runs (a holder that dies loses it ``ttl_ms`` after its last
    renewal), and release it on the way out."""
    if not await store.acquire_lease(name, owner, clock_ms(), ttl_ms):
        raise busy()

    async def renew() -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            await store.acquire_lease(name, owner, clock_ms(), ttl_ms)

    task = asyncio.create_task(renew())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await store.release_lease(name, owner)

"""Leases: one holder at a time across the processes that share a database (a CLI run
beside ``enclave run``, or several replicas). :class:`SQLLeaseStore` keeps them
(:class:`~bridge.store.domains.LeaseStore`); :func:`held_lease` holds one for the length of
a ``with`` block."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable

from .domains import LeaseStore
from .shared import SharedDatabase

log = logging.getLogger(__name__)


def new_lease_owner() -> str:
    """A lease owner name unique to one holder object: ``host:pid:random``.

    The host and process make a held lease traceable in the ``leases`` table; the random
    part keeps two holders in one process (a CLI run beside a service in tests, two
    services built from one config) from renewing each other's lease. The cluster leader
    lease is the exception: it is owned by the replica's configured name, so a replica
    restarted under the same name takes its own lease back.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class LeaseLost(RuntimeError):
    """Another process took the lease while the block ran; the block was stopped."""


@contextlib.asynccontextmanager
async def held_lease(store: LeaseStore, name: str, owner: str, clock_ms: Callable[[], int],
                     ttl_ms: int, busy: Callable[[], Exception]) -> AsyncIterator[None]:
    """Take lease ``name`` for ``owner`` or raise ``busy()``; renew it every third of its
    ttl while the block runs (a holder that dies loses it ``ttl_ms`` after its last
    renewal), and release it on the way out.

    If a renewal finds the lease taken by another process (this one could not renew it in
    time), the block is cancelled and :class:`LeaseLost` raised: two runs never go on side
    by side. A renewal that fails because the store does not answer is retried; the block's
    own writes fail meanwhile.
    """
    if not await store.acquire_lease(name, owner, clock_ms(), ttl_ms):
        raise busy()
    body = asyncio.current_task()
    lost = False

    async def renew() -> None:
        nonlocal lost
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            try:
                held = await store.acquire_lease(name, owner, clock_ms(), ttl_ms)
            except Exception as e:
                log.warning("lease %s: renewal failed (%s); retrying", name, e)
                continue
            if not held:
                lost = True
                log.error("lease %s: taken by another process; stopping this run", name)
                if body is not None:
                    body.cancel()
                return

    task = asyncio.create_task(renew())
    try:
        yield
    except asyncio.CancelledError:
        if not lost:
            raise
        if body is not None:
            body.uncancel()
        raise LeaseLost(f"lease {name} was taken by another process during the run") from None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if not lost:
            await store.release_lease(name, owner)


class SQLLeaseStore:
    """Leases, on the shared database."""

    def __init__(self, shared: SharedDatabase):
        self.db = shared.db

    async def acquire_lease(self, name: str, owner: str, now_ms: int, ttl_ms: int) -> bool:
        counts = await self.db.batch([(
            "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
            " expires_at = excluded.expires_at"
            " WHERE leases.owner = excluded.owner OR leases.expires_at <= ?",
            (name, owner, now_ms + ttl_ms, now_ms), False,
        )])
        return counts[0] == 1

    async def release_lease(self, name: str, owner: str) -> None:
        await self.db.batch([(
            "DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner), False)])

    async def lease_holder(self, name: str) -> tuple[str, int] | None:
        rows = await self.db.fetch("SELECT owner, expires_at FROM leases WHERE name = ?", name)
        return (rows[0][0], int(rows[0][1])) if rows else None

    async def take_over_lease(self, name: str, dead_owner: str, owner: str, now_ms: int,
                              ttl_ms: int) -> bool:
        counts = await self.db.batch([(
            "UPDATE leases SET owner = ?, expires_at = ? WHERE name = ? AND owner = ?",
            (owner, now_ms + ttl_ms, name, dead_owner), False)])
        return counts[0] == 1

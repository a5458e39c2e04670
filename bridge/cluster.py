"""Leadership among Enclave replicas that share one PostgreSQL database.

Every replica accepts the homeserver's transactions (the journal deduplicates them by
transaction id, so a retry that reaches another replica is stored once). Exactly one replica,
the holder of the store lease ``leader``, processes the inbox and runs the scheduled jobs
and the bots' loops: one processor keeps the per-room order and the exactly-once commit of
the inbox as they are with a single process, and a job never runs on two replicas at once.

The leader renews the lease every sixth of its ttl and stops acting as leader when it has
not renewed it for three quarters of the ttl (it may be cut off from the database, or paused)
so it has stepped down before the lease expires and a standby may take it. Standbys try to
take the lease as often; a dead leader is replaced ``ttl`` after its last renewal, plus at
most one standby period. This relies on the replicas' clocks agreeing to well within a
quarter of the ttl (NTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .store.domains import KVStore, LeaseStore

log = logging.getLogger(__name__)

LEADER_LEASE = "leader"
# store component and key prefix: a replica's pid namespace (by name), to judge whether
# it died
COMPONENT = "cluster"
PIDNS_KEY = "pidns:"
# the leader steps down when its last successful renewal is older than this part of the ttl
STEP_DOWN_FRACTION = 0.75


def replica_name(configured: str | None) -> str:
    """The name this process goes by in leases, logs and ``/ready``."""
    return configured or f"{socket.gethostname()}:{os.getpid()}"


def pid_namespace() -> str | None:
    """This process's pid namespace (``/proc/self/ns/pid``), or None where unreadable."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def dead_local_owner(owner: str, owner_pidns: str | None, *, hostname: str, my_pid: int,
                     my_pidns: str | None, alive: Callable[[int], bool] = pid_alive) -> bool:
    """Whether lease ``owner`` is a default-named replica (``host:pid``) of THIS machine
    whose process is gone: same host name, same pid namespace (recorded when it was
    elected; replicas in other containers that share a host name are never judged), and
    no process with its pid. Such a holder cannot renew: its lease may be taken at once."""
    host, sep, pid_s = owner.rpartition(":")
    if not sep or host != hostname or not pid_s.isdigit():
        return False
    pid = int(pid_s)
    if pid == my_pid or my_pidns is None or owner_pidns != my_pidns:
        return False
    return not alive(pid)


class Leadership:
    """Campaign for the ``leader`` lease and start/stop leader-only work with it.

    ``on_elected`` callbacks run (in order) when this replica becomes leader, ``on_deposed``
    ones when it stops being leader (lost lease, shutdown); both are awaited, so work is
    stopped before another replica can take over.
    """

    def __init__(self, leases: LeaseStore, kv: KVStore, name: str, clock_ms: Callable[[], int],
                 ttl_ms: int,
                 *, on_change: Callable[[bool], None] | None = None,
                 exclusive: bool = False):
        self.leases = leases
        self.kv = kv
        self.name = name
        # The lease owner is the replica's name: a replica restarted under the same name
        # (a container's pid 1 in its pod, a configured replica_name) takes its lease back
        # at once instead of waiting out the ttl. Names must therefore be unique.
        self.owner = name
        # ``exclusive``: no other process can run (a SQLite store's lock): always leader,
        # nothing to campaign for
        self.exclusive = exclusive
        self.clock_ms = clock_ms
        self.ttl_ms = ttl_ms
        self._on_change = on_change
        self.on_elected: list[Callable[[], Awaitable[None]]] = []
        self.on_deposed: list[Callable[[], Awaitable[None]]] = []
        self._leader = False
        self._renewed_at = 0.0  # monotonic time of the last successful renewal
        self.elected_at_ms: int | None = None
        self.elections = 0
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def period_s(self) -> float:
        return self.ttl_ms / 6000

    @property
    def is_leader(self) -> bool:
        """True while this replica holds the lease with a safety margin left."""
        return self._leader and (time.monotonic() - self._renewed_at
                                 < self.ttl_ms * STEP_DOWN_FRACTION / 1000)

    def status(self) -> dict[str, Any]:
        return {"replica": self.name, "leader": self.is_leader,
                "since": self.elected_at_ms if self.is_leader else None,
                "lease_ttl_seconds": self.ttl_ms / 1000}

    async def campaign_once(self) -> bool:
        """One attempt to take or renew the lease; start or stop leader work on a change."""
        async with self._lock:
            started = time.monotonic()
            if self.exclusive:
                self._renewed_at = started
                if not self._leader:
                    await self._elect()
                return True
            try:
                held = await self.leases.acquire_lease(LEADER_LEASE, self.owner,
                                                       self.clock_ms(), self.ttl_ms)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # keep leading until the margin runs out: a blip must not cost a takeover
                log.warning("leader lease: the store did not answer (%s)", e)
                held = self._leader and self.is_leader
            else:
                if held:
                    self._renewed_at = started
            if held and not self._leader:
                await self._elect()
            elif not held and self._leader:
                await self._depose("lease lost")
            elif self._leader and not self.is_leader:
                await self._depose("lease not renewed in time")
            return self._leader

    async def _elect(self) -> None:
        self._leader = True
        self.elections += 1
        self.elected_at_ms = self.clock_ms()
        log.info("replica %s is now the leader (inbox processing, scheduled jobs, bots)",
                 self.name)
        self._notify(True)
        for cb in self.on_elected:
            try:
                await cb()
            except Exception:
                log.exception("starting leader work failed")

    async def _depose(self, why: str) -> None:
        self._leader = False
        log.log(logging.INFO if why == "shutting down" else logging.WARNING,
                "replica %s stops leading: %s", self.name, why)
        self._notify(False)
        for cb in reversed(self.on_deposed):
            try:
                await cb()
            except Exception:
                log.exception("stopping leader work failed")

    def _notify(self, leader: bool) -> None:
        self._changed.set()
        if self._on_change is not None:
            self._on_change(leader)

    async def _take_over_from_dead_local(self) -> None:
        """A process restarted after a crash under a new default name (``host:pid``) takes
        the lease of its dead predecessor on the same machine at once instead of waiting
        out the ttl (with nothing processed meanwhile)."""
        try:
            holder = await self.leases.lease_holder(LEADER_LEASE)
            if holder is None or holder[0] == self.owner:
                return
            dead = holder[0]
            recorded = await self.kv.component_get(COMPONENT, PIDNS_KEY + dead)
            if not dead_local_owner(dead, recorded, hostname=socket.gethostname(),
                                    my_pid=os.getpid(), my_pidns=pid_namespace()):
                return
            if await self.leases.take_over_lease(LEADER_LEASE, dead, self.owner,
                                                 self.clock_ms(), self.ttl_ms):
                log.warning("replica %s takes the leader lease of %s at once: that process "
                            "of this machine is gone", self.name, dead)
                await self.kv.component_delete(COMPONENT, PIDNS_KEY + dead)
        except Exception as e:  # the normal campaign still runs
            log.warning("could not check the leader lease's holder: %s", e)

    async def start(self) -> None:
        """First attempt now (so start-up knows its role), then every sixth of the ttl."""
        if not self.exclusive:
            ns = pid_namespace()
            if ns is not None:
                with contextlib.suppress(Exception):
                    await self.kv.component_put(COMPONENT, PIDNS_KEY + self.owner, ns,
                                                   self.clock_ms())
            await self._take_over_from_dead_local()
        await self.campaign_once()
        self._task = asyncio.create_task(self._run(), name="leader-campaign")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            with contextlib.suppress(Exception):
                await self.campaign_once()

    async def stop(self) -> None:
        """Stop leader work and hand the lease over at once (a clean shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._lock:
            if self._leader:
                await self._depose("shutting down")
                if not self.exclusive:
                    with contextlib.suppress(Exception):
                        await self.leases.release_lease(LEADER_LEASE, self.owner)
            if not self.exclusive:
                with contextlib.suppress(Exception):
                    await self.kv.component_delete(COMPONENT, PIDNS_KEY + self.owner)

    async def while_leader(self, work: Callable[[], Awaitable[Any]],
                           on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run ``work()`` whenever this replica leads; cancel it when it stops leading.

        Runs until cancelled. ``on_stop`` is awaited after each cancellation.
        """
        while True:
            while not self._leader:
                self._changed.clear()
                await self._changed.wait()
            task = asyncio.create_task(work())
            try:
                while self._leader and not task.done():
                    self._changed.clear()
                    waiter = asyncio.create_task(self._changed.wait())
                    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    if on_stop is not None:
                        await on_stop()
            if task.cancelled():
                continue  # stopped leading: wait to lead again
            if task.exception() is not None:
                log.error("leader-only work failed: %r", task.exception())
            return  # the work ended on its own

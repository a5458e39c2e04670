"""Leadership among replicas on one store, the journal wake-up between replicas, and the
single-process lock of a SQLite store."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cluster import LEADER_LEASE, Leadership, dead_local_owner, pid_namespace
from bridge.store import Stores
from bridge.store.single import SingleProcessLock, StoreInUse

from .conftest import MakeStore

TTL_MS = 600


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def _leader(st: Stores, name: str, clock: Clock, ttl_ms: int) -> Leadership:
    return Leadership(st.leases, st.kv, name, clock, ttl_ms)


def _pair(a_store, b_store, clock: Clock, log: list[str]) -> tuple[Leadership, Leadership]:
    out = []
    for name, st in (("a", a_store), ("b", b_store)):
        ld = _leader(st, name, clock, TTL_MS)

        async def elected(n: str = name) -> None:
            log.append(f"{n} elected")

        async def deposed(n: str = name) -> None:
            log.append(f"{n} deposed")

        ld.on_elected.append(elected)
        ld.on_deposed.append(deposed)
        out.append(ld)
    return out[0], out[1]


async def test_one_leader_and_takeover_after_expiry(make_store: MakeStore) -> None:
    clock, log = Clock(), []
    a, b = _pair(await make_store(), await make_store(migrate=False), clock, log)
    assert await a.campaign_once()
    assert not await b.campaign_once()
    assert await a.campaign_once()  # renewal
    assert (a.is_leader, b.is_leader) == (True, False)
    clock.now += TTL_MS - 1
    assert not await b.campaign_once()  # not expired yet: a renewed at the previous step
    clock.now += 2
    assert await b.campaign_once()  # expired: taken over
    assert not await a.campaign_once()  # a finds it lost, and stops
    assert log == ["a elected", "b elected", "a deposed"]
    assert b.status()["leader"] and not a.status()["leader"]


async def test_clean_stop_hands_over_at_once(make_store: MakeStore) -> None:
    clock, log = Clock(), []
    a, b = _pair(await make_store(), await make_store(migrate=False), clock, log)
    await a.start()
    assert a.is_leader
    await a.stop()
    assert await b.campaign_once()  # no wait for the ttl
    assert log == ["a elected", "a deposed", "b elected"]
    await b.stop()


async def test_leader_steps_down_when_it_cannot_renew(make_store: MakeStore) -> None:
    clock, log = Clock(), []
    store = await make_store()
    a, _ = _pair(store, store, clock, log)
    assert await a.campaign_once()

    async def unreachable(*_a: object) -> bool:
        raise OSError("connection refused")

    store.leases.acquire_lease = unreachable  # type: ignore[method-assign]
    assert await a.campaign_once()  # a blip: still leading within the margin
    await asyncio.sleep(TTL_MS * 0.8 / 1000)
    assert not a.is_leader  # past the margin: no longer acting as leader...
    assert not await a.campaign_once()  # ...and its work is stopped
    assert log == ["a elected", "a deposed"]


async def test_while_leader_runs_work_only_while_leading(make_store: MakeStore) -> None:
    clock, log = Clock(), []
    a, b = _pair(await make_store(), await make_store(migrate=False), clock, log)
    runs: list[str] = []
    stops: list[str] = []

    async def work() -> None:
        runs.append("start")
        await asyncio.sleep(3600)

    async def on_stop() -> None:
        stops.append("stop")

    task = asyncio.create_task(a.while_leader(work, on_stop))
    await asyncio.sleep(0.05)
    assert runs == []  # not leader yet
    await a.campaign_once()
    await asyncio.sleep(0.05)
    assert runs == ["start"]
    clock.now += TTL_MS + 1
    assert await b.campaign_once()
    await a.campaign_once()  # lost
    await asyncio.sleep(0.05)
    assert stops == ["stop"]
    await b.stop()
    await a.campaign_once()  # leads again: the work starts again
    await asyncio.sleep(0.05)
    assert runs == ["start", "start"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_lease_rows_are_per_owner(make_store: MakeStore) -> None:
    store = await make_store()
    assert await store.leases.acquire_lease(LEADER_LEASE, "x", 0, 100)
    assert not await store.leases.acquire_lease(LEADER_LEASE, "y", 99, 100)
    await store.leases.release_lease(LEADER_LEASE, "y")  # not y's: stays
    assert not await store.leases.acquire_lease(LEADER_LEASE, "y", 50, 100)
    await store.leases.release_lease(LEADER_LEASE, "x")
    assert await store.leases.acquire_lease(LEADER_LEASE, "y", 50, 100)


async def test_journal_append_by_another_process_wakes_the_watcher(
        make_store: MakeStore, db_url: str) -> None:
    leader, other = await make_store(), await make_store(migrate=False)
    woken = asyncio.Event()
    stop = await leader.journal.watch_journal(woken.set)
    try:
        await asyncio.sleep(0.2)
        woken.clear()  # the watcher wakes once on (re)connecting
        assert await other.journal.journal_append("t1", b'{"events": []}', 1)
        if db_url.startswith("sqlite"):
            # one process per SQLite store: nothing to watch, nothing woken
            await asyncio.sleep(0.2)
            assert not woken.is_set()
        else:
            await asyncio.wait_for(woken.wait(), 5)
            woken.clear()
            assert not await other.journal.journal_append("t1", b'{"events": []}', 2)  # duplicate
            await asyncio.sleep(0.3)
            assert not woken.is_set()  # a duplicate wakes nobody
    finally:
        await stop()


def test_sqlite_store_serves_one_process(tmp_path: Path) -> None:
    db = tmp_path / "enclave.db"
    first = SingleProcessLock(db)
    first.acquire()
    with pytest.raises(StoreInUse, match="PostgreSQL"):
        SingleProcessLock(db).acquire()
    first.release()
    again = SingleProcessLock(db)
    again.acquire()  # released: free again
    again.release()


def test_sqlite_lock_dies_with_its_process(tmp_path: Path) -> None:
    db = tmp_path / "enclave.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; "
         "from bridge.store.single import SingleProcessLock as L; "
         f"L(Path({str(db)!r})).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreInUse, match=f"pid {holder.pid}"):
            SingleProcessLock(db).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = SingleProcessLock(db)
    lock.acquire()  # SIGKILL left no stale lock
    lock.release()


async def test_replicas_migrating_at_once_apply_each_migration_once(
        make_store: MakeStore) -> None:
    stores = [await make_store(migrate=False) for _ in range(3)]
    results = await asyncio.gather(*(s.database.migrate() for s in stores))
    applied = sorted(v for r in results for v in r)
    latest = stores[0].database.latest_version
    assert applied == list(range(1, latest + 1))  # each once, by whichever came first
    for s in stores:
        assert await s.database.schema_version() == latest
        await s.database.check_schema()


async def test_a_run_whose_lease_is_taken_is_stopped(make_store: MakeStore) -> None:
    from bridge.store.lease import LeaseLost, held_lease

    clock = Clock()
    store, other = await make_store(), await make_store(migrate=False)
    reached_end = False

    async def run() -> None:
        nonlocal reached_end
        async with held_lease(store.leases, "job", "me", clock, 300, lambda: RuntimeError("busy")):
            clock.now += 10_000  # this process "froze": its lease expired meanwhile...
            assert await other.leases.acquire_lease("job", "them", clock.now, 60_000)  # ...taken
            await asyncio.sleep(1)  # the renewal (every 0.1 s) finds it taken
            reached_end = True

    with pytest.raises(LeaseLost):
        await run()
    assert not reached_end
    assert not await store.leases.acquire_lease("job", "me", clock.now, 300)  # theirs, kept


async def test_a_run_keeps_its_lease_through_renewals(make_store: MakeStore) -> None:
    from bridge.store.lease import held_lease

    clock = Clock()
    store, other = await make_store(), await make_store(migrate=False)
    async with held_lease(store.leases, "job", "me", clock, 300, lambda: RuntimeError("busy")):
        for _ in range(5):
            await asyncio.sleep(0.1)
            clock.now += 100  # renewed every 0.1 s: never expires
            assert not await other.leases.acquire_lease("job", "them", clock.now, 300)
    assert await other.leases.acquire_lease("job", "them", clock.now, 300)  # released at the end


async def test_an_announcement_fan_out_whose_lease_is_taken_stops(
        make_store: MakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fan-out holds its occurrence's lease through the shared helper: a pass whose
    lease another process took (this one froze past the ttl) is stopped, not finished."""
    from types import SimpleNamespace

    from bots.announcements import delivery
    from bots.announcements.audience import Audience
    from bots.announcements.spec import AnnouncementSpec
    from bots.store import MIGRATIONS, AnnouncementOccurrence, AnnouncementStore

    monkeypatch.setattr(delivery, "LEASE_TTL_MS", 300)
    clock = Clock()
    store = await make_store(extra_migrations=[MIGRATIONS])
    other = await make_store(migrate=False)
    bot = SimpleNamespace(svc=SimpleNamespace(leases=store.leases, clock_ms=clock,
                                              announcements=AnnouncementStore(store.database.db)))
    fan = delivery.FanOut(bot)  # type: ignore[arg-type]
    spec = AnnouncementSpec(title="T", body="B", audience=Audience(all_staff=True))
    occ = AnnouncementOccurrence("a", "o", "manual", spec.to_json(), "delivering",
                                 clock.now, clock.now)
    lease = "announcement:a/o"
    reached_end = False

    async def slow_pass(occ: object, spec: object, resumed: bool) -> None:
        nonlocal reached_end
        clock.now += 10_000  # froze past the ttl...
        assert await other.leases.acquire_lease(lease, "them", clock.now, 60_000)  # ...taken
        await asyncio.sleep(1)  # the renewal (every 0.1 s) finds it taken
        reached_end = True

    monkeypatch.setattr(fan, "_pass", slow_pass)
    assert await fan.deliver(occ) is False
    assert not reached_end
    assert not await store.leases.acquire_lease(lease, fan.owner, clock.now, 300)  # theirs, kept
    # with the lease held elsewhere, a pass does not start at all
    monkeypatch.setattr(fan, "_pass", lambda *a: pytest.fail("delivered beside the holder"))
    assert await fan.deliver(occ) is False


@pytest.mark.parametrize(("owner", "recorded_ns", "alive", "expected"), [
    ("box:4242", "pid:[1]", False, True),     # this machine, same namespace, process gone
    ("box:4242", "pid:[1]", True, False),     # still running
    ("box:4242", "pid:[2]", False, False),    # another container sharing the host name
    ("box:4242", None, False, False),         # namespace never recorded: cannot tell
    ("other:4242", "pid:[1]", False, False),  # another machine
    ("box:77", "pid:[1]", False, False),      # this very process
    ("enclave-0", "pid:[1]", False, False),   # a configured name: never judged
    ("box:x12", "pid:[1]", False, False),
])
def test_dead_local_owner(owner: str, recorded_ns: str | None, alive: bool,
                          expected: bool) -> None:
    assert dead_local_owner(owner, recorded_ns, hostname="box", my_pid=77,
                            my_pidns="pid:[1]", alive=lambda _pid: alive) is expected


async def test_restarted_process_takes_its_dead_predecessors_lease_at_once(
    make_store: MakeStore,
) -> None:
    """SIGKILL leaves the lease with ``host:<old pid>``; the process started after it (new
    pid, default name) leads at once instead of waiting out the ttl."""
    if pid_namespace() is None:
        pytest.skip("no /proc/self/ns/pid here")
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()
    host = socket.gethostname()
    clock = Clock()
    first = _leader(await make_store(), f"{host}:{dead.pid}", clock, 30_000)
    await first.start()  # records its namespace and leads
    assert first.is_leader
    first._task.cancel()  # "SIGKILL": no release, the lease stays for 30 s
    second = _leader(await make_store(migrate=False), f"{host}:{os.getpid()}", clock,
                        30_000)
    await second.start()
    try:
        assert second.is_leader
    finally:
        await second.stop()
    # a live holder of another name is never taken over
    third = _leader(await make_store(migrate=False), f"{host}:{os.getpid()}", clock,
                       30_000)
    other = _leader(await make_store(migrate=False), "enclave-1", clock, 30_000)
    await other.start()
    await third.start()
    try:
        assert other.is_leader and not third.is_leader
    finally:
        await third.stop()
        await other.stop()

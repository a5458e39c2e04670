"""Inbox drain micro-benchmark: the InboxProcessor's own cost per event, no handlers.

    .venv/bin/python bench/inbox_drain.py [--events 100000] [--rooms 50] [--engines sqlite postgres]
                                          [--impls before after] [--repeat 1]

Fills a fresh store (SQLite file in a temp dir; PostgreSQL: a fresh database on
127.0.0.1:5432, dropped after) with N events across R rooms via ``save_transaction`` in
100-event transactions, then runs an InboxProcessor with no handlers and a no-op executor
until every event is done. Prints events/s and CPU per event: the whole process (all threads,
so SQLite's worker threads too) and the event-loop thread alone (what competes with the HTTP
endpoint for the loop).

``before`` is ``git show HEAD:bridge/matrix/inbox.py`` loaded as a module beside the real one
(so the comparison needs no stash); ``after`` is the working tree's bridge/matrix/inbox.py.
Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import pg_admin  # noqa: E402  (bench/ is on sys.path)

from bridge.config.models import InboxConfig  # noqa: E402
from bridge.metrics import Metrics  # noqa: E402
from bridge.store import NewEvent, StoredAction, Stores, open_stores  # noqa: E402

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TXN_SIZE = 100


class NoopExecutor:
    async def run_stored(self, stored: StoredAction, *, max_attempts: int) -> bool:
        return True


def load_impl(name: str) -> ModuleType:
    if name == "after":
        import bridge.matrix.inbox as mod
        return mod
    src = subprocess.run(["git", "show", "HEAD:bridge/matrix/inbox.py"], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="inbox-before-")) / "inbox_before.py"
    path.write_text(src)
    # named inside the package so its relative imports (..store, .executor) resolve
    spec = importlib.util.spec_from_file_location("bridge.matrix._inbox_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_events(n: int, rooms: int) -> list[NewEvent]:
    out = []
    for i in range(n):
        room = f"!room{i % rooms}:corp.example.com"
        body = {"type": "m.room.message", "event_id": f"$ev{i}", "room_id": room,
                "sender": f"@user{i % 97}:corp.example.com", "origin_server_ts": i,
                "content": {"msgtype": "m.text", "body": f"message number {i} " + "x" * 120}}
        out.append(NewEvent(f"$ev{i}", room, "pdu", "m.room.message", body["sender"], i,
                            orjson.dumps(body).decode()))
    return out




async def fill(store: Stores, events: list[NewEvent]) -> None:
    now = int(time.time() * 1000)
    for t in range(0, len(events), TXN_SIZE):
        await store.inbox.save_transaction(f"txn{t}", events[t:t + TXN_SIZE], [], now)


async def drain(mod: ModuleType, store: Stores, n: int) -> dict[str, float]:
    cfg = InboxConfig()  # the defaults: room_concurrency 16, batch_size 500
    proc = mod.InboxProcessor(store.journal, store.inbox, store.outbox, NoopExecutor(), [], cfg,
                              Metrics(), lambda: int(time.time() * 1000))
    # loop lag: how late a 1 ms timer fires while the processor works (HTTP answers wait
    # behind the same loop)
    lags: list[float] = []
    stop = False

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while not stop:
            t = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - t - 0.001)

    probe_task = asyncio.create_task(probe())
    w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
    await proc.start()
    proc.notify()
    while True:
        await proc.idle.wait()
        stats = await store.inbox.inbox_stats()
        if stats["events"]["pending"] == 0:
            break
        proc.idle.clear()
        await asyncio.sleep(0.01)
    wall, cpu, loop_cpu = (time.perf_counter() - w0, time.process_time() - c0,
                           time.thread_time() - t0)
    stop = True
    await probe_task
    await proc.stop()
    assert stats["events"]["done"] == n, stats
    lags.sort()
    return {"wall_s": wall, "events_per_s": n / wall, "cpu_us_per_event": cpu / n * 1e6,
            "loop_cpu_us_per_event": loop_cpu / n * 1e6,
            "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000 if lags else 0.0,
            "lag_max_ms": lags[-1] * 1000 if lags else 0.0}


async def one_run(engine: str, mod: ModuleType, events: list[NewEvent]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="inbox-drain-") as tmp:
        dbname = None
        if engine == "sqlite":
            url = "sqlite:///enclave.db"
        else:
            dbname = f"enclave_bench_{uuid.uuid4().hex[:10]}"
            await pg_admin(f'CREATE DATABASE "{dbname}"')
            url = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
        try:
            store = open_stores(url, base_dir=Path(tmp))
            await store.database.open()
            try:
                await store.database.migrate()
                await fill(store, events)
                return await drain(mod, store, len(events))
            finally:
                await store.database.close()
        finally:
            if dbname is not None:
                await pg_admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rooms", type=int, default=50)
    ap.add_argument("--engines", nargs="+", default=["sqlite", "postgres"],
                    choices=["sqlite", "postgres"])
    ap.add_argument("--impls", nargs="+", default=["before", "after"],
                    choices=["before", "after"])
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is shown")
    args = ap.parse_args()
    events = make_events(args.events, args.rooms)
    mods = {name: load_impl(name) for name in args.impls}
    print(f"{args.events} events, {args.rooms} rooms, {TXN_SIZE}-event transactions, "
          f"no handlers; median of {args.repeat}")
    print(f"{'engine':9} {'impl':7} {'events/s':>9} {'wall s':>7} {'CPU us/ev':>10} "
          f"{'loop CPU us/ev':>15} {'lag p99 ms':>11} {'lag max ms':>11}")
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for engine in args.engines:
        for name in args.impls:
            runs = [await one_run(engine, mods[name], events) for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            results[engine, name] = med
            print(f"{engine:9} {name:7} {med['events_per_s']:9.0f} {med['wall_s']:7.2f} "
                  f"{med['cpu_us_per_event']:10.1f} {med['loop_cpu_us_per_event']:15.1f} "
                  f"{med['lag_p99_ms']:11.2f} {med['lag_max_ms']:11.2f}", flush=True)
        if (engine, "before") in results and (engine, "after") in results:
            b, a = results[engine, "before"], results[engine, "after"]
            print(f"{engine:9} after/before: "
                  f"events/s x{a['events_per_s'] / b['events_per_s']:.2f}, "
                  f"CPU/event x{a['cpu_us_per_event'] / b['cpu_us_per_event']:.2f}, "
                  f"loop CPU/event x{a['loop_cpu_us_per_event'] / b['loop_cpu_us_per_event']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())

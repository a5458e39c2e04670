"""S3 archive benchmark: archive throughput into a real SeaweedFS, and ``archive verify`` of
a large room there.

    .venv/bin/python bench/archive_s3.py [--seconds 20] [--rooms 64] [--batch 1]
        [--batches 1,10,100] [--seal-seconds 30] [--verify-events 1000000]
        [--verify-batch 5000] [--db sqlite|postgres] [--no-json]

Issue 20: "archive throughput to S3 (events/s, target >= 2,000 on this machine) and
`archive verify` of 1,000,000 entries on S3 (time, memory)." Prints figures and the
target; asserts nothing. Results go to ``bench/results/archive-s3-<date>.json``.

Set-up: one SeaweedFS (``weed server -s3``, master + volume + filer + S3 gateway in one
process, authentication on, data in a temp dir) and a bucket with Object Lock; the archive
is :class:`~bridge.retention.archive.s3.S3Archive` as ``bridge.root`` builds it (COMPLIANCE,
a keep of 1 day) with the store on SQLite (``--db postgres``: a fresh database on
127.0.0.1:5432).

Throughput: ``--rooms`` rooms written concurrently for ``--seconds`` each round, every
call ``archive.append(room, batch)`` with a batch of N events (~330 bytes each, a
``m.room.message`` as Synapse sends it). N = 1 is the live feed's shape (one event per
call, rooms in parallel lanes); larger N the backfill/purge shape. Each call is one store
commit (the entries staged with their index rows and head; no S3 request); the archive's
sealer runs meanwhile (every ``--seal-seconds``, or when a room's staged bytes reach the
8 MiB segment size) and writes each room's staged entries as one part + one manifest
object. After each round the rest is sealed at once (as a shutdown does): that time is the
seal figure (entries and events per second, PUTs).

Verify: one room of ``--verify-events`` events archived in batches of ``--verify-batch``
(8 MiB segments), then a new S3Archive (a fresh process's view) runs ``verify()``; the
time and peak RSS are measured in a child process (a fresh interpreter, as ``enclave
archive verify`` is; its peak resident memory, VmHWM, before and after the verification).
Verification holds one segment in memory at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "deploy" / "local")]

from bench._common import PG_ADMIN_DSN, git_rev, pg_admin  # noqa: E402
from bridge.retention.archive.s3 import S3Archive  # noqa: E402
from bridge.store import open_stores  # noqa: E402
from devstack.seaweedfs import SeaweedServer  # noqa: E402

T0 = 1_714_560_000_000


def event(room: str, n: int) -> dict[str, Any]:
    return {"event_id": f"${n:010d}{secrets.token_hex(8)}:{room[1:9]}", "room_id": room,
            "sender": "@alice.anderson:corp.example.com", "type": "m.room.message",
            "origin_server_ts": T0 + n,
            "content": {"msgtype": "m.text", "body": f"message number {n} about the quarterly "
                        "figures and the plan for next week"},
            "unsigned": {"age": 12}, "depth": n,
            "hashes": {"sha256": "x" * 43}}


def maxrss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss on Linux carries the
    parent's peak across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def open_store(kind: str, tmp: Path) -> tuple[Any, str | None, str]:
    if kind == "sqlite":
        url, dbname = "sqlite:///bench.db", None
    else:
        dbname = f"bench_s3_{secrets.token_hex(4)}"
        await pg_admin(f'CREATE DATABASE "{dbname}"')
        url = PG_ADMIN_DSN.rpartition("/")[0] + "/" + dbname
    store = open_stores(url, base_dir=tmp, pool_size=8)
    await store.database.open()
    await store.database.migrate()
    return store, dbname, url


def make_archive(server: SeaweedServer, bucket: str, store: Any,
                 seal_seconds: float | None = 30.0) -> S3Archive:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    def client() -> Any:
        return get_session().create_client(
            "s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
            aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
            config=AioConfig(max_pool_connections=64))

    async def keep(room: str) -> int | None:
        return 86_400_000

    async def holds() -> list[Any]:
        return []

    return S3Archive(client, bucket, store.archive, prefix="enclave/", keep_ms=keep,
                     holds=holds, concurrency=32, seal_seconds=seal_seconds)


async def throughput(archive: S3Archive, rooms: int, batch: int, seconds: float) -> dict:
    names = [f"!bench{batch}-{i}:corp.example.com" for i in range(rooms)]
    counter = [0]
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def lane(room: str) -> None:
        while time.monotonic() < stop:
            evs = [event(room, counter[0] + i) for i in range(batch)]
            counter[0] += batch
            t = time.perf_counter()
            res = await archive.append(room, evs)
            latencies.append(time.perf_counter() - t)
            assert res.written == batch

    for r in names:  # first touch (a listing per room) outside the measured time
        await archive.append(r, [event(r, 10**9 + hash(r) % 10**6)])
    await archive.seal()
    counter[0] = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(lane(r) for r in names))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    staged = await archive.store.archive_staged_rooms()
    left_entries = sum(n for *_, n in staged)
    left_bytes = sum(b for _, b, _, _ in staged)
    t1 = time.perf_counter()
    sealed = await archive.seal()
    seal_s = time.perf_counter() - t1
    return {"batch": batch, "rooms": rooms, "events": counter[0], "seconds": round(elapsed, 2),
            "events_per_s": round(counter[0] / elapsed, 1),
            "appends_per_s": round(len(latencies) / elapsed, 1),
            "append_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
            "append_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
            "seal_rooms": len(staged), "seal_entries": sealed, "seal_bytes": left_bytes,
            "seal_seconds": round(seal_s, 2),
            "seal_entries_per_s": round(left_entries / seal_s, 1) if seal_s else None,
            "seal_mb_per_s": round(left_bytes / seal_s / 1e6, 2) if seal_s else None}


async def verify_big(server: SeaweedServer, bucket: str, store: Any, db_url: str,
                     tmp: Path, events: int, batch: int) -> dict:
    room = "!verify:corp.example.com"
    writer = make_archive(server, bucket, store)
    t0 = time.perf_counter()
    n = 0
    while n < events:
        size = min(batch, events - n)
        await writer.append(room, [event(room, n + i) for i in range(size)])
        n += size
    build = time.perf_counter() - t0
    await writer.aclose()
    # `enclave archive verify` is a process of its own: measured in a fresh interpreter
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--verify-child", server.endpoint_url, server.access_key,
        server.secret_key, bucket, db_url, str(tmp), room, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    child = json.loads(out.decode().strip().splitlines()[-1])
    return {**child, "build_seconds": round(build, 1),
            "build_events_per_s": round(events / build, 1)}


async def verify_child(endpoint: str, key: str, secret: str, bucket: str, db_url: str,
                       tmp: str, room: str) -> None:
    store = open_stores(db_url, base_dir=Path(tmp), pool_size=2)
    await store.database.open()
    server = SeaweedServer.__new__(SeaweedServer)  # only its address and identity
    server.s3_port, server.access_key, server.secret_key = int(endpoint.rsplit(":", 1)[1]), \
        key, secret
    reader = make_archive(server, bucket, store, None)
    rss0 = maxrss_mb()
    t1 = time.perf_counter()
    report = await reader.verify(room)
    took = time.perf_counter() - t1
    rss1 = maxrss_mb()
    await reader.aclose()
    await store.database.close()
    print(json.dumps({
        "events": report.events, "manifest_entries": report.entries, "ok": report.ok,
        "problems": len(report.problems), "verify_seconds": round(took, 1),
        "verify_events_per_s": round(report.events / took, 1),
        "peak_rss_mb_before": round(rss0, 1), "peak_rss_mb_after": round(rss1, 1)}))


async def main() -> None:
    if sys.argv[1:2] == ["--verify-child"]:
        await verify_child(*sys.argv[2:9])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rooms", type=int, default=64)
    ap.add_argument("--batches", default="1,10,100")
    ap.add_argument("--seal-seconds", type=float, default=30)
    ap.add_argument("--verify-events", type=int, default=1_000_000)
    ap.add_argument("--verify-batch", type=int, default=5000)
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = SeaweedServer(tmp / "weed").start()
    store, dbname, db_url = await open_store(args.db, tmp)
    out: dict[str, Any] = {"bench": "archive_s3", "date": dt.date.today().isoformat(),
                           **git_rev(), "db": args.db, "cpus": os.cpu_count(),
                           "throughput": [], "target_events_per_s": 2000}
    try:
        s3 = server.client()
        bucket = "bench-archive"
        s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)  # type: ignore[attr-defined]
        archive = make_archive(server, bucket, store, args.seal_seconds)
        out["seal_seconds"] = args.seal_seconds
        for b in (int(x) for x in args.batches.split(",") if x):
            r = await throughput(archive, args.rooms, b, args.seconds)
            out["throughput"].append(r)
            print(f"append batch={b:<4} rooms={args.rooms}: {r['events_per_s']:>8} events/s "
                  f"({r['appends_per_s']} appends/s, p50 {r['append_p50_ms']} ms, "
                  f"p99 {r['append_p99_ms']} ms); then sealed {r['seal_entries']} entries "
                  f"of {r['seal_rooms']} rooms ({r['seal_bytes'] / 1e6:.1f} MB) in "
                  f"{r['seal_seconds']} s: {r['seal_entries_per_s']} entries/s, "
                  f"{r['seal_mb_per_s']} MB/s", flush=True)
        await archive.aclose()
        if args.verify_events:
            v = await verify_big(server, bucket, store, db_url, tmp, args.verify_events,
                                 args.verify_batch)
            out["verify"] = v
            print(f"verify {v['events']} events ({v['manifest_entries']} manifest entries): "
                  f"{v['verify_seconds']} s ({v['verify_events_per_s']} events/s), ok="
                  f"{v['ok']}, peak RSS {v['peak_rss_mb_before']} -> "
                  f"{v['peak_rss_mb_after']} MiB; built in {v['build_seconds']} s "
                  f"({v['build_events_per_s']} events/s)", flush=True)
    finally:
        await store.database.close()
        server.stop()
        if dbname:
            await pg_admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    best = max((r["events_per_s"] for r in out["throughput"]), default=0)
    live = next((r["events_per_s"] for r in out["throughput"] if r["batch"] == 1), None)
    print(f"target >= 2000 events/s: live shape (batch 1) {live}, best {best}")
    if not args.no_json:
        path = REPO / "bench" / "results" / f"archive-s3-{out['date']}.json"
        if path.exists():  # a run of one part (--batches '' or --verify-events 0) keeps the other
            old = json.loads(path.read_text())
            if not out["throughput"]:
                out["throughput"] = old.get("throughput", [])
            if "verify" not in out and "verify" in old:
                out["verify"] = old["verify"]
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"saved {path.relative_to(REPO)}")


if __name__ == "__main__":
    asyncio.run(main())

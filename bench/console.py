"""Console benchmark: page latency and audit search over 1,000,000 audit rows on PostgreSQL.

    .venv/bin/python bench/console.py [--rows 1000000] [--samples 40] [--keep] [--no-json]

A fresh PostgreSQL database (127.0.0.1:5432) is migrated by Enclave and filled with
``--rows`` audit rows by COPY (90 days, 5,000 people, 800 rooms, 60 rules, 20 actors, five
outcomes), then ``enclave run``'s aiohttp application (``bridge.app.mount_root``: every
route and lifetime, the console enabled) is served in this process on a free loopback
port. The bench puts one console session in the store (a person of the directory view in
a group with every role; sign-in through a homeserver is what the integration test
covers) and requests each page and typical audit searches ``--samples`` times in a row
with that cookie: wall time from request to the last byte, p50/p95 per URL. The homeserver
is unreachable on purpose (status shows it; its check is cached for 5 s as in
production). Issue targets: pages p95 <= 200 ms, audit search p95 <= 300 ms.

Prints figures and writes ``bench/results/console-<date>.json``; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import yaml  # noqa: E402
from aiohttp import web  # noqa: E402
from yarl import URL  # noqa: E402

from bench._common import PG_ADMIN_DSN, git_rev, pg_admin  # noqa: E402
from bridge.app import mount_root  # noqa: E402
from bridge.config import check_secrets, load_config  # noqa: E402
from bridge.console.auth import hash_session_id  # noqa: E402
from bridge.model.people import StaffRecord  # noqa: E402
from bridge.root import Root  # noqa: E402
from bridge.store.base import ConsoleSession  # noqa: E402

RESULTS = REPO / "bench" / "results"
USER = "@bench-ops:corp.test"
DAY = 86_400_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(base: Path, dsn: str, port: int) -> Path:
    (base / "as_token").write_text(secrets.token_hex(16))
    (base / "hs_token").write_text(secrets.token_hex(16))
    cfg = {
        "homeserver": {"url": "http://127.0.0.1:9", "server_name": "corp.test",
                       "timeout_seconds": 2, "max_retries": 0},
        "appservice": {"port": port, "public_url": f"http://127.0.0.1:{port}",
                       "as_token": {"file": str(base / "as_token")},
                       "hs_token": {"file": str(base / "hs_token")}},
        "database": {"url": dsn},
        "inbox": {"completeness": {"enabled": False}},
        "logging": {"level": "WARNING"},
        "policy": {"default_class": "internal",
                   "room_classes": [{"id": "internal", "federate": False}],
                   "reconcile": {"interval_minutes": 0}},
        "retention": {"enabled": True, "default": {"keep": "365d"},
                      "archive": {"path": str(base / "archive")},
                      "purge": {"interval_minutes": 0}},
        "console": {"enabled": True, "groups": {"ops": "operator", "legal": "legal"}},
    }
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def fill_audit(dsn: str, rows: int) -> tuple[float, dict[str, Any]]:
    """COPY ``rows`` audit rows; returns seconds and values worth searching for."""
    rnd = random.Random(19)
    now = int(time.time() * 1000)
    start = now - 90 * DAY
    users = [f"@user{i:05d}:corp.test" for i in range(5000)]
    rooms = [f"!room{i:04d}xxxxxxxxxxxxxxxx" for i in range(800)]
    rules = [f"rule.{i:02d}" for i in range(60)]
    actors = [f"@actor{i:02d}:corp.test" for i in range(20)]
    outcomes = ["applied"] * 80 + ["skipped"] * 10 + ["refused"] * 6 + ["failed"] * 3 + [
        "parked"]
    sources = ["inbox", "sync", "gate", "retention", "console"]
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        step = 90 * DAY / rows
        batch: list[tuple[Any, ...]] = []
        for i in range(rows):
            batch.append((int(start + i * step), rnd.choice(sources), rnd.choice(actors),
                          "kind", rnd.choice(users), rnd.choice(rooms), rnd.choice(rules),
                          "a reason a little longer than a word", rnd.choice(outcomes),
                          None))
            if len(batch) == 50_000:
                await conn.copy_records_to_table("audit", records=batch, columns=[
                    "ts", "source", "actor", "kind", "user_id", "room_id", "rule_id",
                    "reason", "outcome", "detail"])
                batch = []
        if batch:
            await conn.copy_records_to_table("audit", records=batch, columns=[
                "ts", "source", "actor", "kind", "user_id", "room_id", "rule_id", "reason",
                "outcome", "detail"])
        await conn.execute("ANALYZE audit")
    finally:
        await conn.close()
    return time.perf_counter() - t0, {"user": users[42], "room": rooms[7], "rule": rules[3],
                                      "actor": actors[5]}


async def measure(session: aiohttp.ClientSession, url: str, samples: int) -> dict[str, Any]:
    times = []
    status = 0
    size = 0
    for _ in range(samples):
        t = time.perf_counter()
        async with session.get(url, allow_redirects=False) as resp:
            body = await resp.read()
            status = resp.status
            size = len(body)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"url": url, "status": status, "bytes": size, "samples": samples,
            "p50_ms": round(statistics.median(times), 1),
            "p95_ms": round(times[max(0, int(len(times) * 0.95) - 1)], 1),
            "max_ms": round(times[-1], 1)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    name = f"enclave_bench_console_{secrets.token_hex(4)}"
    await pg_admin(f'CREATE DATABASE "{name}"')
    dsn = PG_ADMIN_DSN.rpartition("/")[0] + "/" + name
    base = Path(tempfile.mkdtemp(prefix="bench-console-"))
    port = free_port()
    out: dict[str, Any] = {}
    runner: web.AppRunner | None = None
    try:
        loaded = load_config(write_config(base, dsn, port))
        root = Root(loaded, check_secrets(loaded), extensions=[])
        await root.open_store(migrate=True, create_installation_id=True)
        await root.database.close()
        fill_s, values = await fill_audit(dsn, args.rows)
        print(f"filled {args.rows:,} audit rows in {fill_s:.1f} s (COPY)", flush=True)
        app = mount_root(root, migrate=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stores = root.stores
        now = root.clock_ms()
        await stores.directory.replace_directory_view([StaffRecord(
            user_id=USER, person_id="bench", active=True, username="bench-ops",
            display_name="Bench Ops", groups=frozenset({"ops", "legal"}))])
        raw = secrets.token_urlsafe(32)
        await stores.console_sessions.session_create(ConsoleSession(
            hash_session_id(raw), USER, ("legal", "operator"), "csrf", now, now))
        base_url = f"http://127.0.0.1:{port}"
        v = values
        pages = ["/console/", "/console/audit", "/console/holds", "/console/retention",
                 "/console/inbox", "/console/explain", "/console/separation",
                 "/console/directory"]
        searches = [
            "/console/audit?since=24h",
            f"/console/audit?user={v['user']}",
            f"/console/audit?room={v['room']}",
            f"/console/audit?rule={v['rule']}",
            "/console/audit?outcome=parked",
            f"/console/audit?actor={v['actor']}",
            f"/console/audit?user={v['user']}&since=7d",
            f"/console/audit?rule={v['rule']}&outcome=refused",
            "/console/audit?since=60d&until=59d",
            f"/console/audit?before={int(time.time() * 1000) - 45 * DAY}.{args.rows}",
            "/console/audit?user=%40nobody%3Acorp.test",
        ]
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as session:
            session.cookie_jar.update_cookies({"enclave_console": raw},
                                              response_url=URL(base_url + "/console/"))
            for url in pages + searches:  # warm-up: connections, plans, caches
                await measure(session, base_url + url, 2)
            out["pages"] = [await measure(session, base_url + u, args.samples) for u in pages]
            out["audit_search"] = [await measure(session, base_url + u, args.samples)
                                   for u in searches]
            t = time.perf_counter()
            async with session.get(f"{base_url}/console/audit.csv?user={v['user']}") as r:
                body = await r.read()
            out["csv_user"] = {"rows": body.count(b"\n") - 1,
                               "seconds": round(time.perf_counter() - t, 3)}
        bad = [m for m in out["pages"] + out["audit_search"] if m["status"] != 200]
        if bad:
            print(f"WARNING: non-200 answers: {bad}")
        out["fill_seconds"] = round(fill_s, 1)
    finally:
        if runner is not None:
            await runner.cleanup()
        if not args.keep:
            await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            print(f"kept database {name}")
    return out


def report(r: dict[str, Any], rows: int) -> None:
    print(f"\nconsole pages ({rows:,} audit rows, PostgreSQL):")
    for m in r["pages"]:
        print(f"  {m['url'].split(':', 2)[2].split('/', 1)[1]:<60} p50 {m['p50_ms']:>7} ms"
              f"  p95 {m['p95_ms']:>7} ms  ({m['bytes']} B)")
    print("audit search:")
    for m in r["audit_search"]:
        print(f"  {m['url'].split(':', 2)[2].split('/', 1)[1]:<60} p50 {m['p50_ms']:>7} ms"
              f"  p95 {m['p95_ms']:>7} ms")
    print(f"CSV of one person's records: {r['csv_user']['rows']} rows in "
          f"{r['csv_user']['seconds']} s")
    pages95 = max(m["p95_ms"] for m in r["pages"])
    search95 = max(m["p95_ms"] for m in r["audit_search"])
    print(f"\nworst page p95 {pages95} ms (target <= 200); worst audit search p95 "
          f"{search95} ms (target <= 300)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--keep", action="store_true", help="keep the database")
    p.add_argument("--no-json", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("PYTHONPATH", str(REPO))
    res = asyncio.run(main(a))
    report(res, a.rows)
    if not a.no_json:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"console-{dt.date.today().isoformat()}.json"
        meta = {"rows": a.rows, "samples": a.samples, **git_rev(),
                "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        path.write_text(json.dumps({"meta": meta, **res,
                                    "target": {"page_p95_ms": 200,
                                               "audit_search_p95_ms": 300}}, indent=2))
        print(f"wrote {path}")

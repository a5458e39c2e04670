"""Audit streaming benchmark: records/s from the audit table to a real private rsyslogd.

    .venv/bin/python bench/audit_stream.py [--records 200000] [--engine sqlite|postgres]
        [--transports tcp,udp,tls] [--batch-size 500] [--no-json]

Issue 19: "audit streaming >= 5,000 records/s to rsyslog". Prints figures and the target;
asserts nothing. Results go to ``bench/results/audit-stream-<date>.json``.

Per transport: a fresh store (SQLite in a temp dir, or a fresh PostgreSQL database on
127.0.0.1:5432) is filled with ``--records`` audit rows (realistic size: user, room, rule,
reason and a small JSON detail; not measured), a private ``rsyslogd`` (devstack.rsyslog:
imtcp / imudp on loopback, imtcp with the OpenSSL driver for ``tls``, every message
written to a file by an ``omfile`` action with a template that keeps the structured data)
is started, then Enclave's
:class:`~bridge.auditstream.service.AuditStreamer` with one syslog sink runs in this process
exactly as ``enclave run`` runs it (the store read in batches of ``--batch-size``, RFC 5424
formatting, the send, the cursor committed per batch). Measured: from the streamer's start
until rsyslog's output file holds every record (end to end), and until the streamer's
cursor reached the last id (the sender's side); the process's CPU seconds over that time.
UDP has no flow control: what rsyslog dropped (its receive buffer full) is reported as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "deploy" / "local"), str(REPO / "bench")]

from _common import PG_ADMIN_DSN, git_rev, pg_admin  # noqa: E402

from bridge.auditstream.service import AuditStreamer  # noqa: E402
from bridge.config.audit import AuditConfig  # noqa: E402
from bridge.metrics import Metrics  # noqa: E402
from bridge.store import Stores, open_stores  # noqa: E402
from bridge.store.audit import AUDIT_INSERT  # noqa: E402
from devstack.rsyslog import RsyslogServer  # noqa: E402

TARGET = 5000.0


def row(n: int) -> tuple[Any, ...]:
    return (1_765_000_000_000 + n, "inbox", "@enclave:corp.example.com", "membership.kick",
            f"@user{n % 5000:05d}:corp.example.com", f"!room{n % 300:04d}:corp.example.com",
            "separation.outsider_in_internal_room", "not directory-verified staff", "applied",
            json.dumps({"event_id": f"$event{n}", "attempts": 1}))


async def fill(stores: Stores, n: int) -> float:
    started = time.perf_counter()
    chunk = 5000
    for start in range(0, n, chunk):
        rows = [row(i) for i in range(start, min(n, start + chunk))]
        await stores.database.db.batch([(AUDIT_INSERT, rows, True)])
    return time.perf_counter() - started


def count_lines(path: Path, state: dict[str, int]) -> int:
    """Lines in rsyslog's output so far (reads only what was appended since last time)."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        f.seek(state.get("pos", 0))
        data = f.read()
    state["pos"] = state.get("pos", 0) + len(data)
    state["lines"] = state.get("lines", 0) + data.count(b"\n")
    return state["lines"]


async def one_run(engine: str, transport: str, n: int, batch: int, base: Path) -> dict[str, Any]:
    run_dir = base / f"{engine}-{transport}"
    run_dir.mkdir(parents=True)
    pg_name = None
    if engine == "sqlite":
        url = "sqlite:///enclave.db"
    else:
        pg_name = f"enclave_bench_audit_{secrets.token_hex(4)}"
        await pg_admin(f'CREATE DATABASE "{pg_name}"')
        url = f"{PG_ADMIN_DSN.rpartition('/')[0]}/{pg_name}"
    stores = open_stores(url, base_dir=run_dir)
    await stores.database.open()
    rsyslog = RsyslogServer(run_dir / "rsyslog", tls=transport == "tls")
    try:
        await stores.database.migrate()
        fill_s = await fill(stores, n)
        rsyslog.start()
        port = {"tcp": rsyslog.tcp_port, "udp": rsyslog.udp_port,
                "tls": rsyslog.tls_port}[transport]
        sink: dict[str, Any] = {
            "name": transport, "type": "syslog", "transport": "udp" if transport == "udp"
            else "tcp", "address": f"127.0.0.1:{port}", "batch_size": batch}
        if transport == "tls":
            sink["tls"] = {"ca_file": str(rsyslog.cert_path)}
        cfg = AuditConfig.model_validate({"stream": [sink]})
        streamer = AuditStreamer(cfg, stores.audit_feed, stores.kv, Metrics(),
                                 lambda: int(time.time() * 1000), run_dir)
        sink = streamer.streamers[0]
        state: dict[str, int] = {}
        cpu0, t0 = time.process_time(), time.perf_counter()
        task = asyncio.create_task(streamer.run())
        sent_s = None
        last_change, last_count = t0, 0
        while True:
            await asyncio.sleep(0.05)
            now = time.perf_counter()
            if sent_s is None and sink.cursor == n:
                sent_s = now - t0
            got = count_lines(rsyslog.output, state)
            if got != last_count:
                last_change, last_count = now, got
            if got >= n:
                break
            # UDP: once everything is sent and nothing more arrives for 3 s, the rest is lost
            if sent_s is not None and now - last_change > 3.0:
                break
            if now - t0 > 1800:
                break
        end_s = last_change - t0
        cpu = time.process_time() - cpu0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return {"engine": engine, "transport": transport, "records": n, "batch_size": batch,
                "fill_seconds": round(fill_s, 2),
                "sent_seconds": round(sent_s, 3) if sent_s else None,
                "sent_per_second": round(n / sent_s) if sent_s else None,
                "received": last_count, "lost": n - last_count,
                "end_to_end_seconds": round(end_s, 3),
                "records_per_second": round(last_count / end_s) if end_s > 0 else None,
                "cpu_seconds": round(cpu, 2),
                "cpu_us_per_record": round(cpu / n * 1e6, 1)}
    finally:
        rsyslog.stop()
        await stores.database.close()
        if pg_name is not None:
            await pg_admin(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--transports", default="tcp,udp,tls",
                    help="tcp, udp, tls (TCP with TLS to rsyslog's OpenSSL input)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="enclave-bench-audit-") as tmp:
        for transport in args.transports.split(","):
            r = await one_run(args.engine, transport, args.records, args.batch_size, Path(tmp))
            results.append(r)
            print(f"{r['engine']:8} {transport:4} {r['records']:>8,} records: "
                  f"end to end {r['end_to_end_seconds']:.2f} s = "
                  f"{r['records_per_second'] or 0:,} records/s in rsyslog "
                  f"(sent in {r['sent_seconds']} s = {r['sent_per_second'] or 0:,}/s), "
                  f"lost {r['lost']:,}, CPU {r['cpu_us_per_record']} µs/record "
                  f"[target >= {TARGET:,.0f}/s: "
                  f"{'met' if (r['records_per_second'] or 0) >= TARGET else 'NOT met'}]",
                  flush=True)
    if not args.no_json:
        date = datetime.now(UTC).strftime("%Y-%m-%d")
        out = REPO / "bench" / "results" / f"audit-stream-{date}-{args.engine}.json"
        out.write_text(json.dumps({
            "bench": "audit_stream", "date": date, "git": git_rev(), "args": vars(args),
            "target_records_per_second": TARGET, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "results": results}, indent=2) + "\n")
        print(f"saved {out.relative_to(REPO)}")


if __name__ == "__main__":
    asyncio.run(main())

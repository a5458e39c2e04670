"""Replicas benchmark: 1, 2 and 4 Enclave replicas on one PostgreSQL database.

    .venv/bin/python bench/replicas.py [--replicas 1 2 4] [--seconds 20] [--size 20]
                                       [--takeovers 3] [--json]

Prints figures; asserts nothing about speed. Per replica count: a fresh database, N real
``enclave run`` processes (``cluster:`` configured, a directory job every 3 s, no
homeserver: the inbox processor needs none), and a load generator that, like Synapse, keeps
ONE transaction in flight and sends each to the next replica in turn (what a round-robin
balancer does), first as fast as it can (saturation), then paced at ``--rate`` events/s.
Reported: transactions/s and events/s accepted, p50/p99 time-to-answer, the
processing lag of every event (from the replica journaling it to the leader marking it done:
p50/p99/max, read from the database), the time to drain after the load stops, and a check
that every event was stored and processed exactly once. Then, with 2 replicas, the leader is
SIGKILLed ``--takeovers`` times: the time until the standby reports itself leader in
``/ready`` and until it starts the scheduled directory job (its log line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import PG_ADMIN_DSN, REPO, git_rev
from ingest import (
    HTTPClient,
    TxnFactory,
    free_port,
    percentile,
    pg_query,
    stop_process,
    wait_listening,
)

PY = sys.executable
TTL_SECONDS = 5


class Replica:
    def __init__(self, name: str, workdir: Path, dsn: str, hs_token: str, proxy_url: str):
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.dir / "enclave.log"
        (self.dir / "as_token").write_text(secrets.token_urlsafe(48))
        (self.dir / "hs_token").write_text(hs_token)
        (self.dir / "directory.yaml").write_text(
            "people:\n  - {id: '1', username: rita, display_name: Rita, department: Ops}\n")
        closed = free_port()  # no homeserver: jobs start (and log it), then find no admin
        (self.dir / "config.yaml").write_text(f"""\
homeserver:
  url: http://127.0.0.1:{closed}
  server_name: corp.example.com
appservice:
  bind_host: 127.0.0.1
  port: {self.port}
  public_url: {proxy_url}
  as_token: {{file: as_token}}
  hs_token: {{file: hs_token}}
database:
  url: {dsn}
inbox:
  recovery_sweeps_seconds: []
logging:
  level: INFO
  format: text
cluster:
  lease_ttl_seconds: {TTL_SECONDS}
  replica_name: {name}
directory:
  source: {{type: file, path: directory.yaml}}
  interval_minutes: 0.05
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "bridge", "run", "-c", str(self.dir / "config.yaml")], cwd=REPO,
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, self.log)

    def cluster(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 503: homeserver down; the body still says
            body = json.loads(e.read())
        except OSError:
            return None
        return body.get("cluster")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def job_starts(self) -> list[float]:
        out = []
        pat = re.compile(r"^(\S+ \S+) INFO bridge\.app: job directory-sync \(\S+\) starts")
        for line in self.log.read_text(errors="replace").splitlines():
            m = pat.match(line)
            if m:
                out.append(dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return out


def wait_for(cond: Any, within: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if cond():
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError(what)


def run_cell(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    dbname = f"enclave_replicas_{secrets.token_hex(4)}"
    pg_query(PG_ADMIN_DSN, f'CREATE DATABASE "{dbname}"')
    dsn = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    hs_token = secrets.token_urlsafe(48)
    replicas = [Replica(f"r{i}", workdir / f"n{n}", dsn, hs_token, "http://127.0.0.1:9")
                for i in range(n)]
    try:
        replicas[0].start()  # migrates; the others find the schema ready
        for r in replicas[1:]:
            r.start()
        wait_for(lambda: any((r.cluster() or {}).get("leader") for r in replicas), 30,
                 "a leader")
        clients = [HTTPClient(r.port, hs_token) for r in replicas]
        factory = TxnFactory(args.size, seed=7)
        for i in range(50):  # warm-up, also round-robin
            clients[i % n].put_txn(*factory.next())
        wait_for(lambda: pending(dsn) == 0, 60, "warm-up drained")
        first_seq = int(pg_query(dsn, "SELECT COALESCE(MAX(seq), 0) FROM inbox",
                                 fetch="fetchval"))
        warm_txns = int(pg_query(dsn, "SELECT COUNT(*) FROM transactions", fetch="fetchval"))
        lat: list[float] = []
        errors = 0
        sent_txns = 0
        start = time.perf_counter()
        deadline = start + args.seconds
        t1 = start
        i = 0
        while t1 < deadline:
            txn_id, body = factory.next()
            t0 = time.perf_counter()
            status, answer = clients[i % n].put_txn(txn_id, body)
            t1 = time.perf_counter()
            i += 1
            lat.append(t1 - t0)
            sent_txns += 1
            errors += status != 200 or answer.strip() != b"{}"
        elapsed = t1 - start
        stopped_ms = int(time.time() * 1000)
        left = pending(dsn, args.size)
        drain_s = wait_for(lambda: pending(dsn) == 0, 600, "drained")
        events, distinct, lag50, lag99, lagmax, not_done, txns_stored = lag_since(dsn, first_seq)
        # paced: a steady rate below saturation, the lag an operator sees in normal load
        mark = max_seq(dsn)
        interval = args.size / args.rate
        paced_lat: list[float] = []
        t_start = time.perf_counter()
        k = 0
        while time.perf_counter() - t_start < args.paced_seconds:
            due = t_start + k * interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            clients[k % n].put_txn(*factory.next())
            paced_lat.append(time.perf_counter() - t0)
            k += 1
        wait_for(lambda: pending(dsn) == 0, 600, "paced drained")
        p_events, p_distinct, p50, p99, pmax, _, _ = lag_since(dsn, mark)
        for c in clients:
            c.close()
        cell = {
            "replicas": n, "seconds": round(elapsed, 2), "txn_size": args.size,
            "transactions": sent_txns, "errors": errors,
            "transactions_per_s": round(sent_txns / elapsed, 1),
            "events_per_s": round(sent_txns * args.size / elapsed, 1),
            "answer_ms": {"p50": round(percentile(sorted(lat), 50) * 1000, 2),
                          "p99": round(percentile(sorted(lat), 99) * 1000, 2)},
            "processing_lag_ms": {"p50": lag50, "p99": lag99, "max": lagmax},
            "pending_at_stop": left, "drain_s": round(drain_s, 2),
            "processed_events_per_s": round(events / (elapsed + drain_s), 1),
            "exactly_once": {"events_stored": events, "distinct": distinct,
                             "not_done": not_done, "transactions_stored": txns_stored - warm_txns,
                             "transactions_sent": sent_txns},
            "stopped_at_ms": stopped_ms,
            "paced": {"events_per_s": args.rate, "seconds": args.paced_seconds,
                      "events": p_events, "distinct": p_distinct,
                      "answer_ms_p99": round(percentile(sorted(paced_lat), 99) * 1000, 2),
                      "processing_lag_ms": {"p50": p50, "p99": p99, "max": pmax}},
        }
        if n == 2 and args.takeovers:
            cell["takeover"] = takeovers(replicas, args.takeovers, factory, hs_token, dsn)
        return cell
    finally:
        for r in replicas:
            if r.proc is not None:
                stop_process(r.proc)
        pg_query(PG_ADMIN_DSN, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def pending(dsn: str, txn_size: int = 1) -> int:
    """Events not processed yet (a journaled transaction counts as ``txn_size`` events)."""
    return int(pg_query(dsn, "SELECT (SELECT COUNT(*) FROM inbox WHERE status = 'pending') "
                             "+ (SELECT COUNT(*) FROM txn_journal) * $1", txn_size,
                        fetch="fetchval"))


def lag_since(dsn: str, seq: int) -> tuple[Any, ...]:
    return tuple(pg_query(dsn, """
        SELECT COUNT(*), COUNT(DISTINCT event_id),
               percentile_cont(0.5) WITHIN GROUP (ORDER BY done_at - received_at),
               percentile_cont(0.99) WITHIN GROUP (ORDER BY done_at - received_at),
               MAX(done_at - received_at), COUNT(*) FILTER (WHERE status <> 'done'),
               (SELECT COUNT(*) FROM transactions)
        FROM inbox WHERE seq > $1""", seq, fetch="fetchrow"))


def max_seq(dsn: str) -> int:
    return int(pg_query(dsn, "SELECT COALESCE(MAX(seq), 0) FROM inbox", fetch="fetchval"))


def takeovers(replicas: list[Replica], rounds: int, factory: TxnFactory, hs_token: str,
              dsn: str) -> list[dict[str, float]]:
    """Kill the leader; time until the other leads, and until a transaction sent to it
    right after the kill has been processed (the inbox taken over)."""
    out = []
    for _ in range(rounds):
        leader = next(r for r in replicas if (r.cluster() or {}).get("leader"))
        other = next(r for r in replicas if r is not leader)
        time.sleep(1)
        client = HTTPClient(other.port, hs_token)
        killed = time.monotonic()
        leader.kill()
        txn_id, body = factory.next()
        status, _ = client.put_txn(txn_id, body)  # accepted by the standby at once
        answered = time.monotonic() - killed
        client.close()
        wait_for(lambda o=other: (o.cluster() or {}).get("leader"), 60, "the standby leading")
        lead_s = time.monotonic() - killed
        wait_for(lambda: pending(dsn) == 0, 60, "the transaction processed")
        out.append({"accepted_s": round(answered, 3), "status": status,
                    "leader_s": round(lead_s, 2),
                    "processed_s": round(time.monotonic() - killed, 2)})
        leader.start()  # back as the standby for the next round
        wait_for(lambda r=leader: r.cluster() is not None, 30, "the restarted replica")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--size", type=int, default=20, help="events per transaction")
    ap.add_argument("--takeovers", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2000,
                    help="events/s of the paced run (below saturation)")
    ap.add_argument("--paced-seconds", type=float, default=15)
    ap.add_argument("--json", action="store_true", help="write bench/results/replicas.json")
    args = ap.parse_args()
    import tempfile

    cells = []
    with tempfile.TemporaryDirectory(prefix="enclave-replicas-") as tmp:
        for n in args.replicas:
            cell = run_cell(n, args, Path(tmp))
            cells.append(cell)
            print(f"{n} replica(s): {cell['transactions_per_s']} txn/s, "
                  f"{cell['events_per_s']} events/s accepted; answer p50/p99 "
                  f"{cell['answer_ms']['p50']}/{cell['answer_ms']['p99']} ms; processing lag "
                  f"p50/p99/max {cell['processing_lag_ms']['p50']:.0f}/"
                  f"{cell['processing_lag_ms']['p99']:.0f}/{cell['processing_lag_ms']['max']} "
                  f"ms; drained {cell['drain_s']} s after the load; exactly once: "
                  f"{cell['exactly_once']}", flush=True)
            pc = cell["paced"]
            print(f"  paced at {pc['events_per_s']:.0f} events/s for {pc['seconds']:.0f} s: "
                  f"processing lag p50/p99/max {pc['processing_lag_ms']['p50']:.0f}/"
                  f"{pc['processing_lag_ms']['p99']:.0f}/{pc['processing_lag_ms']['max']} ms, "
                  f"answer p99 {pc['answer_ms_p99']} ms ({pc['events']} events, "
                  f"{pc['distinct']} distinct)", flush=True)
            if "takeover" in cell:
                lead = [t["leader_s"] for t in cell["takeover"]]
                done = [t["processed_s"] for t in cell["takeover"]]
                acc = [t["accepted_s"] for t in cell["takeover"]]
                print(f"  takeover after SIGKILL of the leader (ttl {TTL_SECONDS} s): a "
                      f"transaction accepted by the standby after {acc} s; standby leading "
                      f"after {lead} s (median {statistics.median(lead)}); that transaction "
                      f"processed after {done} s", flush=True)
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", **git_rev(),
            "lease_ttl_seconds": TTL_SECONDS}
    if args.json:
        out = REPO / "bench" / "results" / "replicas.json"
        out.write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n")
        print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

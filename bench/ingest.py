"""Ingest benchmark: homeserver transactions through the real HTTP endpoint.

    .venv/bin/python bench/ingest.py [--quick] [--json] [--servers ...] [--sizes 100 1]

Prints figures; asserts nothing about speed. Like Synapse, the load generator keeps ONE
transaction in flight at a time on one keep-alive connection, so time-to-answer is what
bounds throughput. Servers, each in its own subprocess on a free 127.0.0.1 port, started
fresh (fresh database) for every cell, one cell at a time:

  bare              aiohttp + orjson: parse the body, answer {} (the ceiling here)
  mautrix           mautrix-python AppService + a no-op event handler (the peer: txn ids in
                    memory, nothing persisted)
  enclave-sqlite    Enclave's real service (``python -m bridge run``) with a generated config:
                    SQLite file in a temp dir, synchronous=full, InboxProcessor running
  enclave-postgres  the same on PostgreSQL 127.0.0.1:5432 (fresh database, dropped after)

Enclave's homeserver URL points at a closed port: the start-up task retries in the
background (a refused connect costs microseconds; the log's retry count is reported).

Per cell: wait for an idle machine (--wait-quiet), warm-up, let Enclave's inbox drain, then
the timed run. Reported: transactions/s, events/s, p50/p95/p99/max time-to-answer (send to
last byte of ``{}``), CPU of the server (all threads), of its PostgreSQL backends, of the
kernel and of other programs (noise), CPU per transaction; for Enclave also the inbox lag
(events still pending when the load stops, time until the InboxProcessor has marked them all
done: the last ``done_at``) and a check that every transaction and event sent was stored
exactly once. Then the ratios the targets use. ``--repeat N`` runs every cell N times and
keeps the median run; ``--json`` writes bench/results/ingest-<date>.json; ``--profile DIR``
records py-spy stacks of the Enclave servers; ``--enclave-launcher bench/_ingest_only.py``
runs Enclave without its InboxProcessor (analysis only: ingest cost alone).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PY = sys.executable
SERVERS = ("bare", "mautrix", "enclave-sqlite", "enclave-postgres")
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
from _common import git_rev  # noqa: E402  (bench/ is on sys.path)

TXN_PATH = "/_matrix/app/v1/transactions/"

# -- realistic events -------------------------------------------------------------------------

WORDS = (
    "the a to and of we it is for on that this in you be with can have will are not at "
    "deploy release meeting review customer ticket budget report draft roadmap team sprint "
    "please thanks sure tomorrow today update shared folder invoice contract quarter plan "
    "server outage fixed merged branch test staging production config access onboarding "
    "question agenda notes slides deadline approve lunch call afternoon morning friday "
    "monday document link numbers forecast hiring interview policy security audit backup"
).split()
FIRST = ("alice bob carol dave erin frank grace heidi ivan judy mallory niaj olivia peggy "
         "rupert sybil trent victor walter yuki zoe ahmed bea chen dara elif").split()
LAST = "smith jones garcia muller rossi novak kim sato silva dubois".split()
SERVER_NAME = "corp.example.com"
TOKEN_PLACEHOLDER = b"%%TOKEN%"  # 8 bytes, never produced by base64url or the word list


def _b64(rng: random.Random, n: int) -> str:
    return base64.urlsafe_b64encode(rng.randbytes(n * 3 // 4 + 3)).decode().rstrip("=")[:n]


def _text(rng: random.Random) -> str:
    target = rng.randint(100, 300)
    words: list[str] = []
    size = 0
    while size < target:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    s = " ".join(words)[:target]
    return s[0].upper() + s[1:] + "."


class TxnFactory:
    """Synapse-shaped transaction bodies with unique event ids, cheap to produce.

    A pool of pre-serialised templates (50 rooms, 260 senders, bodies 100-300 chars); each
    event id ends with an 8-char placeholder replaced by a per-transaction token, so every
    transaction carries fresh event ids for one ``bytes.replace``.
    """

    def __init__(self, size: int, seed: int, templates: int = 64):
        rng = random.Random(seed)
        rooms = ["!" + _b64(rng, 43) for _ in range(50)]
        senders = [f"@{f}.{last}:{SERVER_NAME}" for f in FIRST for last in LAST]
        now = int(time.time() * 1000)
        self.size = size
        self.templates: list[bytes] = []
        for _ in range(templates):
            events = []
            for _ in range(size):
                events.append({
                    "content": {"body": _text(rng), "m.mentions": {}, "msgtype": "m.text"},
                    "event_id": "$" + _b64(rng, 35) + TOKEN_PLACEHOLDER.decode(),
                    "origin_server_ts": now - rng.randint(0, 60_000),
                    "room_id": rng.choice(rooms),
                    "sender": rng.choice(senders),
                    "type": "m.room.message",
                    "unsigned": {"age": rng.randint(1, 900)},
                })
            self.templates.append(orjson.dumps({"events": events}))
        self.avg_bytes = statistics.mean(len(t) for t in self.templates)
        self._n = rng.randint(10_000, 90_000)
        self._i = 0

    def next(self) -> tuple[str, bytes]:
        """(txn_id, body): ids like Synapse's (increasing integers, not consecutive)."""
        self._n += 1 + (self._i % 3)
        tmpl = self.templates[self._i % len(self.templates)]
        self._i += 1
        token = base64.urlsafe_b64encode(self._n.to_bytes(6, "big"))
        return str(self._n), tmpl.replace(TOKEN_PLACEHOLDER, token)


# -- a lean keep-alive HTTP/1.1 client (one request in flight) --------------------------------

class HTTPClient:
    """Raw-socket keep-alive client: one ``sendall`` per request, Content-Length framing.

    Leaner than http.client/aiohttp so that the client's own cost inflates the servers'
    time-to-answer as little as possible (it matters most for the bare ceiling).
    """

    def __init__(self, port: int, hs_token: str):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head = (
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {hs_token}\r\n"
            "Content-Type: application/json\r\nUser-Agent: Synapse/1.163.2\r\n"
        ).encode()
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def put_txn(self, txn_id: str, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(
            b"PUT " + TXN_PATH.encode() + txn_id.encode() + b" HTTP/1.1\r\n" + self._head
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        return self._read_response()

    def _read_response(self) -> tuple[int, bytes]:
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head = buf[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length = 0
        for line in head[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v)
        buf = buf[end + 4:]
        while len(buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        self._buf = buf[length:]
        return status, buf[:length]


# -- processes and ports ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s:\n{tail(log)}")


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all its threads) from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (user+nice+system+irq+softirq+steal)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def userland_cpu() -> dict[int, float]:
    """CPU seconds of every user-space process now (kernel threads have no cmdline)."""
    out: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if not Path(f"/proc/{d}/cmdline").read_bytes():
                continue
        except OSError:
            continue
        out[int(d)] = cpu_seconds(int(d))
    return out


def foreign_cpu(before: dict[int, float], after: dict[int, float], ours: set[int]) -> float:
    """CPU seconds used meanwhile by user-space processes that are not part of the run."""
    total = 0.0
    for pid, t in after.items():
        if pid in ours or t != t:
            continue
        total += t - before.get(pid, 0.0) if pid in before else 0.0
    return max(0.0, total)


def wait_quiet(max_wait: float, threshold_cores: float = 0.3) -> float:
    """Wait (up to max_wait s) until the machine is nearly idle; return the busy cores seen."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(0.5)
        busy = (machine_busy_seconds() - b0) / (time.monotonic() - t0)
        if busy < threshold_cores or time.monotonic() >= deadline:
            return busy


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- servers ------------------------------------------------------------------------------------

class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    def __init__(self, name: str, workdir: Path, hs_token: str):
        self.name = name
        self.workdir = workdir
        self.hs_token = hs_token
        self.log = workdir / f"{name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def start(self) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=logf, stderr=subprocess.STDOUT,
            )
        wait_listening(self.port, self.proc, self.log)

    def stop(self) -> None:
        stop_process(self.proc)

    # Enclave only
    has_inbox = False

    def helper_pids(self) -> list[int]:
        """Other processes doing this server's work (PostgreSQL backends)."""
        return []

    def inbox_pending(self) -> int:
        """Events still waiting for the InboxProcessor (cheap: the partial index)."""
        raise NotImplementedError

    def inbox_totals(self) -> dict[str, Any]:
        """Everything stored, for the exactly-once check (full scans: only at the end)."""
        raise NotImplementedError


class RefServer(Server):
    def command(self) -> list[str]:
        return [PY, str(BENCH / "_servers.py"), self.name, "--port", str(self.port),
                f"--hs-token={self.hs_token}", "--workdir", str(self.workdir),
                "--homeserver", f"http://127.0.0.1:{free_port()}"]


class EnclaveServer(Server):
    has_inbox = True
    txn_size = 100

    def __init__(self, name: str, workdir: Path, hs_token: str, synchronous: str,
                 launcher: str | None = None):
        super().__init__(name, workdir, hs_token)
        self.synchronous = synchronous
        self.launcher = launcher
        self.dbname: str | None = None
        self.config = workdir / "config.yaml"

    def db_url(self) -> str:
        return "sqlite:///enclave.db"

    def command(self) -> list[str]:
        (self.workdir / "as_token").write_text(secrets.token_urlsafe(48))
        (self.workdir / "hs_token").write_text(self.hs_token)
        closed = free_port()  # nobody listens there: no homeserver
        self.config.write_text(f"""\
homeserver:
  url: http://127.0.0.1:{closed}
  server_name: {SERVER_NAME}
appservice:
  bind_host: 127.0.0.1
  port: {self.port}
  public_url: http://127.0.0.1:{self.port}
  as_token: {{file: as_token}}
  hs_token: {{file: hs_token}}
database:
  url: {self.db_url()}
  sqlite_synchronous: {self.synchronous}
inbox:
  recovery_sweeps_seconds: []  # no homeserver here to redeliver a refused transaction
logging:
  level: INFO
  format: text
""")
        if self.launcher:  # an analysis variant (e.g. a patched service), not the product
            return [PY, self.launcher, str(self.config)]
        return [PY, "-m", "bridge", "run", "-c", str(self.config)]

    def bootstrap_retries(self) -> int:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return 0
        return text.count("homeserver unreachable")

    def _query(self, *queries: str) -> list[Any]:
        c = sqlite3.connect(self.workdir / "enclave.db", timeout=10)
        try:
            return [c.execute(q).fetchone() for q in queries]
        finally:
            c.close()

    def inbox_pending(self) -> int:
        (row,) = self._query("SELECT COUNT(*) FROM inbox WHERE status = 'pending'")
        # transactions still in the journal (not yet expanded) are waiting too
        c = sqlite3.connect(self.workdir / "enclave-journal.db", timeout=10)
        try:
            (journaled,) = c.execute("SELECT COUNT(*) FROM txn_journal").fetchone()
        except sqlite3.OperationalError:  # not created yet
            journaled = 0
        finally:
            c.close()
        return int(row[0]) + int(journaled) * self.txn_size

    def inbox_totals(self) -> dict[str, Any]:
        (total, done_max), (txns,) = self._query(
            "SELECT COUNT(*), MAX(done_at) FROM inbox", "SELECT COUNT(*) FROM transactions")
        return {"events": total, "last_done_ms": done_max, "transactions": txns}


class EnclavePgServer(EnclaveServer):
    def prepare(self) -> None:
        self.dbname = f"enclave_bench_{secrets.token_hex(4)}"
        pg_query(PG_ADMIN_DSN, f'CREATE DATABASE "{self.dbname}"')

    def cleanup(self) -> None:
        if self.dbname is not None:
            pg_query(PG_ADMIN_DSN, f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            self.dbname = None

    def db_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{self.dbname}"

    def helper_pids(self) -> list[int]:
        rows = pg_query(PG_ADMIN_DSN, "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                        self.dbname, fetch="fetch")
        return [r[0] for r in rows]

    def inbox_pending(self) -> int:
        return int(pg_query(
            self.db_url(), "SELECT (SELECT COUNT(*) FROM inbox WHERE status = 'pending') "
            "+ (SELECT COUNT(*) FROM txn_journal) * $1", self.txn_size, fetch="fetchval"))

    def inbox_totals(self) -> dict[str, Any]:
        row = pg_query(self.db_url(), "SELECT COUNT(*), MAX(done_at), "
                       "(SELECT COUNT(*) FROM transactions) FROM inbox", fetch="fetchrow")
        return {"events": row[0], "last_done_ms": row[1], "transactions": row[2]}


def pg_query(dsn: str, sql: str, *args: Any, fetch: str = "execute") -> Any:
    """One statement on a fresh connection (asyncpg, Enclave's own driver)."""
    import asyncpg

    async def run() -> Any:
        c = await asyncpg.connect(dsn)
        try:
            return await getattr(c, fetch)(sql, *args)
        finally:
            await c.close()

    return asyncio.run(run())


def make_server(name: str, workdir: Path, hs_token: str, synchronous: str,
                launcher: str | None) -> Server:
    if name in ("bare", "mautrix"):
        return RefServer(name, workdir, hs_token)
    if name == "enclave-sqlite":
        return EnclaveServer(name, workdir, hs_token, synchronous, launcher)
    if name == "enclave-postgres":
        return EnclavePgServer(name, workdir, hs_token, synchronous, launcher)
    raise ValueError(name)


# -- one cell -----------------------------------------------------------------------------------

@dataclass
class Cell:
    server: str
    size: int
    seconds: float
    txns: int
    events: int
    txn_per_s: float
    events_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: int
    body_kb: float
    server_cpu_pct: float  # of one core, whole process (all threads), during the timed run
    server_cpu_us_per_txn: float  # server + its PostgreSQL backends: CPU cost of one txn
    client_cpu_pct: float  # this load generator
    db_cpu_pct: float  # PostgreSQL backends serving the server's database
    kernel_cpu_pct: float  # machine-wide CPU not in any user process (kernel: I/O, network)
    other_cpu_pct: float  # other user-space processes on the machine (noise from other work)
    inbox: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runs_events_per_s: list[float] = field(default_factory=list)  # with --repeat: every run


def percentile(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


def drive(client: HTTPClient, factory: TxnFactory,
          seconds: float) -> tuple[list[float], int, float]:
    """Send transactions back to back for ``seconds``; (latencies, errors, elapsed)."""
    lat: list[float] = []
    errors = 0
    perf = time.perf_counter
    start = perf()
    deadline = start + seconds
    t1 = start
    while t1 < deadline:
        txn_id, body = factory.next()
        t0 = perf()
        status, answer = client.put_txn(txn_id, body)
        t1 = perf()
        lat.append(t1 - t0)
        if status != 200 or answer.strip() != b"{}":
            errors += 1
    return lat, errors, t1 - start


def wait_drained(server: Server, max_wait: float) -> int:
    """Poll until the inbox has no pending event (or max_wait); the pending count."""
    deadline = time.monotonic() + max_wait
    while True:
        pending = server.inbox_pending()
        if pending == 0 or time.monotonic() > deadline:
            return pending
        time.sleep(0.05)


def run_cell(server: Server, size: int, args: argparse.Namespace,
                   profile_dir: Path | None) -> Cell:
    factory = TxnFactory(size, seed=args.seed + size)
    server.txn_size = size  # journaled transactions count as this many pending events
    notes: list[str] = []
    if args.wait_quiet > 0:
        busy = wait_quiet(args.wait_quiet)
        if busy >= 0.3:
            notes.append(f"machine busy ({busy:.1f} cores) before the cell")
    server.prepare()
    server.start()
    try:
        client = HTTPClient(server.port, server.hs_token)
        try:
            # warm-up (same traffic), then let the inbox catch up so the timed run starts clean
            _, werr, _ = drive(client, factory, args.warmup)
            if werr:
                notes.append(f"{werr} errors during warm-up")
            if server.has_inbox:
                wait_drained(server, args.drain_timeout)
            spy = None
            if profile_dir is not None and server.has_inbox:
                out = profile_dir / f"{server.name}-{size}.txt"
                spy = subprocess.Popen(
                    [str(Path(PY).parent / "py-spy"), "record", "--pid", str(server.proc.pid),
                     "--format", "raw", "--threads", "--rate", "250", "--nonblocking",
                     "-d", str(int(args.duration) + 1), "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)
            helpers = server.helper_pids()
            m_cpu0 = machine_busy_seconds()
            procs0 = userland_cpu()
            s_cpu0, c_cpu0 = cpu_seconds(server.proc.pid), time.process_time()
            h_cpu0 = sum(cpu_seconds(p) for p in helpers)
            lat, errors, elapsed = drive(client, factory, args.duration)
            end_wall_ms = time.time() * 1000
            s_cpu, c_cpu = cpu_seconds(server.proc.pid) - s_cpu0, time.process_time() - c_cpu0
            h_cpu = sum(cpu_seconds(p) for p in helpers) - h_cpu0
            m_cpu = machine_busy_seconds() - m_cpu0
            procs1 = userland_cpu()
            ours = {os.getpid(), server.proc.pid, *helpers}
            o_cpu = foreign_cpu(procs0, procs1, ours)
            u_cpu = sum(t - procs0[p] for p, t in procs1.items() if p in procs0 and t == t)
            inbox: dict[str, Any] = {}
            if server.has_inbox:
                # the inbox was drained before the timed run: what is pending now is lag
                pending_end = server.inbox_pending()
                t0 = time.monotonic()
                still = wait_drained(server, args.drain_timeout)
                waited = time.monotonic() - t0
            if spy is not None:
                spy.wait()
        finally:
            client.close()
        if server.has_inbox:
            totals = server.inbox_totals()
            last_done = totals["last_done_ms"]
            # when the last pending event was marked done (done_at), after the load stopped
            drain_s = (max(0.0, (last_done - end_wall_ms) / 1000)
                       if pending_end and last_done else 0.0)
            sent_txns = factory._i
            inbox = {
                "pending_at_end": pending_end,
                "pending_at_end_pct": 100 * pending_end / max(1, len(lat) * size),
                "drain_s": drain_s if still == 0 else None,
                "still_pending_after_wait": still,
                "waited_s": waited,
                "processed_per_s_during_run": (len(lat) * size - pending_end) / elapsed,
                "stored_events": totals["events"],
                "stored_transactions": totals["transactions"],
                "sent_events": sent_txns * size,
                "sent_transactions": sent_txns,
                "stored_exactly": (totals["events"] == sent_txns * size
                                   and totals["transactions"] == sent_txns),
                "homeserver_retries_logged": server.bootstrap_retries(),  # type: ignore[attr-defined]
            }
            if not inbox["stored_exactly"]:
                notes.append("stored counts differ from what was sent!")
    finally:
        server.stop()
        server.cleanup()
    lat.sort()
    n = len(lat)
    return Cell(
        server=server.name, size=size, seconds=elapsed, txns=n, events=n * size,
        txn_per_s=n / elapsed, events_per_s=n * size / elapsed,
        p50_ms=percentile(lat, 50) * 1e3, p95_ms=percentile(lat, 95) * 1e3,
        p99_ms=percentile(lat, 99) * 1e3, max_ms=lat[-1] * 1e3,
        mean_ms=statistics.fmean(lat) * 1e3, errors=errors,
        body_kb=factory.avg_bytes / 1024,
        server_cpu_pct=100 * s_cpu / elapsed, client_cpu_pct=100 * c_cpu / elapsed,
        db_cpu_pct=100 * h_cpu / elapsed,
        server_cpu_us_per_txn=1e6 * (s_cpu + h_cpu) / max(1, n),
        kernel_cpu_pct=max(0.0, 100 * (m_cpu - u_cpu) / elapsed),
        other_cpu_pct=100 * o_cpu / elapsed,
        inbox=inbox, notes=notes,
    )


# -- report ---------------------------------------------------------------------------------------

def ratios(cells: list[Cell]) -> list[dict[str, Any]]:
    by = {(c.server, c.size): c for c in cells}
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, ok: bool | None) -> None:
        out.append({"name": name, "value": value, "target": target, "met": ok})

    for eng in ("enclave-sqlite", "enclave-postgres"):
        e100, e1 = by.get((eng, 100)), by.get((eng, 1))
        bare100, mau100, mau1 = by.get(("bare", 100)), by.get(("mautrix", 100)), by.get(
            ("mautrix", 1))
        if e100 and bare100:
            r = e100.events_per_s / bare100.events_per_s
            add(f"{eng} ÷ bare, events/s, 100-event txns", r, "≥ 0.5", r >= 0.5)
        if e100 and mau100:
            r = e100.events_per_s / mau100.events_per_s
            add(f"{eng} ÷ mautrix, events/s, 100-event txns", r, "≥ 10×", r >= 10)
        if e1 and mau1:
            r = e1.events_per_s / mau1.events_per_s
            add(f"{eng} ÷ mautrix, events/s, 1-event txns", r, "≥ 10×", r >= 10)
        if e1:
            add(f"{eng} single-event txns/s", e1.txn_per_s, "≥ 1,000", e1.txn_per_s >= 1000)
        if e100:
            add(f"{eng} p99 time-to-answer, 100-event txns (ms)", e100.p99_ms, "≤ 5 ms",
                e100.p99_ms <= 5)
    return out


def print_report(cells: list[Cell], rats: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(180, shutil.get_terminal_size((180, 40)).columns))
    t = Table(title=f"Ingest: one transaction in flight, keep-alive, loopback "
                    f"({meta['cpus']} cores, {meta['seconds_per_cell']:.0f} s per cell)")
    for col in ("server", "ev/txn", "txn/s", "events/s", "p50 ms", "p95 ms", "p99 ms",
                "max ms", "err", "CPU srv/db/kern/other", "CPU µs/txn", "inbox pending at end",
                "drain s",
                "stored"):
        t.add_column(col, justify="left" if col == "server" else "right",
                     no_wrap=col == "server")
    for c in cells:
        ib = c.inbox
        t.add_row(
            c.server, str(c.size), f"{c.txn_per_s:,.0f}", f"{c.events_per_s:,.0f}",
            f"{c.p50_ms:.2f}", f"{c.p95_ms:.2f}", f"{c.p99_ms:.2f}", f"{c.max_ms:.1f}",
            str(c.errors),
            f"{c.server_cpu_pct:.0f}/{c.db_cpu_pct:.0f}/{c.kernel_cpu_pct:.0f}/"
            f"{c.other_cpu_pct:.0f}%",
            f"{c.server_cpu_us_per_txn:,.0f}",
            (f"{ib['pending_at_end']:,} ({ib['pending_at_end_pct']:.0f}%)" if ib else "–"),
            ((f"{ib['drain_s']:.2f}" if ib["drain_s"] is not None else
              f">{ib['waited_s']:.0f}") if ib else "–"),
            (("✓" if ib["stored_exactly"] else "✗") if ib else "–"),
        )
    con.print(t)
    if meta.get("enclave_launcher"):
        con.print(f"[bold red]Enclave rows ran through {meta['enclave_launcher']} (an analysis "
                  "variant), not the product's 'python -m bridge run'.[/bold red]")
    con.print("CPU: % of one core during the timed run — the server process (all threads) / "
              "its PostgreSQL backends / the kernel outside any process (disk flushes, "
              "loopback) / other programs on the machine (noise). The load generator is "
              "excluded. CPU µs/txn: server + its backends per transaction.")
    if any(len(c.runs_events_per_s) > 1 for c in cells):
        con.print("Median run of " + ", ".join(
            f"{c.server} {c.size}: " + "/".join(f"{x:,.0f}" for x in c.runs_events_per_s)
            for c in cells) + " events/s")
    noisy = [c for c in cells if c.other_cpu_pct > 15]
    if noisy:
        con.print("[yellow]Noisy: other work used >15% of a core during "
                  + ", ".join(f"{c.server} {c.size}" for c in noisy)
                  + "; rerun when the machine is idle.[/yellow]")
    r = Table(title="Targets")
    for col in ("figure", "value", "target", "met"):
        r.add_column(col, justify="left" if col == "figure" else "right")
    for x in rats:
        v = x["value"]
        shown = (f"{v:,.0f}" if "txns/s" in x["name"] else
                 f"{v:.2f}" if "ms" in x["name"] or "bare" in x["name"] else f"{v:.1f}×")
        r.add_row(x["name"], shown, x["target"], "yes" if x["met"] else "NO")
    con.print(r)
    for c in cells:
        for n in c.notes:
            con.print(f"[yellow]{c.server} {c.size}: {n}[/yellow]")
    for c in cells:
        if c.inbox:
            con.print(
                f"{c.server} {c.size}-event: inbox processed "
                f"{c.inbox['processed_per_s_during_run']:,.0f} events/s while ingesting; "
                f"start-up connection attempts to the (closed) homeserver port: "
                f"{c.inbox['homeserver_retries_logged']}")




def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.duration = args.duration or 2.0
        args.warmup = args.warmup or 0.5
    else:
        args.duration = args.duration or 10.0
        args.warmup = args.warmup or 2.0
    hs_token = secrets.token_urlsafe(48)
    root = Path(tempfile.mkdtemp(prefix="enclave-bench-"))
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    cells: list[Cell] = []
    try:
        runs: dict[tuple[str, int], list[Cell]] = {}
        for rnd in range(args.repeat):
            for size in args.sizes:
                for name in args.servers:
                    workdir = root / f"{name}-{size}-{rnd}"
                    workdir.mkdir()
                    server = make_server(name, workdir, hs_token, args.sqlite_synchronous,
                                         args.enclave_launcher)
                    print(f"… {name}, {size}-event transactions"
                          + (f" (run {rnd + 1}/{args.repeat})" if args.repeat > 1 else ""),
                          file=sys.stderr, flush=True)
                    try:
                        runs.setdefault((name, size), []).append(
                            run_cell(server, size, args, profile_dir))
                    except Exception as e:
                        print(f"{name} {size}: FAILED: {e}", file=sys.stderr)
                        if args.keep:
                            continue
                        raise
        for group in runs.values():
            # the run with the median events/s stands for the cell; all are listed
            ordered = sorted(group, key=lambda c: c.events_per_s)
            median = ordered[(len(ordered) - 1) // 2]
            median.runs_events_per_s = [c.events_per_s for c in group]
            cells.append(median)
    finally:
        if args.keep:
            print(f"logs and databases kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    order = {n: i for i, n in enumerate(SERVERS)}
    cells.sort(key=lambda c: (-c.size, order[c.server]))
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "git": git_rev(),
        "seconds_per_cell": args.duration, "warmup_seconds": args.warmup,
        "sqlite_synchronous": args.sqlite_synchronous, "repeat": args.repeat,
        "enclave_launcher": args.enclave_launcher,
        "loadavg_at_end": os.getloadavg(),
    }
    rats = ratios(cells)
    print_report(cells, rats, meta)
    if args.json:
        outdir = BENCH / "results"
        outdir.mkdir(exist_ok=True)
        path = outdir / f"ingest-{dt.date.today().isoformat()}.json"
        path.write_text(json.dumps(
            {"meta": meta, "cells": [asdict(c) for c in cells], "targets": rats}, indent=2))
        print(f"results written to {path.relative_to(REPO)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~2 s per cell instead of ~10 s")
    p.add_argument("--duration", type=float, help="seconds of timed load per cell")
    p.add_argument("--warmup", type=float, help="seconds of warm-up load per cell")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--repeat", type=int, default=1,
                   help="run every cell N times (fresh server each) and report the median run")
    p.add_argument("--sizes", nargs="+", type=int, default=[100, 1],
                   help="events per transaction (default: 100 1)")
    p.add_argument("--sqlite-synchronous", choices=["full", "normal"], default="full")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="longest wait for Enclave's inbox to be processed")
    p.add_argument("--seed", type=int, default=20_240_601)
    p.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                   help="before each cell, wait up to this long for the machine to be idle "
                        "(0: don't)")
    p.add_argument("--json", action="store_true",
                   help="also write bench/results/ingest-<date>.json")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy the Enclave servers during the timed run (raw stacks to DIR)")
    p.add_argument("--keep", action="store_true", help="keep server logs and databases")
    p.add_argument("--enclave-launcher", metavar="SCRIPT",
                   help="analysis only: start Enclave with 'python SCRIPT CONFIG' instead of "
                        "'python -m bridge run -c CONFIG' (e.g. a variant without the inbox "
                        "processor); the figures are then not Enclave's")
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())

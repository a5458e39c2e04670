"""Completeness benchmark: events Synapse drops at restarts, recovered within the bound.

    .venv/bin/python bench/completeness.py [--minutes 10] [--rate 20] [--restart-every 60]
        [--stop term|kill] [--rooms 10] [--bound 60] [--store sqlite|postgres]
        [--idle-seconds 120] [--json]

A real Synapse (SQLite) and a real ``enclave run`` (no handlers: an event is processed as
soon as the inbox takes it), ``inbox.completeness.bound_seconds: --bound``. Staff send
``--rate`` messages/s, round robin over ``--rooms`` rooms, for ``--minutes``; every
``--restart-every`` seconds Synapse is stopped (SIGTERM, or SIGKILL with ``--stop kill``)
and started again, Enclave paused (SIGSTOP) for ``--pause-before-stop`` seconds before
the stop: Synapse keeps one transaction in flight to the appservice and holds newer events
in memory, and a stop drops those (element-hq/synapse#11637); an Enclave that answers in
milliseconds rarely has any queued at the moment of the stop, a busy one does. Sends that
fail while it is down are not retried: the truth is what the homeserver HAS afterwards
(every room read back through the admin API).

Reported (prints figures, asserts nothing about speed):

* lost: events the homeserver has that Enclave's inbox never processed; doubled: inbox
  rows per event id above one (the inbox's unique index makes it 0 by construction; it is
  read, not assumed);
* processed − created (inbox ``done_at`` − ``origin_server_ts``) for the events the
  completeness check recovered (inbox transaction ``recovered:*``) and for all events:
  p50 / p95 / p99 / max, against the bound;
* recovered per cause (``enclave_events_recovered_total``);
* the homeserver load the check adds on an idle server: requests Enclave made to Synapse
  (its access log, Enclave's users as requester) per minute over ``--idle-seconds`` with
  no traffic, by endpoint.

Full run (the issue's): ``--minutes 10 --rate 20 --restart-every 60`` (≈ 13 min). On a
shared machine a shortened one: ``--minutes 3 --idle-seconds 60``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import re
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _common import PG_ADMIN_DSN, git_rev, pg_admin  # noqa: E402  (bench/ is on sys.path)
from separation import pct, progress  # noqa: E402

from devstack.synapse import SynapseServer, free_port  # noqa: E402

SERVER = "corp.test"
BOT = "enclave"
ADMIN = "enclave-admin"
ENCLAVE_USERS = (f"@{BOT}:{SERVER}", f"@{ADMIN}:{SERVER}")


def dist(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95),
            "p99": pct(values, 99), "max": max(values) if values else float("nan"),
            "mean": statistics.fmean(values) if values else float("nan")}


def subprocess_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Setup:
    def __init__(self, root: Path, args: argparse.Namespace, db_url: str):
        self.root = root
        self.args = args
        self.secrets = root / "secrets"
        self.secrets.mkdir(parents=True)
        self.as_port = free_port()
        self.synapse = SynapseServer(base_dir=root / "synapse", server_name=SERVER)
        (self.secrets / "registration_shared_secret").write_text(
            self.synapse.registration_shared_secret + "\n")
        self.db_url = db_url
        self.config = root / "enclave" / "config.yaml"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, url: str) -> None:
        cfg = {
            "homeserver": {"url": url, "server_name": SERVER, "timeout_seconds": 10,
                           "max_retries": 3, "registration_shared_secret": {
                               "file": str(self.secrets / "registration_shared_secret")}},
            "appservice": {"id": "enclave", "bind_host": "127.0.0.1", "port": self.as_port,
                           "public_url": f"http://127.0.0.1:{self.as_port}",
                           "as_token": {"file": str(self.secrets / "as_token")},
                           "hs_token": {"file": str(self.secrets / "hs_token")},
                           "bot_localpart": BOT, "admin_localpart": ADMIN},
            "database": {"url": self.db_url},
            "inbox": {"completeness": {"enabled": not self.args.off,
                                       "bound_seconds": self.args.bound}},
            "logging": {"level": "INFO", "format": "text"},
        }
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def start_synapse(self) -> None:
        self.write_config("http://127.0.0.1:1")
        reg = self.root / "registration.yaml"
        res = subprocess.run([sys.executable, "-m", "bridge", "registration", "-c",
                              str(self.config), "-o", str(reg)], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(res.stderr)
        self.synapse.app_service_config_files = [reg]
        self.synapse.start(120)
        self.write_config(self.synapse.base_url)

    def spawn_enclave(self) -> None:
        with (self.root / "enclave" / "enclave.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "-c", str(self.config)], cwd=REPO,
                env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    async def start_enclave(self) -> None:
        await asyncio.to_thread(self.spawn_enclave)
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(f"http://127.0.0.1:{self.as_port}/ready") as r:
                        body = await r.json(content_type=None)
                        if r.status == 200 and body.get("bot") and body["admin"]["ok"]:
                            return
                except (aiohttp.ClientError, OSError, ValueError):
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("Enclave did not get ready")

    def stop_enclave(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def ready(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{self.as_port}/ready") as r:
            return await r.json(content_type=None)

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{self.as_port}/metrics") as r:
            return await r.text()


async def hs(session: aiohttp.ClientSession, base: str, method: str, path: str,
             token: str, body: Any = None) -> Any:
    async with session.request(method, base + path, json=body,
                               headers={"Authorization": f"Bearer {token}"},
                               timeout=aiohttp.ClientTimeout(total=10)) as r:
        data = await r.json(content_type=None)
        if r.status >= 300:
            raise RuntimeError(f"{method} {path} -> {r.status} {data}")
        return data


async def room_events(session: aiohttp.ClientSession, base: str, token: str,
                      room: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    frm = None
    while True:
        q = "dir=f&limit=1000" + (f"&from={urllib.parse.quote(frm)}" if frm else "")
        page = await hs(session, base, "GET", f"/_synapse/admin/v1/rooms/"
                        f"{urllib.parse.quote(room, safe='')}/messages?{q}", token)
        chunk = page.get("chunk") or []
        out.extend(chunk)
        frm = page.get("end")
        if not chunk or not frm:
            return out


def inbox_rows(db_url: str, root: Path, ids: list[str]) -> dict[str, list[tuple]]:
    sql = "SELECT event_id, origin_server_ts, done_at, txn_id, status FROM inbox " \
          "WHERE event_id IN ({})"
    out: dict[str, list[tuple]] = {}
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        if db_url.startswith("sqlite"):
            db = sqlite3.connect(root / "enclave" / "enclave.db", timeout=30)
            rows = db.execute(sql.format(",".join("?" * len(part))), part).fetchall()
            db.close()
        else:
            import psycopg2

            conn = psycopg2.connect(db_url)
            with conn.cursor() as cur:
                cur.execute(sql.format(",".join(["%s"] * len(part))), part)
                rows = cur.fetchall()
            conn.close()
        for r in rows:
            out.setdefault(r[0], []).append(r)
    return out


_ACCESS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ - synapse\.access\.\S+ .*\{(\S+?)\}"
                     r" Processed request: .*\"(\w+) (\S+) HTTP")


def enclave_requests(log: Path, since: float, until: float) -> Counter[str]:
    """Requests Enclave's users made to Synapse between two wall-clock times, by endpoint."""
    out: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        m = _ACCESS.match(line)
        if not m or m.group(2) not in ENCLAVE_USERS:
            continue
        t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        if since <= t < until:
            path = re.sub(r"/(%21|!)[^/?]*", "/{room}", m.group(4).split("?")[0])
            out[f"{m.group(3)} {path}"] += 1
    return out


async def run(args: argparse.Namespace, root: Path, db_url: str) -> dict[str, Any]:
    setup = Setup(root, args, db_url)
    await asyncio.to_thread(setup.start_synapse)
    base = setup.synapse.base_url
    try:
        await setup.start_enclave()
        _admin, admin_token = setup.synapse.register_user(
            "bench-root-" + uuid.uuid4().hex[:6], "pw", admin=True)
        users = [setup.synapse.register_user(f"s{i}-{uuid.uuid4().hex[:4]}", "pw")
                 for i in range(args.rooms)]
        async with aiohttp.ClientSession() as session:
            rooms = [(await hs(session, base, "POST", "/_matrix/client/v3/createRoom", tok,
                               {"name": f"bench {i}"}))["room_id"]
                     for i, (_u, tok) in enumerate(users)]
            sent = failed = 0
            restarts: list[float] = []
            stop_at = time.monotonic() + args.minutes * 60
            next_restart = time.monotonic() + args.restart_every
            tasks: set[asyncio.Task[None]] = set()

            async def send(i: int) -> None:
                nonlocal sent, failed
                room, (_u, tok) = rooms[i % len(rooms)], users[i % len(users)]
                try:
                    await hs(session, base, "PUT", f"/_matrix/client/v3/rooms/"
                             f"{urllib.parse.quote(room, safe='')}/send/m.room.message/"
                             f"b{i}-{secrets.token_hex(3)}", tok,
                             {"msgtype": "m.text", "body": f"bench {i}"})
                    sent += 1
                except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError):
                    failed += 1

            async def restart() -> None:
                t0 = time.monotonic()
                paused = args.pause_before_stop > 0 and setup.proc is not None
                if paused:
                    # a busy Enclave: Synapse's one transaction in flight waits, the
                    # events created meanwhile wait in its memory, and the stop drops them
                    setup.proc.send_signal(signal.SIGSTOP)
                    await asyncio.sleep(args.pause_before_stop)
                try:
                    await asyncio.to_thread(setup.synapse.kill if args.stop == "kill"
                                            else setup.synapse.stop)
                finally:
                    if paused:
                        setup.proc.send_signal(signal.SIGCONT)
                await asyncio.to_thread(setup.synapse.start, 120)
                restarts.append(time.monotonic() - t0)
                progress(f"Synapse restarted ({args.stop}) in {restarts[-1]:.1f}s; "
                         f"{sent} sent, {failed} failed")

            restarter: asyncio.Task[None] | None = None
            t0, i = time.monotonic(), 0
            progress(f"sending {args.rate}/s into {args.rooms} rooms for {args.minutes} min")
            while time.monotonic() < stop_at:
                due = t0 + i / args.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(send(i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
                if time.monotonic() >= next_restart and (restarter is None or restarter.done()):
                    restarter = asyncio.create_task(restart())
                    next_restart += args.restart_every
            await asyncio.gather(*tasks, return_exceptions=True)
            if restarter is not None:
                await restarter
            progress(f"sending done: {sent} sent, {failed} failed; waiting {args.bound + 15:.0f}s "
                     "for the last recoveries")
            await asyncio.sleep(args.bound + 15)

            has: list[dict[str, Any]] = []
            for room in rooms:
                has.extend(e for e in await room_events(session, base, admin_token, room)
                           if e.get("type") == "m.room.message")
            ids = [e["event_id"] for e in has]
            rows = await asyncio.to_thread(inbox_rows, db_url, root, ids)
            lost = [e for e in ids if not rows.get(e) or rows[e][0][4] != "done"]
            doubled = [e for e in ids if len(rows.get(e, [])) > 1]
            lat_all = [(r[0][2] - r[0][1]) / 1000 for e, r in rows.items() if r[0][2]]
            lat_rec = [(r[0][2] - r[0][1]) / 1000 for e, r in rows.items()
                       if r[0][2] and r[0][3].startswith("recovered:")]
            causes = {m.group(1): float(m.group(2)) for m in re.finditer(
                r'^enclave_events_recovered_total\{cause="(\w+)"\} (\S+)$',
                await setup.metrics(), re.M)}

            progress(f"idle phase: {args.idle_seconds}s without traffic")
            await asyncio.sleep(5)  # let the last check of the busy phase finish
            idle_from = time.time()
            await asyncio.sleep(args.idle_seconds)
            idle_to = time.time()
            await asyncio.sleep(1.5)  # Synapse writes its access line after the answer
            idle = enclave_requests(setup.synapse.log_path, idle_from, idle_to)
            ready = await setup.ready()
        minutes = (idle_to - idle_from) / 60
        return {
            "homeserver_has": len(ids), "sent_ok": sent, "send_failed_while_down": failed,
            "lost": len(lost), "lost_ids": lost[:10], "doubled": len(doubled),
            "recovered": len(lat_rec), "recovered_by_cause": causes,
            "processed_minus_created_recovered_s": dist(lat_rec),
            "processed_minus_created_all_s": dist(lat_all),
            "over_bound": sum(1 for v in lat_all if v > args.bound),
            "restarts": len(restarts), "restart_s": dist(restarts),
            "idle_requests_per_min": sum(idle.values()) / minutes if minutes else None,
            "idle_requests_by_endpoint": dict(idle),
            "ready_completeness": ready.get("completeness"),
        }
    finally:
        setup.stop_enclave()
        setup.synapse.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--restart-every", type=float, default=60)
    ap.add_argument("--stop", choices=["term", "kill"], default="term")
    ap.add_argument("--pause-before-stop", type=float, default=0.5,
                    help="pause Enclave (SIGSTOP) this long before each stop, as a busy "
                         "Enclave would be, so the stop finds events queued in Synapse's "
                         "memory (0: plain restarts, which with an idle Enclave rarely "
                         "drop any)")
    ap.add_argument("--rooms", type=int, default=10)
    ap.add_argument("--bound", type=float, default=60)
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--idle-seconds", type=float, default=120)
    ap.add_argument("--off", action="store_true",
                    help="completeness check off (the push alone), for comparison")
    ap.add_argument("--json", action="store_true",
                    help="write bench/results/completeness-<stop>.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="enclave-bench-completeness-"))
    db_name = None
    if args.store == "postgres":
        db_name = f"bench_complete_{secrets.token_hex(4)}"
        asyncio.run(pg_admin(f'CREATE DATABASE "{db_name}"'))
        db_url = f"{PG_ADMIN_DSN.rpartition('/')[0]}/{db_name}"
    else:
        db_url = f"sqlite:///{(root / 'enclave' / 'enclave.db').resolve()}"
    try:
        res = asyncio.run(run(args, root, db_url))
    finally:
        if db_name:
            asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    meta = {"date": dt.date.today().isoformat(), "machine": platform.machine(),
            "python": platform.python_version(), **git_rev(),
            "args": {k: v for k, v in vars(args).items() if k != "json"}}
    r = res["processed_minus_created_recovered_s"]
    a = res["processed_minus_created_all_s"]
    print(f"\nCompleteness under Synapse restarts ({args.stop}, every {args.restart_every:.0f}s, "
          f"Enclave paused {args.pause_before_stop:g}s before each, "
          f"{args.minutes:g} min at {args.rate:g} msg/s, bound {args.bound:g}s, "
          f"{args.store} store{', CHECK OFF' if args.off else ''})")
    print(f"  homeserver has {res['homeserver_has']} messages ({res['send_failed_while_down']} "
          f"sends failed while Synapse was down); lost {res['lost']}, doubled "
          f"{res['doubled']}; {res['restarts']} restarts "
          f"(p50 {res['restart_s']['p50']:.1f}s)")
    print(f"  recovered {res['recovered']} ({res['recovered_by_cause']}); processed − created, "
          f"recovered: p50 {r['p50']:.1f}s p95 {r['p95']:.1f}s p99 {r['p99']:.1f}s "
          f"max {r['max']:.1f}s")
    print(f"  processed − created, all: p50 {a['p50']:.2f}s p95 {a['p95']:.2f}s "
          f"max {a['max']:.1f}s; over the bound: {res['over_bound']}")
    print(f"  idle: {res['idle_requests_per_min']:.1f} requests/min to the homeserver "
          f"{res['idle_requests_by_endpoint']}")
    if args.json:
        out = REPO / "bench" / "results" / f"completeness-{args.stop}.json"
        out.write_text(json.dumps({"meta": meta, "result": res}, indent=2, default=str))
        print(f"  written to {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Separation benchmark: reactive enforcement under background traffic, and reconciliation
of thousands of rooms.

    .venv/bin/python bench/separation.py [--part {all,reactive,reconcile}] [--staff 50]
        [--background-rate 100[,20,...]] [--samples 80] [--invite-rate 3] [--kicks 20]
        [--kick-rate 2] [--background-rooms 4] [--room-members 12] [--rooms 2000]
        [--violations 3] [--concurrency 8] [--no-cli] [--quick] [--no-json] [--keep]

Prints figures and the issue's targets; asserts nothing. Synapse runs with the devstack's
test rate limits (every limiter opened wide) so set-up is fast; Enclave's own requests use
the appservice token, which is not rate limited in production either
(``rate_limited: false``). Results go to ``bench/results/separation.json``, with the CPU
that other programs used during each window (this machine's 2 cores are shared); a run of
one ``--part`` keeps the other part's last results there (each part carries its own meta).

**Part 1, reactive** (issue target: p99 <= 1 s from the disallowed event's timestamp to the
reject/kick being accepted by Synapse, with 100 events/s of background traffic). Two real
Synapses federating on loopback (:class:`~devstack.federation.FederatedPair`): the
corporate one on a fresh PostgreSQL database, WITHOUT the gate module (so the reactive
layer does the work), and a personal one (SQLite) holding the outsiders. Enclave runs as in
production, ``python -m bridge run`` in a subprocess, with a directory file source of
``--staff`` people and a ``policy:`` (``dms.staff_external: deny``, an ``external`` class
for ``#ext-*`` rooms that admits partners only). Disallowed events:

* **invite -> reject**: outsiders open DMs (``is_direct``) inviting staff, open loop at
  ``--invite-rate``/s, ``--samples`` of them; Enclave rejects each as the invitee (and tells
  the staff member in its bot's DM).
* **join -> kick**: outsiders join public ``external``-class corporate rooms over federation
  (Synapse's module API has no check for remote joins, so this is the reactive layer's job
  on any homeserver), ``--kicks`` of them; Enclave kicks them as the room's creator.

t0 = the disallowed event's ``origin_server_ts`` (set by the outsider's server; both servers
share this machine's clock), t1 = the moment the corporate Synapse answered 200 to Enclave's
leave/kick request (the action's ``applied_at`` in Enclave's store, read-only). The store also
gives where the time goes: event stored in Enclave's inbox, the handler's actions committed,
the removal applied. Cross-check from the outsiders' server (its admin API, after each
phase): the same event with the same ``origin_server_ts``, and whether the removal reached it.

First an unmeasured-by-target *first contact* round without background: one refused invite
per staff member, so Enclave's bot has opened its notice DM with everyone (one createRoom
each) before the phases; it is reported on its own. Then one phase per ``--background-rate``
(comma-separated): staff send that many messages/s (open loop, through the appservice token
as each sender) into ``--background-rooms`` corporate rooms for the whole phase, every one
pushed to Enclave; after a warm-up the invites and then the joins run under it.

**Part 2, reconciliation** (issue: "reconciliation scan of 2,000 rooms (rooms/s, admin
calls)"). One corporate Synapse on PostgreSQL (no federation needed). Its appservice
registration has no URL during this part (the CLI path below needs no pushes). Set-up, not
measured: a directory sync provisions the staff (Enclave's own sync, in this process), then
``--rooms`` rooms are made through the appservice token as staff, with the class state and
``m.federate: false`` the gate would have added (from the policy's own
``decide_create_room``), 3 members each (the creator joined, two staff invited; in every
tenth room and the violating ones they join). ``--violations`` percent of them break the
policy: half hold a local account the directory does not list (``unlisted_local_users:
external``), half mix both sides of an information barrier whose ``existing: remove``
applies; 0.5 % are "from before Enclave" (federating internal rooms: a finding, no action).
Measured, with Enclave's :class:`~bridge.separation.service.SeparationService` built as the
CLI builds it (``bridge.root.Root``): ``plan`` (scan + diff), ``enclave separation
--plan`` as a subprocess (the operator's command, process start included), ``apply``, and a
re-plan that must find nothing. Every homeserver request is counted and timed by endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _common import git_rev, pg_admin  # noqa: E402  (bench/ is on sys.path)

from bridge.config import check_secrets, load_config  # noqa: E402
from bridge.matrix.client import MatrixClient  # noqa: E402
from bridge.policy.separation import apply_edits  # noqa: E402
from bridge.root import Root  # noqa: E402
from devstack.federation import FederatedPair  # noqa: E402
from devstack.synapse import SynapseServer, free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "separation.json"
BOT_LOCALPART = "enclave"
ADMIN_LOCALPART = "enclave-admin"
TARGET_P99_MS = 1000.0
TARGET_BACKGROUND = 100.0
MEMBER_FILTER_EVENTS = json.dumps({"types": ["m.room.member"]}, separators=(",", ":"))


# -- small helpers ----------------------------------------------------------------------------
def now_ms() -> int:
    return int(time.time() * 1000)


def progress(msg: str) -> None:
    print(f"… {msg}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: Sequence[float]) -> dict[str, float | int]:
    return {"n": len(values), "p50": pct(values, 50), "p90": pct(values, 90),
            "p99": pct(values, 99), "max": max(values) if values else float("nan")}


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU seconds of a process so far (NaN if unknown)."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_backend_cpu(dbname: str) -> float:
    """CPU seconds of the PostgreSQL backends serving ``dbname``."""
    total = 0.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("postgres:") and f" {dbname} " in cmd:
            total += cpu_seconds(int(d))
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (all processes)."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by our processes over a window, and by everything else on the machine."""

    def __init__(self, pids: dict[str, Callable[[], int | None]], pg_db: str | None):
        self.pids = pids
        self.pg_db = pg_db

    def snapshot(self) -> dict[str, float]:
        snap = {name: cpu_seconds(get()) for name, get in self.pids.items()}
        if self.pg_db:
            snap["postgres_backends"] = pg_backend_cpu(self.pg_db)
        snap["bench_process"] = time.process_time()
        snap["_machine"] = machine_busy_seconds()
        snap["_wall"] = time.monotonic()
        return snap

    @staticmethod
    def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        out = {k: b[k] - a[k] for k in a if not k.startswith("_")}
        wall = b["_wall"] - a["_wall"]
        machine = b["_machine"] - a["_machine"]
        ours = sum(v for v in out.values() if v == v)
        out["machine_busy_cores"] = machine / wall if wall > 0 else float("nan")
        out["other_programs_cores"] = max(0.0, machine - ours) / wall if wall > 0 else 0.0
        out["wall_s"] = wall
        return out


_ID_SEGMENT = re.compile(r"/(%40|%21|%23|@|!|#)[^/]*")


class RequestMeter:
    """Wraps ``client.request``: counts and times requests by endpoint (ids folded)."""

    def __init__(self, client: MatrixClient):
        self.by_endpoint: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        inner = client.request

        async def request(method: str, path: str, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await inner(method, path, **kw)
            finally:
                e = self.by_endpoint[f"{method} {_ID_SEGMENT.sub('/{id}', path)}"]
                e[0] += 1
                e[1] += time.perf_counter() - t0

        client.request = request  # type: ignore[method-assign]

    def reset(self) -> None:
        self.by_endpoint.clear()

    @property
    def total(self) -> int:
        return int(sum(v[0] for v in self.by_endpoint.values()))

    @property
    def writes(self) -> int:
        return int(sum(v[0] for k, v in self.by_endpoint.items()
                       if not k.startswith("GET ") and not k.endswith("/login")))

    def table(self) -> list[dict[str, Any]]:
        rows = [{"endpoint": k, "count": int(v[0]), "total_s": v[1],
                 "mean_ms": v[1] / v[0] * 1000 if v[0] else 0.0}
                for k, v in self.by_endpoint.items()]
        return sorted(rows, key=lambda r: -r["total_s"])


async def bounded(n: int, items: Sequence[Any], fn: Callable[[Any], Awaitable[Any]]) -> list:
    sem = asyncio.Semaphore(n)

    async def one(x: Any) -> Any:
        async with sem:
            return await fn(x)
    return await asyncio.gather(*(one(x) for x in items))


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ENCLAVE_CONFIG", None)
    return env


# -- Enclave config, registration, process ------------------------------------------------------
def write_people(path: Path, n: int, groups_of: Callable[[int], list[str]]) -> list[str]:
    """A directory file of ``n`` people ``staff000``…; their usernames."""
    names = [f"staff{i:03d}" for i in range(n)]
    people = [{"id": f"p{i:04d}", "username": name, "display_name": f"Staff {i:03d}",
               "department": (groups_of(i) or ["general"])[0].title(), "groups": groups_of(i)}
              for i, name in enumerate(names)]
    path.write_text(yaml.safe_dump({"people": people}, sort_keys=False))
    return names


def enclave_config(root: Path, *, server_name: str, shared_secret: str, directory: Path,
                   policy: dict[str, Any]) -> tuple[Path, int]:
    """Enclave's config under ``root/enclave`` (homeserver URL filled in once Synapse runs)."""
    secrets = root / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "registration_shared_secret").write_text(shared_secret + "\n")
    as_port = free_port()
    cfg = {
        "homeserver": {
            "url": "http://127.0.0.1:1", "server_name": server_name, "timeout_seconds": 30,
            "max_retries": 3,
            "registration_shared_secret": {"file": str(secrets / "registration_shared_secret")},
        },
        "appservice": {
            "id": "enclave", "bind_host": "127.0.0.1", "port": as_port,
            "public_url": f"http://127.0.0.1:{as_port}",
            "as_token": {"file": str(secrets / "as_token")},
            "hs_token": {"file": str(secrets / "hs_token")},
            "bot_localpart": BOT_LOCALPART,
        },
        "database": {"url": f"sqlite:///{(root / 'enclave' / 'enclave.db').resolve()}"},
        "logging": {"level": "INFO", "format": "text"},
        "directory": {"source": {"type": "file", "path": str(directory)},
                      "interval_minutes": 0},
        "policy": policy,
    }
    path = root / "enclave" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, as_port


def make_registration(config: Path, out: Path, *, url: bool = True) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "bridge", "registration", "-c", str(config), "-o", str(out)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"enclave registration failed:\n{res.stderr}")
    if not url:
        reg = yaml.safe_load(out.read_text())
        reg["url"] = None  # Synapse pushes nothing to an appservice without a URL
        out.write_text(yaml.safe_dump(reg, sort_keys=False))


def set_homeserver_url(config: Path, url: str) -> None:
    cfg = yaml.safe_load(config.read_text())
    cfg["homeserver"]["url"] = url
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))


def as_token(config: Path) -> str:
    return (config.parent.parent / "secrets" / "as_token").read_text().strip()


def register_admin(server: SynapseServer) -> None:
    """Enclave's admin identity (a server admin), as Enclave's start-up makes it."""
    with contextlib.suppress(RuntimeError):  # already there
        server.register_user(ADMIN_LOCALPART, "not-used-" + uuid.uuid4().hex, admin=True)


async def start_synapse_for(config: Path, synapse: SynapseServer, root: Path) -> tuple[Any, Any]:
    """Register Enclave (no push URL) with ``synapse``, start it, point the config at it
    and make Enclave's admin identity; return the loaded config and its secrets."""
    registration = root / "enclave-registration.yaml"
    await asyncio.to_thread(make_registration, config, registration, url=False)
    synapse.app_service_config_files = [registration]
    await asyncio.to_thread(synapse.start, 120)
    set_homeserver_url(config, synapse.base_url)
    await asyncio.to_thread(register_admin, synapse)
    loaded = load_config(config)
    return loaded, check_secrets(loaded)


class EnclaveProc:
    """``python -m bridge run -c CONFIG`` as in production."""

    def __init__(self, config: Path, port: int):
        self.config = config
        self.port = port
        self.log_path = config.parent / "enclave.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    async def get_json(self, path: str) -> tuple[int, Any]:
        try:
            async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{self.port}{path}",
                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            return 0, str(e)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "-c", str(self.config)],
                cwd=REPO, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)

    async def start(self, within: float = 120) -> None:
        """Spawn; wait for /ready with the bot set up and the first directory sync done."""
        self.proc = self._spawn()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Enclave exited with {self.proc.returncode}:\n"
                                   + self.tail())
            status, body = await self.get_json("/ready")
            if status == 200 and isinstance(body, dict) and body.get("bot") and \
                    (body.get("directory") or {}).get("outcome") == "ok":
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("Enclave not ready in time:\n" + self.tail())

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- part 3: leak check -------------------------------------------------------------------------
def leak_policy(partner_server: str) -> dict[str, Any]:
    """Part 1's policy, with every user of the partner's server a partner of ``external``."""
    return {**reactive_policy(), "notify": {"enabled": False},
            "partners": [{"id": "partner-co", "servers": [partner_server],
                          "room_classes": ["external"]}]}


async def _bodies(client: MatrixClient, room_id: str, prefix: str) -> list[str]:
    """Message bodies starting with ``prefix`` that ``client`` (a user's token) can read:
    an initial sync of that room (joined or left: a member removed at once still sees what
    they could read), which shows the timeline the server lets them see. (/messages is not
    used: on a remote member's server it waits on federation backfill for many seconds.)"""
    flt = json.dumps({"room": {"rooms": [room_id], "include_leave": True,
                               "timeline": {"limit": 100}, "state": {"lazy_load_members": True}},
                      "presence": {"types": []}, "account_data": {"types": []}})
    try:
        body = await client.request("GET", "/_matrix/client/v3/sync",
                                    query={"filter": flt, "timeout": "0"})
    except Exception:
        return []
    rooms = body.get("rooms") or {}
    events = [e for section in ("join", "leave")
              for e in ((rooms.get(section) or {}).get(room_id) or {}).get("timeline", {})
              .get("events", [])]
    return [e["content"]["body"] for e in events
            if e.get("type") == "m.room.message"
            and str((e.get("content") or {}).get("body", "")).startswith(prefix)]


async def _removals_ms(corp: MatrixClient, admin: str, room_id: str,
                       user_prefix: str, user_suffix: str = "") -> list[float]:
    """For each join of a user matching ``user_prefix``/``user_suffix`` in ``room_id``
    (corporate admin API), ms until the next leave/kick of that user: the reactive
    layer's latency."""
    try:
        body = await corp.request("GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/messages",
                                  query={"dir": "f", "limit": "1000",
                                         "filter": MEMBER_FILTER_EVENTS}, user_id=admin)
    except Exception:
        return []
    joined: dict[str, int] = {}
    out: list[float] = []
    for e in body.get("chunk", []):
        key = str(e.get("state_key"))
        if e.get("type") != "m.room.member" or not key.startswith(user_prefix) \
                or not key.endswith(user_suffix):
            continue
        m, who = (e.get("content") or {}).get("membership"), e["state_key"]
        if m == "join":
            joined[who] = e["origin_server_ts"]
        elif m in ("leave", "ban") and who in joined:
            out.append(e["origin_server_ts"] - joined.pop(who))
    return out


async def run_leak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Issue 15's leak check on three homeservers (corporate with Enclave and, unless
    ``--leak-gate off``, the gate module; personal; a partner's): outsiders invited by a
    remote partner into an external-class room join at once and read its history, and
    staff join outsiders' remote rooms and send at once. Target: 0 messages readable or
    delivered across the boundary."""
    pair = FederatedPair.create(root / "trio", with_partner=True)
    assert pair.partner is not None
    for server in pair.servers:
        server.log_level = args.synapse_log_level
    enclave: EnclaveProc | None = None
    gate = args.leak_gate == "on"
    try:
        directory = root / "directory.yaml"
        names = write_people(directory, args.staff, lambda i: ["engineering"])
        config, as_port = enclave_config(
            root, server_name=pair.corp.server_name,
            shared_secret=pair.corp.registration_shared_secret, directory=directory,
            policy=leak_policy(pair.partner.server_name))
        secret_file = root / "secrets" / "gate_secret"
        secret_file.write_text(uuid.uuid4().hex + "\n")
        cfg = yaml.safe_load(config.read_text())
        cfg["gate"] = {"secret": {"file": str(secret_file)}}
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        corp_name = pair.corp.server_name
        if gate:
            pair.corp.extra_config["modules"] = [{
                "module": "bridge.gate.module.EnclaveGate", "config": {
                    "url": f"http://127.0.0.1:{as_port}", "secret_path": str(secret_file),
                    "enclave_users": [f"@{BOT_LOCALPART}:{corp_name}",
                                      f"@{ADMIN_LOCALPART}:{corp_name}"],
                    "timeout_ms": 2000}}]
        registration = root / "enclave-registration.yaml"
        await asyncio.to_thread(make_registration, config, registration)
        pair.corp.app_service_config_files = [registration]
        t = time.monotonic()
        await asyncio.to_thread(pair.start, 120)
        progress(f"three homeservers up in {time.monotonic() - t:.1f}s (gate module "
                 f"{'on' if gate else 'off'}); starting Enclave")
        set_homeserver_url(config, pair.corp.base_url)
        await asyncio.to_thread(register_admin, pair.corp)
        enclave = EnclaveProc(config, as_port)
        await enclave.start()
        staff = [f"@{n}:{corp_name}" for n in names]
        admin = f"@{ADMIN_LOCALPART}:{corp_name}"
        enclave_bot = f"@{BOT_LOCALPART}:{corp_name}"
        token = as_token(config)
        personal_name = pair.personal.server_name
        async with aiohttp.ClientSession(json_serialize=None) as session:
            corp = MatrixClient(session, pair.corp.base_url, token, max_retries=2, timeout=60)

            def user_client(server: SynapseServer, tok: str) -> MatrixClient:
                return MatrixClient(session, server.base_url, tok, max_retries=1, timeout=30)

            pat_id, pat_tok = await asyncio.to_thread(pair.partner.register_user,
                                                      f"pat-{uuid.uuid4().hex[:4]}", "pw")
            pat = user_client(pair.partner, pat_tok)
            prefix = f"@out-{uuid.uuid4().hex[:4]}"
            outsiders = []
            for k in range(args.leak_outsiders):
                uid, tok = await asyncio.to_thread(
                    pair.personal.register_user, f"{prefix[1:]}-{k}", "pw")
                outsiders.append((uid, user_client(pair.personal, tok)))

            # A: external-class rooms of staff with the partner in them (history as the
            # gate's creation edits set it, or as the room was made without the gate)
            lanes = min(args.leak_rooms, args.leak_attempts)
            rooms = []
            for k in range(lanes):
                # Enclave's bot in with power (what the gate's edits give; without the gate
                # the room's admin must: docs/operators/separation.md, "Without the gate")
                rid = await corp.create_room(
                    {"preset": "public_chat", "name": f"ext leak {k}",
                     "room_alias_name": f"ext-leak-{uuid.uuid4().hex[:6]}",
                     "invite": [pat_id, enclave_bot],
                     "power_level_content_override": {"invite": 0,
                                                      "users": {enclave_bot: 100}}},
                    user_id=staff[k % len(staff)])
                await corp.join(rid, user_id=enclave_bot)
                await pat.request("POST", f"/_matrix/client/v3/join/{q(rid)}",
                                  query={"server_name": corp_name}, json={})
                rooms.append((rid, staff[k % len(staff)]))
            readable, joined_ok = 0, 0
            history_fail: list[str] = []

            async def history_lane(k: int) -> None:
                nonlocal readable, joined_ok
                rid, owner = rooms[k]
                for i in range(k, args.leak_attempts, lanes):
                    o_id, o = outsiders[i % len(outsiders)]
                    await corp.send_event(rid, "m.room.message",
                                          {"msgtype": "m.text", "body": f"secret-A-{i}"},
                                          f"leakA{i}-{uuid.uuid4().hex[:6]}", user_id=owner)
                    try:
                        await pat.invite(rid, o_id)
                    except Exception as e:
                        history_fail.append(str(e)[:120])
                        continue
                    # the outsider joins the instant its server has the invitation, and
                    # again at once while the corporate server has not seen it yet
                    for attempt in range(20):
                        try:
                            await o.request("POST", f"/_matrix/client/v3/join/{q(rid)}",
                                            query={"server_name": corp_name}, json={})
                            joined_ok += 1
                            break
                        except Exception as e:
                            if attempt == 19:
                                history_fail.append(str(e)[:120])
                            await asyncio.sleep(0.05)
                    else:
                        continue
                    seen = await _bodies(o, rid, "secret-A-")
                    if seen:
                        readable += 1
                    # let the reactive removal land before this lane's next attempt
                    for _ in range(100):
                        m = await corp.get_state(rid, "m.room.member", o_id, user_id=owner)
                        if (m or {}).get("membership") != "join":
                            break
                        await asyncio.sleep(0.05)

            t = time.monotonic()
            await asyncio.gather(*(history_lane(k) for k in range(lanes)))
            history_s = time.monotonic() - t
            kick_ms: list[float] = []
            for rid, _ in rooms:
                kick_ms += await _removals_ms(corp, admin, rid, prefix)
            progress(f"history: {args.leak_attempts} attempts in {history_s:.1f}s, "
                     f"{joined_ok} outsider joins, {readable} with history readable")

            # B: staff join outsiders' remote rooms and send at once
            party = []
            for k in range(min(args.leak_rooms, len(outsiders))):
                o = outsiders[k][1]
                alias = f"party-{uuid.uuid4().hex[:6]}"
                body = await o.request("POST", "/_matrix/client/v3/createRoom", json={
                    "preset": "public_chat", "room_alias_name": alias,
                    "visibility": "public"})
                party.append((body["room_id"], f"#{alias}:{personal_name}", o))
            joins = sends = 0
            refusals: dict[str, int] = defaultdict(int)

            async def join_lane(k: int) -> None:
                nonlocal joins, sends
                rid, alias, _ = party[k]
                for i in range(k, args.leak_attempts, len(party)):
                    who = staff[i % len(staff)]
                    try:
                        await corp.request("POST", f"/_matrix/client/v3/join/{q(alias)}",
                                           query={"server_name": personal_name}, json={},
                                           user_id=who)
                        joins += 1
                    except Exception as e:
                        m = re.search(r"Enclave policy \(([^)]+)\)", str(e))
                        refusals[m.group(1) if m else str(e)[:60]] += 1
                    try:
                        await corp.send_event(rid, "m.room.message",
                                              {"msgtype": "m.text", "body": f"work-B-{i}"},
                                              f"leakB{i}-{uuid.uuid4().hex[:6]}", user_id=who)
                        sends += 1
                    except Exception:
                        pass

            t = time.monotonic()
            await asyncio.gather(*(join_lane(k) for k in range(len(party))))
            join_s = time.monotonic() - t
            await asyncio.sleep(3)  # what was sent has time to arrive
            delivered = 0
            leave_ms: list[float] = []
            for rid, _, o in party:
                delivered += len(await _bodies(o, rid, "work-B-"))
                leave_ms += await _removals_ms(corp, admin, rid, "@", ":" + corp_name)
            progress(f"remote joins: {args.leak_attempts} attempts in {join_s:.1f}s, "
                     f"{joins} joined, {sends} sends accepted, {delivered} delivered")
        return {
            "setup": {"servers": "corporate (Enclave"
                      + (" + gate module" if gate else ", no gate module")
                      + "), personal, partner; SQLite; federation on loopback",
                      "gate": gate, "staff": args.staff, "outsiders": args.leak_outsiders,
                      "rooms": lanes, "attempts": args.leak_attempts},
            "history": {"attempts": args.leak_attempts, "outsider_joined": joined_ok,
                        "readable": readable, "seconds": history_s,
                        "refused_examples": history_fail[:3],
                        "reactive_removal_ms": summary(kick_ms)},
            "remote_join": {"attempts": args.leak_attempts, "joined": joins,
                            "sends_accepted": sends, "delivered": delivered,
                            "refused_by_rule": dict(refusals), "seconds": join_s,
                            "reactive_removal_ms": summary(leave_ms)},
        }
    finally:
        if enclave is not None:
            enclave.stop()
        await asyncio.to_thread(pair.stop)


# -- part 1: reactive ---------------------------------------------------------------------------
def count_in_log(path: Path, needle: str) -> int:
    """How many lines of a Synapse log contain ``needle``."""
    try:
        with path.open(errors="replace") as f:
            return sum(1 for line in f if needle in line)
    except OSError:
        return 0


# Synapse's warning when the inviter's server refused make_leave: it then only records the
# rejection locally (out of band), and the inviter's server keeps showing the invite
FAILED_REMOTE_REJECT = "Failed to reject invite"


def reactive_policy() -> dict[str, Any]:
    return {
        "default_class": "internal",
        "room_classes": [
            {"id": "internal", "federate": False},
            {"id": "external", "federate": True, "allow": {"partners": True}},
        ],
        "classify": [{"id": "cls-ext-alias", "room_class": "external", "alias": "^#ext-"}],
        "dms": {"staff_external": "deny"},
        "notify": {"contact": "#it-help"},
        "reconcile": {"interval_minutes": 0},
    }


class RemoteView:
    """Membership events of a room as the outsiders' server stores them (its admin API),
    read once a phase is over: whether each removal reached the other side, and its
    event's ``origin_server_ts``."""

    def __init__(self, client: MatrixClient, admin: str):
        self.client = client
        self.admin_token = admin

    async def memberships(self, room_id: str) -> list[dict[str, Any]]:
        try:
            body = await self.client.request(
                "GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/messages",
                query={"dir": "f", "limit": "200", "filter": MEMBER_FILTER_EVENTS},
                access_token=self.admin_token)
        except Exception:
            return []
        return [e for e in body.get("chunk", []) if e.get("type") == "m.room.member"]


class Background:
    """Staff messages into corporate rooms at a fixed rate (open loop)."""

    def __init__(self, client: MatrixClient, rooms: list[tuple[str, list[str]]], rate: float,
                 max_in_flight: int = 400):
        self.client = client
        self.rooms = rooms
        self.rate = rate
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.done: list[float] = []  # monotonic completion times of successful sends
        self.latency_ms: list[float] = []
        self.errors = 0
        self.dropped = 0
        self.run_id = uuid.uuid4().hex[:8]
        self._tasks: set[asyncio.Task[None]] = set()

    async def _send(self, i: int) -> None:
        room, members = self.rooms[i % len(self.rooms)]
        sender = members[(i // len(self.rooms)) % len(members)]
        t = time.monotonic()
        try:
            await self.client.send_event(room, "m.room.message",
                                         {"msgtype": "m.text", "body": f"background {i}"},
                                         f"bg-{self.run_id}-{i}", user_id=sender)
            end = time.monotonic()
            self.done.append(end)
            self.latency_ms.append((end - t) * 1000)
        except Exception:
            self.errors += 1
        finally:
            self.in_flight -= 1

    async def run(self, stop: asyncio.Event) -> None:
        if self.rate <= 0:
            await stop.wait()
            return
        start = time.monotonic()
        i = 0
        while not stop.is_set():
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            if self.in_flight >= self.max_in_flight:
                self.dropped += 1
            else:
                self.in_flight += 1
                t = asyncio.create_task(self._send(i))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            i += 1
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def rate_between(self, a: float, b: float) -> float:
        return sum(1 for t in self.done if a <= t <= b) / (b - a) if b > a else 0.0


@dataclass
class Sample:
    """One disallowed event. t0 is the event's ``origin_server_ts`` (as the homeserver
    pushed it to Enclave), t1 the moment the corporate Synapse answered 200 to Enclave's
    reject (leave as the invitee) or kick: Enclave records it as the action's
    ``applied_at``. ``remote_*``: the same removal as the outsider's own server shows it."""

    kind: str  # "invite" (-> reject) or "join" (-> kick)
    room_id: str
    subject: str  # the invitee (staff) or the joiner (outsider)
    actor: str  # the outsider
    requested_ms: int
    answered_ms: int
    error: str | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    remote_t0: int | None = None
    remote_t1: int | None = None

    @property
    def t0(self) -> int | None:
        return self.stages.get("t0")

    @property
    def t1(self) -> int | None:
        return self.stages.get("applied_ms") if self.stages.get("action_status") == \
            "applied" else None

    @property
    def done(self) -> bool:
        return bool(self.error or not self.room_id or self.stages.get("action_status")
                    in ("applied", "failed", "parked"))

    @property
    def latency_ms(self) -> int | None:
        return self.t1 - self.t0 if self.t0 is not None and self.t1 is not None else None

    async def observe(self, remote: RemoteView) -> None:
        """The event and the removal as the outsider's server has them."""
        if not self.room_id:
            return
        want = "invite" if self.kind == "invite" else "join"
        for e in await remote.memberships(self.room_id):
            if e.get("state_key") != self.subject:
                continue
            m = (e.get("content") or {}).get("membership")
            ts = int(e.get("origin_server_ts") or 0)
            if m == want and self.remote_t0 is None:
                self.remote_t0 = ts
            elif m == "leave" and self.remote_t0 is not None and self.remote_t1 is None:
                self.remote_t1 = ts


async def open_loop(n: int, rate: float, fn: Callable[[int], Awaitable[Sample]]
                    ) -> list[Sample]:
    """Start ``fn(i)`` at i/rate seconds, whether or not earlier ones finished."""
    start = time.monotonic()

    async def at(i: int) -> Sample:
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        return await fn(i)
    return list(await asyncio.gather(*(at(i) for i in range(n))))


def enclave_stages(db_path: Path, samples: list[Sample]) -> None:
    """Fill each sample's stages from Enclave's store (read-only): the event's
    ``origin_server_ts`` (t0) and when it was stored in the inbox, when the handler's
    actions were committed, when the removal was applied (the homeserver's 200)."""
    by_room = {s.room_id: s for s in samples if s.room_id and not s.done}
    if not by_room:
        return
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        marks = ",".join("?" * len(by_room))
        rows = db.execute(
            "SELECT seq, room_id, body, origin_server_ts, received_at, done_at FROM inbox "
            f"WHERE type = 'm.room.member' AND room_id IN ({marks})", list(by_room)).fetchall()
        seqs: dict[int, Sample] = {}
        for seq, room_id, body, ts, received_at, done_at in rows:
            s = by_room[room_id]
            ev = json.loads(body)
            want = "invite" if s.kind == "invite" else "join"
            if ev.get("state_key") != s.subject or \
                    (ev.get("content") or {}).get("membership") != want:
                continue
            s.stages.update(t0=ts, inbox_ms=received_at, handled_ms=done_at)
            seqs[seq] = s
        if not seqs:
            return
        marks = ",".join("?" * len(seqs))
        for seq, kind, created_at, applied_at, status in db.execute(
                f"SELECT event_seq, kind, created_at, applied_at, status FROM actions "
                f"WHERE event_seq IN ({marks}) ORDER BY position", list(seqs)):
            s = seqs[seq]
            if kind in ("leave", "kick"):
                s.stages.update(actions_ms=created_at, applied_ms=applied_at, action=kind,
                                action_status=status)
    finally:
        db.close()


async def run_reactive(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    dbname = f"synapse_sep_{uuid.uuid4().hex[:10]}"
    dsn = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    await pg_admin(f"CREATE DATABASE \"{dbname}\" ENCODING 'UTF8' LC_COLLATE='C' "
                   "LC_CTYPE='C' TEMPLATE template0")
    pair = FederatedPair.create(root / "pair", corp_database=dsn)
    for server in pair.servers:
        server.log_level = args.synapse_log_level
    enclave: EnclaveProc | None = None
    try:
        directory = root / "directory.yaml"
        names = write_people(directory, args.staff, lambda i: ["engineering"])
        config, as_port = enclave_config(
            root, server_name=pair.corp.server_name,
            shared_secret=pair.corp.registration_shared_secret, directory=directory,
            policy=reactive_policy())
        registration = root / "enclave-registration.yaml"
        await asyncio.to_thread(make_registration, config, registration)
        pair.corp.app_service_config_files = [registration]
        t = time.monotonic()
        await asyncio.to_thread(pair.start, 120)
        progress(f"federated pair up in {time.monotonic() - t:.1f}s (corp on PostgreSQL, "
                 "no gate module); starting Enclave")
        set_homeserver_url(config, pair.corp.base_url)
        await asyncio.to_thread(register_admin, pair.corp)
        enclave = EnclaveProc(config, as_port)
        t = time.monotonic()
        await enclave.start()
        progress(f"Enclave ready, {args.staff} staff provisioned, in "
                 f"{time.monotonic() - t:.1f}s")
        corp_name = pair.corp.server_name
        staff = [f"@{n}:{corp_name}" for n in names]
        token = as_token(config)
        async with aiohttp.ClientSession(json_serialize=None) as session:
            corp = MatrixClient(session, pair.corp.base_url, token, max_retries=3, timeout=60)
            # background rooms: internal (not federated), --room-members staff each
            per_room = min(args.room_members, len(staff))
            bg_rooms: list[tuple[str, list[str]]] = []
            for k in range(args.background_rooms):
                members = [staff[(k * per_room + j) % len(staff)] for j in range(per_room)]
                room = await corp.create_room(
                    {"preset": "private_chat", "name": f"team {k}", "invite": members[1:],
                     "creation_content": {"m.federate": False}}, user_id=members[0])
                await bounded(8, members[1:], lambda u, r=room: corp.join(r, user_id=u))
                bg_rooms.append((room, members))
            # external-class rooms for the kick path (public, federating)
            ext_rooms = []
            # (no gate: the creator brings Enclave's bot in with power, so it can kick)
            enclave_bot = f"@{BOT_LOCALPART}:{corp_name}"
            for k in range(args.ext_rooms * len(args.rates)):
                ext_rooms.append(await corp.create_room(
                    {"preset": "public_chat", "name": f"ext {k}",
                     "room_alias_name": f"ext-bench-{uuid.uuid4().hex[:6]}-{k}",
                     "invite": [enclave_bot],
                     "power_level_content_override": {"users": {enclave_bot: 100}}},
                    user_id=staff[k % len(staff)]))
                await corp.join(ext_rooms[-1], user_id=enclave_bot)
            outsiders = []
            for k in range(args.outsiders):
                uid, tok = await asyncio.to_thread(
                    pair.personal.register_user, f"out{k}-{uuid.uuid4().hex[:4]}", "pw-out")
                outsiders.append((uid, MatrixClient(session, pair.personal.base_url, tok,
                                                    max_retries=2, timeout=60)))
            _, personal_admin = await asyncio.to_thread(
                pair.personal.register_user, f"root-{uuid.uuid4().hex[:4]}", "pw-root", True)
            remote = RemoteView(MatrixClient(session, pair.personal.base_url, personal_admin,
                                             max_retries=2, timeout=60), personal_admin)

            meter = CpuMeter({"synapse_corp": lambda: pair.corp.pid,
                              "synapse_personal": lambda: pair.personal.pid,
                              "enclave": lambda: enclave.pid if enclave else None}, dbname)
            db_path = config.parent / "enclave.db"
            common = {"corp": corp, "corp_name": corp_name, "bg_rooms": bg_rooms,
                      "staff": staff, "outsiders": outsiders, "remote": remote,
                      "meter": meter, "db_path": db_path, "corp_log": pair.corp.log_path}
            first_contact = None
            if not args.no_first_contact:
                # every staff member's first refusal: Enclave's bot opens its notice DM with
                # them (a createRoom each), the servers fetch each other's keys; reported
                # on its own so the phases below measure the steady state
                first_contact = await reactive_phase(
                    args, -1, 0.0, samples=len(staff), kicks=0, ext_rooms=[], **common)
                await asyncio.sleep(args.settle)
            phases = []
            for p, rate in enumerate(args.rates):
                if p:
                    await asyncio.sleep(args.settle)  # the last phase's backlog, if any
                # each phase has its own external rooms, so (outsider, room) pairs are new
                rooms = ext_rooms[p * args.ext_rooms:(p + 1) * args.ext_rooms]
                phases.append(await reactive_phase(
                    args, p, rate, samples=args.samples, kicks=args.kicks, ext_rooms=rooms,
                    **common))
            version = (await corp.request("GET", "/_synapse/admin/v1/server_version",
                                          user_id=f"@{ADMIN_LOCALPART}:{corp_name}")
                       ).get("server_version")
        return {
            "synapse_version": version,
            "setup": {"corp": "Synapse on PostgreSQL, no gate module, federation on loopback",
                      "personal": "Synapse on SQLite",
                      "enclave": "python -m bridge run (SQLite store)",
                      "staff": args.staff, "outsiders": args.outsiders,
                      "background_rooms": args.background_rooms,
                      "room_members": args.room_members,
                      "rate_limits": "devstack test limits (wide open)",
                      "synapse_log_level": args.synapse_log_level},
            "first_contact": first_contact,
            "phases": phases,
        }
    finally:
        if enclave is not None:
            enclave.stop()
        await asyncio.to_thread(pair.stop)
        with contextlib.suppress(Exception):
            await pg_admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


async def reactive_phase(args: argparse.Namespace, p: int, rate: float, *,
                         samples: int, kicks: int, corp: MatrixClient, corp_name: str,
                         bg_rooms: list[tuple[str, list[str]]], ext_rooms: list[str],
                         staff: list[str], outsiders: list[tuple[str, MatrixClient]],
                         remote: RemoteView, meter: CpuMeter, db_path: Path,
                         corp_log: Path) -> dict[str, Any]:
    """One measurement at one background rate: invites, then remote joins, under load."""
    failed_rejects0 = await asyncio.to_thread(count_in_log, corp_log, FAILED_REMOTE_REJECT)
    bg = Background(corp, bg_rooms, rate)
    stop_bg = asyncio.Event()
    bg_task = asyncio.create_task(bg.run(stop_bg))
    progress("first contact: one refused invite per staff member, no background"
             if p < 0 else f"phase {p + 1}: background {rate:g} msg/s into {len(bg_rooms)} "
             f"rooms; warm-up {args.warmup:g}s")
    try:
        if rate > 0:
            await asyncio.sleep(args.warmup)
        cpu0 = meter.snapshot()
        w0 = time.monotonic()

        async def invite(i: int) -> Sample:
            uid, client = outsiders[i % len(outsiders)]
            target = staff[(i * 7 + p) % len(staff)]
            t = now_ms()
            try:
                room = await client.create_room({
                    "is_direct": True, "invite": [target], "preset": "trusted_private_chat"})
                return Sample("invite", room, target, uid, t, now_ms())
            except Exception as e:
                return Sample("invite", "", target, uid, t, now_ms(), error=str(e))

        async def join(i: int) -> Sample:
            uid, client = outsiders[i % len(outsiders)]
            room = ext_rooms[i % len(ext_rooms)]
            t = now_ms()
            try:
                await client.request("POST", f"/_matrix/client/v3/join/{q(room)}",
                                     json={}, query={"server_name": corp_name})
                return Sample("join", room, uid, uid, t, now_ms())
            except Exception as e:
                return Sample("join", room, uid, uid, t, now_ms(), error=str(e))

        progress(f"  {samples} DM invites at {args.invite_rate:g}/s")
        done = await open_loop(samples, args.invite_rate, invite)
        if kicks:
            progress(f"  {kicks} remote joins of external rooms at {args.kick_rate:g}/s")
            done += await open_loop(kicks, args.kick_rate, join)
        deadline = time.monotonic() + args.drain
        while True:
            await asyncio.to_thread(enclave_stages, db_path, done)
            pending = [s for s in done if not s.done]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        w1 = time.monotonic()
        cpu = CpuMeter.diff(cpu0, meter.snapshot())
    finally:
        stop_bg.set()
        await bg_task
    # the outsiders' side: give their server a moment to receive the last removals
    await asyncio.sleep(3.0)
    await bounded(8, done, lambda s: s.observe(remote))
    out = reactive_report(args, rate, done, bg, w0, w1, cpu, pending)
    out["corp_rejections_kept_local_only"] = await asyncio.to_thread(
        count_in_log, corp_log, FAILED_REMOTE_REJECT) - failed_rejects0
    return out


def reactive_report(args: argparse.Namespace, rate: float, samples: list[Sample],
                    bg: Background, w0: float, w1: float, cpu: dict[str, float],
                    pending: list[Sample]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "window_s": w1 - w0,
        "background": {
            "target_rate": rate, "rooms": args.background_rooms,
            "achieved_rate": bg.rate_between(w0, w1), "sent_in_window": sum(
                1 for t in bg.done if w0 <= t <= w1),
            "errors": bg.errors, "dropped_over_in_flight_cap": bg.dropped,
            "send_latency_ms": summary(bg.latency_ms)},
        "cpu": cpu,
    }
    for kind, label in (("invite", "invite_reject"), ("join", "join_kick")):
        ss = [s for s in samples if s.kind == kind]
        if not ss:
            continue
        lat = [s.latency_ms for s in ss if s.latency_ms is not None]

        def stage(a: str, b: str, ss: list[Sample] = ss) -> list[float]:
            vals = []
            for s in ss:
                st = {**s.stages, "remote_t0": s.remote_t0, "remote_t1": s.remote_t1}
                if isinstance(st.get(a), int) and isinstance(st.get(b), int):
                    vals.append(st[b] - st[a])
            return vals

        remote = [s for s in ss if s.remote_t1 is not None]
        out[label] = {
            "samples": len(ss),
            "removed": len(lat),
            "rate_per_s": args.invite_rate if kind == "invite" else args.kick_rate,
            "latency_ms": summary(lat),
            "stages_ms": {
                "t0_to_enclave_inbox": summary(stage("t0", "inbox_ms")),
                "inbox_to_actions_committed": summary(stage("inbox_ms", "handled_ms")),
                "actions_to_applied": summary(stage("handled_ms", "applied_ms")),
            },
            "outsider_side": {
                "events_found": sum(1 for s in ss if s.remote_t0 is not None),
                "removals_found": len(remote),
                "t0_matches_store": sum(1 for s in ss if s.remote_t0 is not None
                                        and s.remote_t0 == s.t0),
                "t0_to_removal_event_ts_ms": summary(stage("t0", "remote_t1")),
                "removal_missing_sample": [s.room_id for s in ss
                                    if s.t1 is not None and s.remote_t1 is None][:5],
            },
            "request_ms": summary([s.answered_ms - s.requested_ms for s in ss]),
            "request_errors": [s.error for s in ss if s.error][:5],
            "action_status": dict(_count(str(s.stages.get("action_status")) for s in ss)),
            "not_removed": [{"room": s.room_id, "subject": s.subject, **s.stages}
                            for s in ss if s.latency_ms is None and not s.error][:10],
        }
    out["unresolved"] = len(pending)
    return out


def _json_safe(x: Any) -> Any:
    """NaN (an empty percentile) as null: the results file stays strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _count(items: Any) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for x in items:
        c[x] += 1
    return c


# -- part 2: reconciliation ---------------------------------------------------------------------
RESEARCH, TRADING = "research", "trading"


def reconcile_policy() -> dict[str, Any]:
    return {
        "default_class": "internal",
        "unlisted_local_users": "external",
        "room_classes": [{"id": "internal", "federate": False}],
        "barriers": [{"id": "barrier-research-trading", "existing": "remove",
                      "between": [{"groups": [RESEARCH]}, {"groups": [TRADING]}]}],
        "notify": {"contact": "#it-help"},
        "reconcile": {"interval_minutes": 0, "max_concurrency": 8},
    }


def groups_of(n: int) -> Callable[[int], list[str]]:
    """First 10 % research, next 10 % trading, the rest engineering."""
    tenth = max(1, n // 10)
    return lambda i: [RESEARCH] if i < tenth else [TRADING] if i < 2 * tenth else [
        "engineering"]


async def make_rooms(client: MatrixClient, staff: list[str], n_staff: int, rooms: int,
                     violation_pct: float, concurrency: int, policy: Any,
                     server_name: str, analyze: Callable[[], Awaitable[None]]
                     ) -> dict[str, Any]:
    """``rooms`` rooms of 3 staff; some violating; returns what was made and expected."""
    tenth = max(1, n_staff // 10)
    bot = f"@{BOT_LOCALPART}:{server_name}"
    research, trading = staff[:tenth], staff[tenth:2 * tenth]
    eng = staff[2 * tenth:]
    n_viol = round(rooms * violation_pct / 100)
    n_unlisted = n_viol // 2
    n_pre = max(1, round(rooms * 0.005))
    contractors = [f"contractor{k:03d}" for k in range(max(1, min(n_unlisted, 20)))]
    await bounded(8, contractors, client.register_appservice_user)
    # violations spread evenly over the rooms: the first half unlisted, then barrier mixes;
    # the pre-Enclave rooms sit between them
    step = rooms / max(1, n_viol)
    violating = {int(k * step): ("unlisted" if k < n_unlisted else "barrier")
                 for k in range(n_viol)}
    pre_step = rooms / n_pre
    pre: set[int] = set()
    for k in range(n_pre):
        i = int(k * pre_step + pre_step / 2)
        while i in violating or i in pre:
            i = (i + 1) % rooms
        pre.add(i)
    plan: list[tuple[int, str, list[str], str]] = []  # (index, creator, others, kind)
    for i in range(rooms):
        creator = eng[i % len(eng)]
        mate = eng[(i + 1 + (i // len(eng)) % (len(eng) - 1)) % len(eng)]
        # ordinary rooms hold one side of the barrier at most
        side = research if i % 2 else trading
        others = [mate, side[(i // 2) % len(side)]]
        kind = violating.get(i, "pre-enclave" if i in pre else "normal")
        if kind == "unlisted":
            others.append(f"@{contractors[i % len(contractors)]}:{server_name}")
        elif kind == "barrier":
            others = [mate, research[i % len(research)], trading[i % len(trading)]]
        plan.append((i, creator, others, kind))
    made = 0
    t0 = time.monotonic()

    async def one(item: tuple[int, str, list[str], str]) -> str:
        nonlocal made
        i, creator, others, kind = item
        body: dict[str, Any] = {"preset": "private_chat", "name": f"room {i}",
                                "invite": others}
        if kind != "pre-enclave":
            # what the gate added when the room was made (before the violating member got
            # in, or before the barrier existed): the class state and m.federate false
            plain = {k: v for k, v in body.items() if k != "invite"}
            body = apply_edits(body, policy.decide_create_room(creator, plain).edits)
        room = await client.create_room(body, user_id=creator)
        if bot in body.get("invite", ()):
            # the gate invited Enclave's bot with power; it joins on the invitation
            await client.join(room, user_id=bot)
        # an invite is a membership the scan reads and decides like a join; joining every
        # room would double the set-up (here Synapse spends ~100 ms CPU on a createRoom and
        # ~70 ms on a join), so the violators and every tenth room's members join
        if kind in ("unlisted", "barrier") or i % 10 == 0:
            for u in others:
                await client.join(room, user_id=u)
        made += 1
        if made % 250 == 0:
            progress(f"  {made}/{rooms} rooms ({made / (time.monotonic() - t0):.1f}/s)")
            # a fresh database grows faster than autovacuum re-analyzes it; without
            # statistics Synapse's auth-chain queries go bad and creation slows down
            # as rooms accumulate
            await analyze()
        return room

    ids = await bounded(concurrency, plan, one)
    kinds = _count(p[3] for p in plan)
    return {"rooms": len(ids), "by_kind": dict(kinds), "seconds": time.monotonic() - t0,
            "expected_actions": kinds.get("unlisted", 0) + kinds.get("barrier", 0),
            # a pre-Enclave room federates and Enclave has no power in it: two findings
            "expected_findings": 2 * kinds.get("pre-enclave", 0)}


async def run_reconcile(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    dbname = f"synapse_sepscan_{uuid.uuid4().hex[:10]}"
    dsn = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    await pg_admin(f"CREATE DATABASE \"{dbname}\" ENCODING 'UTF8' LC_COLLATE='C' "
                   "LC_CTYPE='C' TEMPLATE template0")
    synapse = SynapseServer(base_dir=root / "synapse", server_name="corp.test", database=dsn)
    try:
        directory = root / "directory.yaml"
        names = write_people(directory, args.staff, groups_of(args.staff))
        policy = reconcile_policy()
        policy["reconcile"]["max_concurrency"] = args.concurrency
        config, _ = enclave_config(root, server_name=synapse.server_name,
                                   shared_secret=synapse.registration_shared_secret,
                                   directory=directory, policy=policy)
        loaded, secrets = await start_synapse_for(config, synapse, root)
        store = Root(loaded, secrets).stores
        await store.database.open()
        await store.database.migrate()
        await store.database.close()
        async with Root(loaded, secrets).opened() as _root:
            sync = _root.directory
            assert sync is not None
            await sync.client.register_appservice_user(BOT_LOCALPART)
            res = await sync.run(apply=True)
            if res.failed:
                raise RuntimeError(f"directory sync failed: {res.failed[:3]}")
        staff = [f"@{n}:{synapse.server_name}" for n in names]
        progress(f"Synapse on PostgreSQL up, {len(staff)} staff provisioned; making "
                 f"{args.rooms} rooms ({args.violations:g}% violating)")
        analyzing = asyncio.Lock()

        async def analyze() -> None:
            if analyzing.locked():
                return
            async with analyzing:
                await pg_admin("ANALYZE", dsn)

        async with aiohttp.ClientSession(json_serialize=None) as session, \
                Root(loaded, secrets).opened() as root0:
            svc0 = root0.separation
            assert svc0 is not None
            setup_client = MatrixClient(session, synapse.base_url, as_token(config),
                                        max_retries=5, timeout=120)
            made = await make_rooms(setup_client, staff, args.staff, args.rooms,
                                    args.violations, args.setup_concurrency,
                                    await svc0.policy(fresh=True), synapse.server_name,
                                    analyze)
        await analyze()  # as autovacuum would have by now on a server in use
        progress(f"{made['rooms']} rooms made in {made['seconds']:.0f}s "
                 f"({made['rooms'] / made['seconds']:.1f}/s): {made['by_kind']}")
        await asyncio.sleep(2.0)  # let Synapse's background work from the set-up settle
        meter = CpuMeter({"synapse": lambda: synapse.pid}, dbname)
        runs: dict[str, Any] = {}
        async with Root(loaded, secrets).opened() as _root:
            svc = _root.separation
            assert svc is not None
            req = RequestMeter(svc.client)
            scan_s = [0.0]
            inner_scan = svc.scan

            async def timed_scan(**kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await inner_scan(**kw)
                finally:
                    scan_s[0] += time.perf_counter() - t

            svc.scan = timed_scan  # type: ignore[method-assign]

            async def measured(label: str, apply: bool) -> dict[str, Any]:
                req.reset()
                scan_s[0] = 0.0
                c0 = meter.snapshot()
                t = time.perf_counter()
                result = await svc.reconcile(apply=apply)
                wall = time.perf_counter() - t
                plan = result.plan
                run = {
                    "wall_s": wall, "rooms": plan.rooms, "rooms_per_s": plan.rooms / wall,
                    "admin_calls": result.admin_calls, "requests": req.total,
                    "writes": req.writes, "scan_s": scan_s[0],
                    "diff_and_apply_s": wall - scan_s[0],
                    "actions": len(plan.actions),
                    "actions_by_kind": dict(_count(a.kind for a in plan.actions)),
                    "findings": len(plan.findings),
                    "findings_by_rule": dict(_count(f.rule_id for f in plan.findings)),
                    "applied": result.applied, "failed": len(result.failed),
                    "failures_sample": [f"{a.describe()}: {d}" for a, d in result.failed][:5],
                    "by_endpoint": req.table(),
                    "cpu": CpuMeter.diff(c0, meter.snapshot()),
                }
                progress(f"{label}: {plan.rooms} rooms in {wall:.1f}s "
                         f"({plan.rooms / wall:.0f} rooms/s), {result.admin_calls} admin "
                         f"calls, {len(plan.actions)} actions, {result.applied} applied")
                return run

            runs["plan"] = await measured("plan", False)
            if not args.no_cli:
                t = time.perf_counter()
                res = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "bridge", "separation", "--plan",
                                     "--format", "json", "-c", str(config)],
                    cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                    timeout=900)
                wall = time.perf_counter() - t
                lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
                runs["cli_plan"] = {
                    "command": "enclave separation --plan --format json",
                    "wall_s": wall, "exit_code": res.returncode,
                    "rooms_per_s": runs["plan"]["rooms"] / wall,
                    "actions": sum(1 for x in lines if "kind" in x),
                    "findings": sum(1 for x in lines if "finding" in x),
                    "stderr_tail": res.stderr[-500:] if res.returncode else ""}
                progress(f"cli --plan: {wall:.1f}s (exit {res.returncode})")
            runs["apply"] = await measured("apply", True)
            runs["replan"] = await measured("re-plan", False)
            version = await svc.client.request("GET", "/_synapse/admin/v1/server_version",
                                               user_id=svc.admin_user_id)
        return {"synapse_version": version.get("server_version"),
                "setup": {"synapse": "PostgreSQL, no federation, appservice without URL",
                          "enclave_store": "SQLite", "staff": args.staff,
                          "rate_limits": "devstack test limits (wide open)",
                          "members_per_room": "3 (creator joined; the others joined in "
                                              "violating rooms and every tenth room, else "
                                              "invited)",
                          "setup_concurrency": args.setup_concurrency,
                          "max_concurrency": args.concurrency, **made},
                "runs": runs}
    finally:
        await asyncio.to_thread(synapse.stop)
        with contextlib.suppress(Exception):
            await pg_admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


# -- report -------------------------------------------------------------------------------------
def fmt(v: Any, spec: str = ".0f") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def targets(reactive: dict[str, Any] | None,
            reconcile: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's reactive target, and the reconciliation's correctness checks."""
    out = []
    for ph in (reactive or {}).get("phases", []):
        bg = ph["background"]["achieved_rate"]
        if ph["background"]["target_rate"] < TARGET_BACKGROUND:
            continue  # a lighter phase: context, not the target
        for label in ("invite_reject", "join_kick"):
            r = ph.get(label)
            if not r:
                continue
            p99 = r["latency_ms"]["p99"]
            met = (p99 is not None and p99 == p99 and p99 <= TARGET_P99_MS
                   and r["removed"] == r["samples"] and bg >= 0.95 * TARGET_BACKGROUND)
            out.append({"target": f"reactive {label.replace('_', ' -> ')}: p99 <= 1 s with "
                                  "100 events/s of background traffic, every one removed",
                        "value": f"p99 {fmt(p99)} ms, {r['removed']}/{r['samples']} removed, "
                                 f"background {bg:.1f}/s achieved of "
                                 f"{ph['background']['target_rate']:g}",
                        "met": bool(met)})
    if reconcile:
        runs, s = reconcile["runs"], reconcile["setup"]
        plan, apply, replan = runs["plan"], runs["apply"], runs["replan"]
        out.append({"target": "reconciliation finds every planted violation and nothing else",
                    "value": f"{plan['actions']} actions / {s['expected_actions']} planted, "
                             f"{plan['findings']} findings / {s['expected_findings']} planted",
                    "met": plan["actions"] == s["expected_actions"]
                    and plan["findings"] == s["expected_findings"]})
        out.append({"target": "apply fixes them all; a re-plan finds no action",
                    "value": f"{apply['applied']} applied, {apply['failed']} failed, re-plan "
                             f"{replan['actions']} actions",
                    "met": apply["failed"] == 0 and apply["applied"] == apply["actions"]
                    and replan["actions"] == 0})
    return out


def leak_targets(leak: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 15's target: nothing readable or delivered across the boundary."""
    if not leak:
        return []
    h, j = leak["history"], leak["remote_join"]
    gate = "with" if leak["setup"]["gate"] else "without"
    return [
        {"target": f"leak ({gate} the gate): history readable by outsiders a partner "
                   "invited, who joined at once: 0",
         "value": f"{h['readable']} of {h['attempts']} attempts ({h['outsider_joined']} "
                  f"joined; removal p50 {fmt(h['reactive_removal_ms']['p50'])} ms, p99 "
                  f"{fmt(h['reactive_removal_ms']['p99'])} ms)",
         "met": h["readable"] == 0},
        {"target": f"leak ({gate} the gate): staff messages delivered into outsiders' "
                   "remote rooms: 0",
         "value": f"{j['delivered']} of {j['attempts']} attempts ({j['joined']} joins "
                  f"succeeded, {j['sends_accepted']} sends accepted)",
         "met": j["delivered"] == 0},
    ]


def print_report(meta: dict[str, Any], reactive: dict[str, Any] | None,
                 reconcile: dict[str, Any] | None, tgts: list[dict[str, Any]]) -> None:
    print()
    print(f"separation benchmark — {meta['cpus']} CPUs, load average at start "
          f"{meta['loadavg_at_start'][0]:.2f}, at end {meta['loadavg_at_end'][0]:.2f}")
    if reactive:
        st = reactive["setup"]
        print(f"\nreactive layer (Synapse {reactive['synapse_version']}; corp on PostgreSQL "
              f"without the gate, personal on SQLite; {st['staff']} staff; background in "
              f"{st['background_rooms']} rooms of {st['room_members']})")
    fc = (reactive or {}).get("first_contact")
    for ph in ([fc] if fc else []) + (reactive or {}).get("phases", []):
        bg = ph["background"]
        cpu = ph["cpu"]
        w = cpu["wall_s"]
        if ph is fc:
            print("\n  first contact: one refused invite per staff member (the bot opens its "
                  "notice DM with each), no background")
        else:
            print(f"\n  background {bg['target_rate']:g} msg/s: {bg['achieved_rate']:.1f} "
                  f"achieved "
                  f"over {ph['window_s']:.0f}s ({bg['errors']} errors, "
                  f"{bg['dropped_over_in_flight_cap']} dropped), send latency p50 "
                  f"{fmt(bg['send_latency_ms']['p50'])} ms, p99 "
                  f"{fmt(bg['send_latency_ms']['p99'])} ms")
        print(f"  machine: {cpu['machine_busy_cores']:.2f} cores busy, other programs "
              f"{cpu['other_programs_cores']:.2f}; corp Synapse {cpu['synapse_corp'] / w:.2f}, "
              f"personal {cpu['synapse_personal'] / w:.2f}, Enclave {cpu['enclave'] / w:.2f}, "
              f"PostgreSQL {cpu['postgres_backends'] / w:.2f}, bench "
              f"{cpu['bench_process'] / w:.2f}")
        print(f"  {'path':15} {'n':>4} {'removed':>7} {'p50 ms':>7} {'p90 ms':>7} "
              f"{'p99 ms':>7} {'max ms':>7}   (t0 event ts -> Synapse's 200 to the removal)")
        for label in ("invite_reject", "join_kick"):
            r = ph.get(label)
            if not r:
                continue
            lat = r["latency_ms"]
            print(f"  {label:15} {r['samples']:4d} {r['removed']:7d} {fmt(lat['p50']):>7} "
                  f"{fmt(lat['p90']):>7} {fmt(lat['p99']):>7} {fmt(lat['max']):>7}")
        print("  where the time goes (p50 / p99 ms):")
        for label in ("invite_reject", "join_kick"):
            r = ph.get(label)
            if not r:
                continue
            parts = ", ".join(f"{k} {fmt(v['p50'])}/{fmt(v['p99'])}"
                              for k, v in r["stages_ms"].items())
            print(f"    {label}: {parts}")
            o = r["outsider_side"]
            print(f"      outsider's server has {o['events_found']}/{r['samples']} events "
                  f"({o['t0_matches_store']} with the same ts) and {o['removals_found']} "
                  "removals;"
                  f" t0 -> removal event ts {fmt(o['t0_to_removal_event_ts_ms']['p50'])}/"
                  f"{fmt(o['t0_to_removal_event_ts_ms']['p99'])}")
        print(f"  rejections the corp Synapse kept local only (inviter's server refused "
              f"make_leave): {ph['corp_rejections_kept_local_only']}")
    if reconcile:
        s = reconcile["setup"]
        print(f"\nreconciliation (Synapse {reconcile['synapse_version']} on PostgreSQL; "
              f"{s['rooms']} rooms of 3 members made in {s['seconds']:.0f}s: {s['by_kind']}; "
              f"max_concurrency {s['max_concurrency']})")
        hdr = (f"  {'run':8} {'wall s':>7} {'rooms':>6} {'rooms/s':>8} {'admin':>6} "
               f"{'writes':>6} {'actions':>7} {'applied':>7} {'failed':>6} {'findings':>8} "
               f"{'scan s':>7} {'Syn CPU':>7} {'PG CPU':>6} {'own CPU':>7} {'others':>6}")
        print(hdr)
        for name, r in reconcile["runs"].items():
            if name == "cli_plan":
                continue
            c = r["cpu"]
            print(f"  {name:8} {r['wall_s']:7.2f} {r['rooms']:6d} {r['rooms_per_s']:8.0f} "
                  f"{r['admin_calls']:6d} {r['writes']:6d} {r['actions']:7d} "
                  f"{r['applied']:7d} {r['failed']:6d} {r['findings']:8d} {r['scan_s']:7.2f} "
                  f"{c['synapse']:7.1f} {c['postgres_backends']:6.1f} "
                  f"{c['bench_process']:7.1f} {c['other_programs_cores']:6.2f}")
        cli = reconcile["runs"].get("cli_plan")
        if cli:
            print(f"  `{cli['command']}`: {cli['wall_s']:.2f}s wall incl. process start "
                  f"({cli['rooms_per_s']:.0f} rooms/s), {cli['actions']} actions, "
                  f"{cli['findings']} findings, exit {cli['exit_code']}")
        print("  expected: "
              f"{s['expected_actions']} actions, {s['expected_findings']} findings")
        plan = reconcile["runs"]["plan"]
        for x in plan["by_endpoint"][:4]:
            print(f"    plan  {x['endpoint'][:60]:60} {x['count']:6d} × {x['mean_ms']:6.1f} ms")
    if tgts:
        print("\ntargets:")
        for t in tgts:
            print(f"  {'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['value']}")


async def amain(args: argparse.Namespace, root: Path) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    load0 = os.getloadavg()
    reactive = reconcile = leak = None
    try:
        if args.part in ("all", "leak"):
            leak = await run_leak(args, root / "leak")
        if args.part in ("all", "reactive"):
            reactive = await run_reactive(args, root / "reactive")
        if args.part in ("all", "reconcile"):
            reconcile = await run_reconcile(args, root / "reconcile")
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("keep", "no_json")},
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "git": git_rev(),
        "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
        "note": "2 shared cores: other programs' CPU during each window is in cpu."
                "other_programs_cores",
    }
    for part in (reactive, reconcile, leak):
        if part is not None:
            part["meta"] = meta
    tgts = targets(reactive, reconcile) + leak_targets(leak)
    print_report(meta, reactive, reconcile, tgts)
    if not args.no_json:
        # a run of one part keeps the other part's last results (each carries its meta)
        old: dict[str, Any] = {}
        if args.part != "all" and RESULTS.exists():
            with contextlib.suppress(ValueError):
                old = json.loads(RESULTS.read_text())
        reactive = reactive if reactive is not None else old.get("reactive")
        reconcile = reconcile if reconcile is not None else old.get("reconcile")
        leak = leak if leak is not None else old.get("leak")
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(_json_safe({
            "meta": meta, "reactive": reactive, "reconcile": reconcile, "leak": leak,
            "targets": targets(reactive, reconcile) + leak_targets(leak)}), indent=2,
            allow_nan=False))
        print(f"\nresults written to {RESULTS.relative_to(REPO)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "reactive", "reconcile", "leak"], default="all")
    p.add_argument("--leak-attempts", type=int, default=200,
                   help="leak check: attempts of each kind (history, remote join)")
    p.add_argument("--leak-rooms", type=int, default=10,
                   help="leak check: rooms (and lanes) of each kind")
    p.add_argument("--leak-outsiders", type=int, default=20)
    p.add_argument("--leak-gate", choices=["on", "off"], default="on",
                   help="leak check with the gate module loaded (on) or the reactive layer "
                        "alone (off)")
    p.add_argument("--staff", type=int, default=50)
    p.add_argument("--samples", type=int, default=80, help="DM invites to be rejected")
    p.add_argument("--invite-rate", type=float, default=3.0, help="DM invites per second")
    p.add_argument("--kicks", type=int, default=20, help="remote joins to be kicked")
    p.add_argument("--kick-rate", type=float, default=2.0)
    p.add_argument("--outsiders", type=int, default=8)
    p.add_argument("--ext-rooms", type=int, default=5)
    p.add_argument("--background-rate", default="100",
                   help="messages/s; a comma-separated list runs one phase per rate on the "
                        "same servers (e.g. 100,40)")
    p.add_argument("--no-first-contact", action="store_true",
                   help="skip the first-contact round (one refused invite per staff member, "
                        "reported apart) before the phases")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds between phases (the previous backlog drains)")
    p.add_argument("--background-rooms", type=int, default=4)
    p.add_argument("--room-members", type=int, default=12,
                   help="staff in each background room")
    p.add_argument("--synapse-log-level", default="INFO",
                   help="log level of both Synapses in part 1 (production default: INFO)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of background first")
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds to wait for the last removals")
    p.add_argument("--rooms", type=int, default=2000, help="rooms for the reconciliation")
    p.add_argument("--violations", type=float, default=3.0, help="percent of rooms")
    p.add_argument("--concurrency", type=int, default=8, help="policy.reconcile.max_concurrency")
    p.add_argument("--setup-concurrency", type=int, default=16,
                   help="requests in flight while making the rooms (not measured)")
    p.add_argument("--no-cli", action="store_true", help="skip `enclave separation --plan`")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 20 staff, 20 invites, 6 kicks, 200 rooms")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args()
    args.rates = [float(x) for x in str(args.background_rate).split(",") if x.strip()]
    if args.quick:
        args.staff, args.samples, args.kicks, args.rooms = 20, 20, 6, 200
        args.warmup = 2.0
    root = Path(tempfile.mkdtemp(prefix="enclave-separation-bench-"))
    for part in ("reactive", "reconcile", "leak"):
        (root / part).mkdir()
    return asyncio.run(amain(args, root))


if __name__ == "__main__":
    sys.exit(main())

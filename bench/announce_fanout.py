"""Announcement fan-out benchmark: the bots' sending path against a real Synapse with
production rate limits.

    .venv/bin/python bench/announce_fanout.py [--rooms 1000] [--dms 2000] [--e2ee-dms 100]
                                              [--compare 50] [--concurrency 32]
                                              [--database {postgres,sqlite}] [--json]

Synapse keeps its default (production) rate limits for ordinary users; Enclave's
appservice registration (made by ``enclave registration``: ``rate_limited: false``) exempts
requests made with the appservice token. Setup, not measured: the announcement bot
(``@enclave_announce``, a namespace user) creates ``--rooms`` rooms with one staff member
each and ``--dms`` bot DMs (as ``bots/bot.py`` opens them: ``private_chat``, ``is_direct``,
not federated), all through the appservice.

Measured, each timed from the first send to the last answer:

  rooms     one announcement to every room, through ``bots.sending.PlainSender`` (the
            appservice token as the bot) with ``--concurrency`` sends in flight and
            transaction ids from (announcement, occurrence, room) as ``FanOut`` derives
            them (``txn_id_for``);
  rooms-1   the same with one send at a time (how ``FanOut`` posts explicit room targets);
  resend    the rooms fan-out again with the same transaction ids (a restart that lost
            what it had sent): must create no event;
  dms       one personalised message per DM (the ``{name}`` variable), same path;
  e2ee-dms  ``--e2ee-dms`` encrypted DMs through ``bots.crypto.EncryptedSender`` (its
            device cross-signed, as Element requires); every recipient is a device with
            Element's own crypto (matrix-js-sdk + Rust crypto, "only devices signed by their
            owner", ``tests/e2ee_client``, all in one Node process) that set up its own
            cross-signing; the share of recipients whose client shows the message decrypted
            is reported (target 100%);
  nio       a plain matrix-nio bot that is NOT exempt (an ordinary account, its own
            token, ``room_send`` one room after the other, nio honouring 429
            ``retry_after_ms``) over the same first ``--compare`` rooms; extrapolated to
            ``--rooms``.

Delivery and duplicates are counted in Synapse's database (the bot's ``m.room.message``
events per room), homeserver events as ``count(*)`` on ``events`` before and after.
429s are counted by the client's ``on_rate_limited`` hook (Enclave) and by wrapping nio's
HTTP send (nio). Prints a table; ``--json`` also writes ``bench/results/
announce_fanout.json``. Asserts nothing.
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
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))

from _common import git_rev, pg_admin  # noqa: E402  (bench/ is on sys.path)

from bots.crypto import EncryptedSender  # noqa: E402
from bots.markdown import message_content  # noqa: E402
from bots.sending import PlainSender  # noqa: E402
from bridge.matrix.client import MatrixClient  # noqa: E402
from bridge.matrix.executor import txn_id_for  # noqa: E402
from devstack.synapse import SynapseServer, free_port  # noqa: E402
from tests.integration.element_client import (  # noqa: E402
    ElementClient,
    element_client_available,
)

SERVER_NAME = "corp.test"
BOT_LOCALPART = "enclave"  # the appservice's sender
ANNOUNCE_LOCALPART = "enclave_announce"  # the announcement bot (exclusive namespace)
ADMIN_LOCALPART = "enclave-admin"
MARKER = "org.enclave.announcement"
TARGET_ROOMS_S = 120.0
MEGOLM = "m.megolm.v1.aes-sha2"


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU seconds of a process so far (NaN if unknown)."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def progress(msg: str) -> None:
    print(f"… {msg}", file=sys.stderr, flush=True)


# -- the stack --------------------------------------------------------------------------------
class BenchStack:
    """Synapse (production rate limits) with Enclave's registration, and its database."""

    def __init__(self, root: Path, database: str):
        self.root = root
        self.database = database
        self.secrets = root / "secrets"
        self.secrets.mkdir()
        self.dbname = f"synapse_fanout_{uuid.uuid4().hex[:10]}"
        self.dsn = f"postgresql://postgres@127.0.0.1:5432/{self.dbname}"
        self.synapse = SynapseServer(
            base_dir=root / "synapse", server_name=SERVER_NAME, production_rate_limits=True,
            database=self.dsn if database == "postgres" else None)
        self.config = root / "enclave" / "config.yaml"
        self.registration = root / "enclave-registration.yaml"
        self._pg: Any = None

    @property
    def as_token(self) -> str:
        return (self.secrets / "as_token").read_text().strip()

    def write_config(self) -> None:
        as_port = free_port()
        cfg = {
            "homeserver": {
                "url": "http://127.0.0.1:1", "server_name": SERVER_NAME,
                "registration_shared_secret": {
                    "file": str(self.secrets / "registration_shared_secret")},
            },
            "appservice": {
                "id": "enclave", "bind_host": "127.0.0.1", "port": as_port,
                "public_url": f"http://127.0.0.1:{as_port}",
                "as_token": {"file": str(self.secrets / "as_token")},
                "hs_token": {"file": str(self.secrets / "hs_token")},
                "bot_localpart": BOT_LOCALPART,
            },
            "database": {"url": "sqlite:///enclave.db"},
        }
        (self.secrets / "registration_shared_secret").write_text(
            self.synapse.registration_shared_secret + "\n")
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    async def start(self) -> float:
        t0 = time.perf_counter()
        if self.database == "postgres":
            await pg_admin(f"CREATE DATABASE \"{self.dbname}\" ENCODING 'UTF8' "
                           "LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0")
        self.write_config()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("ENCLAVE_CONFIG", None)
        res = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", "registration", "-c", str(self.config),
             "-o", str(self.registration)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"enclave registration failed:\n{res.stderr}")
        reg = yaml.safe_load(self.registration.read_text())
        assert reg["rate_limited"] is False, reg
        self.synapse.app_service_config_files = [self.registration]
        await asyncio.to_thread(self.synapse.start, 120)
        await asyncio.to_thread(self.synapse.register_user, ADMIN_LOCALPART,
                                "not-used-" + uuid.uuid4().hex, True)
        if self.database == "postgres":
            import asyncpg
            self._pg = await asyncpg.connect(self.dsn)
        return time.perf_counter() - t0

    async def query(self, sql_pg: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read Synapse's database (PostgreSQL ``$n`` placeholders; ``?`` for SQLite)."""
        if self._pg is not None:
            return [tuple(r) for r in await self._pg.fetch(sql_pg, *args)]
        sql = sql_pg
        for i in range(len(args), 0, -1):
            sql = sql.replace(f"${i}", "?")

        def run() -> list[tuple[Any, ...]]:
            db = sqlite3.connect(f"file:{self.synapse.base_dir / 'homeserver.db'}?mode=ro",
                                 uri=True, timeout=30)
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        return await asyncio.to_thread(run)

    async def events(self) -> int:
        return int((await self.query("SELECT count(*) FROM events"))[0][0])

    async def settled_events(self, within: float = 120.0) -> int:
        """The event count once it stopped moving for a second."""
        t0 = time.perf_counter()
        last = await self.events()
        while time.perf_counter() - t0 < within:
            await asyncio.sleep(1.0)
            now = await self.events()
            if now == last:
                return now
            last = now
        return last

    async def messages_per_room(self, sender: str, event_type: str,
                                rooms: Sequence[str]) -> dict[str, int]:
        wanted = set(rooms)
        rows = await self.query(
            "SELECT room_id, count(*) FROM events WHERE sender = $1 AND type = $2 "
            "GROUP BY room_id", sender, event_type)
        return {r: int(n) for r, n in rows if r in wanted}

    async def close(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                await self._pg.close()
        await asyncio.to_thread(self.synapse.stop)
        if self.database == "postgres":
            with contextlib.suppress(Exception):
                await pg_admin(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')


# -- setup (through the appservice: exempt, not measured) -------------------------------------
async def bounded(n: int, items: Sequence[Any], fn: Callable[[Any], Awaitable[Any]]) -> list:
    sem = asyncio.Semaphore(n)

    async def one(x: Any) -> Any:
        async with sem:
            return await fn(x)
    return await asyncio.gather(*(one(x) for x in items))


async def register(c: MatrixClient, localparts: Sequence[str]) -> None:
    async def one(lp: str) -> None:
        await c.register_appservice_user(lp)
    await bounded(16, localparts, one)


async def make_rooms(c: MatrixClient, bot: str, members: Sequence[str], *, dm: bool,
                     encrypted: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """One room per member, made by the bot, the member joined (``extra`` users too)."""
    async def one(member: str) -> str:
        body: dict[str, Any] = {"preset": "private_chat", "invite": [member, *extra],
                                "creation_content": {"m.federate": False}}
        if dm:
            body.update({"is_direct": True, "name": "Announcements"})
        else:
            body["name"] = f"team {member.split(':')[0][1:]}"
        if encrypted:
            body["initial_state"] = [{"type": "m.room.encryption", "state_key": "",
                                      "content": {"algorithm": MEGOLM}}]
        room = await c.create_room(body, user_id=bot)
        for u in (member, *extra):
            await c.join(room, user_id=u)
        return room
    return await bounded(16, members, one)


# -- the measured fan-outs --------------------------------------------------------------------
class Counter429:
    def __init__(self) -> None:
        self.n = 0

    def hit(self) -> None:
        self.n += 1


async def fan_out(send: Callable[[str, dict[str, Any], str], Awaitable[str]],
                  rooms: Sequence[str], content_for: Callable[[int, str], dict[str, Any]],
                  occurrence: str, concurrency: int) -> dict[str, Any]:
    """Send one message per room with ``concurrency`` in flight; time and collect."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    event_ids: dict[str, str] = {}

    async def one(i: int, room: str) -> None:
        async with sem:
            txn = txn_id_for(f"announcement/bench-ann/{occurrence}/{room}")
            t0 = time.perf_counter()
            try:
                event_ids[room] = await send(room, content_for(i, room), txn)
            except Exception as e:  # counted, not raised: the bench reports failures
                errors.append(f"{room}: {type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, r) for i, r in enumerate(rooms)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "sent": len(event_ids), "errors": len(errors),
            "errors_sample": errors[:5], "msgs_per_s": len(event_ids) / wall if wall else 0,
            "latency_ms": {"p50": pct(latencies, 50) * 1000, "p95": pct(latencies, 95) * 1000,
                           "max": max(latencies, default=0) * 1000},
            "event_ids": event_ids}


async def verify(stack: BenchStack, sender: str, event_type: str, rooms: Sequence[str],
                 before_events: int, result: dict[str, Any], *,
                 expected_per_room: int = 1) -> dict[str, Any]:
    after = await stack.settled_events()
    per_room = await stack.messages_per_room(sender, event_type, rooms)
    delivered = sum(1 for r in rooms if per_room.get(r, 0) >= expected_per_room)
    duplicates = sum(max(0, per_room.get(r, 0) - expected_per_room) for r in rooms)
    return {**{k: v for k, v in result.items() if k != "event_ids"},
            "rooms": len(rooms), "delivered": delivered,
            "delivered_pct": 100.0 * delivered / len(rooms) if rooms else 0.0,
            "duplicates": duplicates, "events_created": after - before_events}


def content_for_room(_i: int, _room: str) -> dict[str, Any]:
    return message_content(
        "**Office closed on Friday 4 December**\n\nThe building is closed for maintenance; "
        "please work from home. React with ✅ to acknowledge.",
        extra={MARKER: {"id": "bench-ann", "occurrence": "occ-1", "require_ack": True}})


def content_for_dm(i: int, _room: str) -> dict[str, Any]:
    return message_content(
        f"Hello Person {i},\n\n**Your annual security training is due.** Please complete "
        "it by Friday. Reply `!ack` when done.",
        extra={MARKER: {"id": "bench-ann", "occurrence": "occ-1", "require_ack": True}})


async def run_enclave(stack: BenchStack, c: MatrixClient, hits: Counter429, bot: str,
                      rooms: Sequence[str], label: str, content_for: Callable[..., dict],
                      occurrence: str, concurrency: int, *, expected_per_room: int = 1,
                      sender: Any = None) -> dict[str, Any]:
    sender = sender or PlainSender(c)
    before = await stack.settled_events()
    hits.n = 0
    cpu0 = cpu_seconds(stack.synapse.pid)

    async def send(room: str, content: dict[str, Any], txn: str) -> str:
        return await sender.send(room, content, txn_id=txn, sender=bot)

    progress(f"{label}: {len(rooms)} rooms, {concurrency} in flight")
    res = await fan_out(send, rooms, content_for, occurrence, concurrency)
    res["synapse_cpu_s"] = cpu_seconds(stack.synapse.pid) - cpu0
    res["http_429"] = hits.n
    event_type = "m.room.encrypted" if isinstance(sender, EncryptedSender) else "m.room.message"
    out = await verify(stack, bot, event_type, rooms, before, res,
                       expected_per_room=expected_per_room)
    out["run"] = label
    out["concurrency"] = concurrency
    out["_event_ids"] = res["event_ids"]
    progress(f"{label}: {out['wall_s']:.1f}s, {out['delivered']}/{len(rooms)} delivered, "
             f"{out['duplicates']} duplicates, {out['http_429']} 429s")
    return out


async def run_nio_bot(stack: BenchStack, c: MatrixClient, rooms: Sequence[str],
                      bot_user: str, bot_token: str, target_rooms: int) -> dict[str, Any]:
    """The ordinary way: a nio bot with its own account token, one room after the other."""
    import nio

    before = await stack.settled_events()
    client = nio.AsyncClient(stack.synapse.base_url, bot_user)
    client.access_token = bot_token
    client.user_id = bot_user
    status_429 = 0
    waits: list[float] = []
    inner = client.send

    async def counting_send(*a: Any, **kw: Any) -> Any:
        nonlocal status_429
        resp = await inner(*a, **kw)
        if resp.status == 429:
            status_429 += 1
            with contextlib.suppress(Exception):
                waits.append((await resp.json()).get("retry_after_ms", 0) / 1000)
        return resp

    client.send = counting_send  # type: ignore[method-assign]
    progress(f"nio bot (not exempt): {len(rooms)} rooms one after the other "
             f"(production rc_message: expect ~5 s per message after a burst of 10)")
    sent_at: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    try:
        for room in rooms:
            resp = await client.room_send(
                room, "m.room.message", content_for_room(0, room),
                tx_id=txn_id_for(f"nio/bench-ann/occ-1/{room}"))
            if isinstance(resp, nio.RoomSendResponse):
                sent_at.append(time.perf_counter() - t0)
            else:
                errors.append(str(resp))
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    res = {"wall_s": wall, "sent": len(sent_at), "errors": len(errors),
           "errors_sample": errors[:5], "msgs_per_s": len(sent_at) / wall if wall else 0,
           "http_429": status_429, "retry_after_s_total": sum(waits),
           "retry_after_s_mean": statistics.fmean(waits) if waits else 0.0}
    out = await verify(stack, bot_user, "m.room.message", rooms, before, res)
    # extrapolate from the steady state after the initial burst
    burst = next((i for i in range(1, len(sent_at)) if sent_at[i] - sent_at[i - 1] > 1.0),
                 len(sent_at))
    steady = sent_at[burst:]
    if len(steady) >= 2:
        per_msg = (steady[-1] - sent_at[burst - 1]) / len(steady)
        est = sent_at[burst - 1] + (target_rooms - burst) * per_msg
    else:
        per_msg, est = float("nan"), float("nan")
    out.update({"run": "nio", "concurrency": 1, "burst": burst,
                "steady_s_per_msg": per_msg, f"extrapolated_{target_rooms}_rooms_s": est})
    progress(f"nio: {wall:.1f}s for {len(rooms)} rooms, {status_429} 429s")
    return out


async def e2ee_recipients(stack: BenchStack, c: MatrixClient, users: Sequence[str],
                          store: Path) -> tuple[ElementClient, list[ElementClient]]:
    """A device with Element's crypto per user, all in one Node process: the session comes
    from the appservice login (no passwords here); the client sets up the user's
    cross-signing (a first upload needs no interactive auth) and syncs."""
    why = element_client_available()
    if why is not None:
        raise RuntimeError(f"the Element client cannot run: {why}")
    node = await ElementClient.start(store, "recipients")

    async def one(user: str) -> ElementClient:
        body = await c.request("POST", "/_matrix/client/v3/login", json={
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": user}})
        device = node.device(user)
        await device.login(stack.synapse.base_url, user, device_id=body["device_id"],
                           access_token=body["access_token"])
        return device
    return node, await bounded(4, users, one)


async def decrypted_by(clients: Sequence[ElementClient], rooms: Sequence[str],
                       event_ids: dict[str, str], bot: str,
                       within: float = 120.0) -> dict[str, Any]:
    """How many recipients' Element clients show their message decrypted (each waits until
    it does or ``within`` has passed); the failure codes of the others."""
    t0 = time.perf_counter()
    pending = {cl.user_id: (cl, room) for cl, room in zip(clients, rooms, strict=True)
               if room in event_ids}
    failures: dict[str, str] = {}
    ok = 0
    while pending and time.perf_counter() - t0 < within:
        for user, (cl, room) in list(pending.items()):
            for ev in await cl.events(room):
                if ev["event_id"] != event_ids[room] or ev["sender"] != bot:
                    continue
                if str(ev["content"].get("body", "")).startswith("Hello Person"):
                    ok += 1
                    pending.pop(user)
                    failures.pop(user, None)
                else:
                    failures[user] = str(ev["decryption_failure"])
        if pending:
            await asyncio.sleep(1.0)
    for user in pending:
        failures.setdefault(user, "message not shown")
    codes: dict[str, int] = {}
    for code in failures.values():
        codes[code] = codes.get(code, 0) + 1
    return {"recipients": len(clients), "decrypted": ok,
            "decrypted_pct": 100.0 * ok / len(clients) if clients else 0.0,
            "not_decrypted": codes, "waited_s": time.perf_counter() - t0}


# -- report -----------------------------------------------------------------------------------
def print_report(meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    print()
    print(f"announcement fan-out: Synapse {meta['synapse_version']} on {meta['database']} "
          f"with production rate limits; Enclave's appservice rate_limited: false; "
          f"{meta['cpus']} CPUs")
    hdr = (f"{'run':9} {'rooms':>6} {'in flight':>9} {'wall s':>8} {'msg/s':>7} "
           f"{'delivered':>10} {'dupl.':>6} {'429s':>5} {'events':>7} {'p50 ms':>7} "
           f"{'p95 ms':>7} {'Syn CPU s':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in runs:
        lat = r.get("latency_ms", {})
        print(f"{r['run']:9} {r['rooms']:6d} {r['concurrency']:9d} {r['wall_s']:8.1f} "
              f"{r['msgs_per_s']:7.1f} {r['delivered_pct']:9.1f}% {r['duplicates']:6d} "
              f"{r['http_429']:5d} {r['events_created']:7d} {lat.get('p50', float('nan')):7.0f} "
              f"{lat.get('p95', float('nan')):7.0f} "
              f"{r.get('synapse_cpu_s', float('nan')):9.1f}")
    print()
    for r in runs:
        if r.get("errors"):
            print(f"{r['run']}: {r['errors']} errors, e.g. {r['errors_sample'][:2]}")
        if r["run"] == "resend":
            print(f"resend: same event ids as the first pass: {r.get('same_event_ids')}")
        if r["run"] == "e2ee-dms":
            d = r.get("decrypted_by") or {}
            print(f"e2ee-dms: shown decrypted by {d.get('decrypted')}/{d.get('recipients')} "
                  f"recipients' Element clients ({d.get('decrypted_pct', 0):.1f}%; target "
                  f"100%); not decrypted: {d.get('not_decrypted')}")
        if r["run"] == "nio":
            key = next(k for k in r if k.startswith("extrapolated_"))
            print(f"nio: burst {r['burst']} then {r['steady_s_per_msg']:.2f} s/message, "
                  f"{r['http_429']} 429s honoured ({r['retry_after_s_total']:.0f} s asked); "
                  f"{key.split('_')[1]} rooms ≈ {r[key] / 60:.1f} min")
    rooms = next((r for r in runs if r["run"] == "rooms"), None)
    if rooms:
        met = rooms["wall_s"] <= TARGET_ROOMS_S and rooms["delivered_pct"] == 100.0 \
            and rooms["duplicates"] == 0
        print(f"\ntarget: {rooms['rooms']} rooms ≤ {TARGET_ROOMS_S:.0f} s, 100% delivered, "
              f"0 duplicates: {'MET' if met else 'NOT MET'} ({rooms['wall_s']:.1f} s)")


async def amain(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # nio warns once per device it has no Olm session with yet (before claiming one), and
    # once per 429 it honours (counted here anyway)
    logging.getLogger("nio").setLevel(logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="enclave-fanout-bench-"))
    stack = BenchStack(root, args.database)
    runs: list[dict[str, Any]] = []
    setup: dict[str, float] = {}
    e2ee_clients: list[ElementClient] = []
    node: ElementClient | None = None
    sender: EncryptedSender | None = None
    try:
        setup["synapse_start_s"] = await stack.start()
        version = (await asyncio.to_thread(
            stack.synapse.request, "GET", "/_synapse/admin/v1/server_version"))
        hits = Counter429()
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(64, args.concurrency * 2))) as http:
            c = MatrixClient(http, stack.synapse.base_url, stack.as_token, max_retries=8,
                             timeout=120, on_rate_limited=hits.hit)
            bot = f"@{ANNOUNCE_LOCALPART}:{SERVER_NAME}"
            n_staff = max(args.rooms, args.dms)
            staff = [f"@bench-staff-{i:05d}:{SERVER_NAME}" for i in range(n_staff)]
            e2ee_staff = [f"@bench-e2ee-{i:05d}:{SERVER_NAME}" for i in range(args.e2ee_dms)]
            t0 = time.perf_counter()
            await register(c, [ANNOUNCE_LOCALPART]
                           + [u.split(":")[0][1:] for u in staff + e2ee_staff])
            setup["register_s"] = time.perf_counter() - t0
            progress(f"setup: {len(staff) + len(e2ee_staff)} users in "
                     f"{setup['register_s']:.1f}s; creating rooms")
            # the ordinary (not exempt) bot: a normal account in the first rooms
            nio_lp = f"plainbot-{uuid.uuid4().hex[:6]}"
            nio_user, nio_token = await asyncio.to_thread(
                stack.synapse.register_user, nio_lp, "pw-" + nio_lp)
            t0 = time.perf_counter()
            compare = min(args.compare, args.rooms)
            rooms = await make_rooms(c, bot, staff[:compare], dm=False, extra=[nio_user])
            rooms += await make_rooms(c, bot, staff[compare:args.rooms], dm=False)
            setup["rooms_s"] = time.perf_counter() - t0
            progress(f"setup: {len(rooms)} rooms in {setup['rooms_s']:.1f}s")
            t0 = time.perf_counter()
            dms = await make_rooms(c, bot, staff[:args.dms], dm=True)
            setup["dms_s"] = time.perf_counter() - t0
            progress(f"setup: {len(dms)} DMs in {setup['dms_s']:.1f}s")
            e2ee_dms: list[str] = []
            if e2ee_staff:
                t0 = time.perf_counter()
                node, e2ee_clients = await e2ee_recipients(stack, c, e2ee_staff, root / "e2ee")
                e2ee_dms = await make_rooms(c, bot, e2ee_staff, dm=True, encrypted=True)
                setup["e2ee_dms_s"] = time.perf_counter() - t0
                progress(f"setup: {len(e2ee_dms)} encrypted DMs with E2EE recipients in "
                         f"{setup['e2ee_dms_s']:.1f}s")

            if rooms:
                first = await run_enclave(stack, c, hits, bot, rooms, "rooms", content_for_room,
                                          "occ-1", args.concurrency)
                runs.append(first)
                resend = await run_enclave(stack, c, hits, bot, rooms, "resend",
                                           content_for_room, "occ-1", args.concurrency)
                resend["same_event_ids"] = resend["_event_ids"] == first["_event_ids"]
                runs.append(resend)
                if not args.skip_serial:
                    # a second occurrence, one at a time: 2 messages per room afterwards
                    runs.append(await run_enclave(stack, c, hits, bot, rooms, "rooms-1",
                                                  content_for_room, "occ-2", 1,
                                                  expected_per_room=2))
            if dms:
                runs.append(await run_enclave(stack, c, hits, bot, dms, "dms", content_for_dm,
                                              "occ-1", args.concurrency))
            if e2ee_dms:
                sender = EncryptedSender(c, homeserver_url=stack.synapse.base_url,
                                         user_id=bot, store_dir=root / "crypto" / "announce",
                                         ready_timeout=120,
                                         appservice_sender=f"@{BOT_LOCALPART}:{SERVER_NAME}")
                t0 = time.perf_counter()
                await sender.start()
                ready = await sender.wait_ready()
                setup["e2ee_device_ready_s"] = time.perf_counter() - t0
                if not ready:
                    raise RuntimeError("the bot's E2EE device did not become ready")
                r = await run_enclave(stack, c, hits, bot, e2ee_dms, "e2ee-dms",
                                      content_for_dm, "occ-1", args.concurrency, sender=sender)
                r["decrypted_by"] = await decrypted_by(e2ee_clients, e2ee_dms, r["_event_ids"],
                                                       bot)
                runs.append(r)
            if compare and not args.skip_nio:
                runs.append(await run_nio_bot(stack, c, rooms[:compare], nio_user, nio_token,
                                              args.rooms))
    finally:
        if sender is not None:
            await sender.close()
        if node is not None:
            await node.close()
        await stack.close()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    for r in runs:
        r.pop("_event_ids", None)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rooms": args.rooms, "dms": args.dms, "e2ee_dms": args.e2ee_dms,
        "compare": args.compare, "concurrency": args.concurrency,
        "database": "postgresql" if args.database == "postgres" else "sqlite",
        "synapse_version": version.get("server_version"),
        "rate_limits": "Synapse defaults (rc_message 0.2/s, burst 10) for ordinary users; "
                       "appservice rate_limited: false",
        "sending_path": "bots.sending.PlainSender over bridge.matrix.client.MatrixClient "
                        "(appservice token), txn ids bridge.matrix.executor.txn_id_for; "
                        "E2EE: bots.crypto.EncryptedSender",
        "setup_s": setup, "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "git": git_rev(), "loadavg_at_end": os.getloadavg(),
    }
    print_report(meta, runs)
    if args.json:
        path = BENCH / "results" / (args.output or "announce_fanout.json")
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2, default=str))
        print(f"results written to {path.relative_to(REPO)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rooms", type=int, default=1000)
    p.add_argument("--dms", type=int, default=2000)
    p.add_argument("--e2ee-dms", type=int, default=100,
                   help="encrypted DMs with real E2EE recipients (0: skip)")
    p.add_argument("--compare", type=int, default=50,
                   help="rooms for the non-exempt matrix-nio bot (0: skip)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    p.add_argument("--skip-serial", action="store_true", help="no one-at-a-time pass")
    p.add_argument("--skip-nio", action="store_true")
    p.add_argument("--json", action="store_true",
                   help="also write bench/results/announce_fanout.json (or --output)")
    p.add_argument("--output", help="file name under bench/results/")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

"""Helpers of the bot tests: configs with a file directory and ``bots:``, Enclave in-process
with a controllable clock, staff logging in with matrix-nio, reading what the bots sent."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from bots.announcements.spec import MARKER
from bots.store import AnnouncementStore
from bots.wiring import BOTS, BotsRuntime
from bridge.app import SERVICES, Services, build_app, wall_clock_ms
from bridge.config import check_secrets, load_config

from .harness import SERVER_NAME, Stack, nio, wait_until

NAMESPACE = "enclave_"
ANNOUNCE_BOT = f"@{NAMESPACE}announce:{SERVER_NAME}"
WELCOME_BOT = f"@{NAMESPACE}welcome:{SERVER_NAME}"


def uid(localpart: str) -> str:
    return f"@{localpart}:{SERVER_NAME}"


def person(pid: str, username: str, department: str, **extra: Any) -> dict[str, Any]:
    return {"id": pid, "username": username, "display_name": username.title() + " Test",
            "department": department, "initial_password": f"pw-{username}", **extra}


def write_people(base: Path, people: list[dict[str, Any]],
                 groups: list[dict[str, Any]] | None = None) -> None:
    (base / "directory.yaml").write_text(
        yaml.safe_dump({"people": people, "groups": groups or []}, sort_keys=False))


def write_bots_config(stack: Stack, base: Path, people: list[dict[str, Any]], *,
                      bots: dict[str, Any], groups: list[dict[str, Any]] | None = None,
                      managed_rooms: list[dict[str, Any]] | None = None) -> Path:
    """An Enclave config for ``stack`` with a file directory of ``people`` and ``bots``."""
    base.mkdir(parents=True, exist_ok=True)
    write_people(base, people, groups)
    path = stack.write_enclave_config(base / "config.yaml")
    cfg = yaml.safe_load(path.read_text())
    cfg["directory"] = {
        "source": {"type": "file", "path": str(base / "directory.yaml"),
                   "allow_initial_passwords": True},
        "interval_minutes": 0,
        "safety": {"max_deactivations": 50, "max_deactivation_percent": 100},
        "managed_rooms": managed_rooms or [],
    }
    cfg["bots"] = bots
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


class Clock:
    """The injected clock (ms): tests move it; Enclave reads it for every decision."""

    def __init__(self, t: int | None = None):
        self.t = t if t is not None else wall_clock_ms()

    def __call__(self) -> int:
        return self.t


class InProcessEnclave:
    """``build_app`` served on the stack's appservice port inside the test's event loop, so
    the test injects the clock and drives the bots' ``tick()``."""

    def __init__(self, config: Path, port: int, clock: Clock):
        self.config = config
        self.port = port
        self.clock = clock
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None

    async def start(self) -> None:
        loaded = load_config(self.config)
        secrets = check_secrets(loaded)
        self.app = await build_app(loaded, secrets, clock_ms=self.clock)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def svc(self) -> Services:
        assert self.app is not None
        return self.app[SERVICES]

    @property
    def bots(self) -> BotsRuntime:
        assert self.app is not None
        return self.app[BOTS]

    @property
    def announcements(self) -> AnnouncementStore:
        """The bots' own store (announcements), on Enclave's database."""
        return self.bots.services.announcements

    async def wait_directory(self, within: float = 60) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            st = self.svc.directory_status
            return st if st.get("outcome") else None

        status = await wait_until(done, within=within, what="the start-up directory sync")
        assert status["outcome"] == "ok", status
        return status

    async def wait_bots_ready(self, within: float = 60) -> None:
        for bot in self.bots.bots:
            await asyncio.wait_for(bot.ready.wait(), within)

    async def wait_idle(self, within: float = 30) -> None:
        """The inbox has nothing pending (replies and acks decided and applied)."""
        async def idle() -> bool:
            stats = await self.svc.stores.inbox.inbox_stats()
            return (stats["events"]["pending"] == 0 and not stats["journaled_transactions"]
                    and not stats["actions"].get("pending"))

        await wait_until(idle, within=within, what="an idle inbox")


async def login(stack: Stack, username: str) -> nio.AsyncClient:
    """A staff member logged in with matrix-nio (evaluation password of the file)."""
    client = nio.AsyncClient(stack.synapse.base_url, uid(username))
    resp = await client.login(f"pw-{username}")
    assert isinstance(resp, nio.LoginResponse), resp
    return client


async def sync(client: nio.AsyncClient) -> nio.SyncResponse:
    resp = await client.sync(timeout=0, full_state=True)
    assert isinstance(resp, nio.SyncResponse), resp
    return resp


async def bot_messages(stack: Stack, room_id: str, bot: str = ANNOUNCE_BOT
                       ) -> list[dict[str, Any]]:
    """Every message ``bot`` sent in a room (admin API), oldest first."""
    return [e for e in await stack.room_messages(room_id) if e.get("sender") == bot]


async def announcement_copies(stack: Stack, user_id: str, announcement_id: str,
                              occurrence_id: str | None = None) -> list[tuple[str, str]]:
    """(room, event) of every copy of an announcement in any room ``user_id`` is in."""
    q = urllib.parse.quote
    rooms = (await stack.hs("GET", f"/_synapse/admin/v1/users/{q(user_id)}/joined_rooms")
             )["joined_rooms"]
    out = []
    for room in rooms:
        for e in await stack.room_messages(room):
            m = (e.get("content") or {}).get(MARKER)
            if m and m.get("id") == announcement_id and (
                    occurrence_id is None or m.get("occurrence") == occurrence_id):
                out.append((room, e["event_id"]))
    return out


async def joined_rooms(stack: Stack, user_id: str) -> list[str]:
    q = urllib.parse.quote
    return (await stack.hs("GET", f"/_synapse/admin/v1/users/{q(user_id)}/joined_rooms")
            )["joined_rooms"]


def enclave_db_rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read Enclave's SQLite database from outside (read-only; WAL lets it run meanwhile)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    finally:
        con.close()


def pretty(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]


_CROSS_SIGNING: dict[str, Any] = {}


async def cross_sign(client: nio.AsyncClient) -> None:
    """Give a nio staff client's user a cross-signing identity (first device: new keys,
    further devices: the same keys) and sign the client's device with it, as Element does
    at sign-in: without it, the bots (Element's rule) do not count the device as reached."""
    import aiohttp

    from bots.cross_signing import CrossSigningKeys

    user = client.user_id
    headers = {"Authorization": f"Bearer {client.access_token}"}
    base = client.homeserver.rstrip("/") + "/_matrix/client/v3/keys"
    async with aiohttp.ClientSession(headers=headers) as http:
        keys = _CROSS_SIGNING.get(user)
        if keys is None:
            keys = _CROSS_SIGNING[user] = CrossSigningKeys.generate()
            async with http.post(f"{base}/device_signing/upload",
                                 json=keys.upload_body(user)) as r:
                assert r.status == 200, await r.text()
        async with http.post(f"{base}/query",
                             json={"device_keys": {user: [client.device_id]}}) as r:
            device = (await r.json())["device_keys"][user][client.device_id]
        async with http.post(f"{base}/signatures/upload", json={
                user: {client.device_id: keys.device_signature(device, user)}}) as r:
            body = await r.json()
            assert r.status == 200 and not body.get("failures"), body

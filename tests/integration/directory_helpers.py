"""Helpers for the directory-sync tests: an Enclave sync against a real Synapse."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from bridge.config import check_secrets, load_config
from bridge.directory.sync import DirectorySync
from bridge.root import Root

from .harness import SERVER_NAME, Stack

ADMIN_LOCALPART = "enclave-admin"


def uid(localpart: str) -> str:
    return f"@{localpart}:{SERVER_NAME}"


def ensure_enclave_admin(stack: Stack) -> None:
    """What Enclave's start-up does: its admin identity, a server admin."""
    try:
        stack.synapse.register_user(ADMIN_LOCALPART, "not-used-" + ADMIN_LOCALPART, admin=True)
    except RuntimeError as e:
        if "M_USER_IN_USE" not in str(e) and "taken" not in str(e):
            raise


def write_config(stack: Stack, base: Path, directory: dict[str, Any], *,
                 database: str = "sqlite:///enclave.db") -> Path:
    path = stack.write_enclave_config(base / "config.yaml", database=database)
    cfg = yaml.safe_load(path.read_text())
    cfg["directory"] = directory
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def open_sync(config: Path) -> AsyncIterator[DirectorySync]:
    loaded = load_config(config)
    secrets = check_secrets(loaded)
    # the CLI's path: the store must be migrated first (enclave migrate / enclave run)
    store = Root(loaded, secrets).stores
    await store.database.open()
    await store.database.migrate()
    await store.database.close()
    async with Root(loaded, secrets).opened() as _root:
        sync = _root.directory
        assert sync is not None
        yield sync


async def account(stack: Stack, user_id: str) -> dict[str, Any] | None:
    try:
        return await stack.hs("GET", f"/_synapse/admin/v2/users/{urllib.parse.quote(user_id)}")
    except RuntimeError as e:
        if "404" in str(e) or "M_NOT_FOUND" in str(e):
            return None
        raise


async def members(stack: Stack, room_id: str) -> dict[str, str]:
    state = await stack.hs("GET", f"/_synapse/admin/v1/rooms/{urllib.parse.quote(room_id)}"
                                  "/state")
    return {e["state_key"]: e["content"].get("membership") for e in state["state"]
            if e["type"] == "m.room.member"}


async def room_state(stack: Stack, room_id: str, event_type: str,
                     state_key: str = "") -> dict[str, Any] | None:
    state = await stack.hs("GET", f"/_synapse/admin/v1/rooms/{urllib.parse.quote(room_id)}"
                                  "/state")
    for e in state["state"]:
        if e["type"] == event_type and e["state_key"] == state_key:
            return e["content"]
    return None


def joined(m: dict[str, str]) -> set[str]:
    return {u for u, s in m.items() if s == "join"}


def homeserver_event_count(stack: Stack) -> int:
    """Events stored by Synapse (its SQLite database): what a run cost the homeserver."""
    db = stack.synapse.base_dir / "homeserver.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        con.close()


async def settled_event_count(stack: Stack, *, within: float = 30.0) -> int:
    """The event count once it stopped moving for a second (deactivation parts rooms in the
    background, after the admin API has answered)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = homeserver_event_count(stack)
    while loop.time() < deadline:
        await asyncio.sleep(1.0)
        now = homeserver_event_count(stack)
        if now == last:
            return now
        last = now
    raise AssertionError("the homeserver kept creating events for 30 s")

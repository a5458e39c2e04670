"""Fixtures for tests with two federating homeservers (see devstack/federation.py).

* ``federation`` (module scope) — a :class:`Federation`: a started
  :class:`~devstack.federation.FederatedPair` whose corporate server (``corp``,
  server name ``127.0.0.1:PORT``) carries Enclave's registration as a harness
  :class:`~tests.integration.harness.Stack` (``federation.stack``, usable with the
  ``enclave_factory`` fixture), with Enclave's admin identity made a server admin. The
  personal server (``personal``, ``127.0.0.2:PORT``) holds the external contacts.
* ``federation_options`` (module scope) — keyword arguments for
  :meth:`FederatedPair.create`: ``corp_extra_config`` (e.g. ``{"modules": [...]}``),
  ``personal_extra_config``, ``restrict_to_pair``, extra
  ``corp_app_service_config_files``. Override it in a test module to get a pair
  configured differently (one pair per module).
* ``new_corp_user`` / ``new_personal_user`` — ``await new_corp_user("alice")``: a freshly
  registered user on that side as a matrix-nio client, closed after the test.

Helpers for tests: :func:`sync_until`, :func:`wait_invite`, :func:`wait_message`,
:func:`enclave_inbox_events`, and :meth:`Federation.join_via` (a join naming the server
to join through, which nio's ``join`` cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.federation import FederatedPair
from devstack.synapse import SynapseServer

from ..directory_helpers import ensure_enclave_admin
from ..harness import EnclaveProcess, Stack, nio, wait_until

NewUser = Callable[[str], Awaitable[nio.AsyncClient]]


class CorpStaff:
    """Staff of the corporate server as nio clients, for a test set-up that has the
    federated ``pair`` and collects its ``clients`` (closed by the fixture)."""

    pair: FederatedPair
    clients: list[nio.AsyncClient]

    @property
    def corp_name(self) -> str:
        return self.pair.corp.server_name

    def uid(self, name: str) -> str:
        return f"@{name}:{self.corp_name}"

    async def staff(self, name: str) -> nio.AsyncClient:
        c = nio.AsyncClient(self.pair.corp.base_url, self.uid(name))
        resp = await c.login(f"pw-{name}")
        assert isinstance(resp, nio.LoginResponse), resp
        self.clients.append(c)
        return c


@dataclass
class Federation:
    """A running federated pair with Enclave's corporate stack on ``corp``."""

    pair: FederatedPair
    stack: Stack

    @property
    def corp(self) -> SynapseServer:
        """The corporate homeserver (Enclave's)."""
        return self.pair.corp

    @property
    def personal(self) -> SynapseServer:
        """The personal homeserver of the external contacts."""
        return self.pair.personal

    async def _new_user(self, server: SynapseServer, name: str) -> nio.AsyncClient:
        localpart = f"{name}-{uuid.uuid4().hex[:6]}"
        user_id, token = await asyncio.to_thread(
            server.register_user, localpart, f"pw-{localpart}")
        client = nio.AsyncClient(server.base_url, user_id)
        client.access_token = token
        client.user_id = user_id
        return client

    async def new_corp_user(self, name: str) -> nio.AsyncClient:
        """A fresh corporate user (unique per call) as a nio client; the caller closes it."""
        return await self._new_user(self.corp, name)

    async def new_personal_user(self, name: str) -> nio.AsyncClient:
        """A fresh personal-server user (an external contact) as a nio client."""
        return await self._new_user(self.personal, name)

    def server_of(self, client: nio.AsyncClient) -> SynapseServer:
        """The homeserver a client made by this fixture talks to."""
        return self.corp if client.homeserver == self.corp.base_url else self.personal

    async def join_via(self, client: nio.AsyncClient, room: str, via: str) -> str:
        """Join ``room`` (id or alias) through server ``via``; the joined room id.

        Raises RuntimeError carrying the status and Matrix error of a refused join.
        """
        q = urllib.parse.quote
        path = f"/_matrix/client/v3/join/{q(room, safe='')}?server_name={q(via, safe='')}"
        resp = await asyncio.to_thread(
            self.server_of(client).request, "POST", path, {}, client.access_token)
        return resp["room_id"]


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def federation_options() -> dict[str, Any]:
    """Keyword arguments for FederatedPair.create; override per module."""
    return {}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory,
               federation_options: dict[str, Any]) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("federation")
    pair = FederatedPair.create(base / "pair", **federation_options)
    try:
        # registration first: it names the corporate server, and Synapse reads it at start
        stack = Stack.prepare(base / "enclave", synapse=pair.corp)
        pair.start()
        print(f"\nfederated pair {pair.corp.server_name} + {pair.personal.server_name} "
              f"started in {pair.start_seconds:.2f} s")
        stack.bootstrap()
        ensure_enclave_admin(stack)
        yield Federation(pair=pair, stack=stack)
    finally:
        pair.stop()


@pytest.fixture
async def _fed_clients() -> AsyncIterator[list[nio.AsyncClient]]:
    clients: list[nio.AsyncClient] = []
    yield clients
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()


@pytest.fixture
def new_corp_user(federation: Federation, _fed_clients: list[nio.AsyncClient]) -> NewUser:
    """``await new_corp_user(name)``: a fresh corporate user, closed after the test."""
    async def make(name: str) -> nio.AsyncClient:
        client = await federation.new_corp_user(name)
        _fed_clients.append(client)
        return client
    return make


@pytest.fixture
def new_personal_user(federation: Federation, _fed_clients: list[nio.AsyncClient]) -> NewUser:
    """``await new_personal_user(name)``: a fresh personal-server user, closed after."""
    async def make(name: str) -> nio.AsyncClient:
        client = await federation.new_personal_user(name)
        _fed_clients.append(client)
        return client
    return make


# -- helpers -------------------------------------------------------------------------------
async def sync_until(client: nio.AsyncClient, probe: Callable[[nio.SyncResponse], Any], *,
                     within: float = 30, what: str) -> Any:
    """Long-poll sync until ``probe(response)`` is truthy; return that value.

    Each sync continues from the client's last ``next_batch``, so call :func:`sync_until`
    (or ``client.sync()``) once before the action whose result you wait for, or the
    first response replays the whole history.
    """
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{client.user_id}: timed out after {within:.0f}s "
                                 f"waiting for {what}")
        resp = await client.sync(timeout=int(min(left, 5) * 1000))
        assert isinstance(resp, nio.SyncResponse), f"{client.user_id} sync failed: {resp}"
        hit = probe(resp)
        if hit:
            return hit


async def wait_invite(client: nio.AsyncClient, room_id: str, *,
                      within: float = 30) -> nio.InviteInfo:
    """The invite to ``room_id`` as the client's sync shows it."""
    return await sync_until(client, lambda r: r.rooms.invite.get(room_id),
                            within=within, what=f"an invite to {room_id}")


async def wait_message(client: nio.AsyncClient, room_id: str, body: str, *,
                       within: float = 30) -> nio.RoomMessageText:
    """The text message ``body`` in ``room_id`` as the client's sync shows it."""
    def probe(resp: nio.SyncResponse) -> nio.RoomMessageText | None:
        room = resp.rooms.join.get(room_id)
        for ev in room.timeline.events if room else ():
            if isinstance(ev, nio.RoomMessageText) and ev.body == body:
                return ev
        return None

    return await sync_until(client, probe, within=within, what=f"{body!r} in {room_id}")


def separation_config(config: Path, *, directory: Path, gate_secret: Path,
                      policy: dict[str, Any], **sections: Any) -> None:
    """Add a file directory source, the gate secret, ``policy`` and any other sections to
    the Enclave config a harness Stack wrote at ``config``."""
    cfg = yaml.safe_load(config.read_text())
    cfg["directory"] = {"source": {"type": "file", "path": str(directory),
                                   "allow_initial_passwords": True},
                        "interval_minutes": 0}
    cfg["gate"] = {"secret": {"file": str(gate_secret)}}
    cfg["policy"] = policy
    cfg.update(sections)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))


async def started_and_synced(enclave: EnclaveProcess) -> None:
    """Start Enclave if it is not running and wait for its first directory sync."""
    if enclave.running:
        return
    await enclave.start()

    async def provisioned() -> bool:
        _, body = await enclave.get_json("/ready")
        return (body.get("directory") or {}).get("outcome") == "ok"

    await wait_until(provisioned, within=60, what="the first directory sync",
                     describe=enclave.describe)


def enclave_inbox_events(enclave: EnclaveProcess, room_id: str) -> list[dict[str, Any]]:
    """Events of ``room_id`` Enclave stored in its inbox (SQLite), oldest first.

    Only expanded transactions are there: a transaction still in the receive journal is
    not, so poll this with ``wait_until``.
    """
    db = sqlite3.connect(f"file:{enclave.config.parent / 'enclave.db'}?mode=ro", uri=True,
                         timeout=10)
    try:
        rows = db.execute("SELECT body FROM inbox WHERE room_id = ? ORDER BY seq",
                          (room_id,)).fetchall()
    except sqlite3.OperationalError as e:  # not migrated yet
        if "no such table" in str(e):
            return []
        raise
    finally:
        db.close()
    return [json.loads(body) for (body,) in rows]

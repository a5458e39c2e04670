"""The devstack Synapse launcher starts a usable homeserver and cleans up after itself."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip("synapse")
nio = pytest.importorskip("nio")

from devstack.synapse import SynapseServer, free_port  # noqa: E402

from .harness import fresh_pg_database  # noqa: E402

pytestmark = pytest.mark.integration

async def _wait_gone(pid: int, limit_s: float = 5) -> bool:
    """True once neither the process nor its process group exists any more."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
        await asyncio.sleep(0.05)
    return False


async def _login_create_room_send(server: SynapseServer, user_id: str, password: str) -> None:
    client = nio.AsyncClient(server.base_url, user_id)
    try:
        login = await client.login(password)
        assert isinstance(login, nio.LoginResponse), login
        created = await client.room_create(name="launcher smoke test")
        assert isinstance(created, nio.RoomCreateResponse), created
        sent = await client.room_send(
            created.room_id, "m.room.message", {"msgtype": "m.text", "body": "hello"}
        )
        assert isinstance(sent, nio.RoomSendResponse), sent
        assert sent.event_id.startswith("$")
    finally:
        await client.close()


@pytest.fixture
def synapse_server(tmp_path: Path) -> Iterator[SynapseServer]:
    server = SynapseServer(base_dir=tmp_path / "synapse")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_sqlite_register_login_send_stop(synapse_server: SynapseServer) -> None:
    server = synapse_server
    assert server.running
    assert server.base_url == f"http://127.0.0.1:{server.port}"
    assert (server.base_dir / "homeserver.log").stat().st_size > 0

    user_id, token = server.register_user("alice", "correct horse battery staple")
    assert user_id == "@alice:corp.test"
    whoami = server.request("GET", "/_matrix/client/v3/account/whoami", access_token=token)
    assert whoami["user_id"] == user_id

    await _login_create_room_send(server, user_id, "correct horse battery staple")

    pid = server.pid
    assert pid is not None
    server.stop()
    assert not server.running
    assert await _wait_gone(pid), f"Synapse pid {pid} still alive after stop()"
    server.stop()  # idempotent


def test_admin_user_restart_and_appservice(synapse_server: SynapseServer, tmp_path: Path) -> None:
    server = synapse_server
    _, admin_token = server.register_user("root", "pw", admin=True)
    version = server.request("GET", "/_synapse/admin/v1/server_version", access_token=admin_token)
    assert version["server_version"].startswith("1.")

    # A registration added after the first start must take effect on restart.
    as_token = uuid.uuid4().hex
    registration = tmp_path / "enclave-as.yaml"
    registration.write_text(
        yaml.safe_dump(
            {
                "id": "enclave",
                "url": None,
                "as_token": as_token,
                "hs_token": uuid.uuid4().hex,
                "sender_localpart": "enclave",
                "namespaces": {
                    "users": [{"exclusive": True, "regex": "@enclave_.*:corp\\.test"}],
                    "rooms": [],
                    "aliases": [],
                },
            }
        )
    )
    server.app_service_config_files.append(registration)
    port, old_pid = server.port, server.pid
    server.restart()
    assert server.port == port
    assert server.pid != old_pid

    # Data survived the restart.
    whoami = server.request("GET", "/_matrix/client/v3/account/whoami", access_token=admin_token)
    assert whoami["user_id"] == "@root:corp.test"
    # And the appservice is known.
    created = server.request(
        "POST",
        "/_matrix/client/v3/register",
        {"type": "m.login.application_service", "username": "enclave_bob"},
        access_token=as_token,
    )
    assert created["user_id"] == "@enclave_bob:corp.test"


def test_failed_start_reports_log_tail(tmp_path: Path) -> None:
    # A database engine Synapse does not know makes it exit during config parsing.
    server = SynapseServer(
        base_dir=tmp_path / "broken",
        extra_config={"database": {"name": "nosuchengine", "args": {}}},
    )
    with pytest.raises(RuntimeError, match="exited with code") as excinfo:
        server.start(timeout=30)
    assert "nosuchengine" in str(excinfo.value)
    assert not server.running
    server.stop()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """Create a fresh Synapse-compatible database; yield its DSN; drop it afterwards."""
    with fresh_pg_database("enclave_synapse") as dsn:
        yield dsn


async def test_postgres_register_login_send_stop(tmp_path: Path, postgres_database: str) -> None:
    server = SynapseServer(base_dir=tmp_path / "synapse-pg", database=postgres_database)
    await asyncio.to_thread(server.start)
    try:
        overrides = yaml.safe_load(server.overrides_path.read_text())
        assert overrides["database"]["name"] == "psycopg2"
        assert not (server.base_dir / "homeserver.db").exists()

        user_id, _ = await asyncio.to_thread(server.register_user, "alice", "pw-alice")
        await _login_create_room_send(server, user_id, "pw-alice")

        pid = server.pid
        assert pid is not None
        await asyncio.to_thread(server.stop)
        assert await _wait_gone(pid)
    finally:
        server.stop()

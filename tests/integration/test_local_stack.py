"""README command 1: the local stack starts, answers /ready, a demo user logs in, it stops clean."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nio
import pytest
import yaml

from devstack.synapse import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _login_as(homeserver: str, person: dict) -> None:
    client = nio.AsyncClient(homeserver, person["username"])
    try:
        resp = await client.login(person["initial_password"])
        assert isinstance(resp, nio.LoginResponse), resp
        assert resp.user_id == f"@{person['username']}:corp.test"
        name = await client.get_displayname(resp.user_id)
        assert name.displayname == person["display_name"]
        # directory sync put them in their department's space, its general room, All staff
        rooms = await client.joined_rooms()
        assert isinstance(rooms, nio.JoinedRoomsResponse), rooms
        names = set()
        for rid in rooms.rooms:
            state = await client.room_get_state_event(rid, "m.room.name")
            names.add(state.content.get("name"))
        dept = person["department"]
        assert names == {dept, f"{dept} general", "All staff"}, names
    finally:
        await client.close()


async def _barrier_demo(homeserver: str, people: list[dict]) -> None:
    """The sample policy keeps Sales (carol) and Finance (dave) apart, through the gate."""
    carol = next(p for p in people if p["department"] == "Sales")
    dave = next(p for p in people if p["department"] == "Finance")
    client = nio.AsyncClient(homeserver, carol["username"])
    try:
        assert isinstance(await client.login(carol["initial_password"]), nio.LoginResponse)
        dm = await client.room_create(is_direct=True,
                                      invite=[f"@{dave['username']}:corp.test"])
        assert isinstance(dm, nio.RoomCreateError), dm
        assert "barrier-sales-finance" in dm.message
        room = await client.room_create(name="plans")
        assert isinstance(room, nio.RoomCreateResponse), room
        create = await client.room_get_state_event(room.room_id, "m.room.create")
        assert create.content.get("m.federate") is False
    finally:
        await client.close()


def test_local_stack_start_login_stop(tmp_path: Path) -> None:
    hs_port, enc_port = free_port(), free_port()
    out_path = tmp_path / "stack.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devstack.stack", "--state-dir", str(tmp_path / "st"),
             "--synapse-port", str(hs_port), "--enclave-port", str(enc_port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        text = ""
        while "Press Ctrl-C" not in text:
            assert proc.poll() is None, f"stack exited early:\n{out_path.read_text()}"
            assert time.monotonic() < deadline, f"stack not ready:\n{out_path.read_text()}"
            time.sleep(0.2)
            text = out_path.read_text()
        pids = {k: int(v) for k, v in re.findall(r"(synapse|enclave)=(\d+)", text)}
        assert set(pids) == {"synapse", "enclave"}

        with urllib.request.urlopen(f"http://127.0.0.1:{enc_port}/ready", timeout=5) as r:
            assert r.status == 200
        # the operators' console is on, its sign-in page names the server
        with urllib.request.urlopen(f"http://127.0.0.1:{enc_port}/console/login",
                                    timeout=5) as r:
            assert r.status == 200 and "corp.test" in r.read().decode()

        people = yaml.safe_load((REPO / "deploy/local/directory.yaml").read_text())["people"]
        alice = people[0]
        assert f"{alice['username']}" in text and alice["initial_password"] in text
        asyncio.run(_login_as(f"http://127.0.0.1:{hs_port}", alice))
        asyncio.run(_barrier_demo(f"http://127.0.0.1:{hs_port}", people))

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        for what, pid in pids.items():
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(pid), f"{what} (pid {pid}) survived the stack's stop"
        assert "stopped." in out_path.read_text()
    finally:
        if proc.poll() is None:
            # a stop request first: SIGKILL of the launcher would orphan Synapse and Enclave
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

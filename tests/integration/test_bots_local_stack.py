"""README command 1 demonstrates the bots with its sample config: the onboarding bot's
welcome, `!announce` from the control room, a configured announcement sent from the CLI,
and the signed webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devstack.synapse import free_port

from .harness import nio, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVER = "corp.test"
ANNOUNCE = f"@enclave_announce:{SERVER}"
WELCOME = f"@enclave_welcome:{SERVER}"


async def _client(hs: str, user: str, password: str) -> nio.AsyncClient:
    c = nio.AsyncClient(hs, f"@{user}:{SERVER}")
    resp = await c.login(password)
    assert isinstance(resp, nio.LoginResponse), resp
    return c


async def _invited_by(c: nio.AsyncClient, bot: str) -> list[str]:
    resp = await c.sync(timeout=0, full_state=True)
    assert isinstance(resp, nio.SyncResponse), resp
    return [rid for rid, inv in resp.rooms.invite.items()
            if any(getattr(e, "sender", None) == bot for e in inv.invite_state)]


async def _texts(c: nio.AsyncClient, room: str, sender: str) -> list[str]:
    resp = await c.sync(timeout=0, full_state=True)
    assert isinstance(resp, nio.SyncResponse), resp
    joined = resp.rooms.join.get(room)
    if joined is None:
        return []
    return [e.body for e in joined.timeline.events
            if isinstance(e, nio.RoomMessageText | nio.RoomMessageNotice)
            and e.sender == sender]


async def _accept(c: nio.AsyncClient, bot: str) -> str:
    async def invited() -> list[str]:
        return await _invited_by(c, bot)

    (room,) = await wait_until(invited, within=60, what=f"an invitation from {bot}",
                               interval=1.0)
    assert isinstance(await c.join(room), nio.JoinResponse)
    return room


async def _demo(hs: str, enclave: str, state: Path, people: dict[str, Any]) -> None:
    alice = await _client(hs, "alice", people["alice"]["initial_password"])
    dave = await _client(hs, "dave", people["dave"]["initial_password"])
    carol = await _client(hs, "carol", people["carol"]["initial_password"])
    try:
        # the onboarding bot welcomes everyone (greet_existing in the sample config)
        welcome_room = await _accept(alice, WELCOME)

        async def welcome() -> list[str]:
            return await _texts(alice, welcome_room, WELCOME)

        (text,) = await wait_until(welcome, within=30, what="alice's welcome")
        assert text.startswith("Welcome, Alice!") and "[Engineering](" in text

        # dave (it-admins) announces to Sales from the control room; carol receives it
        sync = await dave.sync(timeout=0, full_state=True)
        assert isinstance(sync, nio.SyncResponse)
        control = (await dave.room_resolve_alias(f"#announcements-control:{SERVER}")).room_id
        assert control in sync.rooms.join

        async def bot_in_control() -> bool:
            members = await dave.joined_members(control)
            return ANNOUNCE in [m.user_id for m in members.members]

        await wait_until(bot_in_control, within=60, what="the bot in the control room",
                         interval=1.0)
        await dave.room_send(control, "m.room.message", {
            "msgtype": "m.text", "body": "!announce department:Sales Hello Sales!"})

        async def preview() -> list[str]:
            return [t for t in await _texts(dave, control, ANNOUNCE) if "Preview" in t]

        (p,) = await wait_until(preview, within=60, what="the preview", interval=1.0)
        assert "To **1 people**" in p
        await dave.room_send(control, "m.room.message", {"msgtype": "m.text",
                                                          "body": "!confirm"})
        carol_dm = await _accept(carol, ANNOUNCE)

        async def carol_got() -> list[str]:
            return [t for t in await _texts(carol, carol_dm, ANNOUNCE) if "Hello Sales!" in t]

        await wait_until(carol_got, within=60, what="carol's announcement")

        # the configured announcement, sent from the CLI: alice gets it in her DM
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bridge", "announcements", "send",
                             "welcome-to-enclave", "-c", str(state / "enclave.yaml")],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        alice_dm = await _accept(alice, ANNOUNCE)

        async def alice_got() -> list[str]:
            return [t for t in await _texts(alice, alice_dm, ANNOUNCE)
                    if "Welcome to in-house chat" in t]

        await wait_until(alice_got, within=60, what="alice's announcement")

        # the signed webhook
        body = json.dumps({"alert": {"name": "Disk", "summary": "db1 full"}}).encode()
        secret = (state / "secrets" / "hook_monitoring").read_text().strip()
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        async with aiohttp.ClientSession() as s, s.post(
                f"{enclave}/hooks/monitoring", data=body,
                headers={"X-Enclave-Signature": sig, "Content-Type": "application/json"}) as r:
            assert r.status == 202
            assert (await r.json())["recipients"] == 1  # dave, it-admins
    finally:
        for c in (alice, dave, carol):
            await c.close()


def test_local_stack_demonstrates_the_bots(tmp_path: Path) -> None:
    import yaml

    hs_port, enc_port = free_port(), free_port()
    out_path = tmp_path / "stack.out"
    state = tmp_path / "st"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devstack.stack", "--state-dir", str(state),
             "--synapse-port", str(hs_port), "--enclave-port", str(enc_port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        text = ""
        while "Press Ctrl-C" not in text:
            assert proc.poll() is None, f"stack exited early:\n{out_path.read_text()}"
            assert time.monotonic() < deadline, f"stack not ready:\n{out_path.read_text()}"
            time.sleep(0.2)
            text = out_path.read_text()
        assert "enclave announcements send welcome-to-enclave" in text
        people = {p["username"]: p for p in yaml.safe_load(
            (REPO / "deploy/local/directory.yaml").read_text())["people"]}
        try:
            asyncio.run(_demo(f"http://127.0.0.1:{hs_port}", f"http://127.0.0.1:{enc_port}",
                              state, people))
        except AssertionError as e:
            log = (state / "enclave.log").read_text(errors="replace")[-6000:]
            raise AssertionError(f"{e}\n--- enclave.log (tail) ---\n{log}") from e
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

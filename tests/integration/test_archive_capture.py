"""Capture of encrypted rooms against a real Synapse (issue 20): Enclave runs with the bots
extension, a room class with ``capture: required`` and retention; two staff members use
encrypting matrix-nio clients (cross-signed, as Element signs in).

- A message sent before the archive user is in the room is a gap with that reason.
- The archive user joins the room (invited by Enclave's own bot), posts its notice
  (encrypted, read by a staff client), and the plaintext of staff messages is archived
  beside their ciphertext, linked by event id.
- A late key: the sender shares a new session with the other staff device only; the
  archive records a capture gap with its reason and asks the sender's devices for the key;
  the sender answers the request (a forwarded room key); the gap is marked recovered and the
  plaintext archived then.
- The archive user kicked by a member: Enclave audits it and brings it back.
- After a restart the archive device is the same one and goes on archiving.
- ``capture_notice: topic``: Enclave's bot appends the archive line to the topic, and puts
  it back when a member's topic change drops it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from bots.capture.decisions import BEFORE_JOIN
from bots.capture.store import CaptureGapStore
from bridge.store import AuditFilter

from .bots_helpers import Clock, InProcessEnclave, cross_sign, person, uid, write_bots_config
from .harness import BOT_USER_ID, REPO_ROOT, Stack, nio, subprocess_env, wait_until
from .test_bots_e2ee import bot_events, decrypted

pytestmark = pytest.mark.integration

MEGOLM = "m.megolm.v1.aes-sha2"
ARCHIVE = uid("enclave_archive")
PEOPLE = [person("7001", "carol", "Legal"), person("7002", "dave", "Legal")]


def capture_config(stack: Stack, base: Path, notice: str = "notice") -> Path:
    path = write_bots_config(stack, base / "enclave", PEOPLE, bots={
        "archive": {"key_wait_seconds": 2, "sweep_minutes": 0.25},
        "encryption": {"store_dir": str(base / "crypto")},
    })
    cfg = yaml.safe_load(path.read_text())
    cfg["policy"] = {"default_class": "legal",
                     "room_classes": [{"id": "legal", "federate": False,
                                       "encryption": "required", "capture": "required",
                                       "capture_notice": notice}],
                     "reconcile": {"interval_minutes": 0}}
    cfg["retention"] = {"enabled": True, "default": {"keep": "30d"},
                        "archive": {"path": str(base / "archive")},
                        "purge": {"interval_minutes": 0},
                        "visibility": {"set_state": False, "notice": "none"}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def e2ee_login(stack: Stack, username: str, store: Path) -> nio.AsyncClient:
    """A staff member signed in with an encrypting nio client, cross-signed."""
    await asyncio.to_thread(store.mkdir, parents=True, exist_ok=True)
    config = nio.AsyncClientConfig(encryption_enabled=True, store=nio.store.SqliteStore)
    client = nio.AsyncClient(stack.synapse.base_url, uid(username), store_path=str(store),
                             config=config)
    login = await client.login(f"pw-{username}", device_name=f"{username}'s device")
    assert isinstance(login, nio.LoginResponse), login
    up = await client.keys_upload()
    assert isinstance(up, nio.KeysUploadResponse), up
    await cross_sign(client)
    first = await client.sync(timeout=0, full_state=True)
    assert isinstance(first, nio.SyncResponse), first
    return client


def archived(archive: Path) -> dict[str, dict[str, Any]]:
    """Every record in the archive's segments, by event id (read from the files)."""
    out: dict[str, dict[str, Any]] = {}
    for seg in (archive / "rooms").glob("*/seg-*.jsonl"):
        for line in seg.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["event_id"]] = rec
    return out


async def joined(stack: Stack, room: str, user: str) -> bool:
    q = urllib.parse.quote
    body = await stack.hs("GET", f"/_synapse/admin/v1/rooms/{q(room, safe='')}/members")
    return user in body.get("members", [])


async def audit(enclave: InProcessEnclave, room: str) -> list[dict[str, Any]]:
    return await enclave.svc.stores.audit.query_audit(AuditFilter(room_id=room))


async def send(client: nio.AsyncClient, room: str, body: str) -> str:
    await client.sync(timeout=0)
    resp = await client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body},
                                  ignore_unverified_devices=True)
    assert isinstance(resp, nio.RoomSendResponse), resp
    return resp.event_id


async def test_capture_required_room_is_archived_as_plaintext_and_a_late_key_recovers(
        stack: Stack, tmp_path: Path) -> None:
    enclave = InProcessEnclave(capture_config(stack, tmp_path), stack.as_port, Clock())
    await enclave.start()
    carol = dave = None
    try:
        await enclave.wait_directory()
        await enclave.wait_bots_ready()
        archive_bot = enclave.bots.archive
        assert archive_bot is not None and archive_bot.user_id == ARCHIVE
        assert await archive_bot.device.wait_ready(90), "the archive device never got ready"
        carol = await e2ee_login(stack, "carol", tmp_path / "carol")
        dave = await e2ee_login(stack, "dave", tmp_path / "dave")

        # carol makes an encrypted room with dave and gives Enclave's bot power (as the gate
        # does for rooms made through it)
        resp = await carol.room_create(
            name="Legal hold review", invite=[uid("dave")],
            initial_state=[{"type": "m.room.encryption", "state_key": "",
                            "content": {"algorithm": MEGOLM}}],
            power_level_override={"users": {BOT_USER_ID: 100}})
        assert isinstance(resp, nio.RoomCreateResponse), resp
        room = resp.room_id
        assert isinstance(await dave.join(room), nio.JoinResponse)
        # a message before the archive user is in: not decryptable by it, recorded as such
        early = await send(carol, room, "privileged: before the archive came")
        gaps = CaptureGapStore(enclave.svc.database.db)

        async def early_gap() -> Any:
            return await gaps.gap(early)

        gap = await wait_until(early_gap, within=60, what="the gap of the early message")
        assert gap.open and gap.reason == BEFORE_JOIN, gap
        invited = await carol.room_invite(room, BOT_USER_ID)
        assert isinstance(invited, nio.RoomInviteResponse), invited

        async def archive_in() -> bool:
            return await joined(stack, room, ARCHIVE)

        await wait_until(archive_in, within=60, what="the archive user joined the room")
        # Element shares the room key with a member who joins; nio (this test's client)
        # does not share a session it already shared, nor look up the newcomer's devices:
        # it starts a new session with the devices looked up afresh instead
        await carol.sync(timeout=0)
        carol.olm.outbound_group_sessions.pop(room, None)
        carol.olm.users_for_key_query.add(ARCHIVE)
        assert isinstance(await carol.keys_query(), nio.KeysQueryResponse)

        # (3) the room shows it is archived: the archive user's notice, encrypted, readable
        async def notice_event() -> str | None:
            found = await bot_events(stack, room, "m.room.encrypted", ARCHIVE)
            return str(found[0]["event_id"]) if found else None

        notice_id = await wait_until(notice_event, within=60, what="the archive notice")
        shown = await decrypted(dave, room, notice_id)
        assert isinstance(shown, nio.RoomMessageNotice), shown
        assert "archived by Enclave" in shown.body

        # (1) plaintext archived beside the ciphertext, linked by event id
        first = await send(carol, room, "privileged: settlement draft v1")
        arch = tmp_path / "archive"

        async def plaintext_of(event_id: str) -> dict[str, Any] | None:
            return archived(arch).get(event_id + "#decrypted")

        rec = await wait_until(lambda: plaintext_of(first), within=60,
                               what="the plaintext of the first message in the archive")
        assert rec["content"]["body"] == "privileged: settlement draft v1"
        assert rec["sender"] == uid("carol") and rec["room_id"] == room
        mark = rec["org.enclave.decrypted"]
        assert mark["of"] == first and mark["by"] == ARCHIVE and mark["recovered"] is False
        assert mark["device"] == archive_bot.device.device_id
        cipher = archived(arch)[first]
        assert cipher["type"] == "m.room.encrypted" and "body" not in cipher["content"]
        verify = await enclave.svc.archive.verify(room)
        assert verify.ok, verify.problems

        # (2) a late key: carol starts a new session shared with dave's device only
        await carol.sync(timeout=0)
        archive_device = carol.device_store[ARCHIVE][archive_bot.device.device_id]
        carol.blacklist_device(archive_device)
        carol.olm.outbound_group_sessions.pop(room, None)
        requests: list[Any] = []
        handle = carol.olm._handle_key_requests

        def record(event: Any) -> None:
            requests.append(event)
            handle(event)

        carol.olm._handle_key_requests = record
        late = await send(carol, room, "privileged: the late one")
        dave_sees = await decrypted(dave, room, late)
        assert isinstance(dave_sees, nio.RoomMessageText), dave_sees  # dave has the key

        async def gap_open() -> Any:
            g = await gaps.gap(late)
            return g if g is not None and g.key_requested_at is not None else None

        gap = await wait_until(gap_open, within=60, what="the capture gap and its key request")
        assert gap.open and gap.reason == "no session key", gap
        assert gap.sender == uid("carol") and gap.session_id
        assert await plaintext_of(late) is None
        assert (await enclave.svc.archive.store.archive_known([late])) == {late}  # ciphertext

        # carol's client receives the archive device's key request and answers it
        async def request_seen() -> Any:
            await carol.sync(timeout=500)
            return next((r for r in requests if getattr(r, "session_id", None)
                         == gap.session_id and r.sender == ARCHIVE), None)

        req = await wait_until(request_seen, within=60, what="the key request at carol's")
        olm = carol.olm
        session = olm.inbound_group_store.get(room, req.sender_key, req.session_id)
        assert session is not None
        device = carol.device_store[ARCHIVE][req.requesting_device_id]
        olm_session = olm.session_store.get(device.curve25519)
        assert olm_session is not None
        sent = await carol.to_device(
            olm._encrypt_forwarding_key(room, session, olm_session, device))
        assert isinstance(sent, nio.ToDeviceResponse), sent

        async def recovered() -> Any:
            g = await gaps.gap(late)
            return g if g is not None and not g.open else None

        await wait_until(recovered, within=60, what="the gap recovered")
        rec = await wait_until(lambda: plaintext_of(late), within=10,
                               what="the recovered plaintext in the archive")
        assert rec["content"]["body"] == "privileged: the late one"
        assert rec["org.enclave.decrypted"]["recovered"] is True
        # what is still open is the early message, as the operator's report shows it
        assert [g.event_id for g in await gaps.gaps()] == [early]
        report = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bridge", "bots", "capture-gaps",
                             "--all", "--format", "json", "-c", str(enclave.config)],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert report.returncode == 0, report.stderr
        rows = {r["event"]: r for r in map(json.loads, report.stdout.splitlines())}
        assert rows[early]["reason"] == BEFORE_JOIN and not rows[early]["recovered"]
        assert rows[late]["reason"] == "no session key" and rows[late]["recovered"]
        # the export shows both: the ciphertext and, linked to it, the plaintext
        out = tmp_path / "export"
        exported = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bridge", "export", "--room", room,
                             "--out", str(out), "--formats", "jsonl,html",
                             "-c", str(enclave.config)],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert exported.returncode == 0, exported.stderr
        lines = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
        ids = [e.get("event_id") for e in lines]
        assert first in ids and first + "#decrypted" in ids
        assert ids.index(first) < ids.index(first + "#decrypted")
        html = next(out.glob("rooms/*/transcript.html")).read_text()
        assert "privileged: the late one" in html and "decrypted by the Enclave archive" in html
        kinds = [(a["kind"], a["outcome"]) for a in await audit(enclave, room)
                 if a["source"] == "bots.archive"]
        assert ("capture_gap", "failed") in kinds and ("capture_gap", "recovered") in kinds

        # (4) the archive user kicked by a member: audited, and back in the room
        kick = await carol.room_kick(room, ARCHIVE, reason="no archive here")
        assert isinstance(kick, nio.RoomKickResponse), kick

        async def removal_audited() -> bool:
            return any(a["kind"] == "capture_removed" and a["user_id"] == uid("carol")
                       for a in await audit(enclave, room))

        await wait_until(removal_audited, within=60, what="the removal audited")
        await wait_until(archive_in, within=60, what="the archive user back in the room")

        # a restart: the same device (keys persisted under bots.encryption.store_dir), and
        # a message after it is archived as plaintext
        device_id = archive_bot.device.device_id
        await enclave.stop()
        enclave = InProcessEnclave(enclave.config, stack.as_port, Clock())
        await enclave.start()
        await enclave.wait_bots_ready()
        archive_bot = enclave.bots.archive
        assert archive_bot is not None and await archive_bot.device.wait_ready(90)
        assert archive_bot.device.device_id == device_id
        await carol.sync(timeout=0)
        carol.unblacklist_device(archive_device)
        carol.olm.outbound_group_sessions.pop(room, None)
        carol.olm.users_for_key_query.add(ARCHIVE)
        assert isinstance(await carol.keys_query(), nio.KeysQueryResponse)
        after = await send(carol, room, "privileged: after the restart")
        rec = await wait_until(lambda: plaintext_of(after), within=60,
                               what="the plaintext of a message after the restart")
        assert rec["content"]["body"] == "privileged: after the restart"
        assert rec["org.enclave.decrypted"]["device"] == device_id
    finally:
        for c in (carol, dave):
            if c is not None:
                await c.close()
        await enclave.stop()


async def test_the_topic_says_the_room_is_archived_and_keeps_saying_it(
        stack: Stack, tmp_path: Path) -> None:
    enclave = InProcessEnclave(capture_config(stack, tmp_path, notice="topic"), stack.as_port,
                               Clock())
    await enclave.start()
    staff = None
    try:
        await enclave.wait_directory()
        await enclave.wait_bots_ready()
        archive_bot = enclave.bots.archive
        assert archive_bot is not None
        line = enclave.svc.config.bots.archive.topic_line
        staff = await e2ee_login(stack, "carol", tmp_path / "carol2")
        resp = await staff.room_create(
            name="Board", topic="Board minutes", invite=[BOT_USER_ID],
            initial_state=[{"type": "m.room.encryption", "state_key": "",
                            "content": {"algorithm": MEGOLM}}],
            power_level_override={"users": {BOT_USER_ID: 100}})
        assert isinstance(resp, nio.RoomCreateResponse), resp
        room = resp.room_id

        async def topic() -> str:
            q = urllib.parse.quote
            body = await stack.hs("GET", f"/_synapse/admin/v1/rooms/{q(room, safe='')}/state")
            return next((str(e["content"].get("topic", "")) for e in body["state"]
                         if e["type"] == "m.room.topic"), "")

        async def archived_topic() -> str | None:
            t = await topic()
            return t if line in t else None

        shown = await wait_until(archived_topic, within=60, what="the archive line in the topic")
        assert shown == f"Board minutes\n{line}"
        assert not await bot_events(stack, room, "m.room.encrypted", ARCHIVE)  # no notice
        # a member's topic change that drops the line: Enclave puts it back
        put = await staff.room_put_state(room, "m.room.topic", {"topic": "Board minutes 2027"})
        assert isinstance(put, nio.RoomPutStateResponse), put
        shown = await wait_until(archived_topic, within=60, what="the archive line put back")
        assert shown == f"Board minutes 2027\n{line}"
    finally:
        if staff is not None:
            await staff.close()
        await enclave.stop()

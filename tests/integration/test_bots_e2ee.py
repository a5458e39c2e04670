"""The bots' encrypted sending against a real Synapse, read by a real E2EE matrix-nio client.

A staff member's nio client (E2EE on, its own store) opens an encrypted DM with Enclave's
bot, the bot joins through the appservice, and :class:`bots.crypto.EncryptedSender` posts
an announcement-like message: the staff client must decrypt it (``RoomMessageText``, not an
undecryptable ``MegolmEvent``). A new sender on the same data directory reuses the device
(no login) and its messages decrypt too; a resend with the same transaction id after the
restart yields the first event. Rooms it cannot encrypt for raise ``CannotEncrypt``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bots.cross_signing import KEYS_FILE, RESET_FILE, owner_signed_devices
from bots.crypto import SESSION_FILE, CannotEncrypt, EncryptedSender, EncryptedSenders
from bots.sending import PlainSender, RoomEncryption, RoutingSender
from bridge.matrix.client import MatrixClient
from devstack.synapse import free_port

from .bots_helpers import cross_sign
from .harness import Stack, nio

pytestmark = pytest.mark.integration

MEGOLM = "m.megolm.v1.aes-sha2"
ENCRYPTION_STATE = {"type": "m.room.encryption", "state_key": "",
                    "content": {"algorithm": MEGOLM}}


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture
async def as_client(stack: Stack) -> AsyncIterator[MatrixClient]:
    async with aiohttp.ClientSession() as session:
        yield MatrixClient(session, stack.synapse.base_url, stack.as_token,
                           max_retries=3)


async def e2ee_staff(stack: Stack, name: str, store: Path, *,
                     existing: str | None = None, cross_signed: bool = True) -> nio.AsyncClient:
    """A freshly registered user signed in with an encrypting nio client (keys uploaded,
    device signed by the user's cross-signing key unless ``cross_signed`` is False);
    ``existing``: a further device of that earlier client's user instead."""
    if existing is None:
        localpart = f"{name}-{uuid.uuid4().hex[:6]}"
        await stack_register(stack, localpart, f"pw-{localpart}")
    else:
        localpart = existing.split(":", 1)[0].lstrip("@")
    await asyncio.to_thread(store.mkdir, parents=True, exist_ok=True)
    config = nio.AsyncClientConfig(encryption_enabled=True, store=nio.store.SqliteStore)
    client = nio.AsyncClient(stack.synapse.base_url, f"@{localpart}:{stack.server_name}",
                             store_path=str(store), config=config)
    login = await client.login(f"pw-{localpart}", device_name=f"{name}'s device")
    assert isinstance(login, nio.LoginResponse), login
    up = await client.keys_upload()
    assert isinstance(up, nio.KeysUploadResponse), up
    if cross_signed:
        await cross_sign(client)  # as Element does: the bots count only owner-signed devices
    first = await client.sync(timeout=0, full_state=True)
    assert isinstance(first, nio.SyncResponse), first
    return client


async def published_master(as_client: MatrixClient, user: str) -> str | None:
    """The master cross-signing key the homeserver publishes for ``user``."""
    body = await as_client.request("POST", "/_matrix/client/v3/keys/query",
                                   json={"device_keys": {user: []}})
    keys = ((body.get("master_keys") or {}).get(user) or {}).get("keys") or {}
    return next(iter(keys.values()), None)


async def device_cross_signed(as_client: MatrixClient, user: str, device: str) -> bool:
    """Whether ``device`` is signed by its owner, checked as a staff client would."""
    body = await as_client.request("POST", "/_matrix/client/v3/keys/query",
                                   json={"device_keys": {user: []}})
    return device in owner_signed_devices(body, user)


async def stack_register(stack: Stack, localpart: str, password: str) -> str:
    user_id, _token = await asyncio.to_thread(stack.synapse.register_user, localpart, password)
    return user_id


async def encrypted_dm(owner: nio.AsyncClient, bot: str, as_client: MatrixClient) -> str:
    """The owner opens an encrypted DM with the bot (as Element does); the bot joins."""
    resp = await owner.room_create(
        is_direct=True, invite=[bot], preset=nio.RoomPreset.trusted_private_chat,
        initial_state=[ENCRYPTION_STATE])
    assert isinstance(resp, nio.RoomCreateResponse), resp
    await as_client.join(resp.room_id, user_id=bot)
    return resp.room_id


async def decrypted(client: nio.AsyncClient, room_id: str, event_id: str,
                    rounds: int = 40) -> nio.Event:
    """Sync until ``event_id`` shows up in the room; return it as nio decrypted it.

    Events a client synced earlier are remembered on it (a later call may ask for one).
    A Megolm event whose key arrives in a later sync (allowed by the protocol) is decrypted
    again after each further sync; whatever it is after the last round is returned.
    """
    seen: dict[str, nio.Event] = client.__dict__.setdefault("_seen_events", {})
    for _ in range(rounds):
        found = seen.get(event_id)
        if isinstance(found, nio.MegolmEvent):
            try:
                found = seen[event_id] = client.decrypt_event(found)
            except Exception:  # the key is not there yet: sync again
                pass
        if found is not None and not isinstance(found, nio.MegolmEvent):
            return found
        resp = await client.sync(timeout=1500)
        assert isinstance(resp, nio.SyncResponse), resp
        joined = resp.rooms.join.get(room_id)
        for ev in joined.timeline.events if joined else ():
            seen[ev.event_id] = ev
    found = seen.get(event_id)
    assert found is not None, f"{event_id} never reached {client.user_id}"
    return found


async def bot_events(stack: Stack, room_id: str, event_type: str,
                     bot: str) -> list[dict[str, Any]]:
    """Every event of ``event_type`` the bot sent in the room (admin API)."""
    quote = urllib.parse.quote
    filt = quote(json.dumps({"types": [event_type], "senders": [bot]}))
    page = await stack.hs("GET", f"/_synapse/admin/v1/rooms/{quote(room_id, safe='')}"
                                 f"/messages?dir=f&limit=1000&filter={filt}")
    return page.get("chunk", [])


async def new_bot(stack: Stack, as_client: MatrixClient) -> str:
    """A bot identity of this test's own in Enclave's exclusive namespace (as the bot
    framework makes them: the appservice's sender itself may not sync)."""
    localpart = f"enclave_announce-{uuid.uuid4().hex[:6]}"
    assert await as_client.register_appservice_user(localpart)
    return f"@{localpart}:{stack.server_name}"


def announcement(text: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": text, "format": "org.matrix.custom.html",
            "formatted_body": f"<p>{text}</p>"}


# -- tests -------------------------------------------------------------------------------------
async def test_encrypted_dm_announcement_is_decrypted_and_survives_restart(
    stack: Stack, as_client: MatrixClient, staff: list, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bot = await new_bot(stack, as_client)
    alice = await e2ee_staff(stack, "alice", tmp_path / "alice-store")
    staff.append(alice)
    room = await encrypted_dm(alice, bot, as_client)

    store_dir = tmp_path / "data" / "crypto" / "enclave"
    sender = EncryptedSender(as_client, homeserver_url=stack.synapse.base_url, user_id=bot,
                             store_dir=store_dir, ready_timeout=60)
    await sender.start()
    try:
        assert await sender.wait_ready(), "the bot's E2EE device never became ready"
        # created as the appservice (MSC4190), no login and no token of its own
        assert sender.logins == 0 and sender.auth == "appservice"
        device = sender.device_id
        master = await published_master(as_client, bot)
        assert master is not None and await device_cross_signed(as_client, bot, device)
        assert await RoomEncryption(as_client).is_encrypted(room, as_user=bot)
        first_txn = f"ann-1.occ-1.{uuid.uuid4().hex}"
        first = await sender.send(room, announcement("Office closed on Friday"),
                                  txn_id=first_txn, sender=bot)
    finally:
        await sender.close()

    ev = await decrypted(alice, room, first)
    assert isinstance(ev, nio.RoomMessageText), f"not decrypted: {ev!r}"
    assert ev.decrypted and ev.session_id
    assert ev.body == "Office closed on Friday"
    assert ev.sender == bot

    # what is on disk: the session file is the owner's alone, and no log line has the token
    session_file = store_dir / SESSION_FILE
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((store_dir / KEYS_FILE).stat().st_mode) == 0o600
    assert json.loads(session_file.read_text())["access_token"] == ""
    token = stack.as_token
    assert token not in caplog.text
    assert any(p.suffix == ".db" for p in store_dir.iterdir()), "no nio store written"

    # a restart from the same data directory: same device, no login
    again = EncryptedSender(as_client, homeserver_url=stack.synapse.base_url, user_id=bot,
                            store_dir=store_dir, ready_timeout=60)
    await again.start()
    try:
        assert await again.wait_ready()
        assert again.device_id == device
        assert again.logins == 0
        # the same cross-signing identity: nothing for staff clients to re-approve
        assert again.identity is not None and again.identity.action == "reuse"
        assert await published_master(as_client, bot) == master
        second = await again.send(room, announcement("Reminder: office closed on Friday"),
                                  txn_id=f"ann-1.occ-2.{uuid.uuid4().hex}", sender=bot)
        # the first message again, same transaction id, after the restart: no new event
        resent = await again.send(room, announcement("Office closed on Friday"),
                                  txn_id=first_txn, sender=bot)
    finally:
        await again.close()
    assert resent == first
    ev2 = await decrypted(alice, room, second)
    assert isinstance(ev2, nio.RoomMessageText), f"not decrypted after restart: {ev2!r}"
    assert ev2.body == "Reminder: office closed on Friday"

    sent = await bot_events(stack, room, "m.room.encrypted", bot)
    assert [e["event_id"] for e in sent] == [first, second]
    assert all(e["content"].get("device_id") == device for e in sent)
    assert await bot_events(stack, room, "m.room.message", bot) == [], "something went out in clear"
    assert token not in caplog.text


async def test_rooms_it_cannot_encrypt_for_are_refused(
    stack: Stack, as_client: MatrixClient, staff: list, tmp_path: Path,
) -> None:
    bot = await new_bot(stack, as_client)
    bob = await e2ee_staff(stack, "bob", tmp_path / "bob-store")
    staff.append(bob)
    sender = EncryptedSender(as_client, homeserver_url=stack.synapse.base_url, user_id=bot,
                             store_dir=tmp_path / "crypto" / "enclave", ready_timeout=60)
    await sender.start()
    try:
        assert await sender.wait_ready()

        # an encrypted room the bot is not in
        resp = await bob.room_create(name="private", initial_state=[ENCRYPTION_STATE])
        assert isinstance(resp, nio.RoomCreateResponse), resp
        with pytest.raises(CannotEncrypt, match="not joined") as not_joined:
            await sender.send(resp.room_id, announcement("hello"), txn_id=uuid.uuid4().hex,
                              sender=bot)
        assert not_joined.value.room_id == resp.room_id

        # a DM shared with someone who never signed in with an encrypting client
        room = await encrypted_dm(bob, bot, as_client)
        carol = await stack_register(stack, f"carol-{uuid.uuid4().hex[:6]}", "pw-carol-123")
        await as_client.invite(room, carol, user_id=bob.user_id)
        await as_client.join(room, user_id=carol)
        with pytest.raises(CannotEncrypt, match="without any E2EE device") as no_device:
            await sender.send(room, announcement("hello"), txn_id=uuid.uuid4().hex,
                              sender=bot)
        assert no_device.value.users == (carol,)

        # a member whose only device is not signed by its owner: Element's rule
        legacy = await e2ee_staff(stack, "lee", tmp_path / "lee-store", cross_signed=False)
        staff.append(legacy)
        room2 = await encrypted_dm(bob, bot, as_client)
        await as_client.invite(room2, legacy.user_id, user_id=bob.user_id)
        await as_client.join(room2, user_id=legacy.user_id)
        with pytest.raises(CannotEncrypt, match="no device signed by its owner") as unsigned:
            await sender.send(room2, announcement("hello"), txn_id=uuid.uuid4().hex,
                              sender=bot)
        assert unsigned.value.users == (legacy.user_id,)

        # another bot identity has no device here
        with pytest.raises(CannotEncrypt, match="no E2EE device for sender"):
            await sender.send(room, announcement("hello"), txn_id=uuid.uuid4().hex,
                              sender=f"@someone-else:{stack.server_name}")
    finally:
        await sender.close()
    assert await bot_events(stack, room, "m.room.encrypted", bot) == []
    assert await bot_events(stack, room, "m.room.message", bot) == []


async def test_routing_encrypts_only_encrypted_rooms(
    stack: Stack, as_client: MatrixClient, staff: list, tmp_path: Path,
) -> None:
    bot = await new_bot(stack, as_client)
    dave = await e2ee_staff(stack, "dave", tmp_path / "dave-store")
    staff.append(dave)
    dm = await encrypted_dm(dave, bot, as_client)
    plain = await dave.room_create(name="plain", invite=[bot])
    assert isinstance(plain, nio.RoomCreateResponse), plain
    await as_client.join(plain.room_id, user_id=bot)

    sender = EncryptedSender(as_client, homeserver_url=stack.synapse.base_url, user_id=bot,
                             store_dir=tmp_path / "crypto" / "enclave", ready_timeout=60)
    await sender.start()
    try:
        assert await sender.wait_ready()
        router = RoutingSender(PlainSender(as_client), RoomEncryption(as_client),
                               EncryptedSenders([sender]))
        in_dm = await router.send(dm, announcement("to the DM"), txn_id=uuid.uuid4().hex,
                                  sender=bot)
        in_plain = await router.send(plain.room_id, announcement("to the room"),
                                     txn_id=uuid.uuid4().hex, sender=bot)
        # a second bot identity (in the room) without a device of its own is refused there
        other = await new_bot(stack, as_client)
        await as_client.invite(dm, other, user_id=dave.user_id)
        await as_client.join(dm, user_id=other)
        with pytest.raises(CannotEncrypt, match="no E2EE device configured"):
            await router.send(dm, announcement("x"), txn_id=uuid.uuid4().hex, sender=other)
    finally:
        await sender.close()
    assert [e["event_id"] for e in await bot_events(stack, dm, "m.room.encrypted", bot)] == [in_dm]
    assert [e["event_id"] for e in await bot_events(stack, plain.room_id, "m.room.message", bot)] \
        == [in_plain]
    ev = await decrypted(dave, dm, in_dm)
    assert isinstance(ev, nio.RoomMessageText) and ev.body == "to the DM"


async def test_a_device_added_after_the_first_message_gets_the_next_one(
    stack: Stack, as_client: MatrixClient, staff: list, tmp_path: Path,
) -> None:
    bot = await new_bot(stack, as_client)
    laptop = await e2ee_staff(stack, "erin", tmp_path / "erin-laptop")
    staff.append(laptop)
    room = await encrypted_dm(laptop, bot, as_client)
    sender = EncryptedSender(as_client, homeserver_url=stack.synapse.base_url, user_id=bot,
                             store_dir=tmp_path / "crypto" / "bot", ready_timeout=60)
    await sender.start()
    try:
        assert await sender.wait_ready()
        first = await sender.send(room, announcement("one"), txn_id=uuid.uuid4().hex,
                                  sender=bot)
        phone = await e2ee_staff(stack, "erin", tmp_path / "erin-phone",
                                 existing=laptop.user_id)
        staff.append(phone)
        second = await sender.send(room, announcement("two"), txn_id=uuid.uuid4().hex,
                                   sender=bot)
        on_laptop = [await decrypted(laptop, room, e) for e in (first, second)]
        assert [getattr(e, "body", None) for e in on_laptop] == ["one", "two"]
        on_phone = await decrypted(phone, room, second)
        assert isinstance(on_phone, nio.RoomMessageText), f"new device cannot read: {on_phone!r}"
        assert on_phone.body == "two"

        # the answer comes back encrypted (as the appservice sees it): the bot can read it
        reply = await phone.room_send(room, "m.room.message", {"msgtype": "m.text",
                                                               "body": "!ack"},
                                      ignore_unverified_devices=True)
        assert isinstance(reply, nio.RoomSendResponse), reply
        [raw] = [e for e in await bot_events(stack, room, "m.room.encrypted", phone.user_id)
                 if e["event_id"] == reply.event_id]
        clear = await sender.decrypt(room, raw, within=30)
        assert clear is not None, "the bot could not decrypt the staff member's reply"
        assert clear["type"] == "m.room.message" and clear["content"]["body"] == "!ack"
        assert clear["sender"] == phone.user_id and clear["event_id"] == reply.event_id
    finally:
        await sender.close()


async def test_a_device_that_cannot_sync_refuses_sends_with_the_reason(
    stack: Stack, as_client: MatrixClient, staff: list, tmp_path: Path,
) -> None:
    """Login works (appservice API) but the device's own connection goes nowhere: it never
    becomes ready, and sends are refused, not sent in clear or dropped."""
    bot = await new_bot(stack, as_client)
    frank = await e2ee_staff(stack, "frank", tmp_path / "frank-store")
    staff.append(frank)
    room = await encrypted_dm(frank, bot, as_client)
    dead = f"http://127.0.0.1:{free_port()}"
    sender = EncryptedSender(as_client, homeserver_url=dead, user_id=bot,
                             store_dir=tmp_path / "crypto" / "bot", ready_timeout=2)
    await sender.start()
    try:
        for _ in range(2):
            with pytest.raises(CannotEncrypt, match="not ready") as refused:
                await sender.send(room, announcement("x"), txn_id=uuid.uuid4().hex,
                                  sender=bot)
            assert refused.value.transient
        assert not sender.ready
    finally:
        await sender.close()
    assert await bot_events(stack, room, "m.room.encrypted", bot) == []
    assert await bot_events(stack, room, "m.room.message", bot) == []



async def test_login_fallback_lost_identity_reported_and_explicit_reset(
    stack: Stack, as_client: MatrixClient, staff: list, tmp_path: Path,
) -> None:
    """Without MSC4190 device creation the device comes from the appservice login and is
    cross-signed the same way; a lost key directory is reported (sends refused with the
    fix), never silently replaced; an explicit reset replaces the identity."""
    bot = await new_bot(stack, as_client)
    gail = await e2ee_staff(stack, "gail", tmp_path / "gail-store")
    staff.append(gail)
    room = await encrypted_dm(gail, bot, as_client)

    def make(store_dir: Path) -> EncryptedSender:
        return EncryptedSender(as_client, homeserver_url=stack.synapse.base_url, user_id=bot,
                               store_dir=store_dir, ready_timeout=60, appservice_devices=False)

    sender = make(tmp_path / "crypto" / "bot")
    await sender.start()
    try:
        assert await sender.wait_ready()
        assert sender.logins == 1 and sender.auth == "token"
        assert await device_cross_signed(as_client, bot, sender.device_id)
        master = await published_master(as_client, bot)
        first = await sender.send(room, announcement("one"), txn_id=uuid.uuid4().hex,
                                  sender=bot)
    finally:
        await sender.close()
    assert getattr(await decrypted(gail, room, first), "body", None) == "one"

    # the key directory is lost (a new, empty one): the published identity is not replaced
    lost = make(tmp_path / "crypto" / "bot-restored-empty")
    await lost.start()
    try:
        assert not await lost.wait_ready(5)
        assert lost.identity is not None and lost.identity.action == "lost"
        with pytest.raises(CannotEncrypt, match="reset-identity") as refused:
            await lost.send(room, announcement("x"), txn_id=uuid.uuid4().hex, sender=bot)
        assert not refused.value.transient
        assert await published_master(as_client, bot) == master
    finally:
        await lost.close()

    # the explicit fix: a reset request replaces the identity at the next start
    (tmp_path / "crypto" / "bot-restored-empty" / RESET_FILE).write_text("reset\n")
    reset = make(tmp_path / "crypto" / "bot-restored-empty")
    await reset.start()
    try:
        assert await reset.wait_ready()
        assert reset.identity is not None and reset.identity.action == "replace"
        new_master = await published_master(as_client, bot)
        assert new_master not in (None, master)
        assert await device_cross_signed(as_client, bot, reset.device_id)
        assert not (tmp_path / "crypto" / "bot-restored-empty" / RESET_FILE).exists()
        second = await reset.send(room, announcement("two"), txn_id=uuid.uuid4().hex,
                                  sender=bot)
    finally:
        await reset.close()
    assert getattr(await decrypted(gail, room, second), "body", None) == "two"

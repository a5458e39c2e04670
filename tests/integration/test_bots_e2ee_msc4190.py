"""The bots' E2EE devices on a homeserver whose registration has MSC4190 on
(``io.element.msc4190: true``, as ``appservice.msc4190`` makes ``enclave registration``
write it): Synapse then refuses the appservice login, and the device is created and used
through the appservice alone, cross-signed, readable by a staff client."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from bots.crypto import SESSION_FILE, CannotEncrypt, EncryptedSender
from bridge.matrix.client import MatrixClient

from .harness import Stack, nio
from .test_bots_e2ee import (
    announcement,
    decrypted,
    device_cross_signed,
    e2ee_staff,
    encrypted_dm,
    new_bot,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def msc4190_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack.prepare(tmp_path_factory.mktemp("msc4190"))
    reg = yaml.safe_load(stack.registration.read_text())
    reg["io.element.msc4190"] = True
    stack.registration.write_text(yaml.safe_dump(reg, sort_keys=False))
    stack.synapse.start()
    stack.bootstrap()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def as_client(msc4190_stack: Stack) -> AsyncIterator[MatrixClient]:
    async with aiohttp.ClientSession() as session:
        yield MatrixClient(session, msc4190_stack.synapse.base_url, msc4190_stack.as_token,
                           max_retries=3)


async def test_device_made_and_used_through_the_appservice_when_login_is_refused(
    msc4190_stack: Stack, as_client: MatrixClient, staff: list, tmp_path: Path,
) -> None:
    stack = msc4190_stack
    bot = await new_bot(stack, as_client)
    hana = await e2ee_staff(stack, "hana", tmp_path / "hana-store")
    staff.append(hana)
    room = await encrypted_dm(hana, bot, as_client)

    # the login fallback alone gets nowhere here: Synapse refuses appservice logins
    login_only = EncryptedSender(as_client, homeserver_url=stack.synapse.base_url,
                                 user_id=bot, store_dir=tmp_path / "crypto" / "login-only",
                                 ready_timeout=3, appservice_devices=False)
    await login_only.start()
    try:
        assert not await login_only.wait_ready(3)
        with pytest.raises(CannotEncrypt, match="not ready"):
            await login_only.send(room, announcement("x"), txn_id=uuid.uuid4().hex,
                                  sender=bot)
    finally:
        await login_only.close()

    sender = EncryptedSender(as_client, homeserver_url=stack.synapse.base_url, user_id=bot,
                             store_dir=tmp_path / "crypto" / "bot", ready_timeout=60)
    await sender.start()
    try:
        assert await sender.wait_ready()
        assert sender.auth == "appservice" and sender.logins == 0
        assert await device_cross_signed(as_client, bot, sender.device_id)
        event_id = await sender.send(room, announcement("through MSC4190"),
                                     txn_id=uuid.uuid4().hex, sender=bot)
    finally:
        await sender.close()
    ev = await decrypted(hana, room, event_id)
    assert isinstance(ev, nio.RoomMessageText) and ev.body == "through MSC4190"


async def test_a_device_whose_token_died_is_adopted_through_the_appservice(
    msc4190_stack: Stack, as_client: MatrixClient, staff: list, tmp_path: Path,
) -> None:
    """A device from before MSC4190 (its own token) whose token is no longer valid: the
    login it would use is refused now, so the same device is taken over through the
    appservice; its keys and the bot's identity stay."""
    stack = msc4190_stack
    bot = await new_bot(stack, as_client)
    ivy = await e2ee_staff(stack, "ivy", tmp_path / "ivy-store")
    staff.append(ivy)
    room = await encrypted_dm(ivy, bot, as_client)
    store = tmp_path / "crypto" / "bot"

    def make() -> EncryptedSender:
        return EncryptedSender(as_client, homeserver_url=stack.synapse.base_url, user_id=bot,
                               store_dir=store, ready_timeout=60)

    first = make()
    await first.start()
    try:
        assert await first.wait_ready()
        device = first.device_id
    finally:
        await first.close()
    # what a device from before looks like: its own (now invalid) token
    session_file = store / SESSION_FILE
    raw = json.loads(session_file.read_text())
    session_file.write_text(json.dumps({**raw, "auth": "token", "access_token": "revoked"}))

    again = make()
    await again.start()
    try:
        assert await again.wait_ready()
        assert again.device_id == device and again.auth == "appservice"
        assert again.identity is not None and again.identity.action == "reuse"
        event_id = await again.send(room, announcement("same device"),
                                    txn_id=uuid.uuid4().hex, sender=bot)
    finally:
        await again.close()
    assert json.loads(session_file.read_text())["auth"] == "appservice"
    ev = await decrypted(ivy, room, event_id)
    assert isinstance(ev, nio.RoomMessageText) and ev.body == "same device"

"""Encrypted announcements read by Element's own crypto (matrix-js-sdk + Rust crypto, device
isolation "only devices signed by their owner": Element's mode since April 2026).

Against a real Synapse: a newly provisioned person signs in with that client just before the
announcement; the first and every later message of the new encrypted DM decrypt; the person's
encrypted ✅ reaction and encrypted ``!ack`` are both recorded in the report; after a restart
of Enclave the bot keeps its cross-signing identity (no "identity changed") and its messages
still decrypt. matrix-nio (the other tests' client) applies none of Element's rules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bots.announcements.service import make_occurrence, spec_for

from .bots_helpers import NAMESPACE, Clock, InProcessEnclave, person, uid, write_bots_config
from .element_client import ElementClient, element_client_available
from .harness import SERVER_NAME, Stack, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(element_client_available() is not None,
                                 reason=str(element_client_available()))]

# one person and one bot user per test case: a case must find no identity of the other's
PEOPLE = {"invite": person("n1", "nora", "Legal"), "auto": person("n2", "nick", "Legal")}


def bot_id(join: str) -> str:
    return f"@{NAMESPACE}ann-{join}:{SERVER_NAME}"


def bots(store_dir: Path, join: str, localpart: str | None = None) -> dict:
    note = {"title": "Policy", "require_ack": True, "audience": {"department": ["Legal"]}}
    return {
        "encryption": {"enabled": True, "store_dir": str(store_dir)},
        "announcements": {
            "poll_seconds": 0.5,
            "bot": {"localpart": localpart or f"ann-{join}", "displayname": "Announcements"},
            "dm": {"encrypted": True, "join": join},
            "announcements": [
                {**note, "id": "policy-1", "body": "Hello {first_name}: read policy one."},
                {**note, "id": "policy-2", "body": "Hello {first_name}: read policy two."},
                {**note, "id": "policy-3", "body": "Hello {first_name}: read policy three."},
            ],
        },
    }


@pytest.fixture
async def element(tmp_path: Path) -> AsyncIterator[ElementClient]:
    client = await ElementClient.start(tmp_path / "node")
    try:
        yield client
    finally:
        await client.close()


async def announce(enclave: InProcessEnclave, announcement_id: str) -> None:
    enclave.clock.t += 60_000  # each later than the last: `!ack` means the latest
    svc = enclave.svc
    cfg = svc.config.bots.announcements
    spec = spec_for(next(a for a in cfg.announcements if a.id == announcement_id),
                    cfg.timezone)
    now = enclave.clock()
    created, _ = await make_occurrence(
        enclave.announcements, await svc.stores.directory.directory_view(),
        announcement_id=announcement_id, occurrence_id="o1", kind="manual", spec=spec,
        scheduled_at=now, created_by="test", now_ms=now)
    assert created
    enclave.bots.announcements.waker.wake()


async def bot_message(element: ElementClient, bot: str, text: str,
                      within: float = 60) -> dict[str, Any]:
    """Wait for the bot's message containing ``text`` as the Element client sees it, and
    until it is decrypted (or the client gives a final reason it cannot be)."""
    last: dict[str, Any] = {}

    async def shown() -> dict[str, Any] | None:
        nonlocal last
        for ev in await element.events():
            if ev["sender"] != bot or not ev["encrypted"]:
                continue
            last = ev
            if text in str(ev["content"].get("body", "")):
                return ev
        return None

    try:
        return await wait_until(shown, within=within, interval=0.5,
                                what=f"Element decrypting the bot's '{text}'")
    except AssertionError:
        raise AssertionError(f"not decrypted; last bot event seen: {last}\n"
                             f"{element.log_tail()}") from None


async def delivery(enclave: InProcessEnclave, announcement_id: str, user: str,
                   *, acked: bool = False) -> Any:
    async def row() -> Any:
        rows = await enclave.announcements.announcement_deliveries(announcement_id, "o1")
        found = [r for r in rows if r.target == user and r.status != "pending"]
        if found and (not acked or found[0].acked_at is not None):
            return found[0]
        return None

    return await wait_until(row, within=60, what=f"{announcement_id} delivery to {user}"
                            + (" acknowledged" if acked else ""))


# "auto" (the default): Enclave joins the person to the DM before the first message.
# "invite": the person's client joins after the first message was sent; the bot gives their
# devices the room key when it sees the join (sent up front, Element would try the message
# at the join before it knows the bot's device and give up: UNKNOWN_SENDER_DEVICE).
@pytest.mark.parametrize("join", ["auto", "invite"])
async def test_element_reads_every_message_of_a_new_dm_and_its_acks_are_recorded(
        stack: Stack, element: ElementClient, tmp_path: Path, join: str) -> None:
    me, bot = PEOPLE[join]["username"], bot_id(join)
    config = write_bots_config(stack, tmp_path / "enclave", [PEOPLE[join]],
                               bots=bots(tmp_path / "crypto", join))
    clock = Clock()
    enclave = InProcessEnclave(config, stack.as_port, clock)
    await enclave.start()
    try:
        await enclave.wait_directory()
        await enclave.wait_bots_ready()
        # newly provisioned: signs in (and sets up cross-signing, as Element does) just now
        await element.login(stack.synapse.base_url, uid(me), f"pw-{me}")
        await announce(enclave, "policy-1")

        first = await bot_message(element, bot, "read policy one")
        assert first["decryption_failure"] is None
        row = await delivery(enclave, "policy-1", uid(me))
        assert row.status == "sent", row
        room = first["room_id"]
        # the first message the bot sent in the new DM is that announcement
        bot_msgs = [e for e in await element.events(room) if e["sender"] == bot
                    and e["type"] == "m.room.message"]
        assert bot_msgs[0]["event_id"] == first["event_id"]

        # the bot's device is signed by its owner in Element's eyes
        device = enclave.bots.services.encrypted_sender._by_user[bot].device_id
        trust = await element.trust(bot, device)
        assert trust["device"]["signed_by_owner"] is True, trust
        assert trust["needs_user_approval"] is False

        # an encrypted ✅ on the first, an encrypted !ack on the second: both recorded
        await element.react(room, first["event_id"], "✅")
        acked = await delivery(enclave, "policy-1", uid(me), acked=True)
        assert acked.ack_method == "reaction"

        await announce(enclave, "policy-2")
        second = await bot_message(element, bot, "read policy two")
        assert second["room_id"] == room and second["decryption_failure"] is None
        await element.send(room, "!ack")
        acked2 = await delivery(enclave, "policy-2", uid(me), acked=True)
        assert acked2.ack_method == "command"
        await bot_message(element, bot, "Acknowledged")  # the bot's encrypted reply, readable
    finally:
        await enclave.stop()

    # a restart keeps the identity: same device, same keys, no "identity changed"
    enclave = InProcessEnclave(config, stack.as_port, clock)
    await enclave.start()
    try:
        await enclave.wait_bots_ready()
        sender = enclave.bots.services.encrypted_sender._by_user[bot]
        assert await sender.wait_ready(60)
        assert sender.device_id == device
        await announce(enclave, "policy-3")
        third = await bot_message(element, bot, "read policy three")
        assert third["decryption_failure"] is None
        trust = await element.trust(bot, device)
        assert trust["needs_user_approval"] is False and trust["device"]["signed_by_owner"]
        assert (await delivery(enclave, "policy-3", uid(me))).status == "sent"
    finally:
        await enclave.stop()


async def test_element_command_in_an_encrypted_room_staff_created(
        stack: Stack, element: ElementClient, tmp_path: Path) -> None:
    """Element shares the keys of a staff member's encrypted command with the bot's
    (cross-signed) device in a room the staff member made; the bot's answer decrypts."""
    who = person("n3", "nell", "Legal")
    config = write_bots_config(stack, tmp_path / "enclave", [who],
                               bots=bots(tmp_path / "crypto", "auto", "ann-cmd"))
    enclave = InProcessEnclave(config, stack.as_port, Clock())
    await enclave.start()
    try:
        await enclave.wait_directory()
        await enclave.wait_bots_ready()
        bot = bot_id("cmd")
        assert await enclave.bots.services.encrypted_sender._by_user[bot].wait_ready(60)
        await element.login(stack.synapse.base_url, uid("nell"), "pw-nell")
        room = await element.create_room([bot], name="nell and the bot")

        async def bot_joined() -> bool:
            return (await element.members(room)).get(bot) == "join"

        await wait_until(bot_joined, within=60, what="the bot joining nell's room")
        await element.send(room, "!help")
        reply = await bot_message(element, bot, "!ack")  # the help lists the commands
        assert reply["room_id"] == room and reply["decryption_failure"] is None
    finally:
        await enclave.stop()

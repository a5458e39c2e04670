"""An announcement by DM, end to end through the announcement bot with encryption on: the
bot creates an encrypted DM, sends from its own E2EE device, and the staff member's E2EE
matrix-nio client decrypts it; a person without an encrypting device is reported, not
skipped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bots.announcements.service import make_occurrence, spec_for

from .bots_helpers import (
    ANNOUNCE_BOT,
    Clock,
    InProcessEnclave,
    cross_sign,
    person,
    uid,
    write_bots_config,
)
from .harness import Stack, nio, wait_until

pytestmark = pytest.mark.integration

PEOPLE = [person("e1", "erin", "Sales"), person("e2", "ezra", "Sales"),
          person("e3", "ivan", "Sales")]


def bots(store_dir: Path) -> dict:
    return {
        "encryption": {"enabled": True, "store_dir": str(store_dir)},
        "announcements": {
            "poll_seconds": 0.5,
            "dm": {"encrypted": True},
            "announcements": [{
                "id": "enc-note", "title": "Confidential", "require_ack": False,
                "body": "Hello {first_name}: the merger closes on Friday.",
                "audience": {"department": ["Sales"]},
            }],
        },
    }


@pytest.fixture
async def enclave(stack: Stack, tmp_path: Path) -> AsyncIterator[InProcessEnclave]:
    config = write_bots_config(stack, tmp_path / "enclave", PEOPLE,
                               bots=bots(tmp_path / "crypto"))
    e = InProcessEnclave(config, stack.as_port, Clock())
    await e.start()
    try:
        await e.wait_directory()
        await e.wait_bots_ready()
        yield e
    finally:
        await e.stop()


async def e2ee_login(stack: Stack, username: str, store: Path, *,
                     cross_signed: bool = True) -> nio.AsyncClient:
    await asyncio.to_thread(store.mkdir, parents=True, exist_ok=True)
    config = nio.AsyncClientConfig(encryption_enabled=True, store=nio.store.SqliteStore)
    client = nio.AsyncClient(stack.synapse.base_url, uid(username), store_path=str(store),
                             config=config)
    resp = await client.login(f"pw-{username}", device_name="erin's laptop")
    assert isinstance(resp, nio.LoginResponse), resp
    assert isinstance(await client.keys_upload(), nio.KeysUploadResponse)
    if cross_signed:
        await cross_sign(client)  # as Element does: the bots count only owner-signed devices
    await client.sync(timeout=0, full_state=True)
    return client


async def test_encrypted_dm_announcement_is_decrypted_by_the_recipient(
        stack: Stack, enclave: InProcessEnclave, tmp_path: Path) -> None:
    erin = await e2ee_login(stack, "erin", tmp_path / "erin-store")
    # ivan's client encrypts but never set up cross-signing: Element would not show him
    # anything from the bot's device, so his delivery is not counted as sent
    ivan = await e2ee_login(stack, "ivan", tmp_path / "ivan-store", cross_signed=False)
    try:
        svc = enclave.svc
        cfg = svc.config.bots.announcements
        spec = spec_for(cfg.announcements[0], cfg.timezone)
        now = enclave.clock()
        created, sel = await make_occurrence(
            enclave.announcements, await svc.stores.directory.directory_view(),
            announcement_id="enc-note", occurrence_id="manual-1", kind="manual", spec=spec,
            scheduled_at=now, created_by="test", now_ms=now)
        assert created and set(sel.users) == {uid("erin"), uid("ezra"), uid("ivan")}
        enclave.bots.announcements.waker.wake()

        async def decrypted() -> str | None:
            resp = await erin.sync(timeout=500)
            if isinstance(resp, nio.SyncResponse):
                for rid in list(erin.invited_rooms):
                    await erin.join(rid)
                for room in resp.rooms.join.values():
                    for ev in room.timeline.events:
                        if isinstance(ev, nio.RoomMessageText) and ev.sender == ANNOUNCE_BOT:
                            return ev.body
            return None

        body = await wait_until(decrypted, within=60, interval=0,
                                what="erin's client decrypting the announcement")
        assert "the merger closes on Friday" in body and "Erin" in body

        # ezra never signed in with an encrypting client: reported, not sent in clear
        async def ezra_reported() -> list:
            rows = await enclave.announcements.announcement_deliveries("enc-note", "manual-1")
            return [r for r in rows if r.target == uid("ezra") and r.status == "failed"]

        (row,) = await wait_until(ezra_reported, within=60, what="ezra's failed delivery")
        assert "without any E2EE device" in row.detail and uid("ezra") in row.detail
        async def settled() -> dict | None:
            rows = {r.target: r for r in await enclave.announcements.announcement_deliveries(
                "enc-note", "manual-1")}
            return rows if all(r.status != "pending" for r in rows.values()) else None

        rows = await wait_until(settled, within=60, what="every delivery settled")
        assert rows[uid("erin")].status == "sent"
        assert rows[uid("ivan")].status == "failed"
        assert "no device signed by its owner" in rows[uid("ivan")].detail
    finally:
        await erin.close()
        await ivan.close()

"""A crash (SIGKILL of ``enclave run``) during a fan-out neither duplicates nor loses a
message: after the restart every targeted person has exactly one copy, in exactly one DM
with the bot, and exactly one audited send."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from .bots_helpers import (
    ANNOUNCE_BOT,
    announcement_copies,
    enclave_db_rows,
    joined_rooms,
    login,
    person,
    sync,
    uid,
    write_bots_config,
)
from .harness import EnclaveProcess, Stack, nio, wait_until

pytestmark = pytest.mark.integration

N = 30
PEOPLE = [person(str(100 + i), f"eng{i:02d}", "Engineering") for i in range(N)]


async def test_kill_during_fan_out_neither_duplicates_nor_loses(
        stack: Stack, tmp_path: Path, staff: list[nio.AsyncClient]) -> None:
    config = write_bots_config(stack, tmp_path / "enclave", PEOPLE, bots={"announcements": {
        "poll_seconds": 0.5,
        # one send at a time, so the kill lands in the middle of the fan-out
        "max_concurrency": 1,
        "announcements": [{
            "id": "handbook", "title": "New handbook",
            "body": "Hi {first_name}, the handbook has a new chapter.",
            "audience": {"department": ["Engineering"]}, "require_ack": True}],
    }})
    db = config.parent / "enclave.db"
    proc = EnclaveProcess(config, stack.as_port)
    try:
        await proc.start()

        async def provisioned() -> bool:
            _, ready = await proc.get_json("/ready")
            return (ready.get("directory") or {}).get("outcome") == "ok"

        await wait_until(provisioned, within=90, what="the start-up directory sync",
                         describe=proc.describe)
        queued = await proc.cli("announcements", "send", "handbook", "--occurrence", "run-1")
        assert queued.returncode == 0, queued.stderr
        assert f"for {N} people" in queued.stdout

        def sent() -> int:
            return enclave_db_rows(db, "SELECT COUNT(*) FROM announcement_deliveries "
                                       "WHERE status = 'sent'")[0][0]

        deadline = time.monotonic() + 90
        while sent() < 3:
            assert time.monotonic() < deadline, "the fan-out did not start\n" + proc.describe()
            await asyncio.sleep(0.02)
        await proc.kill()
        at_kill = sent()
        # the crash happened in the middle: some sent, some not (else this proves nothing)
        assert 0 < at_kill < N, at_kill

        await proc.start()

        async def all_sent() -> bool:
            return sent() == N

        await wait_until(all_sent, within=120, what="the rest of the fan-out after restart",
                         describe=proc.describe)
    finally:
        if proc.running:
            await proc.stop()

    bot_rooms = set(await joined_rooms(stack, ANNOUNCE_BOT))
    audits = enclave_db_rows(
        db, "SELECT user_id, outcome FROM audit WHERE kind = 'announcement_send'")
    for p in PEOPLE:
        user = uid(p["username"])
        copies = await announcement_copies(stack, user, "handbook", "run-1")
        assert len(copies) == 1, (user, copies)
        dms = bot_rooms & set(await joined_rooms(stack, user))
        assert dms == {copies[0][0]}, (user, dms)
        assert [o for u, o in audits if u == user] == ["applied"], (user, audits)
    rows = enclave_db_rows(db, "SELECT target, status, room_id, event_id FROM "
                               "announcement_deliveries WHERE occurrence_id = 'run-1'")
    assert len(rows) == N and {r[1] for r in rows} == {"sent"}
    # two of them read it with their own client: one message each
    for p in PEOPLE[:2]:
        client = await login(stack, p["username"])
        staff.append(client)
        resp = await sync(client)
        texts = [e.body for r in resp.rooms.join.values() for e in r.timeline.events
                 if isinstance(e, nio.RoomMessageText) and e.sender == ANNOUNCE_BOT]
        assert len(texts) == 1 and "the handbook has a new chapter" in texts[0], json.dumps(
            texts)

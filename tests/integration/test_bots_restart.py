"""A crash (SIGKILL of ``enclave run``) during a fan-out neither duplicates nor loses a
message: after the restart every targeted person has exactly one copy, in exactly one DM
with the bot, and exactly one audited send.

Also when the crash lands between a send Synapse stored and its record, and Synapse
restarts before Enclave resumes (its in-memory transaction ids are gone): the resumed pass
reads the DM back and records the event it finds. Before that read-back, the resend stored
a second copy for that person."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from bots.announcements.spec import MARKER

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
from .restart_proxy import RestartingProxy, start_proxy

pytestmark = pytest.mark.integration

N = 30


async def start_and_send(proc: EnclaveProcess, announcement: str,
                         occurrence: str) -> subprocess.CompletedProcess[str]:
    """Start Enclave, wait for its start-up directory sync, queue an announcement."""
    await proc.start()

    async def provisioned() -> bool:
        _, ready = await proc.get_json("/ready")
        return (ready.get("directory") or {}).get("outcome") == "ok"

    await wait_until(provisioned, within=90, what="the start-up directory sync",
                     describe=proc.describe)
    queued = await proc.cli("announcements", "send", announcement, "--occurrence", occurrence)
    assert queued.returncode == 0, queued.stderr
    return queued
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
        queued = await start_and_send(proc, "handbook", "run-1")
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


async def test_crash_between_send_and_record_then_synapse_restart_sends_once(
        stack: Stack, tmp_path: Path) -> None:
    people = [person(str(200 + i), f"ops{i:02d}", "Operations") for i in range(6)]
    config = write_bots_config(stack, tmp_path / "enclave", people, bots={"announcements": {
        "poll_seconds": 0.5, "max_concurrency": 1,
        "announcements": [{
            "id": "rota", "title": "New rota",
            "body": "Hi {first_name}, the rota changed.",
            "audience": {"department": ["Operations"]}}],
    }})
    db = config.parent / "enclave.db"
    proc = EnclaveProcess(config, stack.as_port)
    sends: list[str] = []

    def third_announcement(request: web.Request, body: bytes) -> bool:
        if (request.method != "PUT" or "/send/m.room.message/" not in request.path
                or request.query.get("user_id") != ANNOUNCE_BOT
                or MARKER not in json.loads(body)):
            return False
        sends.append(request.path)
        return len(sends) == 3

    def crash() -> None:  # Synapse has stored the third copy; Enclave dies before its record
        assert proc.proc is not None
        proc.proc.kill()
        proc.proc.wait(10)

    proxy = RestartingProxy(stack, third_announcement, crash)
    async with aiohttp.ClientSession() as upstream:
        proxy.session = upstream
        runner, url = await start_proxy(proxy)
        cfg = yaml.safe_load(config.read_text())
        cfg["homeserver"]["url"] = url  # Enclave reaches Synapse through the proxy
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        try:
            await start_and_send(proc, "rota", "r1")

            async def cut() -> bool:
                return bool(proxy.cut) and not proc.running

            await wait_until(cut, within=90, what="the cut send", describe=proc.describe)
            status, stored = proxy.cut[0]
            assert status == 200, "Synapse did not store the cut send"
            recorded = enclave_db_rows(db, "SELECT COUNT(*) FROM announcement_deliveries "
                                           "WHERE status = 'sent'")[0][0]
            assert recorded == 2, recorded  # the third was sent, not recorded

            await proc.start()

            async def all_sent() -> bool:
                return enclave_db_rows(db, "SELECT COUNT(*) FROM announcement_deliveries "
                                           "WHERE status = 'sent'")[0][0] == len(people)

            await wait_until(all_sent, within=120, what="the rest of the fan-out",
                             describe=proc.describe)
        finally:
            if proc.running:
                await proc.stop()
            await runner.cleanup()

    for p in people:
        user = uid(p["username"])
        copies = await announcement_copies(stack, user, "rota", "r1")
        assert len(copies) == 1, (user, copies)
    rows = enclave_db_rows(db, "SELECT event_id FROM announcement_deliveries "
                               "WHERE occurrence_id = 'r1'")
    assert stored["event_id"] in {r[0] for r in rows}, "the found event is the delivery's"

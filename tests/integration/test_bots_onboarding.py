"""The onboarding bot (``enclave run``) greets a newly provisioned staff member by DM with
the configured links and their department's space and room; people who were there before
it was switched on are not greeted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .bots_helpers import (
    WELCOME_BOT,
    enclave_db_rows,
    joined_rooms,
    login,
    person,
    sync,
    uid,
    write_bots_config,
    write_people,
)
from .harness import EnclaveProcess, Stack, nio, wait_until

pytestmark = pytest.mark.integration

PEOPLE = [person("1", "ann", "Sales"), person("2", "ben", "Sales")]
MANAGED = [
    {"id": "dept", "kind": "space", "for_each": "department", "name": "{value}"},
    {"id": "dept-general", "for_each": "department", "parent": "dept",
     "name": "{value} general"},
]


async def test_onboarding_greets_a_newly_provisioned_person(
        stack: Stack, tmp_path: Path, staff: list[nio.AsyncClient]) -> None:
    config = write_bots_config(stack, tmp_path / "enclave", PEOPLE, managed_rooms=MANAGED,
                               bots={"onboarding": {
                                   "poll_seconds": 0.5,
                                   "message": "Welcome, {first_name}! Glad you joined "
                                              "{department}.",
                                   "links": [{"title": "Handbook",
                                              "url": "https://wiki.example.com/handbook"}],
                               }})
    db = config.parent / "enclave.db"

    def kv(key: str) -> list[tuple[str]]:
        return enclave_db_rows(db, "SELECT value FROM component_kv WHERE component = "
                                   "'bot.onboarding' AND key = ?", key)

    proc = EnclaveProcess(config, stack.as_port)
    try:
        await proc.start()

        async def baseline() -> list[str] | None:
            rows = kv("baseline")
            return json.loads(rows[0][0]) if rows else None

        # the people there when onboarding first ran: remembered, not greeted
        base = await wait_until(baseline, within=90, what="onboarding's baseline",
                                describe=proc.describe)
        assert sorted(base) == [uid("ann"), uid("ben")]

        async def start_up_sync_done() -> bool:
            _, ready = await proc.get_json("/ready")
            return (ready.get("directory") or {}).get("outcome") == "ok"

        await wait_until(start_up_sync_done, within=90, what="the start-up directory sync")

        write_people(config.parent, [*PEOPLE, person("3", "cleo", "Sales")])
        synced = await proc.cli("sync", "--apply")
        assert synced.returncode == 0, synced.stderr

        async def greeted() -> dict | None:
            rows = kv(f"greeted:{uid('cleo')}")
            return json.loads(rows[0][0]) if rows else None

        done = await wait_until(greeted, within=60, what="cleo's welcome",
                                describe=proc.describe)
        assert "event_id" in done, done
    finally:
        if proc.running:
            await proc.stop()

    cleo = await login(stack, "cleo")
    staff.append(cleo)
    resp = await sync(cleo)
    room = resp.rooms.join[done["room"]]
    (welcome,) = [e for e in room.timeline.events
                  if isinstance(e, nio.RoomMessageText) and e.sender == WELCOME_BOT]
    assert welcome.body.startswith("Welcome, Cleo! Glad you joined Sales.")
    rooms = {r[0]: r[1] for r in enclave_db_rows(db, "SELECT key, room_id FROM managed_rooms")}
    assert f"[Sales](https://matrix.to/#/{rooms['dept/Sales']}?via=corp.test) (space)" in (
        welcome.body)
    assert f"[Sales general](https://matrix.to/#/{rooms['dept-general/Sales']}" in welcome.body
    assert "- [Handbook](https://wiki.example.com/handbook)" in welcome.body
    assert '<a href="https://wiki.example.com/handbook">Handbook</a>' in welcome.formatted_body
    # and cleo is in that space already (directory sync), so the link leads somewhere
    assert rooms["dept/Sales"] in resp.rooms.join
    # ann and ben were there before: no DM with the welcome bot
    welcome_rooms = set(await joined_rooms(stack, WELCOME_BOT))
    for u in ("ann", "ben"):
        assert not welcome_rooms & set(await joined_rooms(stack, uid(u))), u
    audit = enclave_db_rows(db, "SELECT user_id, outcome FROM audit WHERE kind = "
                                "'onboarding_welcome'")
    assert audit == [(uid("cleo"), "applied")]

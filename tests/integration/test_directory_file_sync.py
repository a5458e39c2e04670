"""Directory sync from a file source against a real Synapse, end to end.

Joiners, movers, leavers (with hand-over of rooms they alone administered), managed spaces
and rooms with members and power levels, a no-change run that writes nothing, refusals that
change nothing, the CLI, and an Element-style password login for the evaluation file.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.directory.sync import SyncRefused

from .directory_helpers import (
    account,
    homeserver_event_count,
    joined,
    members,
    open_sync,
    room_state,
    settled_event_count,
    uid,
    write_config,
)
from .harness import (
    BOT_USER_ID,
    REPO_ROOT,
    EnclaveProcess,
    Stack,
    metric,
    nio,
    subprocess_env,
    wait_until,
)

PEOPLE: list[dict[str, Any]] = [
    {"id": "1", "username": "hanna", "display_name": "Hanna Head", "department": "Sales",
     "title": "Head of Sales", "email": "hanna@corp.example.com", "initial_password": "pw-hanna"},
    {"id": "2", "username": "sam", "display_name": "Sam Seller", "department": "Sales",
     "manager": "1", "email": "sam@corp.example.com"},
    {"id": "3", "username": "sue", "display_name": "Sue Seller", "department": "Sales",
     "manager": "1", "email": "sue@corp.example.com", "initial_password": "pw-sue"},
    {"id": "4", "username": "otto", "display_name": "Otto Ops", "department": "Ops",
     "email": "otto@corp.example.com", "groups": ["it-admins"]},
    {"id": "5", "username": "olga", "display_name": "Olga Ops", "department": "Ops",
     "manager": "4", "email": "olga@corp.example.com"},
]

DIRECTORY: dict[str, Any] = {
    "source": {"type": "file", "path": "directory.yaml", "allow_initial_passwords": True},
    "interval_minutes": 0,
    "safety": {"max_deactivations": 2, "max_deactivation_percent": 50},
    "managed_rooms": [
        {"id": "dept", "kind": "space", "for_each": "department", "name": "{value}",
         "alias": "space-{slug}"},
        {"id": "dept-general", "for_each": "department", "parent": "dept",
         "name": "{value} general", "alias": "general-{slug}",
         "power": [{"managers": True, "level": 50}, {"group": "it-admins", "level": 100}]},
    ],
}


def write_people(base: Path, people: list[dict[str, Any]]) -> None:
    (base / "directory.yaml").write_text(yaml.safe_dump({"people": people}, sort_keys=False))


async def test_file_directory_lifecycle(stack: Stack, tmp_path: Path) -> None:
    write_people(tmp_path, PEOPLE)
    config = write_config(stack, tmp_path, DIRECTORY)

    # -- first run: everyone provisioned, spaces and rooms built ---------------------------
    async with open_sync(config) as sync:
        first = await sync.run()
    assert first.ok, first.failed
    assert first.applied["create_account"] == 5
    assert first.applied["create_managed_room"] == 4
    for p in PEOPLE:
        a = await account(stack, uid(p["username"]))
        assert a is not None and a["displayname"] == p["display_name"]
        assert a["deactivated"] is False
        assert [t["address"] for t in a["threepids"]] == [p["email"]]
    async with open_sync(config) as sync:
        rooms = await sync.directory_store.managed_rooms()
    assert set(rooms) == {"dept/Sales", "dept/Ops", "dept-general/Sales", "dept-general/Ops"}
    sales = rooms["dept-general/Sales"]
    assert joined(await members(stack, sales)) == {
        BOT_USER_ID, uid("hanna"), uid("sam"), uid("sue")}
    pl = await room_state(stack, sales, "m.room.power_levels")
    assert pl["users"].get(uid("hanna")) == 50  # manages people in the room
    assert uid("sam") not in pl["users"]
    ops_pl = await room_state(stack, rooms["dept-general/Ops"], "m.room.power_levels")
    assert ops_pl["users"].get(uid("otto")) == 100  # it-admins
    # never federates; placed in its department's space (both directions)
    create = await room_state(stack, sales, "m.room.create")
    assert create["m.federate"] is False
    # its members are the space's by rule: the space's members may join it without invite
    rules = await room_state(stack, sales, "m.room.join_rules")
    assert rules == {"join_rule": "restricted", "allow": [
        {"type": "m.room_membership", "room_id": rooms["dept/Sales"]}]}
    assert (await room_state(stack, rooms["dept/Sales"], "m.room.join_rules"))[
        "join_rule"] == "invite"
    space_create = await room_state(stack, rooms["dept/Sales"], "m.room.create")
    assert space_create["type"] == "m.space"
    assert await room_state(stack, rooms["dept/Sales"], "m.space.child", sales) is not None
    assert await room_state(stack, sales, "m.space.parent", rooms["dept/Sales"]) is not None

    # -- a second run with no change writes nothing ----------------------------------------
    events_before = await settled_event_count(stack)
    async with open_sync(config) as sync:
        again = await sync.run()
    assert again.plan.actions == ()
    assert again.applied == {}
    assert homeserver_event_count(stack) == events_before

    # -- an evaluation password logs in like Element would ---------------------------------
    client = nio.AsyncClient(stack.synapse.base_url, uid("hanna"))
    try:
        resp = await client.login("pw-hanna")
        assert isinstance(resp, nio.LoginResponse), resp
    finally:
        await client.close()

    # sue is logged in on a device when she leaves
    sue_client = nio.AsyncClient(stack.synapse.base_url, uid("sue"))
    assert isinstance(await sue_client.login("pw-sue"), nio.LoginResponse)

    # -- sue alone administers a room of her own; then edits, a move, a leaver -------------
    own = await stack.hs("POST", "/_matrix/client/v3/createRoom",
                         {"preset": "private_chat", "name": "sue's project"}, as_user=uid("sue"))
    own_room = own["room_id"]
    await stack.hs("POST", f"/_matrix/client/v3/rooms/{own_room}/invite",
                   {"user_id": uid("sam")}, as_user=uid("sue"))
    await stack.hs("POST", f"/_matrix/client/v3/join/{own_room}", {}, as_user=uid("sam"))

    people = [dict(p) for p in PEOPLE]
    people[1]["display_name"] = "Sam Seller-Smith"          # edit
    people[1]["email"] = "sam.smith@corp.example.com"       # edit
    people[4]["department"] = "Sales"                       # move Ops -> Sales
    people[2]["disabled"] = True                            # leaver (disabled)
    del people[0]["initial_password"]
    del people[2]["initial_password"]
    write_people(tmp_path, people)
    async with open_sync(config) as sync:
        plan = (await sync.run(apply=False)).plan
        counts = plan.count()
        # olga: out of Ops' space and room; into Sales' space (invite, join) and its
        # general room (joins through the space: no invite)
        assert counts == {"update_account": 1, "kick": 2, "invite": 1, "join": 1,
                          "join_through_parent": 1, "hand_over_room": 1,
                          "deactivate_account": 1}, counts
        result = await sync.run()
    assert result.ok, result.failed
    sam = await account(stack, uid("sam"))
    assert sam["displayname"] == "Sam Seller-Smith"
    assert [t["address"] for t in sam["threepids"]] == ["sam.smith@corp.example.com"]
    sue = await account(stack, uid("sue"))
    assert sue["deactivated"] is True
    # her session was revoked with the account
    try:
        whoami = await sue_client.whoami()
        assert isinstance(whoami, nio.WhoamiError), whoami
        assert whoami.status_code == "M_UNKNOWN_TOKEN"
    finally:
        await sue_client.close()
    # Synapse parts a deactivated user from every room in the background
    want = {BOT_USER_ID, uid("hanna"), uid("sam"), uid("olga")}

    async def sales_members() -> bool:
        return joined(await members(stack, sales)) == want

    await wait_until(sales_members, within=30, what="Sales general = hanna, sam, olga")
    assert uid("olga") not in joined(await members(stack, rooms["dept-general/Ops"]))
    assert uid("olga") not in (await room_state(
        stack, rooms["dept-general/Ops"], "m.room.power_levels"))["users"]
    # the hand-over happened before the deactivation: sue's manager now runs her room
    own_pl = await room_state(stack, own_room, "m.room.power_levels")
    assert own_pl["users"].get(uid("hanna")) == 100
    assert uid("hanna") in joined(await members(stack, own_room))

    # -- drift: someone kicks sam from Sales general; revert puts him back -----------------
    await stack.hs("POST", f"/_matrix/client/v3/rooms/{sales}/kick",
                   {"user_id": uid("sam")}, as_user=BOT_USER_ID)
    async with open_sync(config) as sync:
        drift = await sync.run()
    assert drift.applied == {"join_through_parent": 1}  # still in the space: no invite
    assert uid("sam") in joined(await members(stack, sales))

    # -- deleted from the file: a leaver too; no change after that -------------------------
    people = [p for p in people if p["id"] != "5"]
    write_people(tmp_path, people)
    async with open_sync(config) as sync:
        gone = await sync.run()
        assert gone.applied.get("deactivate_account") == 1
        assert (await sync.run(apply=False)).plan.actions == ()
    assert (await account(stack, uid("olga")))["deactivated"] is True

    # -- refusals change nothing -----------------------------------------------------------
    events_before = await settled_event_count(stack)
    write_people(tmp_path, [])
    async with open_sync(config) as sync:
        with pytest.raises(SyncRefused, match="no people at all"):
            await sync.run()
    write_people(tmp_path, people[:1])  # 3 of 4 active people would go: > max 2 and > 50%
    async with open_sync(config) as sync:
        with pytest.raises(SyncRefused) as refused:
            await sync.run()
    assert "max_deactivation_percent" in str(refused.value)
    # another process (the CLI beside 'enclave run') holds the sync lease: refused too
    async with open_sync(config) as sync:
        await sync.leases.acquire_lease("directory-sync", "other-host:1:x", sync.clock_ms(),
                                        60_000)
        with pytest.raises(SyncRefused, match="another directory sync is running"):
            await sync.run()
        await sync.leases.release_lease("directory-sync", "other-host:1:x")
    (tmp_path / "directory.yaml").write_text("people: [ {username: broken")
    async with open_sync(config) as sync:
        with pytest.raises(SyncRefused, match="directory source file"):
            await sync.run()
    assert homeserver_event_count(stack) == events_before
    for p in people:
        a = await account(stack, uid(p["username"]))
        assert a["deactivated"] is bool(p.get("disabled"))

    # -- the CLI: --plan prints, --apply refuses with exit 5 and nothing changed -----------
    write_people(tmp_path, people[:1])
    env = subprocess_env()
    cli = [sys.executable, "-m", "bridge", "sync", "-c", str(config)]

    def enclave(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    plan_out = await asyncio.to_thread(enclave, "--plan", "--force")
    assert plan_out.returncode == 0, plan_out.stderr
    assert "deactivate_account" in plan_out.stdout
    assert plan_out.stdout.count("deactivate_account(") == 2
    why = await asyncio.to_thread(enclave, "--plan", "--force", "--user", uid("otto"))
    assert why.returncode == 0, why.stderr
    assert "person 4 -> @otto:corp.test" in why.stdout
    assert "department: Ops" not in why.stdout  # deleted from the file: no entry to show
    assert "not in the directory any more" in why.stdout
    assert "will: deactivate_account(" in why.stdout and "deleted from the directory" in why.stdout
    applied = await asyncio.to_thread(enclave, "--apply")
    assert applied.returncode == 5, applied.stdout + applied.stderr
    assert "refused, nothing was changed" in applied.stderr
    assert homeserver_event_count(stack) == events_before
    write_people(tmp_path, people)
    ok = await asyncio.to_thread(enclave, "--apply")
    assert ok.returncode == 0, ok.stderr
    assert "nothing to do" in ok.stdout
    why = await asyncio.to_thread(enclave, "--plan", "--user", "sam")
    assert why.returncode == 0, why.stderr
    assert "display_name: Sam Seller-Smith" in why.stdout and "groups: -" in why.stdout
    assert "provisioned: active" in why.stdout and "in step with the directory" in why.stdout
    nobody = await asyncio.to_thread(enclave, "--plan", "--user", "nobody")
    assert nobody.returncode == 2 and "no person 'nobody'" in nobody.stderr
    assert "pw-hanna" not in plan_out.stdout + ok.stdout + ok.stderr


async def test_enclave_run_syncs_at_start_and_on_schedule(stack: Stack,
                                                          tmp_path: Path) -> None:
    """The service itself: a run at start-up, then one every interval (APScheduler)."""
    people = [{"id": "s1", "username": "sched1", "display_name": "Sched One"},
              {"id": "s2", "username": "sched2", "display_name": "Sched Two"}]
    write_people(tmp_path, people)
    path = write_config(stack, tmp_path, {
        "source": {"type": "file", "path": str(tmp_path / "directory.yaml")},
        "interval_minutes": 0.02,  # every 1.2 s
        "safety": {"max_deactivations": 5, "max_deactivation_percent": 100},
    })
    proc = EnclaveProcess(path, stack.as_port)
    try:
        await proc.start()

        async def provisioned() -> bool:
            a = await account(stack, uid("sched2"))
            return a is not None and a["displayname"] == "Sched Two"

        await wait_until(provisioned, within=30, what="start-up sync")

        async def first_run_done() -> dict[str, Any] | None:
            # the accounts can exist before the run has finished (saved and counted)
            _, ready = await proc.get_json("/ready")
            return ready["directory"] if ready["directory"].get("outcome") else None

        status = await wait_until(first_run_done, within=30, what="/ready: a finished run")
        assert status["outcome"] == "ok" and status["reason"] == "start-up", status
        people[0]["display_name"] = "Sched Renamed"
        write_people(tmp_path, people)

        async def renamed() -> bool:
            a = await account(stack, uid("sched1"))
            return a is not None and a["displayname"] == "Sched Renamed"

        await wait_until(renamed, within=30, what="a scheduled sync to apply the rename")

        async def counted() -> bool:  # the run counts itself once it has saved its records
            runs = metric(await proc.metrics(), "enclave_directory_sync_runs_total",
                          outcome="ok")
            return runs >= 2

        await wait_until(counted, within=30, what="two successful runs in the metrics")
    finally:
        await proc.stop()
        proc.cleanup()


async def test_homeserver_outage_mid_run_loses_nothing_and_doubles_nothing(
        stack: Stack, tmp_path: Path) -> None:
    """Synapse goes down half way through a first sync: the run reports what failed and
    remembers only what applied; the next run does exactly the rest."""
    people = [{"id": f"o{i}", "username": f"outage{i}", "display_name": f"Outage {i}",
               "department": "Outage", "email": f"outage{i}@corp.example.com"}
              for i in range(12)]
    write_people(tmp_path, people)
    config = write_config(stack, tmp_path, {
        "source": {"type": "file", "path": "directory.yaml"}, "interval_minutes": 0,
        "max_concurrency": 1,  # so "half way" is a well-defined point
        "managed_rooms": [{"id": "outage-room", "members": "all", "name": "Outage room",
                           "alias": "outage-room"}],
    })
    stopped = False

    def stop_half_way(done: int, total: int, action: Any) -> None:
        nonlocal stopped
        if done == 6 and not stopped:
            stopped = True
            stack.synapse.stop()  # blocks the loop ~1 s: the next requests find it down

    try:
        async with open_sync(config) as sync:
            sync.client.max_retries = 1
            first = await sync.run(progress=stop_half_way)
            assert stopped
            assert first.applied == {"create_account": 6}
            assert first.failed  # the rest: accounts, the room, its memberships
            remembered = {r.person_id for r in await sync.directory_store.directory_people()}
            # applied in person-id order: the first six are remembered, no one else
            assert remembered == set(sorted(f"o{i}" for i in range(12))[:6])
    finally:
        if not stack.synapse.running:
            await asyncio.to_thread(stack.synapse.start)
    async with open_sync(config) as sync:
        second = await sync.run()
        assert second.ok, second.failed
        assert second.applied == {"create_account": 6, "create_managed_room": 1,
                                  "invite": 12, "join": 12}
        rooms = await sync.directory_store.managed_rooms()
        assert (await sync.run(apply=False)).plan.actions == ()
    assert joined(await members(stack, rooms["outage-room"])) == {
        BOT_USER_ID, *(uid(f"outage{i}") for i in range(12))}

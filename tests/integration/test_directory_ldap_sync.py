"""Directory sync from a real OpenLDAP (1,000 people) into a real Synapse.

First sync creates everyone with department spaces and rooms; edits, a move, a group change,
a disabled and a deleted person are each reflected exactly by the next run; a run with no
change writes nothing; slapd dying in the middle of a run changes nothing; a directory
shrunk by half is refused.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ldap3 import MODIFY_ADD, MODIFY_REPLACE

from bridge.directory.sync import SyncRefused
from devstack.slapd import SlapdServer, it_admins, person_uid

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
from .harness import BOT_USER_ID, Stack, wait_until
from .ldap_fixtures import ldap_config, running_slapd

N_PEOPLE = 1000
N_DEPARTMENTS = 20


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[SlapdServer]:
    with running_slapd(tmp_path, N_PEOPLE, n_departments=N_DEPARTMENTS,
                       rootpw="bind-pw-" + tmp_path.name[-8:]) as server:
        yield server


def directory_section(server: SlapdServer, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "ldap_password").write_text(server.rootpw + "\n")
    source = ldap_config(server, page_size=200).model_dump(mode="json", exclude_none=True)
    source["bind_password"] = {"file": str(tmp_path / "ldap_password")}
    return {
        "source": source,
        "interval_minutes": 0,
        "mapping": {"localpart_template": "{username}"},
        "safety": {"max_deactivations": 25, "max_deactivation_percent": 5},
        "max_concurrency": 16,
        "managed_rooms": [
            {"id": "dept", "kind": "space", "for_each": "department", "name": "{value}",
             "alias": "space-{slug}"},
            {"id": "dept-general", "for_each": "department", "parent": "dept",
             "name": "{value} general", "alias": "{slug}-general",
             "power": [{"managers": True, "level": 50}, {"group": "it-admins", "level": 100}]},
            {"id": "heads", "groups": ["managers"], "name": "Department heads",
             "alias": "heads"},
        ],
    }


def modify(server: SlapdServer, dn: str, changes: dict[str, Any]) -> None:
    conn = server.connection()
    try:
        assert conn.modify(dn, changes), conn.result
    finally:
        conn.unbind()


def person_user(n: int) -> str:
    return uid(person_uid(n))


async def test_ldap_directory_lifecycle(stack: Stack, slapd: SlapdServer, tmp_path: Path) -> None:
    config = write_config(stack, tmp_path, directory_section(slapd, tmp_path))

    # -- first sync: everyone, their spaces and rooms --------------------------------------
    async with open_sync(config) as sync:
        first = await sync.run()
        rooms = await sync.directory_store.managed_rooms()
    assert first.ok, first.failed[:3]
    assert first.applied["create_account"] == N_PEOPLE
    assert first.applied["create_managed_room"] == 2 * N_DEPARTMENTS + 1
    listed = await stack.hs("GET", "/_synapse/admin/v2/users?limit=5000&guests=false")
    names = {u["name"] for u in listed["users"]}
    assert {person_user(n) for n in range(1, N_PEOPLE + 1)} <= names
    p7 = await account(stack, person_user(7))
    entry = slapd.connection()
    entry.search(slapd.person_dn(7), "(objectClass=*)", attributes=["displayName", "mail"])
    assert p7["displayname"] == str(entry.entries[0].displayName)
    assert [t["address"] for t in p7["threepids"]] == [str(entry.entries[0].mail)]
    entry.unbind()
    # Department 03: 50 people; its head (person 3) manages the others: power 50
    d3 = rooms["dept-general/Department 03"]
    want_d3 = {person_user(n) for n in range(3, N_PEOPLE + 1, N_DEPARTMENTS)}
    assert joined(await members(stack, d3)) == want_d3 | {BOT_USER_ID}
    assert joined(await members(stack, rooms["dept/Department 03"])) == want_d3 | {BOT_USER_ID}
    users_pl = (await room_state(stack, d3, "m.room.power_levels"))["users"]
    assert users_pl.get(person_user(3)) == 50
    for admin in it_admins(N_PEOPLE, n_departments=N_DEPARTMENTS):
        dep = (admin - 1) % N_DEPARTMENTS + 1
        pl = await room_state(stack, rooms[f"dept-general/Department {dep:02d}"],
                              "m.room.power_levels")
        assert pl["users"].get(person_user(admin)) == 100
    assert joined(await members(stack, rooms["heads"])) == {
        person_user(n) for n in range(1, N_DEPARTMENTS + 1)} | {BOT_USER_ID}

    # -- no change: zero admin writes, zero homeserver events ------------------------------
    before = await settled_event_count(stack)
    async with open_sync(config) as sync:
        again = await sync.run()
    assert again.plan.actions == () and again.applied == {}
    assert homeserver_event_count(stack) == before

    # -- edit, move, group change, disable, delete, join -----------------------------------
    modify(slapd, slapd.person_dn(100), {"displayName": [(MODIFY_REPLACE, ["Renamed Person"])],
                                          "mail": [(MODIFY_REPLACE, ["new100@example.com"])]})
    # person 203 moves from Department 03 to Department 05
    modify(slapd, slapd.person_dn(203), {"departmentNumber": [(MODIFY_REPLACE,
                                                               ["Department 05"])]})
    # person 505 (Department 05) joins it-admins: only the group entry changes
    modify(slapd, slapd.group_dn("it-admins"), {"member": [(MODIFY_ADD,
                                                            [slapd.person_dn(505)])]})
    modify(slapd, slapd.person_dn(300), {"pwdAccountLockedTime": [(MODIFY_REPLACE,
                                                                   ["000001010000Z"])]})
    conn = slapd.connection()
    assert conn.delete(slapd.person_dn(400)), conn.result
    assert conn.add(f"uid=newbie,ou=people,{slapd.suffix}", "inetOrgPerson", {
        "cn": "New Bie", "sn": "Bie", "displayName": "New Bie", "uid": "newbie",
        "mail": "newbie@example.com", "departmentNumber": "Department 05",
        "manager": slapd.person_dn(5)}), conn.result
    conn.unbind()
    async with open_sync(config) as sync:
        plan = (await sync.run(apply=False)).plan
        assert plan.count() == {
            "update_account": 1,           # 100: name + email in one write
            "create_account": 1,           # newbie
            "deactivate_account": 2,       # 300 disabled, 400 deleted
            "kick": 2,                     # 203 out of Department 03's space and room
            "invite": 2, "join": 2,        # 203 and newbie into Department 05's space...
            "join_through_parent": 2,      # ...and its general room (no invite needed)
            "set_state": 1,                # Department 05 general: 505 -> 100
        }, plan.count()
        result = await sync.run()
    assert result.ok, result.failed
    assert (await account(stack, person_user(100)))["displayname"] == "Renamed Person"
    assert (await account(stack, person_user(300)))["deactivated"] is True
    assert (await account(stack, person_user(400)))["deactivated"] is True
    assert (await account(stack, uid("newbie")))["displayname"] == "New Bie"
    d5 = rooms["dept-general/Department 05"]
    pl5 = (await room_state(stack, d5, "m.room.power_levels"))["users"]
    assert pl5.get(person_user(505)) == 100
    assert {person_user(203), uid("newbie")} <= joined(await members(stack, d5))

    async def d3_members() -> bool:  # 203 kicked; 300 parted by deactivation
        return joined(await members(stack, d3)) == (
            want_d3 - {person_user(203), person_user(300)}) | {BOT_USER_ID}

    await wait_until(d3_members, within=30, what="Department 03 general after the changes")
    async with open_sync(config) as sync:
        assert (await sync.run(apply=False)).plan.actions == ()

    # -- LDAP dies in the middle of a run: nothing changes ---------------------------------
    modify(slapd, slapd.person_dn(101), {"displayName": [(MODIFY_REPLACE, ["Not Applied"])]})
    before = await settled_event_count(stack)
    async with open_sync(config) as sync:
        sync.source._after_page = lambda page: slapd.kill() if page == 2 else None
        with pytest.raises(SyncRefused, match="page 3"):
            await sync.run()
    assert homeserver_event_count(stack) == before
    assert (await account(stack, person_user(101)))["displayname"] != "Not Applied"
    slapd.start()

    # -- a directory shrunk by half is refused, nothing changes ----------------------------
    conn = slapd.connection()
    for n in range(2, N_PEOPLE + 1, 2):
        if n not in (100, 300, 400):
            assert conn.delete(slapd.person_dn(n)), conn.result
    conn.unbind()
    async with open_sync(config) as sync:
        with pytest.raises(SyncRefused, match="max_deactivations") as refused:
            await sync.run()
    assert "max_deactivation_percent" in str(refused.value)
    assert homeserver_event_count(stack) == before
    listed = await stack.hs("GET", "/_synapse/admin/v2/users?limit=5000&guests=false"
                                   "&deactivated=true")
    deactivated = {u["name"] for u in listed["users"] if u["deactivated"]}
    assert deactivated == {person_user(300), person_user(400)}
    _ = urllib.parse  # (quote kept for ad-hoc debugging of room ids)

"""Directory sync from a real OpenLDAP: accounts it must not touch and names that imitate
(issue 15). A server admin whose localpart a directory entry maps onto is reported "not
adopted" and never joined into, nor kicked out of, a managed room; entries that imitate
Enclave's own users or an existing account (Unicode TR39 confusables) are left out with the
reason, and no account is made for them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.slapd import SlapdServer, person_uid

from .directory_helpers import account, members, open_sync, uid, write_config
from .harness import Stack
from .ldap_fixtures import ldap_source_with_password_file, running_slapd

N_PEOPLE = 10


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[SlapdServer]:
    with running_slapd(tmp_path, N_PEOPLE, n_departments=2,
                       rootpw="bind-pw-" + tmp_path.name[-8:]) as server:
        yield server


def directory_section(server: SlapdServer, tmp_path: Path) -> dict[str, Any]:
    source = ldap_source_with_password_file(server, tmp_path)
    return {
        "source": source, "interval_minutes": 0,
        "mapping": {"localpart_template": "{username}", "collision": "suffix"},
        "managed_rooms": [{"id": "dept", "for_each": "department", "name": "{value}",
                           "alias": "lk-{slug}"}],
    }


async def server_admin(stack: Stack) -> tuple[str, str]:
    """``@admin``, a server admin made by hand (not by Enclave): (user id, token)."""
    try:
        return await asyncio.to_thread(stack.synapse.register_user, "admin", "pw-admin", True)
    except RuntimeError:  # made by the other test of this module
        user_id = uid("admin")
        login = await stack.hs("POST", "/_matrix/client/v3/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "admin"},
            "password": "pw-admin"})
        return user_id, login["access_token"]


def add_person(server: SlapdServer, username: str, display: str) -> None:
    conn = server.connection()
    try:
        assert conn.add(f"uid={username},ou=people,{server.suffix}", "inetOrgPerson", {
            "cn": display, "sn": display.split()[-1], "displayName": display,
            "uid": username, "mail": f"x{abs(hash(username)) % 10**8}@example.com",
            "departmentNumber": "Department 01"}), conn.result
    finally:
        conn.unbind()


def delete_person(server: SlapdServer, username: str) -> None:
    conn = server.connection()
    try:
        assert conn.delete(f"uid={username},ou=people,{server.suffix}"), conn.result
    finally:
        conn.unbind()


async def test_not_adopted_admin_is_never_touched(stack: Stack, slapd: SlapdServer,
                                                  tmp_path: Path) -> None:
    admin_id, admin_token = await server_admin(stack)
    add_person(slapd, "ädmin", "Admin Person")  # normalises to 'admin'
    config = write_config(stack, tmp_path, directory_section(slapd, tmp_path))
    async with open_sync(config) as sync:
        result = await sync.run()
        rooms = await sync.directory_store.managed_rooms()
    assert result.ok, result.failed[:3]
    assert ("directory.adopt", admin_id) in {(f.rule_id, f.subject)
                                             for f in result.plan.findings}
    touched = [a.describe() for a in result.plan.actions if admin_id in a.describe()]
    assert touched == []
    everyone = rooms["dept/Department 01"]
    assert admin_id not in await members(stack, everyone)
    # the admin joins the company room by hand, then the entry is deleted: still untouched
    await stack.hs("POST", f"/_matrix/client/v3/rooms/{everyone}/invite",
                   {"user_id": admin_id}, as_user=stack.bot_user_id)
    await stack.hs("POST", f"/_matrix/client/v3/join/{everyone}", {}, token=admin_token)
    assert (await members(stack, everyone)).get(admin_id) == "join"
    delete_person(slapd, "ädmin")
    async with open_sync(config) as sync:
        again = await sync.run()
    assert [a.describe() for a in again.plan.actions if admin_id in a.describe()] == []
    assert (await members(stack, everyone)).get(admin_id) == "join"
    assert (await account(stack, admin_id))["deactivated"] is False


async def test_lookalike_entries_are_left_out_with_the_reason(
        stack: Stack, slapd: SlapdServer, tmp_path: Path) -> None:
    await server_admin(stack)
    config = write_config(stack, tmp_path, directory_section(slapd, tmp_path))
    async with open_sync(config) as sync:
        assert (await sync.run()).ok
    victim = uid(person_uid(1))
    victim_name = (await account(stack, victim))["displayname"]
    imitation = victim_name.replace("e", "е", 1).replace("a", "а", 1)  # Cyrillic е / а
    assert imitation != victim_name
    for username, display in [("enclave", "Enclave"), ("enclave-admin-2", "Enclave Admin"),
                              ("adrnin", "Server Admin"), ("imitator", imitation),
                              ("x" * 70, "Long Name")]:
        add_person(slapd, username, display)
    async with open_sync(config) as sync:
        result = await sync.run()
    why = dict(result.refused_mappings)
    reasons = " | ".join(why.values())
    assert "imitates Enclave's own user @enclave:" in reasons  # not enclave-2
    assert "reserved prefix 'enclave-admin'" in reasons
    assert "looks like @admin:" in reasons
    assert f"looks like {victim_name!r}" in reasons
    assert len(why) == 4, why
    for lp in ("enclave-2", "enclave-admin-2", "adrnin", "imitator"):
        assert await account(stack, uid(lp)) is None
    # the long uid is provisioned, cut, and the cut reported
    assert await account(stack, uid("x" * 64)) is not None
    notes = [f for f in result.plan.findings if f.rule_id == "directory.mapping"]
    assert any("cut to 64 characters" in f.message for f in notes), notes

"""Directory records an auditor reads, with a real OpenLDAP, a real Synapse and the
``enclave sync`` CLI: an entry with someone else's email is refused as a finding (the owner
keeps it), a deleted leaver's rooms go to their remembered manager, ``sync --plan --user``
explains a deleted person by username, and CLI runs leave no admin session behind (counted
through Synapse's admin API).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.slapd import SlapdServer, person_uid

from .directory_helpers import ADMIN_LOCALPART, account, room_state, uid, write_config
from .harness import REPO_ROOT, Stack, subprocess_env
from .ldap_fixtures import ldap_source_with_password_file, running_slapd

pytestmark = pytest.mark.integration

N_PEOPLE = 10  # departments 01 and 02, headed by people 1 and 2


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[SlapdServer]:
    with running_slapd(tmp_path, N_PEOPLE, n_departments=2,
                       rootpw="bind-pw-" + tmp_path.name[-8:]) as server:
        yield server


def directory_section(server: SlapdServer, tmp_path: Path) -> dict[str, Any]:
    source = ldap_source_with_password_file(server, tmp_path)
    return {"source": source, "interval_minutes": 0,
            "mapping": {"localpart_template": "{username}"},
            "safety": {"max_deactivations": 5, "max_deactivation_percent": 50},
            "leavers": {"successors": ["manager", "bot"]}}


async def enclave(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", *args, "-c", str(config)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)


def person(n: int) -> str:
    return uid(person_uid(n))


async def emails(stack: Stack, user_id: str) -> list[str]:
    acct = await account(stack, user_id)
    assert acct is not None, user_id
    return [t["address"] for t in acct.get("threepids") or []]


async def admin_sessions(stack: Stack) -> list[dict[str, Any]]:
    """The devices (sessions) of Enclave's admin: logging out deletes a session's device."""
    admin = urllib.parse.quote(uid(ADMIN_LOCALPART))
    return (await stack.hs("GET", f"/_synapse/admin/v2/users/{admin}/devices"))["devices"]


async def test_directory_records(stack: Stack, slapd: SlapdServer, tmp_path: Path) -> None:
    config = write_config(stack, tmp_path, directory_section(slapd, tmp_path))
    assert (await enclave(config, "migrate")).returncode == 0
    before = len(await admin_sessions(stack))
    r = await enclave(config, "sync", "--apply")
    assert r.returncode == 0, r.stdout + r.stderr
    owner_mail = f"{person_uid(4)}@"
    (mail4,) = await emails(stack, person(4))
    assert mail4.startswith(owner_mail)

    # -- person 3 (manager: person 1) is the only admin of a room of their own ----------------
    created = await stack.hs("POST", "/_matrix/client/v3/createRoom",
                             {"preset": "private_chat", "name": "p3's project",
                              "room_version": "11"}, as_user=person(3))
    room = created["room_id"]

    # -- a new entry with person 4's email: refused as a finding, person 4 keeps it -----------
    conn = slapd.connection()
    assert conn.add(f"uid=dupe,ou=people,{slapd.suffix}", "inetOrgPerson", {
        "cn": "Du Pe", "sn": "Pe", "displayName": "Du Pe", "uid": "dupe", "mail": mail4.upper(),
        "departmentNumber": "Department 01"}), conn.result
    # -- and person 3 is deleted from the directory -------------------------------------------
    assert conn.delete(slapd.person_dn(3)), conn.result
    conn.unbind()
    # the plan explains the deleted person by username (not only by Matrix id)
    r = await enclave(config, "sync", "--plan", "--user", person_uid(3))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deleted" in r.stdout and "hand_over_room" in r.stdout, r.stdout
    assert f"successor={person(1)}" in r.stdout, r.stdout
    r = await enclave(config, "sync", "--apply")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "directory.email.duplicate" in r.stdout and uid("dupe") in r.stdout, r.stdout
    assert await emails(stack, person(4)) == [mail4]
    assert await emails(stack, uid("dupe")) == []
    # the deleted leaver's room: its manager is admin now (not Enclave's bot)
    pl = await room_state(stack, room, "m.room.power_levels")
    assert pl["users"].get(person(1)) == 100, pl
    assert (await account(stack, person(3)))["deactivated"] is True

    # -- the duplicate removed again: person 4 still has the email -----------------------------
    conn = slapd.connection()
    assert conn.delete(f"uid=dupe,ou=people,{slapd.suffix}"), conn.result
    conn.unbind()
    r = await enclave(config, "sync", "--apply")
    assert r.returncode == 0, r.stdout + r.stderr
    assert await emails(stack, person(4)) == [mail4]

    # -- three CLI syncs, and no admin session left behind ------------------------------------
    for _ in range(2):
        assert (await enclave(config, "sync", "--plan")).returncode == 0
    sessions = await admin_sessions(stack)
    assert len(sessions) == before, sessions
    assert not [d for d in sessions if d.get("device_id") == "ENCLAVE_ADMIN_API"], sessions

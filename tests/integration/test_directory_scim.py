"""SCIM push into a running Enclave, and the homeserver following, against a real Synapse.

Requests are shaped as Okta and Entra ID send them (Entra: capitalised ops, string booleans).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .directory_helpers import account, joined, members, uid
from .harness import EnclaveProcess, Stack, wait_until

TOKEN = "scim-test-token-0123456789"
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


@pytest.fixture
async def enclave(stack: Stack, tmp_path: Path) -> AsyncIterator[EnclaveProcess]:
    (tmp_path / "scim_token").write_text(TOKEN + "\n")
    path = stack.write_enclave_config(tmp_path / "config.yaml")
    cfg = yaml.safe_load(path.read_text())
    cfg["directory"] = {
        "source": {"type": "scim", "token": {"file": str(tmp_path / "scim_token")},
                   "debounce_seconds": 0.3},
        "interval_minutes": 0,
        "safety": {"max_deactivations": 10, "max_deactivation_percent": 100},
        "managed_rooms": [{"id": "leads", "groups": ["Engineering leads"],
                           "name": "Engineering leads", "alias": "eng-leads",
                           "power": [{"group": "Engineering leads", "level": 50}]}],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = EnclaveProcess(path, stack.as_port)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()
        proc.cleanup()


async def scim(proc: EnclaveProcess, method: str, path: str, body: Any = None, *,
               token: str = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}
    async with aiohttp.ClientSession() as s, s.request(
            method, f"{proc.base_url}/scim/v2{path}", json=body, headers=headers) as r:
        text = await r.text()
        return r.status, (yaml.safe_load(text) if text else None)


async def wait_account(stack: Stack, user_id: str, what: str, check: Any) -> dict[str, Any]:
    async def probe() -> Any:
        a = await account(stack, user_id)
        return a if a is not None and check(a) else None

    return await wait_until(probe, within=30, what=what)


async def test_scim_provisioning_drives_the_homeserver(stack: Stack,
                                                       enclave: EnclaveProcess) -> None:
    # Okta creates a manager and a report
    status, lead = await scim(enclave, "POST", "/Users", {
        "schemas": [USER, ENTERPRISE], "userName": "lena@example.com",
        "name": {"givenName": "Lena", "familyName": "Lead"}, "displayName": "Lena Lead",
        "emails": [{"value": "lena@example.com", "primary": True, "type": "work"}],
        "active": True, "title": "Engineering Lead", "password": "okta-sends-this",
        ENTERPRISE: {"department": "Engineering"},
    })
    assert status == 201, lead
    # Entra ID creates another, with the manager reference it sends
    status, dev = await scim(enclave, "POST", "/Users", {
        "schemas": [USER, ENTERPRISE], "externalId": "a1b2", "userName": "dev@example.com",
        "active": True, "displayName": "Dev Eloper",
        "emails": [{"primary": True, "type": "work", "value": "dev@example.com"}],
        ENTERPRISE: {"department": "Engineering", "manager": {"value": lead["id"]}},
    })
    assert status == 201, dev
    # default mapping: {username} normalised -> lena.example.com
    lena, devu = uid("lena.example.com"), uid("dev.example.com")
    a = await wait_account(stack, lena, "Lena's account", lambda a: True)
    assert a["displayname"] == "Lena Lead"
    assert [t["address"] for t in a["threepids"]] == ["lena@example.com"]
    await wait_account(stack, devu, "Dev's account", lambda a: True)

    # a group -> the managed room it feeds, with power by group
    status, group = await scim(enclave, "POST", "/Groups", {
        "schemas": [GROUP], "displayName": "Engineering leads", "members": []})
    assert status == 201, group
    status, _ = await scim(enclave, "PATCH", f"/Groups/{group['id']}", {
        "schemas": [PATCH], "Operations": [
            {"op": "add", "path": "members", "value": [{"value": lead["id"]}]}]})
    assert status in (200, 204)

    async def leads_room() -> str | None:
        async with aiohttp.ClientSession() as s, s.get(
                f"{stack.synapse.base_url}/_matrix/client/v3/directory/room/"
                "%23eng-leads:corp.test") as r:
            if r.status != 200:
                return None
            rid = (await r.json())["room_id"]
        return rid if lena in joined(await members(stack, rid)) else None

    room_id = await wait_until(leads_room, within=30, what="Lena in the leads room")

    # Entra renames and then deactivates Dev (capitalised ops, string boolean)
    status, _ = await scim(enclave, "PATCH", f"/Users/{dev['id']}", {
        "schemas": [PATCH], "Operations": [
            {"op": "Replace", "path": "displayName", "value": "Dev Eloper-Smith"}]})
    assert status in (200, 204)
    await wait_account(stack, devu, "Dev renamed",
                       lambda a: a["displayname"] == "Dev Eloper-Smith")
    # a wrong token changes nothing
    status, err = await scim(enclave, "PATCH", f"/Users/{lead['id']}", {
        "schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": False}}]},
        token="wrong")
    assert status == 401 and err["status"] == "401"
    status, _ = await scim(enclave, "PATCH", f"/Users/{dev['id']}", {
        "schemas": [PATCH], "Operations": [
            {"op": "Replace", "path": "active", "value": "False"}]})
    assert status in (200, 204)
    await wait_account(stack, devu, "Dev deactivated", lambda a: a["deactivated"])

    # Okta removes Lena from the group, then deletes her
    status, _ = await scim(enclave, "PATCH", f"/Groups/{group['id']}", {
        "schemas": [PATCH], "Operations": [
            {"op": "remove", "path": f'members[value eq "{lead["id"]}"]'}]})
    assert status in (200, 204)

    async def lena_out() -> bool:
        return lena not in joined(await members(stack, room_id))

    await wait_until(lena_out, within=30, what="Lena removed from the leads room")
    assert (await account(stack, lena))["deactivated"] is False
    status, _ = await scim(enclave, "DELETE", f"/Users/{lead['id']}")
    assert status == 204
    await wait_account(stack, lena, "Lena deactivated", lambda a: a["deactivated"])
    # every change is audited (the record follows the homeserver's answer); the password
    # Okta sent was never stored
    async def audited() -> str | None:
        out = await enclave.cli("audit", "--format", "json")
        return out.stdout if out.stdout.count('"deactivate_account"') >= 2 else None

    audit = await wait_until(audited, within=30, what="both deactivations in the audit log")
    assert "create_account" in audit and "okta-sends-this" not in audit

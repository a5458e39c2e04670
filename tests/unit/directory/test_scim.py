"""SCIM 2.0 endpoint (bridge.directory.scim) over a real SQLite store."""

from __future__ import annotations

import asyncio
import http.client
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from wsgiref.headers import Headers

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from scim2_client.client import BaseSyncSCIMClient
from scim2_client.engines.inprocess import (
    InProcessResponse,
    _prepare_request,
    _stays_under_base_url,
)
from scim2_tester import Status, check_server

from bridge.directory.scim import ScimService, ScimSource
from bridge.model.people import Person
from bridge.store import Stores, open_stores

TOKEN = "s3cret-scim-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/scim+json"}
USER_URN = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_URN = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENT_URN = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_URN = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR_URN = "urn:ietf:params:scim:api:messages:2.0:Error"
T0 = 1_700_000_000_000


# -- fixtures -----------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@dataclass
class Harness:
    tmp_path: Path
    clock: Clock = field(default_factory=Clock)
    changes: list[int] = field(default_factory=list)
    stores: list[Stores] = field(default_factory=list)

    async def open_store(self) -> Stores:
        store = open_stores("sqlite:///s.db", base_dir=self.tmp_path)
        await store.database.open()
        await store.database.migrate()
        self.stores.append(store)
        return store

    async def service(self, store: Stores) -> ScimService:
        svc = ScimService(store.scim, token=TOKEN, clock_ms=self.clock,
                          on_change=lambda: self.changes.append(self.clock.now))
        await svc.load()
        return svc


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    yield h
    for s in h.stores:
        await s.database.close()


@pytest.fixture
async def store(harness: Harness) -> Stores:
    return await harness.open_store()


MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client, harness: Harness) -> MakeClient:
    async def make(store: Stores) -> TestClient:
        app = web.Application()
        (await harness.service(store)).add_routes(app)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: MakeClient, store: Stores) -> TestClient:
    return await make_client(store)


# -- helpers --------------------------------------------------------------------------------

OKTA_USER: dict[str, Any] = {
    "schemas": [USER_URN],
    "userName": "alice.okta@example.com",
    "name": {"givenName": "Alice", "familyName": "Okta"},
    "emails": [{"primary": True, "value": "alice.okta@example.com", "type": "work"}],
    "displayName": "Alice Okta",
    "locale": "en-US",
    "externalId": "00u1abcd",
    "groups": [],
    "password": "Okta-Sends-This-1",
    "active": True,
}


def entra_user(manager: str | None = None) -> dict[str, Any]:
    ext: dict[str, Any] = {"department": "Engineering", "employeeNumber": "1042"}
    if manager:
        ext["manager"] = {"value": manager}
    return {
        "schemas": [USER_URN, ENT_URN],
        "externalId": "0a21f0f2-8d2a-4f8e-bf98-7b3ec2f2e1b1",
        "userName": "bob.entra@example.com",
        "active": True,
        "displayName": "Bob Entra",
        "title": "Engineer",
        "emails": [{"primary": True, "type": "work", "value": "bob@example.com"}],
        "meta": {"resourceType": "User"},
        "name": {"formatted": "Bob Entra", "familyName": "Entra", "givenName": "Bob"},
        "addresses": [{"type": "work", "locality": "Paris", "country": "FR",
                       "primary": True}],
        "roles": [],
        ENT_URN: ext,
    }


def patch(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_URN], "Operations": list(ops)}


async def create(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(f"/scim/v2/{path}", headers=AUTH, data=orjson.dumps(body))
    assert resp.status == 201, await resp.text()
    return await resp.json(content_type=None)


async def stored(store: Stores, rt: str = "User") -> dict[str, dict[str, Any]]:
    return {r.id: orjson.loads(r.data) for r in await store.scim.scim_list(rt)}


def assert_scim_error(body: dict[str, Any], status: int) -> None:
    assert body["schemas"] == [ERROR_URN]
    assert body["status"] == str(status)
    assert body["detail"]


# -- scim2-tester --------------------------------------------------------------------------

class UrllibSCIMClient(BaseSyncSCIMClient):
    """A scim2-client engine over http.client (httpx2, its network engine, is not installed
    here); it sends real HTTP requests to the server under test."""

    def __init__(self, base_url: str, headers: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url
        self.headers = headers

    def _stays_under_base_url(self, endpoint: str) -> bool:
        return _stays_under_base_url(self.base_url, endpoint)

    def _parse_json(self, response: Any) -> Any:
        return response.json()

    def request(self, method: str, url: str, **kwargs: Any) -> InProcessResponse:
        req = _prepare_request(self.base_url, self.headers, method, url, **kwargs)
        target = urlsplit(self.base_url)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        try:
            path = req.url.path + (f"?{req.url.query}" if req.url.query else "")
            conn.putrequest(req.method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in req.headers:
                conn.putheader(name, value)
            conn.endheaders(req.body or None)
            r = conn.getresponse()
            return InProcessResponse(r.status, Headers(list(r.getheaders())), r.read())
        finally:
            conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_scim2_tester_finds_no_failure(harness: Harness, store: Stores) -> None:
    app = web.Application()
    (await harness.service(store)).add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        client = UrllibSCIMClient(f"http://127.0.0.1:{port}/scim/v2",
                                  {"Authorization": f"Bearer {TOKEN}"})
        # scim2-tester is synchronous: run it in a thread while this loop serves it
        results = await asyncio.to_thread(check_server, client)
    finally:
        await runner.cleanup()
    assert len(results) > 100  # discovery, CRUD and PATCH of every attribute, both types
    # every check passes: no ERROR/CRITICAL, and not even a SHOULD-level deviation
    assert {r.status for r in results} == {Status.SUCCESS}, [
        r for r in results if r.status is not Status.SUCCESS]


# -- auth ---------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [
    None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x",
])
async def test_missing_or_wrong_token_is_401_and_stores_nothing(
        client: TestClient, store: Stores, harness: Harness, authorization: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    headers = {"Content-Type": "application/scim+json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    for method, path, body in (("POST", "Users", OKTA_USER), ("GET", "Users", None),
                               ("GET", "ServiceProviderConfig", None)):
        resp = await client.request(method, f"/scim/v2/{path}", headers=headers,
                                    data=orjson.dumps(body) if body else None)
        assert resp.status == 401
        assert resp.headers["Content-Type"].startswith("application/scim+json")
        assert_scim_error(await resp.json(content_type=None), 401)
    assert await store.scim.scim_list("User") == []
    assert harness.changes == []
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text


# -- users ----------------------------------------------------------------------------------

async def test_create_user_as_okta_sends_it(client: TestClient, store: Stores,
                                            harness: Harness) -> None:
    resp = await client.post("/scim/v2/Users", headers=AUTH, data=orjson.dumps(OKTA_USER))
    assert resp.status == 201
    body = await resp.json(content_type=None)
    uid = body["id"]
    assert resp.headers["Location"].endswith(f"/scim/v2/Users/{uid}")
    assert resp.headers["ETag"] == 'W/"1"'
    assert body["userName"] == "alice.okta@example.com"
    assert body["meta"]["version"] == 'W/"1"'
    assert "password" not in body
    rows = await store.scim.scim_list("User")
    assert [(r.id, r.external_id, r.version, r.created_at, r.updated_at) for r in rows] == [
        (uid, "00u1abcd", 1, T0, T0)]
    data = orjson.loads(rows[0].data)
    assert data["emails"][0]["value"] == "alice.okta@example.com"
    assert "password" not in data and "Okta-Sends-This-1" not in rows[0].data
    assert harness.changes == [T0]


async def test_create_user_as_entra_sends_it(client: TestClient, store: Stores) -> None:
    # Entra sends the manager as {"value": id} without the "$ref" scim2-models requires
    body = await create(client, "Users", entra_user(manager="some-manager-id"))
    assert body[ENT_URN] == {"employeeNumber": "1042", "department": "Engineering",
                             "manager": {"value": "some-manager-id"}}
    data = (await stored(store))[body["id"]]
    assert data["addresses"][0]["locality"] == "Paris"
    assert data["externalId"] == "0a21f0f2-8d2a-4f8e-bf98-7b3ec2f2e1b1"


async def test_json_content_type_accepted_other_types_refused(client: TestClient,
                                                              store: Stores) -> None:
    headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    resp = await client.post("/scim/v2/Users", headers=headers, data=orjson.dumps(OKTA_USER))
    assert resp.status == 201
    headers = {**AUTH, "Content-Type": "text/plain"}
    resp = await client.post("/scim/v2/Users", headers=headers,
                             data=orjson.dumps({**OKTA_USER, "userName": "x@example.com"}))
    assert resp.status == 415
    assert len(await store.scim.scim_list("User")) == 1


async def test_get_filter_and_paginate(client: TestClient) -> None:
    ids = []
    for i in range(5):
        u = await create(client, "Users", {"schemas": [USER_URN], "userName": f"u{i}@example.com",
                                           "externalId": f"ext-{i}"})
        ids.append(u["id"])

    resp = await client.get(f"/scim/v2/Users/{ids[2]}", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json(content_type=None))["userName"] == "u2@example.com"
    resp = await client.get("/scim/v2/Users/no-such-id", headers=AUTH)
    assert resp.status == 404
    assert_scim_error(await resp.json(content_type=None), 404)

    async def search(**query: str) -> dict[str, Any]:
        resp = await client.get("/scim/v2/Users", headers=AUTH, params=query)
        assert resp.status == 200, await resp.text()
        return await resp.json(content_type=None)

    found = await search(filter='userName eq "u3@example.com"')
    assert found["totalResults"] == 1 and found["Resources"][0]["id"] == ids[3]
    found = await search(filter='externalId eq "ext-1"')
    assert [r["id"] for r in found["Resources"]] == [ids[1]]
    found = await search(filter='userName eq "nobody@example.com"')  # Entra's probe
    assert found["totalResults"] == 0 and found["Resources"] == []

    page1 = await search(startIndex="1", count="2")
    page2 = await search(startIndex="3", count="2")
    page3 = await search(startIndex="5", count="2")
    assert [p["totalResults"] for p in (page1, page2, page3)] == [5, 5, 5]
    assert [p["itemsPerPage"] for p in (page1, page2, page3)] == [2, 2, 1]
    assert page2["startIndex"] == 3
    seen = [r["id"] for p in (page1, page2, page3) for r in p["Resources"]]
    assert sorted(seen) == sorted(ids)


async def test_put_replaces_the_user(client: TestClient, store: Stores,
                                     harness: Harness) -> None:
    u = await create(client, "Users", entra_user())
    harness.clock.now = T0 + 5000
    replacement = {"schemas": [USER_URN], "id": u["id"], "userName": "bob.entra@example.com",
                   "displayName": "Robert Entra", "active": True,
                   "emails": [{"value": "robert@example.com", "primary": True}]}
    resp = await client.put(f"/scim/v2/Users/{u['id']}", headers=AUTH,
                            data=orjson.dumps(replacement))
    assert resp.status == 200, await resp.text()
    assert resp.headers["ETag"] == 'W/"2"'
    [row] = await store.scim.scim_list("User")
    assert (row.version, row.created_at, row.updated_at) == (2, T0, T0 + 5000)
    data = orjson.loads(row.data)
    assert data["displayName"] == "Robert Entra"
    assert ENT_URN not in data and "title" not in data  # replaced, not merged
    assert harness.changes == [T0, T0 + 5000]


@pytest.mark.parametrize("ops", [
    # Entra ID: capitalised op, boolean as a string
    [{"op": "Replace", "path": "active", "value": "False"}],
    # Okta: no path, the attributes in the value
    [{"op": "replace", "value": {"active": False}}],
], ids=["entra", "okta"])
async def test_patch_deactivates(client: TestClient, store: Stores, harness: Harness,
                                 ops: list[dict[str, Any]]) -> None:
    u = await create(client, "Users", entra_user())
    resp = await client.patch(f"/scim/v2/Users/{u['id']}", headers=AUTH,
                              data=orjson.dumps(patch(*ops)))
    assert resp.status == 200, await resp.text()  # 200 + resource, what Okta expects
    assert resp.headers["ETag"] == 'W/"2"'
    assert (await resp.json(content_type=None))["active"] is False
    resp = await client.get(f"/scim/v2/Users/{u['id']}", headers=AUTH)
    assert (await resp.json(content_type=None))["active"] is False
    [row] = await store.scim.scim_list("User")
    assert row.version == 2 and orjson.loads(row.data)["active"] is False
    snap = await ScimSource(store.scim).read()
    assert snap.people[u["id"]].disabled is True
    assert len(harness.changes) == 2


async def test_patch_that_changes_nothing_writes_nothing(client: TestClient, store: Stores,
                                                         harness: Harness) -> None:
    u = await create(client, "Users", entra_user())
    resp = await client.patch(f"/scim/v2/Users/{u['id']}", headers=AUTH, data=orjson.dumps(
        patch({"op": "Replace", "path": "active", "value": "True"})))
    assert resp.status == 200
    assert [r.version for r in await store.scim.scim_list("User")] == [1]
    assert len(harness.changes) == 1


async def test_entra_manager_and_attribute_patches(client: TestClient, store: Stores) -> None:
    boss = await create(client, "Users", {"schemas": [USER_URN], "userName": "boss@example.com"})
    u = await create(client, "Users", entra_user())
    ops = patch(
        # Entra sets the manager with a bare id
        {"op": "Add", "path": f"{ENT_URN}:manager", "value": boss["id"]},
        {"op": "Replace", "path": f"{ENT_URN}:department", "value": "Sales"},
        {"op": "Replace", "path": 'emails[type eq "work"].value', "value": "b2@example.com"},
        {"op": "Replace", "path": 'addresses[type eq "work"].locality', "value": "Lyon"},
        {"op": "Add", "path": "title", "value": "Lead"},
    )
    resp = await client.patch(f"/scim/v2/Users/{u['id']}", headers=AUTH, data=orjson.dumps(ops))
    assert resp.status == 200, await resp.text()
    p = (await ScimSource(store.scim).read()).people[u["id"]]
    assert (p.manager, p.department, p.email, p.location, p.title) == (
        boss["id"], "Sales", "b2@example.com", "Lyon", "Lead")

    # Entra removes the manager with the old value attached
    resp = await client.patch(f"/scim/v2/Users/{u['id']}", headers=AUTH, data=orjson.dumps(patch(
        {"op": "Remove", "path": f"{ENT_URN}:manager", "value": [{"value": boss["id"]}]})))
    assert resp.status == 200, await resp.text()
    assert (await ScimSource(store.scim).read()).people[u["id"]].manager is None


async def test_if_match_with_a_stale_etag_is_412(client: TestClient, store: Stores,
                                                 harness: Harness) -> None:
    u = await create(client, "Users", OKTA_USER)
    body = orjson.dumps(patch({"op": "replace", "value": {"title": "CTO"}}))
    resp = await client.patch(f"/scim/v2/Users/{u['id']}", data=body,
                              headers={**AUTH, "If-Match": 'W/"7"'})
    assert resp.status == 412
    assert [r.version for r in await store.scim.scim_list("User")] == [1]
    resp = await client.patch(f"/scim/v2/Users/{u['id']}", data=body,
                              headers={**AUTH, "If-Match": 'W/"1"'})
    assert resp.status == 200
    assert len(harness.changes) == 2


async def test_concurrent_writes(client: TestClient, store: Stores, harness: Harness) -> None:
    async def post(i: int) -> int:
        user = {"schemas": [USER_URN], "userName": f"p{i % 10}@example.com"}
        resp = await client.post("/scim/v2/Users", headers=AUTH, data=orjson.dumps(user))
        return resp.status

    statuses = await asyncio.gather(*(post(i) for i in range(30)))
    assert sorted(statuses) == [201] * 10 + [409] * 20  # each userName created once
    assert len(await store.scim.scim_list("User")) == 10
    assert len(harness.changes) == 10


async def test_delete_user(client: TestClient, store: Stores, harness: Harness) -> None:
    u = await create(client, "Users", OKTA_USER)
    keep = await create(client, "Users", entra_user())
    resp = await client.delete(f"/scim/v2/Users/{u['id']}", headers=AUTH)
    assert resp.status == 204
    assert (await client.get(f"/scim/v2/Users/{u['id']}", headers=AUTH)).status == 404
    assert [r.id for r in await store.scim.scim_list("User")] == [keep["id"]]
    resp = await client.delete(f"/scim/v2/Users/{u['id']}", headers=AUTH)
    assert resp.status == 404
    assert len(harness.changes) == 3
    assert set((await ScimSource(store.scim).read()).people) == {keep["id"]}


async def test_duplicate_user_name_is_409(client: TestClient, store: Stores,
                                          harness: Harness) -> None:
    await create(client, "Users", OKTA_USER)
    resp = await client.post("/scim/v2/Users", headers=AUTH, data=orjson.dumps(OKTA_USER))
    assert resp.status == 409
    assert_scim_error(await resp.json(content_type=None), 409)
    assert len(await store.scim.scim_list("User")) == 1
    assert len(harness.changes) == 1


# -- groups ---------------------------------------------------------------------------------

async def test_groups_and_membership_patches(client: TestClient, store: Stores,
                                             harness: Harness) -> None:
    a = await create(client, "Users", OKTA_USER)
    b = await create(client, "Users", entra_user())
    g = await create(client, "Groups", {"schemas": [GROUP_URN], "displayName": "Engineering",
                                        "externalId": "grp-1", "members": []})
    gid = g["id"]

    async def members() -> set[str]:
        resp = await client.get(f"/scim/v2/Groups/{gid}", headers=AUTH)
        return {m["value"] for m in (await resp.json(content_type=None)).get("members", [])}

    async def do_patch(*ops: dict[str, Any]) -> None:
        resp = await client.patch(f"/scim/v2/Groups/{gid}", headers=AUTH,
                                  data=orjson.dumps(patch(*ops)))
        assert resp.status == 200, await resp.text()

    await do_patch({"op": "add", "path": "members", "value": [{"value": a["id"]}]})
    await do_patch({"op": "Add", "path": "members", "value": [{"value": b["id"]}]})
    assert await members() == {a["id"], b["id"]}
    snap = await ScimSource(store.scim).read()
    assert snap.groups["Engineering"].members == {a["id"], b["id"]}
    assert snap.people[a["id"]].groups == {"Engineering"}

    await do_patch({"op": "remove", "path": f'members[value eq "{a["id"]}"]'})  # Okta
    assert await members() == {b["id"]}
    await do_patch({"op": "Remove", "path": "members", "value": [{"value": b["id"]}]})  # Entra
    assert await members() == set()

    await do_patch({"op": "replace", "value": {"id": gid, "displayName": "Platform"}})  # Okta
    snap = await ScimSource(store.scim).read()
    assert set(snap.groups) == {"Platform"}
    assert [r.version for r in await store.scim.scim_list("Group")] == [6]
    assert len(harness.changes) == 2 + 1 + 5

    resp = await client.delete(f"/scim/v2/Groups/{gid}", headers=AUTH)
    assert resp.status == 204
    assert await store.scim.scim_list("Group") == []


# -- discovery ------------------------------------------------------------------------------

async def test_discovery_endpoints(client: TestClient) -> None:
    resp = await client.get("/scim/v2/ServiceProviderConfig", headers=AUTH)
    assert resp.status == 200
    spc = await resp.json(content_type=None)
    assert spc["patch"]["supported"] is True
    assert spc["filter"]["supported"] is True
    assert spc["bulk"]["supported"] is False
    assert spc["changePassword"]["supported"] is False
    assert spc["etag"]["supported"] is True
    assert spc["authenticationSchemes"][0]["type"] == "oauthbearertoken"

    resp = await client.get("/scim/v2/ResourceTypes", headers=AUTH)
    rts = {r["name"]: r for r in (await resp.json(content_type=None))["Resources"]}
    assert rts["User"]["endpoint"] == "/Users" and rts["Group"]["endpoint"] == "/Groups"
    assert rts["User"]["schemaExtensions"][0]["schema"] == ENT_URN

    resp = await client.get("/scim/v2/Schemas", headers=AUTH)
    ids = {s["id"] for s in (await resp.json(content_type=None))["Resources"]}
    assert {USER_URN, GROUP_URN, ENT_URN} <= ids


# -- failures change nothing ----------------------------------------------------------------

async def test_malformed_json_is_400_and_changes_nothing(client: TestClient, store: Stores,
                                                         harness: Harness) -> None:
    u = await create(client, "Users", OKTA_USER)
    before = await store.scim.scim_list("User")
    for method, path in (("POST", "Users"), ("PUT", f"Users/{u['id']}"),
                         ("PATCH", f"Users/{u['id']}")):
        resp = await client.request(method, f"/scim/v2/{path}", headers=AUTH,
                                    data=b'{"userName": "x@example.com",')
        assert resp.status == 400
        body = await resp.json(content_type=None)
        assert_scim_error(body, 400)
        assert body["scimType"] == "invalidSyntax"
    # valid JSON that is not a valid resource / patch
    for method, path, payload in (
            ("POST", "Users", {"schemas": [USER_URN], "displayName": "no userName"}),
            ("PATCH", f"Users/{u['id']}", {"schemas": [PATCH_URN],
                                           "Operations": [{"op": "frobnicate"}]}),
            ("POST", "Users", [1, 2, 3])):
        resp = await client.request(method, f"/scim/v2/{path}", headers=AUTH,
                                    data=orjson.dumps(payload))
        assert resp.status == 400, (method, path, await resp.text())
        assert_scim_error(await resp.json(content_type=None), 400)
    assert await store.scim.scim_list("User") == before
    assert len(harness.changes) == 1


async def test_store_failure_is_503_and_leaves_nothing_behind(
        client: TestClient, store: Stores, harness: Harness,
        monkeypatch: pytest.MonkeyPatch) -> None:
    u = await create(client, "Users", OKTA_USER)

    async def broken(*args: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(store.scim, "scim_put", broken)
    monkeypatch.setattr(store.scim, "scim_delete", broken)
    resp = await client.post("/scim/v2/Users", headers=AUTH, data=orjson.dumps(entra_user()))
    assert resp.status == 503
    assert_scim_error(await resp.json(content_type=None), 503)
    resp = await client.patch(f"/scim/v2/Users/{u['id']}", headers=AUTH, data=orjson.dumps(
        patch({"op": "replace", "value": {"active": False}})))
    assert resp.status == 503
    resp = await client.delete(f"/scim/v2/Users/{u['id']}", headers=AUTH)
    assert resp.status == 503
    monkeypatch.undo()

    # what the endpoint answers is what the store holds
    found = await (await client.get("/scim/v2/Users", headers=AUTH)).json(content_type=None)
    assert [(r["id"], r["active"]) for r in found["Resources"]] == [(u["id"], True)]
    assert found["Resources"][0]["meta"]["version"] == 'W/"1"'
    # the refused creation left no trace in the uniqueness index either
    await create(client, "Users", entra_user())
    assert len(harness.changes) == 2


# -- restart --------------------------------------------------------------------------------

async def test_data_survives_a_restart(make_client: MakeClient, harness: Harness) -> None:
    store1 = await harness.open_store()
    c1 = await make_client(store1)
    u = await create(c1, "Users", entra_user())
    g = await create(c1, "Groups", {"schemas": [GROUP_URN], "displayName": "Ops",
                                    "members": [{"value": u["id"]}]})
    harness.clock.now = T0 + 60_000
    resp = await c1.patch(f"/scim/v2/Users/{u['id']}", headers=AUTH, data=orjson.dumps(
        patch({"op": "Replace", "path": "title", "value": "Staff"})))
    assert resp.status == 200
    first = await (await c1.get(f"/scim/v2/Users/{u['id']}", headers=AUTH)).json(
        content_type=None)
    await c1.close()
    await store1.database.close()
    harness.stores.remove(store1)

    store2 = await harness.open_store()
    c2 = await make_client(store2)
    again = await (await c2.get(f"/scim/v2/Users/{u['id']}", headers=AUTH)).json(
        content_type=None)
    for body in (again, first):  # the test servers listen on different ports
        body["meta"].pop("location")
    assert again == first
    assert again["meta"]["version"] == 'W/"2"' and again["title"] == "Staff"
    assert again["meta"]["created"] == "2023-11-14T22:13:20Z"
    assert again["meta"]["lastModified"] == "2023-11-14T22:14:20Z"
    resp = await c2.get("/scim/v2/Users", headers=AUTH,
                        params={"filter": 'userName eq "bob.entra@example.com"'})
    assert (await resp.json(content_type=None))["totalResults"] == 1
    # uniqueness is enforced over what was loaded
    resp = await c2.post("/scim/v2/Users", headers=AUTH, data=orjson.dumps(entra_user()))
    assert resp.status == 409
    # versions go on from the stored one
    resp = await c2.patch(f"/scim/v2/Users/{u['id']}", headers=AUTH, data=orjson.dumps(
        patch({"op": "Replace", "path": "title", "value": "Principal"})))
    assert resp.headers["ETag"] == 'W/"3"'
    grp = await (await c2.get(f"/scim/v2/Groups/{g['id']}", headers=AUTH)).json(
        content_type=None)
    assert [m["value"] for m in grp["members"]] == [u["id"]]


async def test_requests_before_load_are_refused(aiohttp_client, store: Stores) -> None:
    svc = ScimService(store.scim, token=TOKEN, clock_ms=lambda: T0)
    app = web.Application()
    svc.add_routes(app)
    client = await aiohttp_client(app)
    resp = await client.post("/scim/v2/Users", headers=AUTH, data=orjson.dumps(OKTA_USER))
    assert resp.status == 503
    assert await store.scim.scim_list("User") == []


async def test_custom_path_prefix(aiohttp_client, store: Stores) -> None:
    svc = ScimService(store.scim, token=TOKEN, path_prefix="/idp/scim", clock_ms=lambda: T0)
    await svc.load()
    app = web.Application()
    svc.add_routes(app)
    client = await aiohttp_client(app)
    resp = await client.post("/idp/scim/Users", headers=AUTH, data=orjson.dumps(OKTA_USER))
    assert resp.status == 201
    assert resp.headers["Location"].startswith(f"http://{client.host}:{client.port}/idp/scim/")
    assert (await client.get("/scim/v2/Users", headers=AUTH)).status == 404


def test_empty_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ScimService(open_stores("sqlite:///s.db", base_dir=tmp_path).scim, token="",
                    clock_ms=lambda: T0)


# -- the directory source -------------------------------------------------------------------

USERS_TO_PEOPLE: list[tuple[dict[str, Any], dict[str, Any]]] = [
    # Entra: everything set
    ({**entra_user(manager="@boss"), "userName": "bob@example.com"},
     dict(username="bob@example.com", display_name="Bob Entra", email="bob@example.com",
          title="Engineer", department="Engineering", location="Paris", manager="@boss",
          disabled=False)),
    # Okta: no enterprise extension; display name from displayName
    (OKTA_USER,
     dict(username="alice.okta@example.com", display_name="Alice Okta",
          email="alice.okta@example.com", title=None, department=None, location=None,
          manager=None, disabled=False)),
    # no displayName: name.formatted
    ({"schemas": [USER_URN], "userName": "c", "name": {"formatted": "Carol C.",
                                                       "givenName": "Carol"}},
     dict(username="c", display_name="Carol C.", email=None, disabled=False)),
    # no formatted name: given + family; the primary email wins over the first
    ({"schemas": [USER_URN], "userName": "d", "name": {"givenName": "Dan", "familyName": "D"},
      "emails": [{"value": "d-home@example.com"},
                 {"value": "d@example.com", "primary": True}], "active": False},
     dict(username="d", display_name="Dan D", email="d@example.com", disabled=True)),
    # nothing but the userName; first email when none is primary; locality of a custom
    # extension
    ({"schemas": [USER_URN, "urn:ietf:params:scim:schemas:extension:acme:2.0:User"],
      "userName": "e@example.com", "emails": [{"value": "e1@example.com"},
                                               {"value": "e2@example.com"}],
      "urn:ietf:params:scim:schemas:extension:acme:2.0:User": {"locality": "Oslo"}},
     dict(username="e@example.com", display_name="e@example.com", email="e1@example.com",
          location="Oslo", disabled=False)),
]


async def test_source_maps_users_to_people(client: TestClient, store: Stores) -> None:
    boss = await create(client, "Users", {"schemas": [USER_URN], "userName": "boss"})
    ids = []
    for payload, _ in USERS_TO_PEOPLE:
        payload = orjson.loads(orjson.dumps(payload).replace(b"@boss", boss["id"].encode()))
        ids.append((await create(client, "Users", payload))["id"])
    snap = await ScimSource(store.scim).read()
    assert snap.source == "scim"
    assert set(snap.people) == {boss["id"], *ids}
    for uid, (_, expected) in zip(ids, USERS_TO_PEOPLE, strict=True):
        want = {k: (boss["id"] if v == "@boss" else v) for k, v in expected.items()}
        p = snap.people[uid]
        assert isinstance(p, Person) and p.id == uid
        assert {k: getattr(p, k) for k in want} == want, uid


async def test_source_maps_groups(client: TestClient, store: Stores) -> None:
    a = await create(client, "Users", {"schemas": [USER_URN], "userName": "a"})
    b = await create(client, "Users", {"schemas": [USER_URN], "userName": "b"})
    c = await create(client, "Users", {"schemas": [USER_URN], "userName": "c"})
    inner = await create(client, "Groups", {"schemas": [GROUP_URN], "displayName": "Inner",
                                            "members": [{"value": c["id"]}]})
    await create(client, "Groups", {
        "schemas": [GROUP_URN], "displayName": "Staff",
        "members": [{"value": a["id"]}, {"value": "not-a-user"},
                    {"value": inner["id"], "type": "Group"}]})
    # two groups with one name (allowed by SCIM): one directory group with both memberships
    await create(client, "Groups", {"schemas": [GROUP_URN], "displayName": "Sales",
                                    "members": [{"value": a["id"]}]})
    await create(client, "Groups", {"schemas": [GROUP_URN], "displayName": "Sales",
                                    "members": [{"value": b["id"]}]})
    snap = await ScimSource(store.scim).read()
    assert {gid: (g.name, set(g.members)) for gid, g in snap.groups.items()} == {
        "Inner": ("Inner", {c["id"]}),
        "Staff": ("Staff", {a["id"], c["id"]}),  # nested group expanded, non-user dropped
        "Sales": ("Sales", {a["id"], b["id"]}),
    }
    assert snap.people[a["id"]].groups == {"Staff", "Sales"}
    assert snap.people[c["id"]].groups == {"Inner", "Staff"}

    # a user deleted through SCIM is simply gone, from people and from groups
    await client.delete(f"/scim/v2/Users/{a['id']}", headers=AUTH)
    snap = await ScimSource(store.scim).read()
    assert a["id"] not in snap.people
    assert snap.groups["Sales"].members == {b["id"]}


async def test_source_raises_directory_error_when_the_store_fails(
        store: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.model.people import DirectoryError

    async def broken(*args: Any) -> Any:
        raise OSError("database is locked")

    monkeypatch.setattr(store.scim, "scim_list", broken)
    with pytest.raises(DirectoryError):
        await ScimSource(store.scim).read()


async def test_a_cancelled_request_leaves_cache_and_store_agreeing(
        harness: Harness, store: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    from scim2_server.requests import ScimRequest

    svc = await harness.service(store)
    started = asyncio.Event()
    real_put = store.scim.scim_put

    async def slow_put(row: Any) -> None:
        started.set()
        await asyncio.sleep(0.05)
        await real_put(row)

    monkeypatch.setattr(store.scim, "scim_put", slow_put)
    req = ScimRequest(method="POST", base_url="http://h/scim/v2", path="/Users",
                      headers={"Content-Type": "application/scim+json"},
                      body=orjson.dumps(OKTA_USER))
    task = asyncio.create_task(svc.handler.handle(req))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the write was finished, not abandoned half-way: the store and the cache both have it
    [row] = await store.scim.scim_list("User")
    get = ScimRequest(method="GET", base_url="http://h/scim/v2", path=f"/Users/{row.id}")
    assert (await svc.handler.handle(get)).status == 200

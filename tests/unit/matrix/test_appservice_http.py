"""The appservice HTTP routes over a real SQLite store (aiohttp test client)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bridge.matrix.appservice import AppserviceAPI, json_errors
from bridge.matrix.inbox import expand_journal
from bridge.metrics import Metrics
from bridge.store import Stores

from ..conftest import new_store

TOKEN = "hs-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TXN = "/_matrix/app/v1/transactions/"
STORE = web.AppKey("store", Stores)
METRICS = web.AppKey("metrics", Metrics)


class Harness:
    def __init__(self) -> None:
        self.notified = 0
        self.ready_report: dict[str, Any] = {"ready": True}
        self.ready_raises = False

    async def ready(self) -> dict[str, Any]:
        if self.ready_raises:
            raise RuntimeError("store exploded")
        return self.ready_report

    def notify(self) -> None:
        self.notified += 1


MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
def make_client(aiohttp_client, harness: Harness) -> MakeClient:
    async def make(store: Stores, *, max_size: int = 1024 * 1024) -> TestClient:
        async def user_exists(user_id: str) -> bool:
            return user_id == "@enclave:corp.example.com"

        metrics = Metrics()
        api = AppserviceAPI(store.journal, store.inbox, metrics, hs_token=TOKEN,
                            on_new_events=harness.notify,
                            user_exists=user_exists, ready=harness.ready,
                            clock_ms=lambda: 1_000)
        app = web.Application(middlewares=[json_errors], client_max_size=max_size)
        app[STORE], app[METRICS] = store, metrics
        app.add_routes(api.routes())
        return await aiohttp_client(app)

    return make


async def expand(client: TestClient) -> int:
    """What the inbox processor does next: expand journaled transactions into the inbox."""
    store = client.app[STORE]
    return await expand_journal(store.journal, store.inbox, client.app[METRICS], limit=1000)


def pdu(n: int, room: str = "!r1", **over: Any) -> dict[str, Any]:
    ev = {"type": "m.room.message", "event_id": f"$e{n}", "room_id": room,
          "sender": "@alice:corp.example.com", "origin_server_ts": n, "content": {"n": n}}
    ev.update(over)
    return ev


async def error_of(resp: Any) -> tuple[int, str]:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body.get("error"), str)
    return resp.status, body["errcode"]


def deep(n: int) -> bytes:
    return b'{"events": [' + b"[" * n + b"]" * n + b"]}"


@pytest.mark.parametrize(
    ("method", "path", "headers", "data", "expected"),
    [
        pytest.param("PUT", TXN + "t1", {}, b'{"events": []}', (401, "M_UNAUTHORIZED"),
                     id="no-token"),
        pytest.param("PUT", TXN + "t1", {"Authorization": "Bearer nope"}, b'{"events": []}',
                     (403, "M_FORBIDDEN"), id="wrong-token"),
        pytest.param("PUT", TXN + "t1?access_token=nope", AUTH, b'{"events": []}',
                     (403, "M_FORBIDDEN"), id="tokens-disagree"),
        pytest.param("PUT", TXN + "t1", AUTH, b'{"events": [', (400, "M_NOT_JSON"),
                     id="truncated-json"),
        pytest.param("PUT", TXN + "t1", AUTH, b"", (400, "M_NOT_JSON"), id="empty-body"),
        pytest.param("PUT", TXN + "t1", AUTH, b'{"events": ["\xff\xfe"]}', (400, "M_NOT_JSON"),
                     id="invalid-utf8"),
        pytest.param("PUT", TXN + "t1", AUTH, deep(5000), (400, "M_NOT_JSON"),
                     id="deep-nesting"),
        pytest.param("PUT", TXN + "t1", AUTH, b"NaN", (400, "M_NOT_JSON"), id="nan"),
        pytest.param("PUT", TXN + "t1", AUTH, b"[]", (400, "M_BAD_JSON"), id="array"),
        pytest.param("PUT", TXN + "t1", AUTH, b"{}", (400, "M_BAD_JSON"), id="no-events"),
        pytest.param("PUT", TXN + "t1", AUTH, b'{"events": {}}', (400, "M_BAD_JSON"),
                     id="events-not-list"),
        pytest.param("PUT", TXN + "x" * 256, AUTH, b'{"events": []}',
                     (400, "M_INVALID_PARAM"), id="txn-id-too-long"),
        pytest.param("GET", "/nope", {}, None, (404, "M_UNRECOGNIZED"), id="unknown-path"),
        pytest.param("GET", "/_matrix/app/v1/unknown", AUTH, None, (404, "M_UNRECOGNIZED"),
                     id="unknown-app-path"),
        pytest.param("POST", TXN + "t1", AUTH, b'{"events": []}', (405, "M_UNRECOGNIZED"),
                     id="wrong-method"),
        pytest.param("DELETE", "/health", {}, None, (405, "M_UNRECOGNIZED"),
                     id="wrong-method-health"),
        pytest.param("GET", "/_matrix/app/v1/users/@nobody:corp.example.com", AUTH, None,
                     (404, "M_NOT_FOUND"), id="unknown-user"),
        pytest.param("GET", "/_matrix/app/v1/users/@enclave:corp.example.com", {}, None,
                     (401, "M_UNAUTHORIZED"), id="user-query-unauthenticated"),
        pytest.param("GET", "/_matrix/app/v1/rooms/%23a:corp.example.com", AUTH, None,
                     (404, "M_NOT_FOUND"), id="room-alias"),
        pytest.param("POST", "/_matrix/app/v1/ping", {}, b"{}", (401, "M_UNAUTHORIZED"),
                     id="ping-unauthenticated"),
        pytest.param("POST", "/_matrix/app/v1/ping", AUTH, b"[1]", (400, "M_BAD_JSON"),
                     id="ping-not-object"),
        pytest.param("POST", "/_matrix/app/v1/ping", AUTH, b"{", (400, "M_NOT_JSON"),
                     id="ping-not-json"),
    ],
)
async def test_error_shapes(make_client: MakeClient, store: Stores, method: str, path: str,
                            headers: dict[str, str], data: bytes | None,
                            expected: tuple[int, str]) -> None:
    client = await make_client(store)
    resp = await client.request(method, path, headers=headers, data=data)
    assert await error_of(resp) == expected
    stats = await store.inbox.inbox_stats()
    assert (stats["transactions"], stats["journaled_transactions"]) == (0, 0)


async def test_too_large_body_is_413(make_client: MakeClient, store: Stores) -> None:
    client = await make_client(store, max_size=2048)
    body = orjson.dumps({"events": [pdu(1, content={"pad": "x" * 4096})]})
    resp = await client.put(TXN + "big", headers=AUTH, data=body)
    assert await error_of(resp) == (413, "M_TOO_LARGE")
    assert (await store.inbox.inbox_stats())["transactions"] == 0
    # just under the limit is fine
    small = orjson.dumps({"events": [pdu(2)]})
    assert len(small) < 2048
    resp = await client.put(TXN + "small", headers=AUTH, data=small)
    assert resp.status == 200


async def test_unexpected_error_is_json_500(make_client: MakeClient, store: Stores,
                                            harness: Harness) -> None:
    harness.ready_raises = True
    client = await make_client(store)
    resp = await client.get("/ready")
    assert await error_of(resp) == (500, "M_UNKNOWN")
    assert "store exploded" not in await resp.text()


@pytest.mark.parametrize(("report", "status"), [({"ready": True}, 200), ({"ready": False}, 503)])
async def test_ready(make_client: MakeClient, store: Stores, harness: Harness,
                     report: dict[str, Any], status: int) -> None:
    harness.ready_report = report
    client = await make_client(store)
    resp = await client.get("/ready")
    assert resp.status == status
    assert await resp.json() == report


async def test_health_user_ping_metrics(make_client: MakeClient, store: Stores) -> None:
    client = await make_client(store)
    resp = await client.get("/health")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    resp = await client.get("/_matrix/app/v1/users/@enclave:corp.example.com", headers=AUTH)
    assert (resp.status, await resp.json()) == (200, {})
    resp = await client.post("/_matrix/app/v1/ping", headers=AUTH,
                             data=b'{"transaction_id": "p1"}')
    assert (resp.status, await resp.json()) == (200, {})
    await client.put(TXN + "t1", headers=AUTH, data=orjson.dumps({"events": [pdu(1)]}))
    await expand(client)
    resp = await client.get("/metrics")
    text = await resp.text()
    assert resp.status == 200
    assert 'enclave_transactions_total{result="accepted"} 1.0' in text
    assert 'enclave_inbox_events{status="pending"} 1.0' in text


async def put(client: TestClient, txn: str, events: list[Any], *, expand_after: bool = True,
              **extra: Any) -> Any:
    resp = await client.put(TXN + txn, headers=AUTH,
                            data=orjson.dumps({"events": events, **extra}))
    assert (resp.status, await resp.json()) == (200, {})
    if expand_after:
        await expand(client)
    return resp


async def test_query_token_accepted(make_client: MakeClient, store: Stores) -> None:
    client = await make_client(store)
    resp = await client.put(f"{TXN}t1?access_token={TOKEN}", data=b'{"events": []}')
    assert (resp.status, await resp.json()) == (200, {})


async def test_same_txn_twice_stores_once(make_client: MakeClient, store: Stores,
                                          harness: Harness) -> None:
    client = await make_client(store)
    # resent while still in the journal: acknowledged, journaled once
    await put(client, "t1", [pdu(1), pdu(2)], expand_after=False)
    await put(client, "t1", [pdu(1), pdu(2)], expand_after=False)
    assert (await store.journal.journal_stats())[0] == 1
    assert harness.notified == 1
    assert await expand(client) == 1
    # resent after it was expanded: acknowledged, deduplicated by the inbox
    await put(client, "t1", [pdu(1), pdu(2)])
    assert len(await store.inbox.list_events("pending")) == 2
    stats = await store.inbox.inbox_stats()
    assert (stats["transactions"], stats["journaled_transactions"]) == (1, 0)


async def test_reused_txn_id_with_new_events_is_a_new_transaction(
        make_client: MakeClient, store: Stores) -> None:
    """Synapse on SQLite restarts its transaction ids at 1 after a restart: the same id
    with other events is new (its events must not be dropped as a resend), while a resend
    (same events, only the unsigned ``age`` differs) stays a duplicate."""
    client = await make_client(store)
    await put(client, "1", [pdu(1, unsigned={"age": 10})])
    await put(client, "1", [pdu(1, unsigned={"age": 99})])  # a resend
    await put(client, "1", [pdu(2)])  # after a homeserver restart
    assert [e["event_id"] for e in await store.inbox.list_events("pending")] == ["$e1", "$e2"]
    assert (await store.inbox.inbox_stats())["transactions"] == 2


async def test_event_redelivered_in_another_txn_stored_once(make_client: MakeClient,
                                                            store: Stores) -> None:
    client = await make_client(store)
    await put(client, "t1", [pdu(1)])
    await put(client, "t2", [pdu(1), pdu(2)])
    assert [e["event_id"] for e in await store.inbox.list_events("pending")] == ["$e1", "$e2"]


async def test_dedupe_survives_restart(make_client: MakeClient, tmp_path: Path,
                                       harness: Harness) -> None:
    store = await new_store(tmp_path)
    client = await make_client(store)
    await put(client, "t1", [pdu(1), pdu(2)])
    await client.close()
    await store.database.close()
    # "restart": a new store object and a new app on the same database file
    store2 = await new_store(tmp_path)
    try:
        client2 = await make_client(store2)
        await put(client2, "t1", [pdu(1), pdu(2)])
        await put(client2, "t2", [pdu(2), pdu(3)])
        assert [e["event_id"] for e in await store2.inbox.list_events("pending")] == [
            "$e1", "$e2", "$e3"]
        assert (await store2.inbox.inbox_stats())["transactions"] == 2
    finally:
        await store2.database.close()


async def test_malformed_event_quarantined_rest_stored(make_client: MakeClient,
                                                       store: Stores) -> None:
    client = await make_client(store)
    await put(client, "t1", [pdu(1), {"type": "m.room.message", "room_id": "!r1"}, pdu(3)],
              ephemeral=[{"type": "m.typing", "room_id": "!r1", "content": {}}])
    pending = await store.inbox.list_events("pending")
    assert [(e["event_id"], e["type"]) for e in pending] == [
        ("$e1", "m.room.message"), ("$e3", "m.room.message"), (None, "m.typing")]
    (q,) = await store.inbox.list_quarantine()
    assert (q["txn_id"].split("#")[0], q["section"], q["position"]) == ("t1", "events", 1)
    assert q["reason"] == "missing 'event_id'"
    assert orjson.loads(q["raw"]) == {"type": "m.room.message", "room_id": "!r1"}
    # a redelivery of the same transaction does not quarantine it twice
    await put(client, "t1", [pdu(1), {"type": "m.room.message", "room_id": "!r1"}, pdu(3)])
    assert len(await store.inbox.list_quarantine()) == 1


async def test_empty_transaction_does_not_wake_the_inbox(make_client: MakeClient, store: Stores,
                                                         harness: Harness) -> None:
    client = await make_client(store)
    await put(client, "t1", [])
    assert harness.notified == 0
    assert (await store.inbox.inbox_stats())["transactions"] == 1


async def test_recovery_sweep_refuses_exactly_one_transaction(aiohttp_client,
                                                              store: Stores) -> None:
    refused: list[int] = []

    async def ready() -> dict[str, Any]:
        return {"ready": True}

    async def no_user(user_id: str) -> bool:
        return False

    api = AppserviceAPI(store.journal, store.inbox, Metrics(), hs_token=TOKEN,
                        on_new_events=lambda: None, user_exists=no_user, ready=ready,
                        clock_ms=lambda: 1_000, on_refused=lambda: refused.append(1))
    app = web.Application(middlewares=[json_errors])
    app.add_routes(api.routes())
    client = await aiohttp_client(app)
    body = orjson.dumps({"events": [pdu(1)]})
    assert (await client.put(TXN + "t1", headers=AUTH, data=body)).status == 200
    api.request_recovery_sweep()
    resp = await client.put(TXN + "t2", headers=AUTH, data=body)
    assert await error_of(resp) == (503, "M_UNKNOWN")
    assert refused == [1]
    assert (await store.journal.journal_stats())[0] == 1  # t2 was not stored: it will be resent
    resp = await client.put(TXN + "t2", headers=AUTH, data=body)
    assert resp.status == 200 and refused == [1]
    assert (await store.journal.journal_stats())[0] == 2

"""The gate route over aiohttp's test server: auth, parsing, the decider, metrics."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bridge.gate.protocol import GateAnswer, GateRequest
from bridge.gate.service import GATE_PATH, GateService
from bridge.metrics import Metrics

SECRET = "gate-secret-for-tests"
AUTH = {"Authorization": f"Bearer {SECRET}"}
INVITE = {"check": "invite", "user": "@alice:corp.test", "target": "@eve:ext.test",
          "federated": False, "room": {"room_id": "!r", "members": {"@alice:corp.test": "join"}},
          "create": None, "event": None}


class Decider:
    def __init__(self, answer: GateAnswer | None = None, raises: bool = False,
                 returns: Any = None):
        self.seen: list[GateRequest] = []
        self.answer = answer or GateAnswer.allowed("test.ok", "fine")
        self.raises = raises
        self.returns = returns

    async def __call__(self, req: GateRequest) -> GateAnswer:
        self.seen.append(req)
        if self.raises:
            raise RuntimeError("policy exploded")
        return self.returns if self.returns is not None else self.answer


Make = Callable[..., Awaitable[tuple[TestClient, Decider, Metrics]]]


@pytest.fixture
def make(aiohttp_client: Any) -> Make:
    async def build(decider: Decider | None = None) -> tuple[TestClient, Decider, Metrics]:
        decider = decider or Decider()
        metrics = Metrics()
        app = web.Application()
        GateService(secret=SECRET, decide=decider, metrics=metrics).add_routes(app)
        return await aiohttp_client(app), decider, metrics
    return build


def checks(metrics: Metrics, check: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "enclave_gate_checks_total", {"check": check, "outcome": outcome})
    return value or 0.0


async def test_decider_gets_the_parsed_request_and_its_answer_is_sent(make: Make) -> None:
    deny = GateAnswer.denied("policy.dms.staff_external", "external invitee",
                             "Enclave policy (dm-staff-external): no.")
    client, decider, metrics = await make(Decider(deny))

    resp = await client.post(GATE_PATH, data=json.dumps(INVITE), headers=AUTH)

    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == deny.to_json()
    assert len(decider.seen) == 1
    req = decider.seen[0]
    assert req.check == "invite" and req.target == "@eve:ext.test"
    assert req.room is not None and req.room.members == {"@alice:corp.test": "join"}
    assert checks(metrics, "invite", "deny") == 1
    assert metrics.registry.get_sample_value("enclave_gate_decide_seconds_count") == 1


async def test_allow_with_edits(make: Make) -> None:
    edits = {"creation_content": {"m.federate": False}}
    client, _, metrics = await make(Decider(GateAnswer.allowed("r", "ok", edits=edits)))
    create = {"check": "create_room", "user": "@a:corp.test", "create": {"name": "x"}}

    resp = await client.post(GATE_PATH, data=json.dumps(create), headers=AUTH)

    assert resp.status == 200
    assert (await resp.json())["edits"] == edits
    assert checks(metrics, "create_room", "allow") == 1


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRET}"},
    {"Authorization": SECRET}, {"Authorization": f"Bearer {SECRET}x"},
], ids=["missing", "wrong", "basic", "no-scheme", "longer"])
async def test_wrong_or_missing_secret_is_401(make: Make, headers: dict[str, str]) -> None:
    client, decider, metrics = await make()

    resp = await client.post(GATE_PATH, data=json.dumps(INVITE), headers=headers)

    assert resp.status == 401
    assert (await resp.json())["errcode"] == "M_UNKNOWN_TOKEN"
    assert decider.seen == []
    assert checks(metrics, "unknown", "unauthorized") == 1


@pytest.mark.parametrize(("raw", "errcode", "check"), [
    (b"{not json", "M_BAD_JSON", "unknown"),
    (b"[1, 2]", "M_BAD_JSON", "unknown"),
    (json.dumps({**INVITE, "check": "kick"}).encode(), "M_INVALID_PARAM", "unknown"),
    (json.dumps({**INVITE, "user": None}).encode(), "M_MISSING_PARAM", "invite"),
    (json.dumps({**INVITE, "room": {"room_id": 7}}).encode(), "M_INVALID_PARAM", "invite"),
])
async def test_malformed_requests_are_400(make: Make, raw: bytes, errcode: str,
                                          check: str) -> None:
    client, decider, metrics = await make()

    resp = await client.post(GATE_PATH, data=raw, headers=AUTH)

    assert resp.status == 400
    payload = await resp.json()
    assert payload["errcode"] == errcode and payload["error"]
    assert decider.seen == []
    assert checks(metrics, check, "bad_request") == 1


@pytest.mark.parametrize("decider", [Decider(raises=True), Decider(returns={"allow": True})],
                         ids=["raises", "not-an-answer"])
async def test_decider_failure_is_500(make: Make, decider: Decider) -> None:
    client, _, metrics = await make(decider)

    resp = await client.post(GATE_PATH, data=json.dumps(INVITE), headers=AUTH)

    assert resp.status == 500
    assert (await resp.json())["errcode"] == "M_UNKNOWN"
    assert len(decider.seen) == 1
    assert checks(metrics, "invite", "error") == 1


async def test_only_post_is_routed(make: Make) -> None:
    client, _, _ = await make()
    assert (await client.get(GATE_PATH, headers=AUTH)).status == 405


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        GateService(secret="", decide=Decider())

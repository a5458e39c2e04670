"""Hostile or broken input sent straight at a running Enclave's appservice API.

Every answer must be spec-shaped JSON (``errcode`` + ``error``) with the right status, a
malformed event inside a valid transaction must be quarantined (not refused: refusing would
make Synapse resend it forever), a resent transaction must not be stored twice, and the
process must still be up afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from .harness import EnclaveProcess, Stack, metric

pytestmark = pytest.mark.integration

MAX_BODY = 64 * 1024
TXN_PATH = "/_matrix/app/v1/transactions/"


async def call(enclave: EnclaveProcess, method: str, path: str, *, token: str | None = None,
               query_token: str | None = None, body: bytes | None = None,
               tokens: tuple[str, ...] = (),
               ) -> tuple[int, str, Any]:
    """One request on a fresh connection: (status, content type, decoded JSON body).
    ``tokens``: one ``Authorization`` header each (a request may carry several)."""
    headers = CIMultiDict({"Content-Type": "application/json"})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    for t in tokens:
        headers.add("Authorization", f"Bearer {t}")
    params = {"access_token": query_token} if query_token is not None else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
            s.request(method, enclave.base_url + path, params=params, data=body,
                      headers=headers, timeout=aiohttp.ClientTimeout(total=15)) as resp:
        raw = await resp.read()
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = raw[:300]
        return resp.status, resp.content_type, decoded


def txn_path() -> str:
    return TXN_PATH + uuid.uuid4().hex


def event(**over: Any) -> dict[str, Any]:
    ev = {"type": "org.enclave.test", "event_id": f"$e2e-{uuid.uuid4().hex}",
          "room_id": f"!e2e-{uuid.uuid4().hex[:12]}", "sender": "@someone:corp.test",
          "origin_server_ts": 1_700_000_000_000, "content": {"n": 1}}
    ev.update(over)
    return ev


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


async def test_bad_requests_get_json_errors_and_leave_enclave_running(
    shared_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
) -> None:
    stack = shared_stack
    enclave = enclave_factory(stack, max_body_bytes=MAX_BODY)
    await enclave.start()
    good = stack.hs_token
    valid = enc({"events": []})
    deep = b'{"events": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    too_big = enc({"events": [event(content={"pad": "x" * (MAX_BODY + 1000)})]})
    cases: list[tuple[str, str, str, dict[str, Any], int, str]] = [
        # (what, method, path, request kwargs, status, errcode)
        ("no token", "PUT", txn_path(), {"body": valid}, 401, "M_UNAUTHORIZED"),
        ("wrong header token", "PUT", txn_path(), {"token": "nope", "body": valid}, 403,
         "M_FORBIDDEN"),
        ("wrong query token", "PUT", txn_path(), {"query_token": "nope", "body": valid}, 403,
         "M_FORBIDDEN"),
        ("header/query mismatch", "PUT", txn_path(),
         {"token": good, "query_token": good + "x", "body": valid}, 403, "M_FORBIDDEN"),
        ("query/header mismatch", "PUT", txn_path(),
         {"token": "nope", "query_token": good, "body": valid}, 403, "M_FORBIDDEN"),
        ("not JSON", "PUT", txn_path(), {"token": good, "body": b"{events: nope"}, 400,
         "M_NOT_JSON"),
        ("empty body", "PUT", txn_path(), {"token": good, "body": b""}, 400, "M_NOT_JSON"),
        ("invalid UTF-8", "PUT", txn_path(),
         {"token": good, "body": b'{"events": [], "x": "\xff\xfe"}'}, 400, "M_NOT_JSON"),
        ("nested 5000 deep", "PUT", txn_path(), {"token": good, "body": deep}, 400,
         "M_NOT_JSON"),
        ("events not a list", "PUT", txn_path(), {"token": good, "body": enc({"events": {}})},
         400, "M_BAD_JSON"),
        ("events missing", "PUT", txn_path(), {"token": good, "body": enc({"ephemeral": []})},
         400, "M_BAD_JSON"),
        ("events null", "PUT", txn_path(), {"token": good, "body": enc({"events": None})},
         400, "M_BAD_JSON"),
        ("ephemeral null", "PUT", txn_path(),
         {"token": good, "body": enc({"events": [], "ephemeral": None})}, 400, "M_BAD_JSON"),
        ("two headers, right one first", "PUT", txn_path(),
         {"tokens": (good, "nope"), "body": enc({"events": [event()]})}, 401,
         "M_UNAUTHORIZED"),
        ("two headers, right one last", "PUT", txn_path(),
         {"tokens": ("nope", good), "body": enc({"events": [event()]})}, 401,
         "M_UNAUTHORIZED"),
        ("body is an array", "PUT", txn_path(), {"token": good, "body": enc([event()])}, 400,
         "M_BAD_JSON"),
        ("body too large", "PUT", txn_path(), {"token": good, "body": too_big}, 413,
         "M_TOO_LARGE"),
        ("unknown route", "GET", "/_matrix/app/v1/nothing-here", {"token": good}, 404,
         "M_UNRECOGNIZED"),
        ("unknown root route", "PUT", "/transactions/1", {"token": good, "body": valid}, 404,
         "M_UNRECOGNIZED"),
        ("GET on transactions", "GET", txn_path(), {"token": good}, 405, "M_UNRECOGNIZED"),
        ("POST on transactions", "POST", txn_path(), {"token": good, "body": valid}, 405,
         "M_UNRECOGNIZED"),
        ("DELETE on transactions", "DELETE", txn_path(), {"token": good}, 405,
         "M_UNRECOGNIZED"),
    ]
    failures = []
    refused_events = [json.loads(kw["body"])["events"][0]["event_id"]
                      for what, _, _, kw, _, _ in cases if what.startswith("two headers")]
    for what, method, path, kw, want_status, want_errcode in cases:
        status, ctype, body = await call(enclave, method, path, **kw)
        ok = (status == want_status and ctype == "application/json" and isinstance(body, dict)
              and body.get("errcode") == want_errcode and isinstance(body.get("error"), str))
        if not ok:
            failures.append(f"{what}: got {status} {ctype} {body!r}, "
                            f"want {want_status} {want_errcode}")
    assert not failures, "\n".join(failures)

    # Just under the limit is fine: the limit is max_body_bytes, not something smaller.
    near = enc({"events": [event(content={"pad": "x" * (MAX_BODY - 1000)})]})
    assert len(near) < MAX_BODY
    status, _, body = await call(enclave, "PUT", txn_path(), token=good, body=near)
    assert (status, body) == (200, {}), body

    # A valid transaction with one malformed event: accepted, the bad event quarantined.
    txn_id = "e2e-" + uuid.uuid4().hex
    good_event = event()
    bad_event = event(room_id="not-a-room-id")
    payload = enc({"events": [good_event, bad_event]})
    for attempt in ("first", "resend"):
        status, ctype, body = await call(enclave, "PUT", TXN_PATH + txn_id, token=good,
                                         body=payload)
        assert (status, ctype, body) == (200, "application/json", {}), (attempt, body)

    r = await enclave.cli("inbox", "quarantine", "--format", "json")
    assert r.returncode == 0, r.stderr
    quarantined = [json.loads(line) for line in r.stdout.splitlines() if line]
    ours = [q for q in quarantined if q["txn_id"].split("#")[0] == txn_id]
    assert len(ours) == 1, f"quarantined {len(ours)} times (resend stored twice?): {ours}"
    assert ours[0]["position"] == 1 and ours[0]["section"] == "events"
    assert "room_id" in ours[0]["reason"], ours[0]
    assert json.loads(ours[0]["raw"])["event_id"] == bad_event["event_id"]

    db = sqlite3.connect(enclave.config.parent / "enclave.db")
    try:
        # stored under the homeserver's id plus a digest of its events (see appservice.py)
        txns = db.execute("SELECT COUNT(*) FROM transactions WHERE txn_id LIKE ?",
                          (txn_id + "#%",)).fetchone()[0]
        stored = db.execute("SELECT COUNT(*) FROM inbox WHERE event_id = ?",
                            (good_event["event_id"],)).fetchone()[0]
        refused_stored = db.execute(
            "SELECT COUNT(*) FROM inbox WHERE event_id IN (?, ?)", refused_events).fetchone()[0]
    finally:
        db.close()
    assert (txns, stored) == (1, 1), f"transaction rows {txns}, inbox rows {stored}"
    assert refused_stored == 0, "a transaction with two Authorization headers was stored"
    m = await enclave.metrics()
    assert metric(m, "enclave_transactions_total", result="duplicate") == 1
    assert metric(m, "enclave_events_quarantined_total") == 1

    # Still alive and well.
    assert enclave.running, enclave.describe()
    assert await enclave.get_json("/health") == (200, {"status": "ok"})
    status, ready = await enclave.get_json("/ready")
    assert status == 200 and ready["ready"] is True, ready
    assert await enclave.stop() == 0, enclave.describe()

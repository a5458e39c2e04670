"""An action is applied once when Synapse restarts after storing it but before answering.

A real Synapse, and the executor talking to it through a loopback proxy that forwards the
first send, lets Synapse store the event, restarts Synapse (its in-memory transaction ids
are gone) and then drops the answer. The client's resend must not store a second event.

On the code before the read-back (README "Known issues", issue #16): the resend with the
same transaction id reaches the restarted Synapse, which stores the event again — two
events in the room (the assertion ``len(found) == 1`` fails with 2).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.matrix.client import MatrixClient
from bridge.matrix.executor import Executor
from bridge.metrics import Metrics
from bridge.policy.actions import Redact, SendEvent
from bridge.policy.resend import ACTION_KEY
from bridge.store import open_stores

from .harness import Stack

pytestmark = pytest.mark.integration

ADMIN_LOCALPART = "enclave-admin"
HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@pytest.fixture(scope="module")
def restart_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A Synapse of this module's own: the tests restart it."""
    s = Stack.create(tmp_path_factory.mktemp("exactly_once"))
    # Enclave's admin identity (what `enclave run` creates with the shared secret)
    s.synapse.register_user(ADMIN_LOCALPART, "not-used-" + s.hs_token[:8], admin=True)
    try:
        yield s
    finally:
        s.stop()


class RestartingProxy:
    """Forwards everything to Synapse; the first request whose path contains ``marker``
    is forwarded, answered by Synapse, then Synapse restarts and the answer is dropped."""

    def __init__(self, stack: Stack, marker: str):
        self.stack, self.marker = stack, marker
        self.cut: list[tuple[int, Any]] = []  # (status, body) Synapse gave and we dropped
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with self.session.request(
                request.method, self.stack.synapse.base_url + request.path_qs, data=body,
                headers=headers) as resp:
            payload, status = await resp.read(), resp.status
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        if request.method == "PUT" and self.marker in request.path and not self.cut:
            self.cut.append((status, json.loads(payload)))
            await asyncio.to_thread(self.stack.synapse.stop)
            await asyncio.to_thread(self.stack.synapse.start)
            assert request.transport is not None
            request.transport.close()  # the answer is lost
            raise ConnectionResetError("answer dropped by the test proxy")
        return web.Response(status=status, body=payload, headers=out_headers)


@pytest.fixture
async def env(restart_stack: Stack, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    store = open_stores("sqlite:///enclave.db", base_dir=tmp_path)
    await store.database.open()
    await store.database.migrate()
    async with aiohttp.ClientSession() as upstream, aiohttp.ClientSession() as session:
        yield {"store": store, "upstream": upstream, "session": session}
    await store.database.close()


async def start_proxy(proxy: RestartingProxy) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def events_of(stack: Stack, room: str, event_type: str) -> list[dict[str, Any]]:
    q = urllib.parse.quote
    filt = q(json.dumps({"types": [event_type]}))
    page = await stack.hs("GET", f"/_synapse/admin/v1/rooms/{q(room, safe='')}/messages"
                                 f"?dir=b&limit=1000&filter={filt}")
    return page.get("chunk", [])


@pytest.mark.parametrize("kind", ["send", "redact"])
async def test_resend_after_synapse_restart_applies_once(
    restart_stack: Stack, env: dict[str, Any], kind: str,
) -> None:
    stack = restart_stack
    room = (await stack.hs("POST", "/_matrix/client/v3/createRoom",
                           {"preset": "private_chat", "name": "exactly once"},
                           as_user=stack.bot_user_id))["room_id"]
    target = ""
    if kind == "redact":
        target = (await stack.hs("PUT", f"/_matrix/client/v3/rooms/{room}/send/"
                                 "m.room.message/t1", {"msgtype": "m.text", "body": "bad"},
                                 as_user=stack.bot_user_id))["event_id"]
    proxy = RestartingProxy(stack, "/send/" if kind == "send" else "/redact/")
    proxy.session = env["upstream"]
    runner, url = await start_proxy(proxy)
    try:
        client = MatrixClient(env["session"], url, stack.as_token, max_retries=8,
                              backoff_initial=0.5, backoff_max=2.0, timeout=120)
        ex = Executor(client, env["store"].outbox, env["store"].audit,
                      bot_user_id=stack.bot_user_id,
                      clock_ms=lambda: time.time_ns() // 1_000_000,
                      metrics=Metrics(),
                      admin_user_id=f"@{ADMIN_LOCALPART}:{stack.server_name}")
        if kind == "send":
            action: Any = SendEvent(rule_id="t", reason="exactly once", room=room,
                                    event_type="m.room.message",
                                    content={"msgtype": "m.text", "body": "exactly once"})
        else:
            action = Redact(rule_id="t", reason="exactly once", room=room, event_id=target)
        outcome = await ex.run_direct(action, f"test/{kind}/{room}", source="test")
    finally:
        await runner.cleanup()
    assert proxy.cut and proxy.cut[0][0] == 200, "Synapse did not store the first attempt"
    first_id = proxy.cut[0][1]["event_id"]
    if kind == "send":
        found = [e for e in await events_of(stack, room, "m.room.message")
                 if e["content"].get("body") == "exactly once"]
    else:
        found = await events_of(stack, room, "m.room.redaction")
    assert len(found) == 1, f"{len(found)} events for one action: {found}"
    assert found[0]["event_id"] == first_id
    assert found[0]["content"][ACTION_KEY] == f"test/{kind}/{room}"
    assert (outcome.status, outcome.detail) == ("applied", first_id)
    assert ex.metrics.resends_avoided._value.get() == 1

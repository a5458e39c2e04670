"""An action is applied once when Synapse restarts after storing it but before answering.

A real Synapse, and the executor talking to it through a loopback proxy that forwards the
first send, lets Synapse store the event, restarts Synapse (its in-memory transaction ids
are gone) and then drops the answer. The client's resend must not store a second event.

On the code before the read-back (docs/operators/known-issues.md, issue #16): the resend with the
same transaction id reaches the restarted Synapse, which stores the event again — two
events in the room (the assertion ``len(found) == 1`` fails with 2).

The crash case: an earlier Enclave process sent an outbox action, Synapse stored it, and
the process died before it counted the attempt (the outbox row still says 0 attempts);
Synapse restarts; the next process's inbox resumes the outbox. Before the lane head was
treated as resumed, that resend was blind and stored a second event.
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
import orjson
import pytest

from bridge.config.models import InboxConfig
from bridge.matrix.client import MatrixClient
from bridge.matrix.executor import Executor
from bridge.matrix.inbox import InboxProcessor
from bridge.metrics import Metrics
from bridge.policy.actions import Redact, SendEvent
from bridge.policy.resend import ACTION_KEY
from bridge.store import AuditFilter, NewEvent, open_stores

from .harness import Stack
from .restart_proxy import RestartingProxy, start_proxy

pytestmark = pytest.mark.integration

ADMIN_LOCALPART = "enclave-admin"


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


@pytest.fixture
async def env(restart_stack: Stack, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    store = open_stores("sqlite:///enclave.db", base_dir=tmp_path)
    await store.database.open()
    await store.database.migrate()
    async with aiohttp.ClientSession() as upstream, aiohttp.ClientSession() as session:
        yield {"store": store, "upstream": upstream, "session": session}
    await store.database.close()


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
    marker = "/send/" if kind == "send" else "/redact/"
    proxy = RestartingProxy(stack, lambda r, _: r.method == "PUT" and marker in r.path)
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


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_attempt_cut_off_by_a_crash_before_it_was_counted_applies_once(
    restart_stack: Stack, env: dict[str, Any],
) -> None:
    stack, store = restart_stack, env["store"]
    admin = f"@{ADMIN_LOCALPART}:{stack.server_name}"
    room = (await stack.hs("POST", "/_matrix/client/v3/createRoom",
                           {"preset": "private_chat", "name": "crash before count"},
                           as_user=stack.bot_user_id))["room_id"]
    # a handler decided a send: committed to the outbox with its event's done mark
    await store.inbox.save_transaction("t-crash", [NewEvent("$src", room, "pdu", "m.room.message",
                                                      "@a:corp.test", 1, "{}")], [], now_ms())
    (ev,) = await store.inbox.fetch_due_events(now_ms(), 10)
    action = SendEvent(rule_id="t", reason="exactly once", room=room,
                       event_type="m.room.message",
                       content={"msgtype": "m.text", "body": "once, crash or not"})
    await store.inbox.complete_events([ev.seq], [(ev.seq, 0, room, action.kind,
                                                  orjson.dumps(action.to_dict()).decode(),
                                                  action.rule_id, action.reason)], now_ms())
    (sa,) = await store.outbox.pending_actions(None, 10)

    def executor() -> Executor:
        client = MatrixClient(env["session"], stack.synapse.base_url, stack.as_token,
                              max_retries=8, backoff_initial=0.5, backoff_max=2.0,
                              timeout=60)
        return Executor(client, store.outbox, store.audit, bot_user_id=stack.bot_user_id,
                        clock_ms=now_ms, metrics=Metrics(), admin_user_id=admin)

    # the first process: its send reaches Synapse, which stores the event; the process
    # dies before it records the attempt (nothing is written: the row says 0 attempts)
    first = executor()
    sent = await first.apply(action, first.action_key(sa.id))
    assert sent.status == "applied" and sent.detail.startswith("$")
    (still,) = await store.outbox.pending_actions(None, 10)
    assert still.attempts == 0
    # Synapse restarts: the transaction id it remembered in memory is gone
    await asyncio.to_thread(stack.synapse.stop)
    await asyncio.to_thread(stack.synapse.start)

    # the next process: its inbox resumes the outbox at start
    second = executor()
    inbox = InboxProcessor(store.journal, store.inbox, store.outbox, second, [],
                           InboxConfig(backoff_initial_seconds=0.2, backoff_max_seconds=1.0),
                           Metrics(), now_ms)
    await inbox.start()
    try:
        deadline = time.monotonic() + 60
        while (await store.inbox.inbox_stats())["actions"].get("pending"):
            assert time.monotonic() < deadline, "the outbox was not resumed"
            inbox.notify()
            await asyncio.sleep(0.1)
    finally:
        await inbox.stop()
    found = [e for e in await events_of(stack, room, "m.room.message")
             if e["content"].get("body") == "once, crash or not"]
    assert len(found) == 1, f"{len(found)} events for one action: {found}"
    assert found[0]["event_id"] == sent.detail
    (rec,) = await store.audit.query_audit(AuditFilter(room_id=room))
    assert (rec["outcome"], rec["detail"]) == ("applied", sent.detail)
    assert second.metrics.resends_avoided._value.get() == 1

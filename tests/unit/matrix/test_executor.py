"""Executor: actions to homeserver calls, one audit record per action, retry/park semantics."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bridge.matrix.client import MatrixClient
from bridge.matrix.executor import Executor, Outcome, txn_id_for
from bridge.metrics import Metrics
from bridge.policy.actions import Action, Invite, Join, Kick, Leave, Redact, SendEvent, SetState
from bridge.policy.resend import ACTION_KEY
from bridge.store import AuditFilter, NewEvent, StoredAction, Stores

from .conftest import FakeHomeserver, MakeClient

BOT = "@enclave:corp.example.com"
NOW = 1_700_000_000_000
SERVER_ERROR = (502, {"errcode": "M_UNKNOWN", "error": "bad gateway"})


@pytest.fixture
def client(make_matrix_client: MakeClient) -> MatrixClient:
    return make_matrix_client(max_retries=0)


@pytest.fixture
def executor(client: MatrixClient, store: Stores) -> Executor:
    return Executor(client, store.outbox, store.audit, bot_user_id=BOT, clock_ms=lambda: NOW,
                    metrics=Metrics())


async def stored(store: Stores, *actions: Action, payload: str | None = None) -> list[StoredAction]:
    await store.inbox.save_transaction("t", [NewEvent("$e", "!r", "pdu", "m.x", "@a:x", 1, "{}")],
                                       [], NOW)
    (ev,) = await store.inbox.fetch_due_events(NOW, 10)
    rows = [(ev.seq, i, "!r", a.kind, payload or orjson.dumps(a.to_dict()).decode(),
             a.rule_id, a.reason) for i, a in enumerate(actions)]
    await store.inbox.complete_events([ev.seq], rows, NOW)
    return await store.outbox.pending_actions(None, 100)


async def action_status(store: Stores) -> dict[str, int]:
    return (await store.inbox.inbox_stats())["actions"]


KICK = Kick(rule_id="separation.external", reason="not directory staff", room="!r",
            user="@eve:evil.org", actor="@alice:corp.example.com")


@pytest.mark.parametrize(
    ("action", "method", "path", "query_user", "body"),
    [
        pytest.param(SendEvent(rule_id="r", reason="x", room="!r", event_type="m.room.message",
                               content={"body": "hi"}),
                     "PUT", "/_matrix/client/v3/rooms/!r/send/m.room.message/", BOT,
                     {"body": "hi", ACTION_KEY: "action:1"}, id="send"),
        pytest.param(SetState(rule_id="r", reason="x", room="!r", event_type="m.room.topic",
                              content={"topic": "t"}, actor="@alice:corp.example.com"),
                     "PUT", "/_matrix/client/v3/rooms/!r/state/m.room.topic/",
                     "@alice:corp.example.com", {"topic": "t"}, id="state"),
        pytest.param(Invite(rule_id="r", reason="x", room="!r", user="@bob:corp.example.com"),
                     "POST", "/_matrix/client/v3/rooms/!r/invite", BOT,
                     {"user_id": "@bob:corp.example.com"}, id="invite"),
        pytest.param(Join(rule_id="r", reason="x", room="!r", actor="@bob:corp.example.com"),
                     "POST", "/_matrix/client/v3/join/!r", "@bob:corp.example.com", {},
                     id="join"),
        pytest.param(Leave(rule_id="r", reason="x", room="!r", actor="@bob:corp.example.com"),
                     "POST", "/_matrix/client/v3/rooms/!r/leave", "@bob:corp.example.com",
                     {"reason": "x"}, id="leave"),
        pytest.param(KICK, "POST", "/_matrix/client/v3/rooms/!r/kick",
                     "@alice:corp.example.com",
                     {"user_id": "@eve:evil.org", "reason": "not directory staff"}, id="kick"),
    ],
)
async def test_run_stored_applies_and_audits_once(
    fake_hs: FakeHomeserver, store: Stores, executor: Executor, action: Action, method: str,
    path: str, query_user: str, body: dict[str, Any],
) -> None:
    fake_hs.on(method, "/_matrix/client/v3/", (200, {"event_id": "$new", "room_id": "!r"}))
    (sa,) = await stored(store, action)
    assert await executor.run_stored(sa, max_attempts=3) is True
    (seen,) = fake_hs.seen
    assert (seen.method, seen.query) == (method, {"user_id": query_user})
    assert seen.path.startswith(path)
    assert seen.body == body
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert (rec["source"], rec["kind"], rec["outcome"]) == ("inbox", action.kind, "applied")
    assert (rec["rule_id"], rec["reason"], rec["room_id"]) == ("r" if action is not KICK
                                                               else "separation.external",
                                                               action.reason, "!r")
    assert rec["actor"] == (action.actor or BOT)
    assert rec["ts"] == NOW
    assert await action_status(store) == {"applied": 1}
    assert await store.outbox.pending_actions(None, 10) == []


async def test_audit_names_the_target_user(fake_hs: FakeHomeserver, store: Stores,
                                           executor: Executor) -> None:
    fake_hs.on("POST", "/_matrix/client/v3/rooms/", (200, {}))
    (sa,) = await stored(store, KICK)
    await executor.run_stored(sa, max_attempts=3)
    (rec,) = await store.audit.query_audit(AuditFilter(user_id="@eve:evil.org"))
    assert rec["detail"] == "ok"


async def test_send_txn_id_is_stable_per_action(fake_hs: FakeHomeserver, store: Stores,
                                                executor: Executor) -> None:
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", SERVER_ERROR, (200, {"event_id": "$1"}),
               (200, {"event_id": "$2"}))
    fake_hs.on("GET", "/_synapse/admin/v1/rooms/!r/messages", (200, {"chunk": []}))
    send = SendEvent(rule_id="r", reason="x", room="!r", event_type="m.notice")
    first, second = await stored(store, send, send)
    assert await executor.run_stored(first, max_attempts=5) is False  # 502: stays pending
    (again, _) = await store.outbox.pending_actions(None, 10)
    assert again.id == first.id and again.attempts == 1
    assert await executor.run_stored(again, max_attempts=5) is True
    assert await executor.run_stored(second, max_attempts=5) is True
    txns = [s.path.rsplit("/", 1)[1] for s in fake_hs.seen if s.method == "PUT"]
    assert txns[0] == txns[1] == txn_id_for(f"action:{first.id}")
    assert txns[2] == txn_id_for(f"action:{second.id}") != txns[0]


@pytest.mark.parametrize(
    ("key_a", "key_b", "same"),
    [("action:1", "action:1", True), ("action:1", "action:2", False), ("x", "x", True)],
)
def test_txn_id_for(key_a: str, key_b: str, same: bool) -> None:
    assert (txn_id_for(key_a) == txn_id_for(key_b)) is same
    assert txn_id_for(key_a).startswith("enclave.") and len(txn_id_for(key_a)) == 40


@pytest.mark.parametrize(
    ("action", "reply", "outcome", "detail"),
    [
        pytest.param(KICK, (403, {"errcode": "M_FORBIDDEN", "error": "You cannot kick user"}),
                     "failed", "403 M_FORBIDDEN: You cannot kick user", id="forbidden"),
        pytest.param(Join(rule_id="r", reason="x", room="!gone"),
                     (404, {"errcode": "M_NOT_FOUND", "error": "No known servers"}),
                     "failed", "404 M_NOT_FOUND: No known servers", id="not-found"),
        pytest.param(Invite(rule_id="r", reason="x", room="!r", user="@b:x"),
                     (403, {"errcode": "M_FORBIDDEN", "error": "@b:x is already in the room."}),
                     "applied", "already: @b:x is already in the room.", id="already-member"),
        pytest.param(Leave(rule_id="r", reason="x", room="!r"),
                     (403, {"errcode": "M_FORBIDDEN", "error": "User @x:y not in room !r"}),
                     "applied", "already: User @x:y not in room !r", id="already-left"),
        pytest.param(KICK, (403, {"errcode": "M_FORBIDDEN",
                                  "error": "The target user is not in the room"}),
                     "applied", "already: The target user is not in the room",
                     id="kick-target-already-gone"),
        # Synapse's event_auth when the KICKER is not joined: a real failure, not "done"
        pytest.param(KICK, (403, {"errcode": "M_FORBIDDEN",
                                  "error": "@alice:corp.example.com not in room !r."}),
                     "failed", "403 M_FORBIDDEN: @alice:corp.example.com not in room !r.",
                     id="kicker-not-in-room"),
        pytest.param(Invite(rule_id="r", reason="x", room="!r", user="@b:x"),
                     (403, {"errcode": "M_FORBIDDEN", "error": "You are already invited to "
                            "this room"}),
                     "applied", "already: You are already invited to this room",
                     id="already-invited"),
        pytest.param(Invite(rule_id="r", reason="x", room="!r", user="@b:x"),
                     (403, {"errcode": "M_FORBIDDEN", "error": "@b:x is banned from the room"}),
                     "failed", "403 M_FORBIDDEN: @b:x is banned from the room",
                     id="invite-banned"),
    ],
)
async def test_permanent_outcomes_are_final_and_audited(
    fake_hs: FakeHomeserver, store: Stores, executor: Executor, action: Action,
    reply: tuple, outcome: str, detail: str,
) -> None:
    fake_hs.on("POST", "/_matrix/client/v3/", reply)
    (sa,) = await stored(store, action)
    assert await executor.run_stored(sa, max_attempts=3) is True
    assert len(fake_hs.seen) == 1  # not retried
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert (rec["outcome"], rec["detail"], rec["rule_id"]) == (outcome, detail, action.rule_id)
    assert await action_status(store) == {outcome: 1}


@pytest.mark.parametrize(
    "reply",
    [SERVER_ERROR, (429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 5})],
    ids=["5xx", "429"],
)
async def test_transient_failure_pending_then_parked(fake_hs: FakeHomeserver, store: Stores,
                                                     executor: Executor, reply: tuple) -> None:
    fake_hs.on("POST", "/_matrix/client/v3/", reply)
    (sa,) = await stored(store, KICK)
    for attempt in (1, 2):
        assert await executor.run_stored(sa, max_attempts=3) is False
        (sa,) = await store.outbox.pending_actions("!r", 10)
        assert sa.attempts == attempt
        assert await store.audit.query_audit(AuditFilter()) == []  # nothing final yet
    assert await executor.run_stored(sa, max_attempts=3) is True
    assert await store.outbox.pending_actions(None, 10) == []
    assert await action_status(store) == {"parked": 1}
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert (rec["outcome"], rec["kind"], rec["rule_id"]) == ("parked", "kick",
                                                             "separation.external")


async def test_unexpected_error_is_transient_not_a_crash(fake_hs: FakeHomeserver, store: Stores,
                                                         executor: Executor) -> None:
    # a 200 without the event_id the client reads: must not escape run_stored
    fake_hs.on("PUT", "/_matrix/client/v3/", (200, {}))
    send = SendEvent(rule_id="r", reason="x", room="!r", event_type="m.notice")
    (sa,) = await stored(store, send)
    assert await executor.run_stored(sa, max_attempts=2) is False
    (sa,) = await store.outbox.pending_actions(None, 10)
    assert sa.attempts == 1
    assert await executor.run_stored(sa, max_attempts=2) is True
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert rec["outcome"] == "parked"
    assert rec["detail"].startswith("KeyError")


@pytest.mark.parametrize(
    "payload",
    ['{"kind": "teleport", "rule_id": "r", "reason": "x"}', "not json", "[1, 2]",
     '{"rule_id": "r"}', '{"kind": "kick", "rule_id": "r", "reason": "x"}'],
    ids=["unknown-kind", "not-json", "not-object", "no-kind", "missing-field"],
)
async def test_undecodable_action_fails_with_audit(fake_hs: FakeHomeserver, store: Stores,
                                                   executor: Executor, payload: str) -> None:
    (sa,) = await stored(store, KICK, payload=payload)
    assert await executor.run_stored(sa, max_attempts=3) is True
    assert fake_hs.seen == []
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert (rec["kind"], rec["outcome"]) == ("unknown", "failed")
    assert await action_status(store) == {"failed": 1}


async def test_run_direct_audits_with_source(fake_hs: FakeHomeserver, store: Stores,
                                             executor: Executor) -> None:
    fake_hs.on("POST", "/_matrix/client/v3/", (200, {}))
    outcome = await executor.run_direct(KICK, "cli:1", source="cli")
    assert (outcome.status, outcome.detail) == ("applied", "ok")
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert (rec["source"], rec["outcome"], rec["rule_id"]) == ("cli", "applied",
                                                               "separation.external")


def test_action_key_differs_between_installations() -> None:
    # a restored or new database reuses action ids; the homeserver must not see a resend
    a = Executor.__new__(Executor)
    b = Executor.__new__(Executor)
    a._installation_id, b._installation_id = (lambda: "aaaa"), (lambda: "bbbb")
    assert a.action_key(7) != b.action_key(7)
    assert txn_id_for(a.action_key(7)) != txn_id_for(b.action_key(7))
    assert a.action_key(7) == a.action_key(7)


# -- exactly once across a homeserver restart: read back before a resend ----------------

DROP = (0, {})  # the fake cuts the connection: the answer is lost, the outcome unknown
MESSAGES = "/_synapse/admin/v1/rooms/!r/messages"
ADMIN = "@admin:corp.example.com"


def stored_event(key: str, *, sender: str = BOT, event_type: str = "m.notice",
                 event_id: str = "$first") -> dict[str, Any]:
    return {"type": event_type, "sender": sender, "event_id": event_id,
            "origin_server_ts": NOW, "content": {"body": "hi", ACTION_KEY: key}}


def puts(fake_hs: FakeHomeserver) -> list[str]:
    return [s.path for s in fake_hs.seen if s.method == "PUT"]


@pytest.mark.parametrize("retries", [0, 2], ids=["next-attempt", "client-retry"])
async def test_resend_after_lost_answer_finds_the_event_and_does_not_send_again(
    fake_hs: FakeHomeserver, store: Stores, make_matrix_client: MakeClient, retries: int,
) -> None:
    # the homeserver stored the event, then restarted before answering (its in-memory
    # transaction ids are gone: a second PUT would store a second event, "$second")
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", DROP, (200, {"event_id": "$second"}))
    fake_hs.on("GET", MESSAGES, (200, {"chunk": [
        stored_event("action:1", event_id="$first"), {"type": "m.room.message"}],
        "end": "t1"}))
    ex = Executor(make_matrix_client(max_retries=retries), store.outbox, store.audit,
                  bot_user_id=BOT,
                  clock_ms=lambda: NOW, metrics=Metrics(), admin_user_id=ADMIN)
    (sa,) = await stored(store, SendEvent(rule_id="r", reason="x", room="!r",
                                          event_type="m.notice", content={"body": "hi"}))
    if retries == 0:  # the first run ends without an answer; the next one reads back
        assert await ex.run_stored(sa, max_attempts=5) is False
        (sa,) = await store.outbox.pending_actions(None, 10)
    assert await ex.run_stored(sa, max_attempts=5) is True
    assert len(puts(fake_hs)) == 1, "sent again although the event is in the room"
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert (rec["outcome"], rec["detail"]) == ("applied", "$first")
    read = next(s for s in fake_hs.seen if s.method == "GET")
    assert (read.query["dir"], read.query["user_id"]) == ("b", ADMIN)
    assert ex.metrics.resends_avoided._value.get() == 1


@pytest.mark.parametrize(
    "found",
    [pytest.param([], id="nothing-there"),
     pytest.param([stored_event("action:1", sender="@mallory:corp.example.com")],
                  id="someone-else-forged-the-key"),
     pytest.param([stored_event("action:2")], id="another-action"),
     pytest.param([stored_event("action:1", event_type="m.room.message")], id="other-type")],
)
async def test_resend_when_the_read_back_finds_no_earlier_attempt(
    fake_hs: FakeHomeserver, store: Stores, make_matrix_client: MakeClient,
    found: list[dict[str, Any]],
) -> None:
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", DROP, (200, {"event_id": "$second"}))
    fake_hs.on("GET", MESSAGES, (200, {"chunk": found}))
    ex = Executor(make_matrix_client(max_retries=1), store.outbox, store.audit,
                  bot_user_id=BOT,
                  clock_ms=lambda: NOW, metrics=Metrics())
    (sa,) = await stored(store, SendEvent(rule_id="r", reason="x", room="!r",
                                          event_type="m.notice"))
    assert await ex.run_stored(sa, max_attempts=5) is True
    assert len(puts(fake_hs)) == 2
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert rec["detail"] == "$second"


async def test_refused_send_is_not_read_back(fake_hs: FakeHomeserver, store: Stores,
                                             executor: Executor) -> None:
    # a 4xx is a known outcome (nothing stored): no read-back, no resend
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/",
               (403, {"errcode": "M_FORBIDDEN", "error": "not in room"}))
    (sa,) = await stored(store, SendEvent(rule_id="r", reason="x", room="!r",
                                          event_type="m.notice"))
    assert await executor.run_stored(sa, max_attempts=5) is True
    assert [s.method for s in fake_hs.seen] == ["PUT"]


async def test_read_back_unavailable_keeps_the_action_pending(
    fake_hs: FakeHomeserver, store: Stores, executor: Executor,
) -> None:
    # the homeserver answers nothing at all: neither send blind nor give up
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", DROP, (200, {"event_id": "$second"}))
    fake_hs.on("GET", MESSAGES, SERVER_ERROR)
    (sa,) = await stored(store, SendEvent(rule_id="r", reason="x", room="!r",
                                          event_type="m.notice"))
    assert await executor.run_stored(sa, max_attempts=5) is False
    (sa,) = await store.outbox.pending_actions(None, 10)
    assert await executor.run_stored(sa, max_attempts=5) is False
    assert len(puts(fake_hs)) == 1
    assert await action_status(store) == {"pending": 1}


async def test_redaction_resend_finds_the_earlier_redaction(
    fake_hs: FakeHomeserver, store: Stores, make_matrix_client: MakeClient,
) -> None:
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", DROP, (200, {"event_id": "$second"}))
    fake_hs.on("GET", MESSAGES, (200, {"chunk": [
        {**stored_event("action:1", event_type="m.room.redaction", event_id="$red"),
         "redacts": "$bad"}]}))
    ex = Executor(make_matrix_client(max_retries=1), store.outbox, store.audit,
                  bot_user_id=BOT,
                  clock_ms=lambda: NOW, metrics=Metrics())
    (sa,) = await stored(store, Redact(rule_id="r", reason="spam", room="!r",
                                       event_id="$bad"))
    assert await ex.run_stored(sa, max_attempts=5) is True
    (put,) = [s for s in fake_hs.seen if s.method == "PUT"]
    assert put.body == {"reason": "spam", ACTION_KEY: "action:1"}
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert rec["detail"] == "$red"


# -- an attempt a crash (or a failed store write) cut off before it was counted -------------

async def test_resumed_action_is_read_back_although_no_attempt_was_counted(
    fake_hs: FakeHomeserver, store: Stores, executor: Executor,
) -> None:
    # an earlier process sent it, Synapse stored it, the process died before counting the
    # attempt (attempts stays 0) and Synapse restarted: the inbox runs it as resumed
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", (200, {"event_id": "$second"}))
    fake_hs.on("GET", MESSAGES, (200, {"chunk": [stored_event("action:1")]}))
    (sa,) = await stored(store, SendEvent(rule_id="r", reason="x", room="!r",
                                          event_type="m.notice", content={"body": "hi"}))
    assert sa.attempts == 0
    assert await executor.run_stored(sa, max_attempts=5, resumed=True) is True
    assert puts(fake_hs) == [], "sent again although the event is in the room"
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert (rec["outcome"], rec["detail"]) == ("applied", "$first")


async def test_a_fresh_action_is_not_read_back(fake_hs: FakeHomeserver, store: Stores,
                                               executor: Executor) -> None:
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", (200, {"event_id": "$e"}))
    (sa,) = await stored(store, SendEvent(rule_id="r", reason="x", room="!r",
                                          event_type="m.notice"))
    assert await executor.run_stored(sa, max_attempts=5) is True
    assert [s.method for s in fake_hs.seen] == ["PUT"]


async def test_an_outcome_the_store_did_not_record_is_read_back_when_run_again(
    fake_hs: FakeHomeserver, store: Stores, executor: Executor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # sent and stored by the homeserver, then the store failed: the room worker crashed
    # with the action pending (attempts 0) and runs it again in the same process
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", (200, {"event_id": "$first"}),
               (200, {"event_id": "$second"}))
    fake_hs.on("GET", MESSAGES, (200, {"chunk": [stored_event("action:1")]}))
    (sa,) = await stored(store, SendEvent(rule_id="r", reason="x", room="!r",
                                          event_type="m.notice"))
    finish = store.outbox.finish_action

    async def broken(*a: Any, **kw: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store.outbox, "finish_action", broken)
    with pytest.raises(OSError):
        await executor.run_stored(sa, max_attempts=5)
    monkeypatch.setattr(store.outbox, "finish_action", finish)
    (sa,) = await store.outbox.pending_actions(None, 10)
    assert sa.attempts == 0
    assert await executor.run_stored(sa, max_attempts=5) is True
    assert len(puts(fake_hs)) == 1
    (rec,) = await store.audit.query_audit(AuditFilter())
    assert rec["detail"] == "$first"


async def test_direct_sends_are_read_back_and_appliers_told_of_a_resend(
    fake_hs: FakeHomeserver, store: Stores, executor: Executor,
) -> None:
    # nothing records whether an earlier run of a direct action sent its (stable) key
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", (200, {"event_id": "$second"}))
    fake_hs.on("GET", MESSAGES, (200, {"chunk": [stored_event("retention-vis:!r")]}))
    send = SendEvent(rule_id="r", reason="x", room="!r", event_type="m.notice")
    outcome = await executor.run_direct(send, "retention-vis:!r", source="retention")
    assert (outcome.status, outcome.detail, puts(fake_hs)) == ("applied", "$first", [])
    told: list[bool] = []

    async def applier(action: Any, key: str, *, resend: bool) -> Outcome:
        told.append(resend)
        return Outcome("applied", "ok")

    executor.register(Leave, applier)
    leave = Leave(rule_id="r", reason="x", room="!r", actor=BOT)
    await executor.run_direct(leave, "k", source="cli")
    (sa,) = await stored(store, leave)
    await executor.run_stored(sa, max_attempts=5)
    await executor.run_stored(sa, max_attempts=5, resumed=True)
    assert told == [True, False, True]

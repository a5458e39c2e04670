"""MatrixClient against a scripted fake homeserver: retries, 429s, errors, user_id."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from bridge.matrix.client import HomeserverUnavailable, MatrixRequestError, q

from .conftest import AS_TOKEN, DROP, FakeHomeserver, MakeClient, Sleeps

PATH = "/_matrix/client/v3/account/whoami"
OK = (200, {"user_id": "@enclave:x"})


def limited(ms: Any = None, errcode: str = "M_LIMIT_EXCEEDED", status: int = 429,
            headers: dict[str, str] | None = None) -> tuple:
    body: dict[str, Any] = {"errcode": errcode, "error": "Too many requests"}
    if ms is not None:
        body["retry_after_ms"] = ms
    return (status, body, headers or {})


@pytest.mark.parametrize(
    ("reply", "expected_delay"),
    [
        pytest.param(limited(1500), 1.5, id="retry_after_ms"),
        pytest.param(limited(0), 0.0, id="retry_after_ms-zero"),
        pytest.param(limited(250.5), 0.2505, id="float-ms"),
        pytest.param(limited(None, headers={"Retry-After": "3"}), 3.0, id="header"),
        pytest.param(limited(2000, headers={"Retry-After": "9"}), 2.0, id="body-wins"),
        pytest.param(limited(10_000_000), 3600.0, id="capped-1h"),
        pytest.param(limited(1200, status=400), 1.2, id="errcode-on-400"),
        pytest.param((429, b"slow down", {"Retry-After": "2"}), 2.0, id="proxy-429-no-json"),
    ],
)
async def test_rate_limit_is_honoured(fake_hs: FakeHomeserver, make_matrix_client: MakeClient,
                                      sleeps: Sleeps, reply: tuple,
                                      expected_delay: float) -> None:
    fake_hs.on("GET", PATH, reply, OK)
    hits: list[int] = []
    client = make_matrix_client(on_rate_limited=lambda: hits.append(1))
    assert await client.whoami() == {"user_id": "@enclave:x"}
    assert sleeps == [pytest.approx(expected_delay)]
    assert hits == [1]
    assert len(fake_hs.seen) == 2


async def test_rate_limit_without_hint_uses_backoff(fake_hs: FakeHomeserver,
                                                    make_matrix_client: MakeClient,
                                                    sleeps: Sleeps) -> None:
    fake_hs.on("GET", PATH, limited(None), OK)
    await make_matrix_client(backoff_initial=2.0).whoami()
    assert len(sleeps) == 1 and 1.5 <= sleeps[0] <= 2.5


async def test_rate_limited_for_ever_gives_up(fake_hs: FakeHomeserver,
                                              make_matrix_client: MakeClient,
                                              sleeps: Sleeps) -> None:
    fake_hs.on("GET", PATH, limited(100))
    with pytest.raises(HomeserverUnavailable, match="still rate limited"):
        await make_matrix_client(max_retries=2).whoami()
    assert sleeps == [0.1, 0.1]
    assert len(fake_hs.seen) == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_retried_with_backoff(fake_hs: FakeHomeserver, make_matrix_client: MakeClient,
                                        sleeps: Sleeps, status: int) -> None:
    err = (status, {"errcode": "M_UNKNOWN", "error": "upstream"})
    fake_hs.on("GET", PATH, err, err, OK)
    client = make_matrix_client(backoff_initial=1.0, backoff_max=30.0)
    assert await client.whoami() == {"user_id": "@enclave:x"}
    assert len(sleeps) == 2
    # exponential with ±25% jitter: 1 s then 2 s
    assert 0.75 <= sleeps[0] <= 1.25
    assert 1.5 <= sleeps[1] <= 2.5


async def test_5xx_until_exhausted(fake_hs: FakeHomeserver, make_matrix_client: MakeClient,
                                   sleeps: Sleeps) -> None:
    fake_hs.on("GET", PATH, (502, b"<html>bad gateway</html>"))
    client = make_matrix_client(max_retries=4, backoff_initial=1.0, backoff_max=3.0)
    with pytest.raises(HomeserverUnavailable, match="502"):
        await client.whoami()
    assert len(fake_hs.seen) == 5
    assert len(sleeps) == 4
    assert sleeps[3] <= 3.0 * 1.25  # capped by backoff_max (plus jitter)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_connection_errors_retried_then_unavailable(make_matrix_client: MakeClient,
                                                          sleeps: Sleeps) -> None:
    client = make_matrix_client(base_url=f"http://127.0.0.1:{closed_port()}", max_retries=3,
                                backoff_initial=0.5)
    with pytest.raises(HomeserverUnavailable) as ei:
        await client.whoami()
    assert "ClientConnectorError" in str(ei.value)
    assert len(sleeps) == 3
    assert 0.375 <= sleeps[0] <= 0.625 and 0.75 <= sleeps[1] <= 1.25


async def test_connection_error_then_recovery(fake_hs: FakeHomeserver,
                                              make_matrix_client: MakeClient,
                                              sleeps: Sleeps) -> None:
    fake_hs.on("GET", PATH, DROP, DROP, OK)  # the connection is cut twice, then it answers
    assert await make_matrix_client().whoami() == {"user_id": "@enclave:x"}
    # every resend is ours, with backoff (aiohttp's own hidden resend is switched off)
    assert len(sleeps) == 2
    assert all(0.375 <= d <= 1.25 for d in sleeps)
    assert len(fake_hs.seen) == 3


@pytest.mark.parametrize(
    ("reply", "status", "errcode", "error"),
    [
        pytest.param((403, {"errcode": "M_FORBIDDEN", "error": "not allowed"}), 403,
                     "M_FORBIDDEN", "not allowed", id="403"),
        pytest.param((404, {"errcode": "M_NOT_FOUND", "error": "no room"}), 404,
                     "M_NOT_FOUND", "no room", id="404"),
        pytest.param((400, {"errcode": "M_BAD_JSON"}), 400, "M_BAD_JSON", "", id="no-error"),
        pytest.param((401, b"nope"), 401, "M_UNKNOWN", "nope", id="not-json"),
        pytest.param((409, [1, 2]), 409, "M_UNKNOWN", "[1,2]", id="json-not-object"),
    ],
)
async def test_4xx_raises_with_errcode(fake_hs: FakeHomeserver, make_matrix_client: MakeClient,
                                       sleeps: Sleeps, reply: tuple, status: int, errcode: str,
                                       error: str) -> None:
    fake_hs.on("GET", PATH, reply)
    with pytest.raises(MatrixRequestError) as ei:
        await make_matrix_client().whoami()
    e = ei.value
    assert (e.status, e.errcode, e.error) == (status, errcode, error)
    assert (e.method, e.path) == ("GET", PATH)
    assert str(e) == f"GET {PATH} -> {status} {errcode}: {error}"
    assert sleeps == []
    assert len(fake_hs.seen) == 1


async def test_user_id_and_token_are_sent(fake_hs: FakeHomeserver,
                                          make_matrix_client: MakeClient) -> None:
    fake_hs.on("GET", PATH, OK)
    client = make_matrix_client()
    await client.whoami("@alice:corp.example.com")
    await client.whoami()
    a, b = fake_hs.seen
    assert a.query == {"user_id": "@alice:corp.example.com"}
    assert a.headers["Authorization"] == f"Bearer {AS_TOKEN}"
    assert b.query == {}
    assert "access_token" not in a.query  # the token never travels in the URL


async def test_unauthenticated_requests_carry_no_token(fake_hs: FakeHomeserver,
                                                       make_matrix_client: MakeClient) -> None:
    fake_hs.on("GET", "/_matrix/client/versions", (200, {"versions": ["v1.11"]}))
    assert await make_matrix_client().versions() == {"versions": ["v1.11"]}
    assert "Authorization" not in fake_hs.seen[0].headers


async def test_path_segments_are_encoded(fake_hs: FakeHomeserver,
                                         make_matrix_client: MakeClient) -> None:
    room, etype, txn = "!abc/def:corp.example.com", "org.example/odd type", "t?x#1"
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", (200, {"event_id": "$new"}))
    eid = await make_matrix_client().send_event(room, etype, {"body": "x"}, txn,
                                                user_id="@bob:corp.example.com")
    assert eid == "$new"
    (seen,) = fake_hs.seen
    assert seen.path == f"/_matrix/client/v3/rooms/{room}/send/{etype}/{txn}"
    # '/', '?', '#' and ' ' inside a segment must stay encoded ('!' and ':' may be requoted)
    assert seen.raw_path.split("?")[0] == (
        f"/_matrix/client/v3/rooms/{q(room)}/send/{q(etype)}/{q(txn)}"
    ).replace("%21", "!").replace("%3A", ":")
    assert seen.query == {"user_id": "@bob:corp.example.com"}
    assert seen.body == {"body": "x"}
    assert seen.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [((200, {}), True), ((400, {"errcode": "M_USER_IN_USE", "error": "taken"}), False)],
)
async def test_register_appservice_user(fake_hs: FakeHomeserver, make_matrix_client: MakeClient,
                                        reply: tuple, expected: bool) -> None:
    fake_hs.on("POST", "/_matrix/client/v3/register", reply)
    assert await make_matrix_client().register_appservice_user("enclave") is expected
    assert fake_hs.seen[0].body == {"type": "m.login.application_service",
                                    "username": "enclave", "inhibit_login": True}


async def test_register_appservice_user_other_error_raises(
        fake_hs: FakeHomeserver, make_matrix_client: MakeClient) -> None:
    fake_hs.on("POST", "/_matrix/client/v3/register",
               (400, {"errcode": "M_EXCLUSIVE", "error": "reserved"}))
    with pytest.raises(MatrixRequestError, match="M_EXCLUSIVE"):
        await make_matrix_client().register_appservice_user("x")


async def test_shared_secret_register_mac(fake_hs: FakeHomeserver,
                                          make_matrix_client: MakeClient) -> None:
    import hashlib
    import hmac

    fake_hs.on("GET", "/_synapse/admin/v1/register", (200, {"nonce": "n0nce"}))
    fake_hs.on("POST", "/_synapse/admin/v1/register", (200, {"user_id": "@adm:x"}))
    uid = await make_matrix_client().shared_secret_register("adm", "pw", "s3cret", admin=True)
    assert uid == "@adm:x"
    body = fake_hs.seen[1].body
    expected = hmac.new(b"s3cret", b"n0nce\x00adm\x00pw\x00admin", hashlib.sha1).hexdigest()
    assert body["mac"] == expected and body["admin"] is True
    assert "Authorization" not in fake_hs.seen[1].headers


async def test_room_stream_position_is_never_a_cached_sync(
        fake_hs: FakeHomeserver, make_matrix_client: MakeClient) -> None:
    """Synapse caches a /sync answer for 2 minutes by its request (filter included): each
    position request must be a new one, or a quiet-looking cached position would hide new
    events from the completeness check."""
    fake_hs.on("GET", "/_matrix/client/v3/sync", (200, {"next_batch": "s41_7_0_1"}),
               (200, {"next_batch": "s42_7_0_1"}))
    client = make_matrix_client()
    assert await client.room_stream_position("@admin:x") == "s41"
    assert await client.room_stream_position("@admin:x") == "s42"
    filters = [seen.query["filter"] for seen in fake_hs.seen]
    assert len(set(filters)) == 2
    assert all(seen.query["user_id"] == "@admin:x" and seen.query["timeout"] == "0"
               for seen in fake_hs.seen)


@pytest.mark.parametrize(
    ("replies", "reads", "sent", "answer"),
    [
        # the answer lost: read back before the resend; found -> no second send
        ([DROP, (200, {"event_id": "$2"})], [{"event_id": "$1"}], 1, "$1"),
        # read back, nothing there -> resend
        ([DROP, (200, {"event_id": "$2"})], [None], 2, "$2"),
        # a 5xx may have been applied too
        ([(502, {}), (200, {"event_id": "$2"})], [None], 2, "$2"),
        # a 4xx-free first answer: no read-back at all
        ([(200, {"event_id": "$1"})], [], 1, "$1"),
    ],
    ids=["dropped-found", "dropped-not-found", "5xx", "answered"],
)
async def test_before_resend_runs_before_each_resend_of_an_unknown_outcome(
    fake_hs: FakeHomeserver, make_matrix_client: MakeClient, replies: list[Any],
    reads: list[Any], sent: int, answer: str,
) -> None:
    fake_hs.on("PUT", "/_matrix/client/v3/rooms/", *replies)
    asked: list[int] = []
    answers = list(reads)

    async def before_resend() -> Any:
        asked.append(1)
        return answers.pop(0)

    eid = await make_matrix_client().send_event("!r", "m.notice", {}, "t1",
                                                before_resend=before_resend)
    assert (eid, len(fake_hs.seen), len(asked)) == (answer, sent, len(reads))


async def test_refused_connection_needs_no_read_back(make_matrix_client: MakeClient) -> None:
    # nothing reached the homeserver: no read-back (it would only wait on the same outage)
    client = make_matrix_client(base_url=f"http://127.0.0.1:{closed_port()}", max_retries=2)
    asked: list[int] = []

    async def before_resend() -> Any:
        asked.append(1)

    with pytest.raises(HomeserverUnavailable):
        await client.send_event("!r", "m.notice", {}, "t1", before_resend=before_resend)
    assert asked == []

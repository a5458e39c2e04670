"""The client methods the bots call (instead of raw ``client.request(…)``): each sends the
request the old raw call sent and reads the answer the same way."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.matrix.client import MatrixRequestError

from .conftest import AS_TOKEN, FakeHomeserver, MakeClient

U, R = "@bot:x", "!room:x"
MEMBER = {"type": "m.room.member", "state_key": U, "content": {"membership": "join"}}
CASES = [
    # (call, method, path, query, reply, result)
    (lambda c: c.whoami(U, device_id="DEV"), "GET", "/_matrix/client/v3/account/whoami",
     {"user_id": U, "device_id": "DEV"}, {"user_id": U, "device_id": "DEV"},
     {"user_id": U, "device_id": "DEV"}),
    (lambda c: c.get_device("D/1", user_id=U), "GET", "/_matrix/client/v3/devices/D/1",
     {"user_id": U}, {"device_id": "D/1"}, {"device_id": "D/1"}),
    (lambda c: c.joined_rooms(U), "GET", "/_matrix/client/v3/joined_rooms", {"user_id": U},
     {"joined_rooms": [R]}, [R]),
    (lambda c: c.room_state(R, user_id=U), "GET", f"/_matrix/client/v3/rooms/{R}/state",
     {"user_id": U}, [MEMBER], [MEMBER]),
    (lambda c: c.room_members(R, user_id=U, not_membership="leave"), "GET",
     f"/_matrix/client/v3/rooms/{R}/members", {"user_id": U, "not_membership": "leave"},
     {"chunk": [MEMBER]}, [MEMBER]),
    (lambda c: c.room_members(R, user_id=U), "GET", f"/_matrix/client/v3/rooms/{R}/members",
     {"user_id": U}, {"chunk": None}, []),
    (lambda c: c.get_avatar_url(U), "GET", f"/_matrix/client/v3/profile/{U}/avatar_url", {},
     {"avatar_url": "mxc://x/a"}, "mxc://x/a"),
    (lambda c: c.get_account_data(U, "m.direct"), "GET",
     f"/_matrix/client/v3/user/{U}/account_data/m.direct", {"user_id": U}, {"@a:x": [R]},
     {"@a:x": [R]}),
    (lambda c: c.set_account_data(U, "m.direct", {"@a:x": [R]}), "PUT",
     f"/_matrix/client/v3/user/{U}/account_data/m.direct", {"user_id": U}, {}, None),
    (lambda c: c.set_avatar_url(U, "mxc://x/b"), "PUT",
     f"/_matrix/client/v3/profile/{U}/avatar_url", {"user_id": U}, {}, None),
]


@pytest.mark.parametrize(("call", "method", "path", "query", "reply", "result"), CASES,
                         ids=[f"{c[1]} {c[2].split('/')[-1]}" for c in CASES])
async def test_client_method(fake_hs: FakeHomeserver, make_matrix_client: MakeClient,
                             call: Any, method: str, path: str, query: dict[str, str],
                             reply: Any, result: Any) -> None:
    fake_hs.on(method, path, (200, reply))
    assert await call(make_matrix_client()) == result
    seen = fake_hs.seen[-1]
    assert (seen.method, seen.path, seen.query) == (method, path, query)


LOGIN = {"type": "m.login.application_service",
         "identifier": {"type": "m.id.user", "user": U},
         "initial_device_display_name": "Enclave bot"}
KEYS = {"device_keys": {U: {"DEV": {"keys": {}}}}, "master_keys": {}}
E2EE_CASES = [
    # (call, method, path, query, body sent, reply, result): a bot's E2EE device
    (lambda c: c.put_device("D/1", display_name="Enclave bot", user_id=U), "PUT",
     "/_matrix/client/v3/devices/D/1", {"user_id": U}, {"display_name": "Enclave bot"}, {},
     None),
    (lambda c: c.login_appservice(U, device_name="Enclave bot"), "POST",
     "/_matrix/client/v3/login", {}, LOGIN, {"device_id": "NEW", "access_token": "t"},
     {"device_id": "NEW", "access_token": "t"}),
    (lambda c: c.login_appservice(U, device_name="Enclave bot", device_id="DEV"), "POST",
     "/_matrix/client/v3/login", {}, {**LOGIN, "device_id": "DEV"},
     {"device_id": "DEV", "access_token": "t"}, {"device_id": "DEV", "access_token": "t"}),
    (lambda c: c.query_keys({U: ["DEV"], "@a:x": []}, user_id=U), "POST",
     "/_matrix/client/v3/keys/query", {"user_id": U},
     {"device_keys": {U: ["DEV"], "@a:x": []}}, KEYS, KEYS),
    (lambda c: c.upload_cross_signing_keys({"master_key": {"usage": ["master"]}}, user_id=U),
     "POST", "/_matrix/client/v3/keys/device_signing/upload", {"user_id": U},
     {"master_key": {"usage": ["master"]}}, {}, None),
    (lambda c: c.upload_signatures({U: {"DEV": {"signatures": {}}}}, user_id=U), "POST",
     "/_matrix/client/v3/keys/signatures/upload", {"user_id": U},
     {U: {"DEV": {"signatures": {}}}}, {"failures": {}}, {"failures": {}}),
    (lambda c: c.send_to_device("m.room.encrypted", "t/1", {"@a:x": {"D": {"c": 1}}},
                                user_id=U, device_id="DEV"), "PUT",
     "/_matrix/client/v3/sendToDevice/m.room.encrypted/t/1", {"user_id": U, "device_id": "DEV"},
     {"messages": {"@a:x": {"D": {"c": 1}}}}, {}, None),
    (lambda c: c.send_event(R, "m.room.encrypted", {"ciphertext": "x"}, "t1", user_id=U,
                            device_id="DEV"), "PUT",
     f"/_matrix/client/v3/rooms/{R}/send/m.room.encrypted/t1",
     {"user_id": U, "device_id": "DEV"}, {"ciphertext": "x"}, {"event_id": "$e"}, "$e"),
    # a device not known yet: the parameter is still sent, empty (as before)
    (lambda c: c.send_event(R, "m.room.encrypted", {}, "t2", user_id=U, device_id=""), "PUT",
     f"/_matrix/client/v3/rooms/{R}/send/m.room.encrypted/t2", {"user_id": U, "device_id": ""},
     {}, {"event_id": "$f"}, "$f"),
    (lambda c: c.send_event(R, "m.room.message", {}, "t3", user_id=U), "PUT",
     f"/_matrix/client/v3/rooms/{R}/send/m.room.message/t3", {"user_id": U}, {},
     {"event_id": "$g"}, "$g"),
]


@pytest.mark.parametrize(("call", "method", "path", "query", "sent", "reply", "result"),
                         E2EE_CASES,
                         ids=[f"{c[1]} {c[2].split('/v3/')[-1]}" for c in E2EE_CASES])
async def test_e2ee_client_method(fake_hs: FakeHomeserver, make_matrix_client: MakeClient,
                                  call: Any, method: str, path: str, query: dict[str, str],
                                  sent: Any, reply: Any, result: Any) -> None:
    fake_hs.on(method, path, (200, reply))
    assert await call(make_matrix_client()) == result
    seen = fake_hs.seen[-1]
    assert (seen.method, seen.path, seen.query, seen.body) == (method, path, query, sent)
    assert seen.headers["Authorization"] == f"Bearer {AS_TOKEN}"


async def test_whoami_with_a_users_own_token(fake_hs: FakeHomeserver,
                                             make_matrix_client: MakeClient) -> None:
    fake_hs.on("GET", "/_matrix/client/v3/account/whoami", (200, {"user_id": U}))
    await make_matrix_client().whoami(access_token="syt_own")
    seen = fake_hs.seen[-1]
    assert seen.query == {} and seen.headers["Authorization"] == "Bearer syt_own"


async def test_account_data_never_set_is_none(fake_hs: FakeHomeserver,
                                              make_matrix_client: MakeClient) -> None:
    assert await make_matrix_client().get_account_data(U, "m.direct") is None  # 404
    fake_hs.on("GET", "/_matrix/client/v3/user/", (403, {"errcode": "M_FORBIDDEN"}))
    with pytest.raises(MatrixRequestError):
        await make_matrix_client().get_account_data(U, "m.direct")

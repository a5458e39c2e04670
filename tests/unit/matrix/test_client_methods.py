"""The client methods the bots call (instead of raw ``client.request("GET", …)``): each
sends the request the old raw call sent and reads the answer the same way."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.matrix.client import MatrixRequestError

from .conftest import FakeHomeserver, MakeClient

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

"""Shared fixtures of the matrix unit tests: a small scripted fake homeserver (aiohttp test
server) for client and executor tests (the SQLite ``store`` fixture is tests/unit's)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge.matrix.client import MatrixClient

AS_TOKEN = "as-token-for-tests"


@dataclass
class Seen:
    method: str
    path: str  # decoded
    raw_path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


Reply = tuple[int, Any] | tuple[int, Any, dict[str, str]]
DROP: Reply = (0, None)


@dataclass
class FakeHomeserver:
    """Answers from a script: per (method, path prefix) a list of replies, the last repeats."""

    script: dict[tuple[str, str], list[Reply]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def on(self, method: str, path_prefix: str, *replies: Reply) -> None:
        self.script[(method, path_prefix)] = list(replies)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        self.seen.append(Seen(request.method, request.path, request.raw_path,
                              dict(request.query), dict(request.headers), body))
        for (method, prefix), replies in self.script.items():
            if method == request.method and request.path.startswith(prefix):
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                status, payload, *hdrs = reply
                if status == 0:  # DROP: cut the connection without an answer
                    assert request.transport is not None
                    request.transport.close()
                    raise ConnectionResetError("dropped by the fake homeserver")
                data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
                return web.Response(status=status, body=data,
                                    headers=hdrs[0] if hdrs else None,
                                    content_type="application/json")
        return web.Response(status=404, body=b'{"errcode":"M_UNRECOGNIZED","error":"fake"}',
                            content_type="application/json")


@pytest.fixture
async def fake_hs(aiohttp_server) -> FakeHomeserver:
    hs = FakeHomeserver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hs.handle)
    server = await aiohttp_server(app)
    hs.url = str(server.make_url("")).rstrip("/")
    return hs


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Sleeps(list[float]):
    async def __call__(self, delay: float) -> None:
        self.append(delay)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


MakeClient = Callable[..., MatrixClient]


@pytest.fixture
def make_matrix_client(fake_hs: FakeHomeserver, session: aiohttp.ClientSession,
                       sleeps: Sleeps) -> MakeClient:
    def make(**kw: Any) -> MatrixClient:
        kw.setdefault("max_retries", 3)
        kw.setdefault("sleep", sleeps)
        return MatrixClient(session, kw.pop("base_url", fake_hs.url), AS_TOKEN, **kw)

    return make


"""A round-robin HTTP proxy in front of Enclave replicas, for tests and benchmarks.

What a load balancer does in production (nginx/Caddy upstreams, a Kubernetes Service):
each request goes to the next replica; a replica that refuses the connection is skipped
(as a health-checking balancer would), so a dead replica costs no lost transaction.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import aiohttp
from aiohttp import web

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class RoundRobinProxy:
    def __init__(self, backends: Sequence[str]):
        self.backends = list(backends)
        self._next = itertools.cycle(range(len(self.backends)))
        self.sent: Counter[str] = Counter()  # backend -> requests it answered
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        start = next(self._next)
        last_error: Exception | None = None
        for i in range(len(self.backends)):
            backend = self.backends[(start + i) % len(self.backends)]
            try:
                async with self._session.request(
                    request.method, backend + request.path_qs, data=body, headers=headers,
                    allow_redirects=False,
                ) as resp:
                    payload = await resp.read()
                    self.sent[backend] += 1
                    return web.Response(
                        status=resp.status, body=payload,
                        headers={k: v for k, v in resp.headers.items()
                                 if k.lower() not in HOP_HEADERS})
            except (aiohttp.ClientConnectionError, OSError) as e:
                last_error = e  # down: the next replica gets it
        return web.Response(status=502, text=f"no replica answered: {last_error}")

    async def start(self, host: str, port: int) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=120, sock_connect=2))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

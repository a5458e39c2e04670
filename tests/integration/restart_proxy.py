"""A loopback proxy in front of Synapse that loses one answer across a Synapse restart.

Everything is forwarded. The first request ``cut(request, body)`` picks is forwarded and
answered by Synapse (which stores what it sent), then ``crash()`` runs (e.g. kill Enclave:
a crash between the send and its record), Synapse restarts (its in-memory transaction ids
are gone) and the answer is dropped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from .harness import Stack

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class RestartingProxy:
    def __init__(self, stack: Stack, cut: Callable[[web.Request, bytes], bool],
                 crash: Callable[[], None] = lambda: None):
        self.stack, self.should_cut, self.crash = stack, cut, crash
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
        if not self.cut and self.should_cut(request, body):
            self.cut.append((status, json.loads(payload)))
            self.crash()
            await asyncio.to_thread(self.stack.synapse.stop)
            await asyncio.to_thread(self.stack.synapse.start)
            assert request.transport is not None
            request.transport.close()  # the answer is lost
            raise ConnectionResetError("answer dropped by the test proxy")
        return web.Response(status=status, body=payload, headers=out_headers)


async def start_proxy(proxy: RestartingProxy) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"

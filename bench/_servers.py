"""Reference servers for bench/ingest.py, each run in its own process.

    python bench/_servers.py bare    --port P --hs-token T
    python bench/_servers.py mautrix --port P --hs-token T --workdir DIR --homeserver URL

``bare``: aiohttp route that reads the body, parses it with orjson and answers ``{}`` (the
ceiling of an aiohttp+orjson endpoint on this machine). ``mautrix``: mautrix-python's
``AppService`` with one no-op event handler (txn ids in memory, nothing persisted). Enclave
itself is started through its real CLI (``python -m bridge run``) by the benchmark.
Both print ``READY`` on stdout once listening and stop cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path


async def _serve_until_signal(start, stop) -> None:
    await start()
    print("READY", flush=True)
    ev = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, ev.set)
    await ev.wait()
    await stop()


async def run_bare(port: int, hs_token: str) -> None:
    import orjson
    from aiohttp import web

    answer = b"{}"

    async def put_txn(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=answer, content_type="application/json")

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_put("/_matrix/app/v1/transactions/{txn_id}", put_txn)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()

    await _serve_until_signal(start, runner.cleanup)


async def run_mautrix(port: int, hs_token: str, workdir: Path, homeserver: str) -> None:
    from mautrix.appservice import AppService
    from mautrix.appservice.state_store.file import FileASStateStore

    logging.basicConfig(level=logging.WARNING)
    appserv = AppService(
        server=homeserver, domain="corp.example.com", as_token="bench-as-token",
        hs_token=hs_token, bot_localpart="bench", id="bench",
        state_store=FileASStateStore(path=str(workdir / "mx-state.json"), binary=False),
        aiohttp_params={"client_max_size": 10 * 1024 * 1024},
    )

    @appserv.matrix_event_handler
    async def noop(_event: object) -> None:
        return None

    await _serve_until_signal(lambda: appserv.start("127.0.0.1", port), appserv.stop)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["bare", "mautrix"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hs-token", required=True)
    p.add_argument("--workdir", type=Path, default=Path("."))
    p.add_argument("--homeserver", default="http://127.0.0.1:9")
    a = p.parse_args()
    if a.kind == "bare":
        asyncio.run(run_bare(a.port, a.hs_token))
    else:
        asyncio.run(run_mautrix(a.port, a.hs_token, a.workdir, a.homeserver))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``enclave run`` (serve the appservice) and ``enclave reload`` (make the running one
re-read its policy)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import urllib.error
import urllib.request
from typing import Any

import orjson
from aiohttp import web

from ..app import SERVICES, build_app, reload_policy
from ..logs import setup_logging
from .kit import EXIT_ERROR, EXIT_OK, _err, _load

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace) -> int:
    loaded, secrets = _load(args)
    cfg = loaded.config
    lcfg = cfg.logging
    setup_logging(args.log_level or lcfg.level, lcfg.format,
                  [s.get() for s in secrets.values()],
                  libraries=args.library_log_level or lcfg.libraries, loggers=lcfg.loggers)

    async def serve() -> None:
        app = await build_app(loaded, secrets, migrate=not args.no_migrate)
        # Long-lived start-up objects leave the collector's view, and young collections run
        # less often: full collections otherwise pause the loop for tens of ms (p99).
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, cfg.appservice.bind_host, cfg.appservice.port,
                           reuse_address=True)
        await site.start()
        # a log line, so a JSON log stays JSON from its first line
        log.info("enclave listening on http://%s:%d", cfg.appservice.bind_host,
                 cfg.appservice.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP: re-read the policy; a file that fails validation is refused (logged)
        loop.add_signal_handler(signal.SIGHUP, lambda: reload_policy(app[SERVICES]))
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    return EXIT_OK



def cmd_reload(args: argparse.Namespace) -> int:
    loaded, secrets = _load(args)
    cfg = loaded.config
    host = "127.0.0.1" if cfg.appservice.bind_host in ("0.0.0.0", "::") else \
        cfg.appservice.bind_host
    req = urllib.request.Request(
        f"http://{host}:{cfg.appservice.port}/_enclave/admin/v1/reload", method="POST",
        headers={"Authorization": f"Bearer {secrets['appservice.as_token'].get()}"}, data=b"")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        body = orjson.loads(e.read() or b"{}")
        _err(f"enclave reload: refused: {body.get('message') or body}")
        return EXIT_ERROR
    except OSError as e:
        _err(f"enclave reload: cannot reach the running Enclave: {e}")
        return EXIT_ERROR
    print(body.get("message", "reloaded"))
    return EXIT_OK



def add_run_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("run", parents=[common], help="serve the appservice")
    s.add_argument("--no-migrate", action="store_true",
                   help="refuse to start on an old schema instead of migrating it")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    s.add_argument("--log-level", type=str.upper, choices=levels,
                   help="Enclave's own log level (overrides logging.level)")
    s.add_argument("--library-log-level", type=str.upper, choices=levels,
                   help="the libraries' log level: APScheduler, aiohttp, matrix-nio, asyncio... "
                        "(overrides logging.libraries; default WARNING)")
    s.set_defaults(fn=cmd_run)



def add_reload_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("reload", parents=[common],
                       help="make the running Enclave re-read its policy (like SIGHUP)")
    s.set_defaults(fn=cmd_reload)

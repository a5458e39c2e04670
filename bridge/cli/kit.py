"""What every ``enclave`` command shares (core and extensions' command groups): exit codes,
loading the config, a store of the composition root, time parsing and table output."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from ..config import LoadedConfig, check_secrets, load_config
from ..kernel.timestamps import parse_when_ms, readable_utc
from ..retention.archive.s3 import ArchiveBucketError
from ..root import Root
from ..store import Stores

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_DATABASE = 0, 1, 2, 3, 4
EXIT_REFUSED = 5


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _load(args: argparse.Namespace, *, secrets: bool = True) -> tuple[LoadedConfig, dict]:
    loaded = load_config(args.config)
    return loaded, (check_secrets(loaded) if secrets else {})


async def _with_root(args: argparse.Namespace,
                     fn: Callable[[Root], Awaitable[int]], *, check: bool = True,
                     loaded: tuple[LoadedConfig, dict] | None = None) -> int:
    """Run ``fn`` on a composition root whose store (with the extensions' schemas) is open,
    its schema checked unless ``check`` is False (``enclave migrate``). ``loaded``: the
    config and secrets a command already read (else they are read here)."""
    root = Root(*(loaded or _load(args)))
    await root.database.open()
    try:
        if check:
            await root.database.check_schema()
        try:
            return await fn(root)
        except ArchiveBucketError as e:  # the S3 archive's bucket cannot be used
            _err(f"enclave {args.cmd}: {e}")
            return EXIT_CONFIG
    finally:
        await root.close_client(wait_seconds=10)  # nothing to do unless fn used the client
        await root.close_archive()
        await root.database.close()


async def _with_store(args: argparse.Namespace,
                      fn: Callable[[Stores], Awaitable[int]], *, check: bool = True) -> int:
    """Run ``fn`` on the root's stores (see :func:`_with_root`)."""
    return await _with_root(args, lambda root: fn(root.stores), check=check)


def parse_time(value: str, *, now: dt.datetime | None = None) -> int:
    """'90m', '24h', '7d' (ago) or an ISO date/time (UTC if no zone) -> epoch ms."""
    now = now or dt.datetime.now(dt.UTC)
    got = parse_when_ms(value, int(now.timestamp() * 1000))
    if got is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a relative time like 24h nor an ISO date")
    return got


def _fmt_ts(ms: int | None) -> str:
    return readable_utc(ms)


def _print_rows(rows: list[dict[str, Any]], fmt: str, columns: list[str], title: str) -> None:
    if fmt == "json":
        for r in rows:
            sys.stdout.write(orjson.dumps(r).decode() + "\n")
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[
            _fmt_ts(r[c]) if c in ("ts", "received_at", "done_at") else str(r.get(c) or "")
            for c in columns
        ])
    Console(width=200).print(table)

"""The ``enclave`` command line.

Exit codes (also in the README):
  0 success · 1 runtime error · 2 usage error · 3 invalid config or secret ·
  4 database problem (unreachable, schema newer than this code, migration needed) ·
  5 directory sync refused (source error or safety limit; nothing was changed)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import os
import re
import secrets as pysecrets
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import yaml

from .config import ConfigError, LoadedConfig, check_secrets, load_config
from .config.models import SecretRef
from .store import AuditFilter, DatabaseError, SchemaError, Store

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_DATABASE = 0, 1, 2, 3, 4
EXIT_REFUSED = 5


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _load(args: argparse.Namespace, *, secrets: bool = True) -> tuple[LoadedConfig, dict]:
    loaded = load_config(args.config)
    return loaded, (check_secrets(loaded) if secrets else {})


# -- registration -------------------------------------------------------------------------
def registration_dict(loaded: LoadedConfig, as_token: str, hs_token: str) -> dict[str, Any]:
    """The appservice registration the homeserver loads (``app_service_config_files``)."""
    cfg = loaded.config
    server = re.escape(cfg.homeserver.server_name)
    prefix = re.escape(cfg.appservice.namespace_prefix)
    return {
        "id": cfg.appservice.id,
        "url": cfg.appservice.public_url,
        "as_token": as_token,
        "hs_token": hs_token,
        "sender_localpart": cfg.appservice.bot_localpart,
        "rate_limited": False,
        "receive_ephemeral": True,
        "de.sorunome.msc2409.push_ephemeral": True,
        "namespaces": {
            "users": [
                {"exclusive": True, "regex": f"@{prefix}.*:{server}"},
                # non-exclusive: every local user's events reach us and we may act as them
                {"exclusive": False, "regex": f"@.*:{server}"},
            ],
            # non-exclusive: Enclave's bot may give the spaces and rooms it manages
            # aliases (Synapse refuses an appservice an alias outside its namespaces)
            "aliases": [{"exclusive": False, "regex": f"#.*:{server}"}],
            "rooms": [{"exclusive": False, "regex": "!.*"}],
        },
    }


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically with mode 0600, whatever mode an old file had.

    A temp file in the same folder, fsync, then rename: a crash leaves the old file or the
    new one, never an empty token file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write_secret_file(path: Path, value: str) -> None:
    _write_private(path, value + "\n")


def _token_for(loaded: LoadedConfig, ref: SecretRef, key: str, rotate: bool) -> str:
    if ref.env is not None:
        return loaded.secret(ref, key).get()
    assert ref.file is not None
    path = loaded.resolve(ref.file)
    if path.exists() and not rotate:
        try:
            return loaded.secret(ref, key).get()
        except ConfigError:
            pass  # a placeholder left from the example: replace it with a real token
    token = pysecrets.token_urlsafe(48)
    _write_secret_file(path, token)
    print(f"wrote a new {key} to {path} (mode 0600)")
    return token


def cmd_registration(args: argparse.Namespace) -> int:
    loaded, _ = _load(args, secrets=False)
    cfg = loaded.config
    as_token = _token_for(loaded, cfg.appservice.as_token, "appservice.as_token", args.rotate)
    hs_token = _token_for(loaded, cfg.appservice.hs_token, "appservice.hs_token", args.rotate)
    reg = registration_dict(loaded, as_token, hs_token)
    out = Path(args.output)
    _write_private(out, (
        "# Enclave appservice registration: add this file to Synapse's\n"
        "# app_service_config_files. It holds tokens: keep it mode 0600.\n"
    ) + yaml.safe_dump(reg, sort_keys=False))
    print(f"wrote registration to {out}")
    return EXIT_OK


# -- validate / migrate -------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    loaded, secrets = _load(args)
    cfg = loaded.config
    print(f"{args.config}: valid. homeserver {cfg.homeserver.url} ({cfg.homeserver.server_name}),"
          f" appservice '{cfg.appservice.id}' on {cfg.appservice.bind_host}:"
          f"{cfg.appservice.port}, database {cfg.database.url.split('://')[0]}, "
          f"{len(secrets)} secret(s) readable")
    return EXIT_OK


async def _with_store(args: argparse.Namespace,
                      fn: Callable[[Store], Awaitable[int]], *, check: bool = True) -> int:
    from .app import build_store

    loaded, secrets = _load(args)
    store = build_store(loaded, secrets)
    await store.open()
    try:
        if check:
            await store.check_schema()
        return await fn(store)
    finally:
        await store.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        before = await store.schema_version()
        if args.check:
            await store.check_schema()
            print(f"schema is current (version {before})")
            return EXIT_OK
        applied = await store.migrate()
        if applied:
            print(f"migrated from version {before} to {applied[-1]} ({len(applied)} step(s))")
        else:
            print(f"already at version {before}; nothing to do")
        return EXIT_OK

    return asyncio.run(_with_store(args, run, check=False))


# -- audit / inbox ------------------------------------------------------------------------
_REL_RE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, *, now: dt.datetime | None = None) -> int:
    """'90m', '24h', '7d' (ago) or an ISO date/time (UTC if no zone) -> epoch ms."""
    now = now or dt.datetime.now(dt.UTC)
    m = _REL_RE.match(value.strip())
    if m:
        return int((now.timestamp() - int(m.group(1)) * _UNITS[m.group(2)]) * 1000)
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a relative time like 24h nor an ISO date"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def _fmt_ts(ms: int | None) -> str:
    if ms is None:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_rows(rows: list[dict[str, Any]], fmt: str, columns: list[str], title: str) -> None:
    if fmt == "json":
        for r in rows:
            sys.stdout.write(orjson.dumps(r).decode() + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[
            _fmt_ts(r[c]) if c in ("ts", "received_at", "done_at") else str(r.get(c) or "")
            for c in columns
        ])
    Console(width=200).print(table)


def cmd_audit(args: argparse.Namespace) -> int:
    flt = AuditFilter(
        since_ms=parse_time(args.since) if args.since else None,
        until_ms=parse_time(args.until) if args.until else None,
        user_id=args.user, room_id=args.room, rule_id=args.rule, outcome=args.outcome,
        limit=args.limit,
    )

    async def run(store: Store) -> int:
        rows = await store.query_audit(flt)
        _print_rows(rows, args.format,
                    ["ts", "source", "kind", "outcome", "actor", "user_id", "room_id",
                     "rule_id", "reason", "detail"], f"audit ({len(rows)} records)")
        return EXIT_OK

    return asyncio.run(_with_store(args, run))


def cmd_inbox(args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        if args.inbox_cmd == "status":
            stats = await store.inbox_stats()
            stats["oldest_pending_received_at"] = _fmt_ts(stats["oldest_pending_received_at"])
            print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
        elif args.inbox_cmd == "parked":
            rows = await store.list_events("parked", args.limit)
            _print_rows(rows, args.format, ["seq", "event_id", "room_id", "type", "attempts",
                                            "last_error", "received_at"], "parked events")
        elif args.inbox_cmd == "quarantine":
            rows = await store.list_quarantine(args.limit)
            _print_rows(rows, args.format, ["id", "txn_id", "section", "position", "reason",
                                            "raw", "received_at"], "quarantined events")
        elif args.inbox_cmd == "requeue":
            n = await store.requeue_parked(args.seq or None)
            print(f"requeued {n} parked event(s); a running Enclave picks them up")
        return EXIT_OK

    return asyncio.run(_with_store(args, run))


# -- run ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .app import build_app
    from .logs import setup_logging

    loaded, secrets = _load(args)
    cfg = loaded.config
    setup_logging(cfg.logging.level, cfg.logging.format, [s.get() for s in secrets.values()])

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
        print(f"enclave listening on http://{cfg.appservice.bind_host}:{cfg.appservice.port}",
              file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    return EXIT_OK


# -- directory sync ----------------------------------------------------------------------
def cmd_sync(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from .app import wall_clock_ms
    from .directory.build import standalone_sync
    from .directory.sync import SyncRefused, SyncResult

    if args.user and args.apply:
        _err("enclave sync: --user explains a plan; use it with --plan")
        return EXIT_USAGE
    loaded, secrets = _load(args)
    if loaded.config.directory is None:
        _err("enclave sync: the configuration has no directory: section")
        return EXIT_CONFIG
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)

    def explain(result: SyncResult, query: str) -> int:
        from .policy.directory import touching

        snap = result.snapshot
        pid = next((p for p, mu in result.users.items() if query in (
            p, mu.user_id, mu.localpart, mu.person.username)), None)
        if pid is None:
            pid = next((p for p, r in result.known.items() if query in (p, r.user_id)), None)
        if pid is None:
            _err(f"enclave sync: no person {query!r} in the directory or in what Enclave "
                 "provisioned (give a person id, username or Matrix id)")
            return EXIT_USAGE
        person = snap.people.get(pid)
        mapped = result.users.get(pid)
        rec = result.known.get(pid)
        user_id = mapped.user_id if mapped else rec.user_id  # type: ignore[union-attr]
        out.print(f"person {pid} -> {user_id}", markup=False)
        if person is None:
            out.print("  not in the directory any more (deleted)")
        else:
            for name in ("username", "display_name", "email", "title", "department",
                         "location", "manager", "disabled"):
                out.print(f"  {name}: {getattr(person, name)}", markup=False)
            out.print(f"  groups: {', '.join(sorted(person.groups)) or '-'}", markup=False)
        out.print(f"  provisioned: {rec.status if rec else 'not yet'}", markup=False)
        acts, finds = touching(result.plan, user_id)
        for a in acts:
            out.print("  will: " + a.describe(), markup=False)
        for f in finds:
            out.print(f"  finding [{f.rule_id}]: {f.message}", markup=False)
        if not acts and not finds:
            out.print("  in step with the directory: nothing to do")
        return EXIT_OK

    def show(result: SyncResult) -> None:
        plan = result.plan
        if args.format == "json":
            for a in plan.actions:
                print(orjson.dumps(a.to_dict()).decode())
            for f in plan.findings:
                print(orjson.dumps({"finding": f.rule_id, "subject": f.subject,
                                    "message": f.message}).decode())
            return
        snap = result.snapshot
        out.print(f"directory ({snap.source or 'source'}): {len(snap.people)} people, "
                  f"{sum(1 for p in snap.people.values() if p.disabled)} disabled, "
                  f"{len(snap.groups)} groups")
        counts = plan.count()
        t = Table(title="planned actions", show_edge=False)
        t.add_column("action")
        t.add_column("count", justify="right")
        for kind, n in sorted(counts.items()):
            t.add_row(kind, str(n))
        if not counts:
            t.add_row("(none: the homeserver matches the directory)", "0")
        out.print(t)
        shown = plan.actions if args.details is None else plan.actions[: args.details]
        for a in shown:
            out.print("  " + a.describe(), markup=False)
        if len(shown) < len(plan.actions):
            out.print(f"  … {len(plan.actions) - len(shown)} more (--details N)")
        for f in plan.findings:
            out.print(f"  finding [{f.rule_id}] {f.subject}: {f.message}", markup=False)
        for pid, why in result.refused_mappings:
            out.print(f"  left out: person {pid}: {why}", markup=False)

    async def go() -> int:
        async with standalone_sync(loaded, secrets, clock_ms=wall_clock_ms) as sync:
            try:
                if not args.apply:
                    result = await sync.run(apply=False, force=args.force)
                    if args.user:
                        return explain(result, args.user)
                    show(result)
                    return EXIT_OK
                progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                    MofNCompleteColumn(), console=err,
                                    disable=not err.is_terminal)
                with progress:
                    task = progress.add_task("applying", total=None)

                    def tick(done: int, total: int, action: Any) -> None:
                        progress.update(task, completed=done, total=total)

                    result = await sync.run(apply=True, force=args.force, progress=tick)
            except SyncRefused as e:
                _err("directory sync refused, nothing was changed:")
                for p in e.problems:
                    _err(f"  - {p}")
                return EXIT_REFUSED
            applied = ", ".join(f"{k} {v}" for k, v in sorted(result.applied.items()))
            out.print(f"applied: {applied or 'nothing to do'}")
            for f in result.plan.findings:
                out.print(f"  finding [{f.rule_id}] {f.subject}: {f.message}", markup=False)
            for a, detail in result.failed:
                _err(f"failed: {a.describe()}: {detail}")
            return EXIT_OK if result.ok else EXIT_ERROR

    return asyncio.run(go())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enclave", description=__doc__.split("\n")[0])
    default_cfg = os.environ.get("ENCLAVE_CONFIG", "config.yaml")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=default_cfg,
                        help="config file (default: $ENCLAVE_CONFIG or ./config.yaml)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("registration", parents=[common],
                       help="write the appservice registration YAML (and token files)")
    s.add_argument("-o", "--output", default="enclave-registration.yaml")
    s.add_argument("--rotate", action="store_true", help="generate new tokens")
    s.set_defaults(fn=cmd_registration)

    s = sub.add_parser("validate", parents=[common], help="check a config file and its secrets")
    s.add_argument("config_file", nargs="?", help="config file (overrides -c)")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("run", parents=[common], help="serve the appservice")
    s.add_argument("--no-migrate", action="store_true",
                   help="refuse to start on an old schema instead of migrating it")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("migrate", parents=[common], help="upgrade the database schema")
    s.add_argument("--check", action="store_true", help="only check; exit 4 if not current")
    s.set_defaults(fn=cmd_migrate)

    s = sub.add_parser("audit", parents=[common], help="print the audit log")
    s.add_argument("--since", help="e.g. 24h, 7d or 2026-11-01T00:00")
    s.add_argument("--until")
    s.add_argument("--user")
    s.add_argument("--room")
    s.add_argument("--rule")
    s.add_argument("--outcome")
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(fn=cmd_audit)

    s = sub.add_parser("inbox", parents=[common], help="inspect the durable inbox")
    s.add_argument("inbox_cmd", choices=["status", "parked", "quarantine", "requeue"])
    s.add_argument("--seq", type=int, nargs="*", help="with requeue: only these events")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(fn=cmd_inbox)

    s = sub.add_parser("sync", parents=[common],
                       help="directory sync: show (--plan) or run (--apply) one run")
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", action="store_true", help="print the actions, change nothing")
    mode.add_argument("--apply", action="store_true", help="run them (progress and summary)")
    s.add_argument("--force", action="store_true",
                   help="lift the safety limits (deactivation count/percentage, min_people)")
    s.add_argument("--details", type=int, default=None, metavar="N",
                   help="with --plan: print only the first N actions")
    s.add_argument("--user", metavar="WHO",
                   help="with --plan: explain one person (id, username or Matrix id): their "
                        "directory entry, Matrix id and what the run would do to them")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(fn=cmd_sync)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config_file", None):
        args.config = args.config_file
    try:
        return args.fn(args)
    except ConfigError as e:
        _err(str(e))
        return EXIT_CONFIG
    except (SchemaError, DatabaseError) as e:
        _err(f"database: {e}")
        return EXIT_DATABASE
    except argparse.ArgumentTypeError as e:
        _err(f"enclave: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""``enclave migrate``, ``enclave audit`` and ``enclave inbox``: the database's schema, the
audit log and the durable inbox."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson

from ..store import AuditFilter, Stores
from .kit import EXIT_OK, _fmt_ts, _print_rows, _with_store, parse_time


def cmd_migrate(args: argparse.Namespace) -> int:
    async def run(store: Stores) -> int:
        before = await store.database.schema_version()
        if args.check:
            await store.database.check_schema()
            print(f"schema is current (version {before})")
            return EXIT_OK
        applied = await store.database.migrate()
        if applied:
            print(f"migrated from version {before} to {applied[-1]} ({len(applied)} step(s))")
        else:
            print(f"already at version {before}; nothing to do")
        return EXIT_OK

    return asyncio.run(_with_store(args, run, check=False))


# -- audit / inbox ------------------------------------------------------------------------
def cmd_audit(args: argparse.Namespace) -> int:
    flt = AuditFilter(
        since_ms=parse_time(args.since) if args.since else None,
        until_ms=parse_time(args.until) if args.until else None,
        user_id=args.user, room_id=args.room, rule_id=args.rule, outcome=args.outcome,
        limit=args.limit,
    )

    async def run(store: Stores) -> int:
        rows = await store.audit.query_audit(flt)
        _print_rows(rows, args.format,
                    ["ts", "source", "kind", "outcome", "actor", "user_id", "room_id",
                     "rule_id", "reason", "detail"], f"audit ({len(rows)} records)")
        return EXIT_OK

    return asyncio.run(_with_store(args, run))


def cmd_inbox(args: argparse.Namespace) -> int:
    async def run(store: Stores) -> int:
        if args.inbox_cmd == "status":
            stats = await store.inbox.inbox_stats()
            stats["oldest_pending_received_at"] = _fmt_ts(stats["oldest_pending_received_at"])
            print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
        elif args.inbox_cmd == "parked":
            rows = await store.inbox.list_events("parked", args.limit)
            _print_rows(rows, args.format, ["seq", "event_id", "room_id", "type", "attempts",
                                            "last_error", "received_at"], "parked events")
        elif args.inbox_cmd == "quarantine":
            rows = await store.inbox.list_quarantine(args.limit)
            _print_rows(rows, args.format, ["id", "txn_id", "section", "position", "reason",
                                            "raw", "received_at"], "quarantined events")
        elif args.inbox_cmd == "requeue":
            n = await store.inbox.requeue_parked(args.seq or None)
            print(f"requeued {n} parked event(s); a running Enclave picks them up")
        return EXIT_OK

    return asyncio.run(_with_store(args, run))



def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
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


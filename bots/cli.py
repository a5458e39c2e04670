"""The bots' command groups: ``enclave announcements`` and ``enclave bots`` (store and
config only; the running Enclave sends)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import os
import sys
from pathlib import Path
from typing import Any

from bridge.cli.kit import EXIT_ERROR, EXIT_OK, EXIT_USAGE, _err, _load, _print_rows, _with_store
from bridge.kernel.timestamps import iso_utc
from bridge.store import Stores

from .announcements.overview import announcement_list, occurrence_report, queue_send
from .announcements.report import write_csv
from .capture.store import CaptureGapStore
from .cross_signing import request_reset
from .store import AnnouncementStore


def cmd_announcements(args: argparse.Namespace) -> int:
    """``enclave announcements list | report ID | send ID`` (store and config only)."""
    loaded, _ = _load(args)
    bots_cfg = loaded.config.bots
    acfg = bots_cfg.announcements if bots_cfg is not None else None
    configured = {a.id: a for a in acfg.announcements} if acfg is not None else {}
    tz = acfg.timezone if acfg is not None else "UTC"

    async def run(core: Stores) -> int:
        # the bots' own tables, on the database of the core stores (the audit, the directory)
        store = AnnouncementStore(core.database.db)
        if args.ann_cmd == "list":
            rows = await announcement_list(store, configured)
            _print_rows(rows, args.format, ["id", "source", "title", "schedule",
                                            "occurrences", "latest", "status", "counts"],
                        f"announcements ({len(rows)})")
            return EXIT_OK
        if args.ann_cmd == "send":
            a = configured.get(args.id)
            if a is None:
                _err(f"enclave announcements send: no announcement {args.id!r} in "
                     "bots.announcements.announcements")
                return EXIT_USAGE
            now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
            q = await queue_send(store, await core.directory.directory_view(), a, tz,
                                 occurrence_id=args.occurrence, now_ms=now,
                                 created_by=f"cli:{os.environ.get('USER', '?')}")
            if not q.created:
                _err(f"occurrence {q.occurrence_id!r} of {a.id!r} exists already; "
                     "nothing queued")
                return EXIT_ERROR
            assert acfg is not None
            print(f"queued {a.id} / {q.occurrence_id} for {q.users} people and "
                  f"{q.rooms} room(s); the running Enclave delivers it within "
                  f"{acfg.poll_seconds:g} s")
            return EXIT_OK
        # report
        rep = await occurrence_report(store, await core.directory.directory_view(), args.id,
                                      args.occurrence, tz)
        if rep is None:
            _err(f"enclave announcements report: nothing sent for {args.id!r}"
                 + (f" occurrence {args.occurrence!r}" if args.occurrence else ""))
            return EXIT_ERROR
        rows, head = rep.rows, rep.head
        if args.csv == "-":
            _err(head)
            write_csv(rows, sys.stdout)
            return EXIT_OK
        print(head)
        if args.csv:
            buf = io.StringIO()
            write_csv(rows, buf)
            await asyncio.to_thread(Path(args.csv).write_text, buf.getvalue(), "utf-8")
            print(f"wrote {len(rows)} row(s) to {args.csv}")
        else:
            _print_rows(rows, args.format, ["recipient", "name", "status", "delivered_at",
                                            "acknowledged_at", "ack_method", "reminders",
                                            "escalated_to", "detail"], "recipients")
        return EXIT_OK

    return asyncio.run(_with_store(args, run))


def add_announcements_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("announcements",
                       help="announcements: list, report who got/acknowledged one, send one")
    a = s.add_subparsers(dest="ann_cmd", required=True)
    x = a.add_parser("list", parents=[common], help="configured and sent announcements")
    x.add_argument("--format", choices=["table", "json"], default="table")
    x = a.add_parser("report", parents=[common],
                     help="counts and who/when of an announcement's latest (or one) send")
    x.add_argument("id")
    x.add_argument("--occurrence", help="one occurrence (default: the latest)")
    x.add_argument("--csv", metavar="FILE", help="write the rows as CSV ('-': stdout)")
    x.add_argument("--format", choices=["table", "json"], default="table")
    x = a.add_parser("send", parents=[common],
                     help="queue a configured announcement now (the running Enclave sends)")
    x.add_argument("id")
    x.add_argument("--occurrence", help="occurrence id (default: manual-<UTC time>)")
    s.set_defaults(fn=cmd_announcements)


# -- bots ---------------------------------------------------------------------------------
def cmd_bots(args: argparse.Namespace) -> int:
    """``enclave bots reset-identity BOT``: replace a bot's cross-signing identity at its
    next start (the fix for a lost or conflicting key directory); ``enclave bots
    capture-gaps``: :func:`cmd_capture_gaps`."""
    if args.bots_cmd == "capture-gaps":
        return cmd_capture_gaps(args)
    loaded, _ = _load(args, secrets=False)
    cfg = loaded.config
    bots_cfg = cfg.bots
    sections = [s for s in (bots_cfg.announcements, bots_cfg.onboarding, bots_cfg.archive)
                if s is not None] if bots_cfg is not None else []
    prefix, server = cfg.appservice.namespace_prefix, cfg.homeserver.server_name
    by_name: dict[str, str] = {}
    for section in sections:
        localpart = prefix + section.bot.localpart
        for name in (section.bot.localpart, localpart, f"@{localpart}:{server}"):
            by_name[name] = localpart
    localpart = by_name.get(args.bot)
    if localpart is None or bots_cfg is None or not bots_cfg.encryption.enabled:
        _err(f"enclave bots: no bot with an E2EE device named {args.bot!r} (configured: "
             + (", ".join(sorted({f"@{v}:{server}" for v in by_name.values()})) or "none")
             + ")")
        return EXIT_USAGE
    store_dir = loaded.resolve(bots_cfg.encryption.store_dir) / localpart
    request_reset(store_dir)
    print(f"reset requested for @{localpart}:{server}: its next start (the leading replica) "
          f"makes and publishes a new cross-signing identity (old keys kept aside in "
          f"{store_dir}); staff clients show 'identity changed' for the bot once")
    return EXIT_OK


def cmd_capture_gaps(args: argparse.Namespace) -> int:
    """``enclave bots capture-gaps``: encrypted messages of capture-required rooms that the
    archive device could not decrypt (yet), with the reason; ``--all`` adds recovered ones.
    Exit 0 either way: the list is the report."""

    async def run(core: Stores) -> int:
        gaps = await CaptureGapStore(core.database.db).gaps(
            open_only=not args.all, room_id=args.room)
        rows = [{"room": g.room_id, "event": g.event_id, "sender": g.sender or "",
                 "session": g.session_id or "", "reason": g.reason,
                 "first_seen": iso_utc(g.first_seen), "attempts": g.attempts,
                 "key_requested": iso_utc(g.key_requested_at) if g.key_requested_at else "",
                 "recovered": iso_utc(g.recovered_at) if g.recovered_at else ""}
                for g in gaps]
        open_count = sum(1 for g in gaps if g.open)
        _print_rows(rows, args.format, ["room", "event", "sender", "reason", "first_seen",
                                        "attempts", "key_requested", "recovered"],
                    f"capture gaps ({open_count} open)")
        return EXIT_OK

    return asyncio.run(_with_store(args, run))


def add_bots_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("bots", help="bots: reset a bot's cross-signing identity, list the "
                                    "archive device's capture gaps")
    b = s.add_subparsers(dest="bots_cmd", required=True)
    x = b.add_parser("capture-gaps", parents=[common],
                     help="encrypted messages the archive device could not decrypt (yet)")
    x.add_argument("--all", action="store_true", help="recovered gaps too")
    x.add_argument("--room", help="one room")
    x.add_argument("--format", choices=["table", "json"], default="table")
    x = b.add_parser("reset-identity", parents=[common],
                     help="replace a bot's cross-signing identity at its next start")
    x.add_argument("bot", help="the bot's user id or localpart (e.g. announce)")
    s.set_defaults(fn=cmd_bots)



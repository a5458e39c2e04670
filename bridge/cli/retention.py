"""``enclave retention``, ``enclave hold``, ``enclave archive`` and ``enclave export``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import secrets as pysecrets
from pathlib import Path
from typing import Any

import orjson

from ..kernel.durations import format_duration_ms
from ..retention.export import FORMATS, ExportRequest, export_archive
from ..retention.holds import HoldCheckFailed, UnknownHoldSubjects
from ..root import Root
from ..store.base import AuditRecord, HoldRecord
from .kit import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    _err,
    _fmt_ts,
    _load,
    _print_rows,
    _with_root,
    parse_time,
)


def _needs_retention(args: argparse.Namespace) -> tuple[Any, dict] | None:
    loaded, secrets = _load(args)
    if loaded.config.retention is None:
        _err(f"enclave {args.cmd}: the configuration has no retention: section")
        return None
    return loaded, secrets


# -- enclave retention --------------------------------------------------------------------
def cmd_retention(args: argparse.Namespace) -> int:
    got = _needs_retention(args)
    if got is None:
        return EXIT_CONFIG
    loaded, secrets = got

    def progress(line: str) -> None:
        if args.format != "json":
            print("  " + line, flush=True)

    async def go() -> int:
        async with Root(loaded, secrets).opened() as root:
            svc = root.retention
            assert svc is not None  # checked above
            try:
                run = await svc.run(apply=args.apply, rooms=args.room or None,
                                    progress=progress)
            except RuntimeError as e:
                _err(f"enclave retention: {e}")
                return EXIT_ERROR
        due = held = deferred = purged = would = redacted = 0
        for rr in run.rooms:
            p = rr.plan
            if args.format == "json":
                print(orjson.dumps({
                    "room": rr.room_id, "error": rr.error, "read": rr.read,
                    "archived": rr.archived, "purged": rr.purged, "redacted": rr.redacted,
                    "not_redacted": rr.not_redacted,
                    "not_redacted_reason": rr.not_redacted_reason,
                    "media_deleted": rr.media_deleted,
                    "steps": [{"up_to_ts": s.up_to_ts, "seconds": round(s.seconds, 3)}
                              for s in rr.steps],
                    "plan": None if p is None else {
                        "keep": format_duration_ms(p.period.keep_ms), "rule": p.rule_id,
                        "due_events": p.due_events, "held_events": p.held_events,
                        "deferred_events": p.deferred_events, "cutoff_ms": p.cutoff_ms,
                        "windows": len(p.windows), "holds": list(p.hold_ids),
                        "reason": p.reason}}).decode())
            if p is not None:
                due += p.due_events
                held += p.held_events
                deferred += p.deferred_events
                would += p.purge_events
            purged += rr.purged
            redacted += rr.redacted
            if args.format == "json":
                continue
            if rr.error:
                print(f"{rr.room_id}: FAILED, nothing more purged: {rr.error}")
            elif p is not None and (p.due_events or p.held_events or args.verbose):
                print(f"{rr.room_id}: keep {format_duration_ms(p.period.keep_ms)} "
                      f"[{p.rule_id}] due {p.due_events}, held {p.held_events}, "
                      f"deferred {p.deferred_events}, cutoff {_fmt_ts(p.cutoff_ms) or '-'}, "
                      f"{len(p.windows)} step(s)"
                      + (f", holds {', '.join(p.hold_ids)}" if p.hold_ids else "")
                      + (f"; purged {rr.purged}, redacted {rr.redacted}" if args.apply
                         else "")
                      + (f"; {rr.not_redacted} NOT redacted: {rr.not_redacted_reason}"
                         if rr.not_redacted else ""))
        for f in run.findings:
            if args.format == "json":
                print(orjson.dumps({"finding": f}).decode())
            else:
                print(f"finding: {f}")
        if args.format != "json":
            verb = "purged" if args.apply else "would purge"
            print(f"{len(run.rooms)} rooms: {due} events due, {held} held, {deferred} kept "
                  f"beside held ones; {verb} {purged if args.apply else would}"
                  + (f", redacted {redacted} kept beside held ones" if redacted else "")
                  + f"; {len(run.failed)} failed")
            if run.archive_pruned:
                print(f"archive retention: {run.archive_pruned} sealed segments pruned")
        return EXIT_OK if not run.failed else EXIT_ERROR

    return asyncio.run(go())


# -- enclave hold -------------------------------------------------------------------------
def cmd_hold(args: argparse.Namespace) -> int:
    got = _needs_retention(args)
    if got is None:
        return EXIT_CONFIG

    async def run(root: Root) -> int:
        svc = root.retention
        assert svc is not None  # checked above
        if args.hold_cmd == "add":
            rec = HoldRecord(
                id=args.id or f"hold-{pysecrets.token_hex(4)}", case_id=args.case,
                reason=args.reason, placed_by=args.by, users=tuple(args.user or ()),
                rooms=tuple(args.room or ()),
                since_ms=parse_time(args.since) if args.since else None,
                until_ms=parse_time(args.until) if args.until else None,
                created_at=root.clock_ms())
            try:
                placed = await svc.add_hold(rec)
            except HoldCheckFailed as e:
                _err(f"enclave hold add: cannot check the hold's users and rooms: {e}")
                return EXIT_ERROR
            except UnknownHoldSubjects as e:
                for p in e.problems:
                    _err(f"enclave hold add: {p}")
                _err("enclave hold add: no hold placed")
                return EXIT_USAGE
            except ValueError as e:
                _err(f"enclave hold add: {e}")
                return EXIT_USAGE
            if not placed:
                _err(f"enclave hold add: a hold with id {rec.id!r} exists")
                return EXIT_ERROR
            print(f"placed hold {rec.id} (case {rec.case_id})")
            await _mirror_holds(root)
            return EXIT_OK
        if args.hold_cmd == "release":
            if not await svc.release_hold(args.id, by=args.by, reason=args.reason):
                _err(f"enclave hold release: no active hold {args.id!r}")
                return EXIT_ERROR
            print(f"released hold {args.id}; its events follow the retention policy again")
            await _mirror_holds(root)
            return EXIT_OK
        holds = await root.stores.holds.holds(include_released=args.all)
        rows = [{"id": h.id, "case": h.case_id, "users": " ".join(h.users),
                 "rooms": " ".join(h.rooms), "since": _fmt_ts(h.since_ms),
                 "until": _fmt_ts(h.until_ms), "placed_by": h.placed_by,
                 "placed": _fmt_ts(h.created_at), "released": _fmt_ts(h.released_at),
                 "reason": h.reason} for h in holds]
        _print_rows(rows, args.format, list(rows[0]) if rows else ["id"], "legal holds")
        return EXIT_OK

    return asyncio.run(_with_root(args, run, loaded=got))


async def _mirror_holds(root: Root) -> None:
    """Put the holds on the archive's storage now (S3 legal holds; nothing for a local
    directory), not only at the next retention run."""
    archive, svc = root.archive, root.retention
    if archive is None or svc is None:
        return
    holds = await svc.active_holds()
    await archive.apply_holds(holds, list(await root.stores.archive.archive_rooms()))


# -- enclave archive verify ---------------------------------------------------------------
def cmd_archive(args: argparse.Namespace) -> int:

    got = _needs_retention(args)
    if got is None:
        return EXIT_CONFIG

    async def run(root: Root) -> int:
        archive = root.archive
        assert archive is not None  # checked above
        report = await archive.verify(args.room)
        if args.format == "json":
            print(orjson.dumps({
                "ok": report.ok, "rooms": report.rooms, "entries": report.entries,
                "events": report.events, "media": report.media,
                "problems": [p.__dict__ for p in report.problems]}).decode())
        else:
            print(f"checked {report.rooms} rooms, {report.entries} manifest entries, "
                  f"{report.events} events, {report.media} media files")
            for p in report.problems:
                where = f"entry {p.entry}" if p.entry is not None else "manifest"
                print(f"BROKEN {p.room_id} at {where}: {p.kind}: {p.detail}")
            print("archive OK" if report.ok else "archive FAILED verification")
        return EXIT_OK if report.ok else EXIT_ERROR

    return asyncio.run(_with_root(args, run, loaded=got))


# -- enclave export -----------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    got = _needs_retention(args)
    if got is None:
        return EXIT_CONFIG
    formats = frozenset(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = formats - FORMATS
    if unknown or not formats:
        _err(f"enclave export: unknown format(s) {sorted(unknown)}; use "
             f"{','.join(sorted(FORMATS))}")
        return EXIT_USAGE
    by = args.by or f"os:{getpass.getuser()}"
    out_abs = str(Path(args.out).resolve())

    async def run(root: Root) -> int:
        store = root.stores
        if args.hold and await store.holds.hold_get(args.hold) is None:
            _err(f"enclave export: no hold {args.hold!r}")
            return EXIT_ERROR
        archived = await store.archive.archive_rooms()
        missing = [r for r in args.room or () if r not in archived]
        if missing:
            # like an unknown hold: an empty export would read as "nothing was said"
            _err(f"enclave export: no archived room {', '.join(map(repr, missing))}")
            return EXIT_ERROR
        for user in args.user or ():
            if not await store.archive.archive_query(senders=[user], limit=1):
                # not a refusal: a subject-access request for someone who said nothing
                # gets its (empty) bundle, but the operator is told
                print(f"enclave export: {user} sent no archived event", flush=True)
        archive = root.archive
        assert archive is not None  # checked above
        req = ExportRequest(
            rooms=tuple(args.room or ()), users=tuple(args.user or ()),
            since_ms=parse_time(args.since) if args.since else None,
            until_ms=parse_time(args.until) if args.until else None,
            hold_id=args.hold, formats=formats)
        what = orjson.dumps({
            "out": out_abs, "rooms": list(req.rooms),
            "users": list(req.users), "since_ms": req.since_ms, "until_ms": req.until_ms,
            "hold": req.hold_id, "formats": sorted(formats)}).decode()
        try:
            report = await export_archive(archive, store.archive, store.holds,
                                          store.directory, Path(args.out), req,
                                          clock_ms=root.clock_ms)
        except (ValueError, OSError) as e:
            await store.audit.add_audit(AuditRecord(
                ts=root.clock_ms(), source="cli", kind="export", outcome="failed", actor=by,
                rule_id="builtin.export", reason=args.reason, detail=f"{what}: {e}"))
            _err(f"enclave export: {e}")
            return EXIT_ERROR
        # who read the archive, what they took and why: the export itself is audited
        await store.audit.add_audit(AuditRecord(
            ts=root.clock_ms(), source="cli", kind="export", outcome="applied", actor=by,
            user_id=req.users[0] if len(req.users) == 1 else None,
            room_id=req.rooms[0] if len(req.rooms) == 1 else None,
            rule_id="builtin.export", reason=args.reason,
            detail=f"{what}: {report.events} events of {report.rooms} rooms, "
                   f"{report.media} media files"))
        print(f"exported {report.events} events of {report.rooms} rooms and {report.media} "
              f"media files to {report.out_dir} ({len(report.files)} files)")
        return EXIT_OK

    return asyncio.run(_with_root(args, run, loaded=got))


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("retention", parents=[common],
                       help="retention: show (--plan) or run (--apply) archive-then-purge")
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", action="store_true",
                      help="rooms, due/held event counts, cutoffs; changes nothing")
    mode.add_argument("--apply", action="store_true",
                      help="archive what is missing, then purge in bounded steps (progress)")
    s.add_argument("--room", action="append", metavar="ROOM_ID",
                   help="only these rooms (repeatable); default: every room")
    s.add_argument("--verbose", action="store_true", help="also rooms with nothing due")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(fn=cmd_retention)

    s = sub.add_parser("hold", help="legal holds: add, list, release")
    h = s.add_subparsers(dest="hold_cmd", required=True)
    x = h.add_parser("add", parents=[common], help="place a legal hold")
    x.add_argument("--case", required=True, help="case or matter id")
    x.add_argument("--reason", required=True)
    x.add_argument("--by", required=True, help="who places it (recorded in the audit log)")
    x.add_argument("--user", action="append", help="held sender (repeatable)")
    x.add_argument("--room", action="append", help="held room (repeatable)")
    x.add_argument("--since", help="only events from this time (ISO date/time, or 30d ago)")
    x.add_argument("--until", help="only events up to this time")
    x.add_argument("--id", help="hold id (default: generated)")
    x = h.add_parser("list", parents=[common], help="active holds (--all: released too)")
    x.add_argument("--all", action="store_true")
    x.add_argument("--format", choices=["table", "json"], default="table")
    x = h.add_parser("release", parents=[common], help="release a hold")
    x.add_argument("id")
    x.add_argument("--by", required=True)
    x.add_argument("--reason", default="released")
    s.set_defaults(fn=cmd_hold)

    s = sub.add_parser("archive", help="the compliance archive: verify its hash chain")
    a = s.add_subparsers(dest="archive_cmd", required=True)
    x = a.add_parser("verify", parents=[common],
                     help="check every segment, media file and manifest link; exit 1 if broken")
    x.add_argument("--room", help="only this room")
    x.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(fn=cmd_archive)

    s = sub.add_parser("export", parents=[common],
                       help="eDiscovery export from the archive (JSON Lines, HTML, EML, CSV)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--room", action="append", help="room id (repeatable)")
    s.add_argument("--user", action="append",
                   help="sender (repeatable); a subject-access bundle: their messages and "
                        "media across rooms, with subject.json")
    s.add_argument("--since")
    s.add_argument("--until")
    s.add_argument("--hold", help="everything a legal hold covers")
    s.add_argument("--formats", default="jsonl,html,eml",
                   help="comma separated: jsonl, html, eml, csv")
    s.add_argument("--by", help="who runs the export (audit log); default: os:<login name>")
    s.add_argument("--reason", help="why (case, request id), recorded in the audit log")
    s.set_defaults(fn=cmd_export)

"""``enclave sync``: one directory sync run, planned or applied, or one person explained."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from ..directory.sync import SyncRefused, SyncResult
from ..kernel.ids import localpart_of
from ..policy.directory import touching
from ..root import Root
from .kit import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_USAGE, _err, _load


def cmd_sync(args: argparse.Namespace) -> int:
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
        snap = result.snapshot
        pid = next((p for p, mu in result.users.items() if query in (
            p, mu.user_id, mu.localpart, mu.person.username)), None)
        if pid is None:
            # a deleted person: only what Enclave remembers (person id, Matrix id and so
            # its localpart, which the username mapped to)
            pid = next((p for p, r in result.known.items() if query in (
                p, r.user_id, localpart_of(r.user_id))), None)
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
        async with Root(loaded, secrets).opened() as root:
            sync = root.directory
            assert sync is not None  # checked above
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



def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
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


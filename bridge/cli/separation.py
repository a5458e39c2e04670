"""``enclave separation`` (reconcile the policy) and ``enclave explain`` (one decision)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
from rich.console import Console

from ..root import Root
from ..separation.explain import (
    Explanation,
    Ruling,
    explain_invite,
    explain_join,
    explain_room,
)
from .kit import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_USAGE, _err, _load


def cmd_separation(args: argparse.Namespace) -> int:
    loaded, secrets = _load(args)
    if loaded.config.policy is None:
        _err("enclave separation: the configuration has no policy: section")
        return EXIT_CONFIG
    out = Console(highlight=False)

    async def go() -> int:
        async with Root(loaded, secrets).opened() as root:
            sep = root.separation
            assert sep is not None  # checked above
            try:
                result = await sep.reconcile(apply=args.apply, rooms=args.room or None)
            except RuntimeError as e:
                _err(f"enclave separation: {e}")
                return EXIT_ERROR
        plan = result.plan
        if args.format == "json":
            for a in plan.actions:
                print(orjson.dumps(a.to_dict()).decode())
            for f in plan.findings:
                print(orjson.dumps({"finding": f.rule_id, "room": f.room_id,
                                    "subject": f.subject, "message": f.message}).decode())
            return EXIT_OK if not result.failed else EXIT_ERROR
        out.print(f"scanned {plan.rooms} rooms ({result.admin_calls} admin API calls): "
                  f"{len(plan.actions)} actions, {len(plan.findings)} findings")
        for a in plan.actions:
            out.print(("  applied: " if args.apply else "  will: ") + a.describe(),
                      markup=False)
        for f in plan.findings:
            out.print(f"  finding [{f.rule_id}] {f.room_id} {f.subject}: {f.message}",
                      markup=False)
        if args.apply:
            out.print(f"applied {result.applied}, failed {len(result.failed)}")
            for a, detail in result.failed:
                _err(f"failed: {a.describe()}: {detail}")
        return EXIT_OK if not result.failed else EXIT_ERROR

    return asyncio.run(go())


def cmd_explain(args: argparse.Namespace) -> int:
    loaded, secrets = _load(args)
    if loaded.config.policy is None:
        _err("enclave explain: the configuration has no policy: section")
        return EXIT_CONFIG

    def where(r: Ruling) -> str:
        return f"{r.path} ({loaded.path}, line {r.line})" if r.line else r.path

    def show(ex: Explanation) -> None:
        d = ex.decision
        assert d is not None
        print(ex.title)
        print(f"  decision: {'ALLOW' if d.allow else 'DENY'}")
        print(f"  rule:     {d.rule_id}")
        print(f"  where:    {where(d)}")
        print(f"  reason:   {d.reason}")
        if d.message:
            print(f"  message:  {d.message}")

    async def go() -> int:
        async with Root(loaded, secrets).opened() as root:
            sep = root.separation
            assert sep is not None  # checked above
            if args.what == "invite":
                if len(args.args) not in (2, 3):
                    _err("usage: enclave explain invite @inviter @invitee [!room]")
                    return EXIT_USAGE
                ex = await explain_invite(sep, args.args[0], args.args[1],
                                          args.args[2] if len(args.args) == 3 else None,
                                          loaded.line_of)
                for pr in ex.principals:
                    print(f"{pr.user_id}: {pr.kind}" + (
                        f" (groups: {', '.join(pr.groups)})" if pr.groups else ""))
                show(ex)
                return EXIT_OK
            if args.what == "join":
                if len(args.args) != 2:
                    _err("usage: enclave explain join @user !room")
                    return EXIT_USAGE
                show(await explain_join(sep, args.args[0], args.args[1], loaded.line_of))
                return EXIT_OK
            if len(args.args) != 1:
                _err("usage: enclave explain room !room")
                return EXIT_USAGE
            ex = await explain_room(sep, args.args[0], loaded.line_of)
            assert ex.class_rule is not None
            print(f"room {ex.room_id}")
            print(f"  class:    {ex.room_class} (by {ex.class_rule.rule_id}, "
                  f"{where(ex.class_rule)})")
            print(f"  version:  {ex.room_version}, federates: {ex.federate}, "
                  f"encrypted: {ex.encrypted}")
            for m in ex.members:
                r = m.ruling
                print(f"  {m.membership:6} {m.user_id} ({m.kind}): "
                      f"{'ok' if r.allow else 'NOT ALLOWED'} [{r.rule_id}, {where(r)}]")
            for a in ex.actions:
                print("  reconciliation would: " + a)
            for rule_id, message in ex.findings:
                print(f"  finding [{rule_id}]: {message}")
            return EXIT_OK

    return asyncio.run(go())



def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("separation", parents=[common],
                       help="reconcile separation policy: show (--plan) or fix (--apply)")
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", action="store_true", help="print what would change")
    mode.add_argument("--apply", action="store_true", help="remove who must go, report")
    s.add_argument("--room", action="append", metavar="ROOM_ID",
                   help="only these rooms (repeatable); default: every room on the server")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(fn=cmd_separation)

    s = sub.add_parser("explain", parents=[common],
                       help="explain a separation decision: invite @a @b [!room] | "
                            "join @a !room | room !room")
    s.add_argument("what", choices=["invite", "join", "room"])
    s.add_argument("args", nargs="+")
    s.set_defaults(fn=cmd_explain)


"""``enclave separation`` (reconcile the policy) and ``enclave explain`` (one decision)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
from rich.console import Console

from ..policy.separation import RoomFacts
from ..root import Root
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

    def where(path: str) -> str:
        line = loaded.line_of(path) if path.startswith("policy") else None
        return f"{path} ({loaded.path}, line {line})" if line else path

    def show(what: str, d: Any) -> None:
        print(what)
        print(f"  decision: {'ALLOW' if d.allow else 'DENY'}")
        print(f"  rule:     {d.rule_id}")
        print(f"  where:    {where(d.path)}")
        print(f"  reason:   {d.reason}")
        if d.message:
            print(f"  message:  {d.message}")

    async def go() -> int:
        async with Root(loaded, secrets).opened() as root:
            sep = root.separation
            assert sep is not None  # checked above
            p = await sep.policy(fresh=True)
            if args.what == "invite":
                if len(args.args) not in (2, 3):
                    _err("usage: enclave explain invite @inviter @invitee [!room]")
                    return EXIT_USAGE
                inviter, invitee = args.args[:2]
                if len(args.args) == 3:
                    facts = await sep.room_facts(args.args[2])
                else:
                    # no room: a new direct chat, the usual way a contact is invited
                    facts = RoomFacts(room_id="(new direct chat)", is_direct=True,
                                      members={inviter: "join"})
                for who in (inviter, invitee):
                    pr = p.principal(who)
                    print(f"{who}: {pr.kind}" + (
                        f" (groups: {', '.join(sorted(pr.groups))})" if pr.groups else ""))
                show(f"invite {invitee} by {inviter} into {facts.room_id}",
                     p.decide_invite(inviter, invitee, facts))
                return EXIT_OK
            if args.what == "join":
                if len(args.args) != 2:
                    _err("usage: enclave explain join @user !room")
                    return EXIT_USAGE
                user, room = args.args
                facts = await sep.room_facts(room)
                show(f"join {room} as {user} ({p.principal(user).kind})",
                     p.decide_join(user, facts,
                                   invite_approved=await sep.invite_approved(room, user)))
                return EXIT_OK
            if len(args.args) != 1:
                _err("usage: enclave explain room !room")
                return EXIT_USAGE
            facts = await sep.room_facts(args.args[0])
            rc = p.classify_room(facts)
            print(f"room {facts.room_id}")
            print(f"  class:    {rc.id} (by {rc.rule_id}, {where(rc.path)})")
            print(f"  version:  {facts.room_version}, federates: {facts.federate}, "
                  f"encrypted: {facts.encrypted}")
            for u in facts.current():
                d = p.decide_membership(u, facts)
                print(f"  {facts.members[u]:6} {u} ({p.principal(u).kind}): "
                      f"{'ok' if d.allow else 'NOT ALLOWED'} [{d.rule_id}, {where(d.path)}]")
            actions, findings = p.diff_room(facts)
            for a in actions:
                print("  reconciliation would: " + a.describe())
            for f in findings:
                print(f"  finding [{f.rule_id}]: {f.message}")
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


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
import gc
import os
import re
import secrets as pysecrets
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from .clikit import (
    EXIT_CONFIG,
    EXIT_DATABASE,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    _err,
    _fmt_ts,
    _load,
    _print_rows,
    _with_store,
    parse_time,
)
from .config import ConfigError, LoadedConfig
from .config.models import SecretRef
from .store import AuditFilter, DatabaseError, SchemaError, Stores

__all__ = ["EXIT_CONFIG", "EXIT_DATABASE", "EXIT_ERROR", "EXIT_OK", "EXIT_REFUSED",
           "EXIT_USAGE", "build_parser", "main", "parse_time", "registration_dict"]


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
                {"exclusive": True, "regex": f"@{prefix}.*:{server}$"},
                # non-exclusive: every local user's events reach us and we may act as them
                {"exclusive": False, "regex": f"@.*:{server}$"},
            ],
            # non-exclusive: Enclave's bot may give the spaces and rooms it manages
            # aliases (Synapse refuses an appservice an alias outside its namespaces)
            "aliases": [{"exclusive": False, "regex": f"#.*:{server}$"}],
            "rooms": [{"exclusive": False, "regex": "!.*"}],
        },
        # MSC4190: the bots create their E2EE devices as the appservice and act as them
        # with the AS token (they do so wherever the homeserver allows it, flag or not)
        **({"io.element.msc4190": True} if cfg.appservice.msc4190 else {}),
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
    if cfg.gate is not None:
        # the secret the gate module (homeserver.yaml secret_path) and Enclave share
        _token_for(loaded, cfg.gate.secret, "gate.secret", args.rotate)
    reg = registration_dict(loaded, as_token, hs_token)
    out = Path(args.output)
    _write_private(out, (
        "# Enclave appservice registration: add this file to Synapse's\n"
        "# app_service_config_files. It holds tokens: keep it mode 0600.\n"
    ) + yaml.safe_dump(reg, sort_keys=False))
    print(f"wrote registration to {out}")
    if args.homeserver_snippet:
        snippet = Path(args.homeserver_snippet)
        snippet.write_text(homeserver_snippet(loaded))
        print(f"wrote the homeserver.yaml snippet to {snippet}")
    return EXIT_OK


def homeserver_snippet(loaded: LoadedConfig) -> str:
    """Synapse settings separation needs, from the config's policy: the profile limits and,
    with a ``policy:`` section, ``federation_domain_whitelist`` (the company's server plus
    the policy's partner and guest servers) — required for separation without the gate."""
    from .policy.separation import federation_whitelist

    cfg = loaded.config
    body: dict[str, Any] = {
        "limit_profile_requests_to_users_who_share_rooms": True,
        "require_auth_for_profile_requests": True,
        "allow_profile_lookup_over_federation": False,
    }
    head = ("# Generated by `enclave registration --homeserver-snippet` from "
            f"{loaded.path}.\n# Add to Synapse's homeserver.yaml (or a later -c file) and "
            "restart Synapse;\n# regenerate it whenever the policy's partners or guests "
            "change.\n")
    if cfg.policy is not None:
        body["federation_domain_whitelist"] = federation_whitelist(
            cfg.policy, cfg.homeserver.server_name)
        head += ("# federation_domain_whitelist: only this server and the policy's partners\n"
                 "# and guests federate. Without the gate module it is what keeps staff out of\n"
                 "# rooms hosted on other servers (Synapse refuses the join); required for\n"
                 "# separation without the gate. Note it also blocks federation with any\n"
                 "# server not listed (e.g. matrix.org).\n")
    return head + yaml.safe_dump(body, sort_keys=False)


# -- validate / migrate -------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    loaded, secrets = _load(args)
    cfg = loaded.config
    print(f"{args.config}: valid. homeserver {cfg.homeserver.url} ({cfg.homeserver.server_name}),"
          f" appservice '{cfg.appservice.id}' on {cfg.appservice.bind_host}:"
          f"{cfg.appservice.port}, database {cfg.database.url.split('://')[0]}, "
          f"{len(secrets)} secret(s) readable")
    return EXIT_OK


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
        from .app import SERVICES, reload_policy

        # SIGHUP: re-read the policy; a file that fails validation is refused (logged)
        loop.add_signal_handler(signal.SIGHUP, lambda: reload_policy(app[SERVICES]))
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    return EXIT_OK


# -- directory sync ----------------------------------------------------------------------
def cmd_sync(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from .directory.sync import SyncRefused, SyncResult
    from .root import Root

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
            # a deleted person: only what Enclave remembers (person id, Matrix id and so
            # its localpart, which the username mapped to)
            pid = next((p for p, r in result.known.items() if query in (
                p, r.user_id, r.user_id[1:].partition(":")[0])), None)
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


# -- separation ----------------------------------------------------------------------------
def cmd_separation(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .root import Root

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
    from .policy.separation import RoomFacts
    from .root import Root

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


def cmd_reload(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

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
    s.add_argument("--homeserver-snippet", metavar="PATH",
                   help="also write the homeserver.yaml settings separation needs (profile "
                        "limits; federation_domain_whitelist from the policy)")
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

    s = sub.add_parser("reload", parents=[common],
                       help="make the running Enclave re-read its policy (like SIGHUP)")
    s.set_defaults(fn=cmd_reload)
    from .retention.cli import add_retention_parsers

    add_retention_parsers(sub, common)
    # the extensions' own command groups (the bots': announcements, bots)
    from .extension import discover_extensions

    for ext in discover_extensions():
        ext.add_cli(sub, common)
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

"""``enclave policy test`` (policy as code: cases against the config's policy) and
``enclave policy diff`` (what a new policy would change on the homeserver, before a reload).

Both answer with the decisions the live parts use (:mod:`bridge.policy.cases`,
:mod:`bridge.policy.policy_diff`); neither changes anything.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from ..config import ConfigError, LoadedConfig, check_secrets, load_config
from ..config.directory import MappingConfig
from ..config.loader import parse_yaml_model, yaml_lines
from ..config.policy import PolicyConfig
from ..config.policy_cases import PolicyCases
from ..directory.file_source import FileSource
from ..directory.sync import staff_view
from ..model.people import DirectoryError, StaffRecord
from ..policy.cases import ACTIONS, CaseInputError, CaseResult, CaseRunner
from ..policy.mapping import map_people
from ..policy.policy_diff import PolicyDiff, diff_policies, named_users
from ..policy.power import is_enclave_user
from ..policy.retention import RetentionPolicy
from ..root import Root, wall_clock_ms
from .kit import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_USAGE, _err

# `enclave policy test`: 0 every case passed, 1 a case failed, 2 bad input (the case file,
# the config or the directory file)
EXIT_BAD_INPUT = EXIT_USAGE


def _directory(loaded: LoadedConfig, cases_file: Path, name: str,
               now_ms: int) -> list[StaffRecord]:
    """The directory view a directory file would give: people mapped to user ids with the
    config's ``directory.mapping``, as a sync with no accounts yet would map them.
    ``name``: a file relative to the case file, or ``config`` for the config's file source."""
    cfg = loaded.config
    if name == "config":
        src = cfg.directory.source if cfg.directory is not None else None
        if src is None or src.type != "file":
            raise ConfigError(f"in {cases_file}", [
                "at directory: 'config' needs a directory source of type file in the "
                f"configuration {loaded.path}"], what="case file")
        source = FileSource(loaded.resolve(src.path), format=src.format)
    else:
        source = FileSource(cases_file.resolve().parent / name)
    snapshot = source.read_sync()
    mapping = cfg.directory.mapping if cfg.directory is not None else MappingConfig()
    server = cfg.homeserver.server_name

    def reserved(localpart: str) -> bool:  # Enclave's own users, as the sync reserves them
        return is_enclave_user(f"@{localpart}:{server}", server_name=server,
                               own_users=(cfg.bot_user_id, cfg.admin_user_id),
                               namespace_prefix=cfg.appservice.namespace_prefix)

    result = map_people(snapshot.people.values(), mapping, server, known={},
                        reserved=reserved, reserved_names={cfg.appservice.bot_localpart,
                                                           cfg.appservice.admin_localpart})
    return staff_view(snapshot, dict(result.users), {}, now_ms)


def _where(loaded: LoadedConfig, path: str) -> str:
    line = loaded.line_of(path) if path.startswith("policy") else None
    return f"{path} ({loaded.path}, line {line})" if line else path


def run_policy_test(config_path: str, cases_path: str, *, now_ms: int | None = None,
                    all_lines: bool = False) -> tuple[LoadedConfig, list[CaseResult]]:
    """Load the config and the case file (strictly) and run every case; raises
    :class:`ConfigError` (config, case file), :class:`DirectoryError` or
    :class:`CaseInputError` for bad input. Each failed case (every case with
    ``all_lines``) carries its line in the case file."""
    loaded = load_config(config_path)
    cfg = loaded.config
    if cfg.policy is None:
        raise ConfigError(f"in {loaded.path}", ["the configuration has no policy: section"])
    p = Path(cases_path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"in {p}", [f"cannot read the file: {e}"], what="case file") from None
    # the lines of a big file cost more than running it: read only when a case fails
    cases, _ = parse_yaml_model(PolicyCases, text, source=str(p), what="keys",
                                file_kind="case file", with_lines=False)
    now = now_ms if now_ms is not None else wall_clock_ms()
    directory = _directory(loaded, p, cases.directory, now) if cases.directory else []
    runner = CaseRunner(cfg.policy, server_name=cfg.homeserver.server_name,
                        service_users=[cfg.bot_user_id, cfg.admin_user_id],
                        service_prefix=cfg.appservice.namespace_prefix,
                        directory=directory, people=cases.people, now_ms=now)
    results = runner.run(cases)
    if all_lines or not all(r.passed for r in results):
        case_lines = {k[1]: v for k, v in yaml_lines(text).items()
                      if len(k) == 2 and k[0] == "cases"}
        results = [replace(r, line=case_lines.get(r.index)) for r in results]
    return loaded, results


def _failure_text(loaded: LoadedConfig, cases_path: str, r: CaseResult) -> str:
    at = f" ({cases_path}, line {r.line})" if r.line else ""
    out = [f"FAIL case {r.index}: {r.name}{at}", f"  {r.summary}"]
    width = max(len(m.field) for m in r.mismatches)
    for m in r.mismatches:
        out.append(f"  {m.field:<{width}}  expected {m.expected}")
        out.append(f"  {'':<{width}}  got      {m.got}")
    g = r.got
    out.append(f"  decided by {g.rule_id} at {_where(loaded, g.path)}: {g.reason}")
    if g.message:
        out.append(f"  message: {g.message}")
    return "\n".join(out)


def cmd_policy_test(args: argparse.Namespace) -> int:
    try:
        loaded, results = run_policy_test(args.config, args.cases, all_lines=args.verbose)
    except ConfigError as e:
        _err(str(e))
        return EXIT_BAD_INPUT
    except DirectoryError as e:
        _err(f"enclave policy test: {e}")
        return EXIT_BAD_INPUT
    except CaseInputError as e:
        _err("enclave policy test: case facts policy cannot be asked about:\n" +
             "\n".join(f"  - {p}" for p in e.problems))
        return EXIT_BAD_INPUT
    failed = [r for r in results if not r.passed]
    if args.format == "json":
        sys.stdout.write(orjson.dumps({
            "config": str(loaded.path), "cases_file": args.cases, "cases": len(results),
            "passed": len(results) - len(failed), "failed": len(failed),
            "results": [{"index": r.index, "name": r.name, "line": r.line,
                         "passed": r.passed, "summary": r.summary, "got": r.got.to_dict(),
                         "mismatches": [vars(m) for m in r.mismatches]}
                        for r in results if args.verbose or not r.passed],
        }).decode() + "\n")
    else:
        for r in results:
            if not r.passed:
                print(_failure_text(loaded, args.cases, r))
            elif args.verbose:
                print(f"ok   case {r.index}: {r.name} ({r.got.decision or r.got.room_class} "
                      f"by {r.got.rule_id})")
        print(f"{len(results)} cases: {len(results) - len(failed)} passed, "
              f"{len(failed)} failed ({args.cases} against the policy of {loaded.path})")
    return EXIT_ERROR if failed else EXIT_OK


# -- diff ------------------------------------------------------------------------------------
def _room(name: str | None, room_id: str) -> str:
    return f"{room_id} ({name})" if name else room_id


def print_diff(d: PolicyDiff, old: str, new: str, calls: int) -> None:
    print(f"policy diff {old} -> {new}: {d.rooms} rooms read ({calls} admin API calls); "
          "nothing was changed")
    if not d.changed:
        print("no change for current rooms, direct chats and people")
        return
    sections: list[tuple[str, list[str]]] = [
        ("rooms that change class", [
            f"{_room(c.room_name, c.room_id)}: {c.old_class} ({c.old_rule}) -> "
            f"{c.new_class} ({c.new_rule})" for c in d.class_changes]),
        ("would be removed", [
            f"{r.user} from {_room(r.room_name, r.room_id)} [{r.room_class}] by {r.rule_id}: "
            f"{r.reason}" for r in d.removed]),
        ("no longer removed", [
            f"{r.user} in {_room(r.room_name, r.room_id)} [{r.room_class}] (was {r.rule_id})"
            for r in d.kept]),
        ("new findings (rooms newly in breach, not fixed automatically)", [
            f"[{f.rule_id}] {f.room_id} {f.subject}: {f.message}" for f in d.new_findings]),
        ("findings that go away", [
            f"[{f.rule_id}] {f.room_id} {f.subject}" for f in d.resolved_findings]),
        ("retention periods that change", [
            f"{_room(c.room_name, c.room_id)}: {c.old} -> {c.new}"
            for c in d.retention_changes]),
        ("people whose standing changes", [
            f"{c.user}: {c.old} -> {c.new}" for c in d.standing_changes]),
    ]
    for title, rows in sections:
        if rows:
            print(f"{title}:")
            for row in rows:
                print(f"  {row}")


def _policy_of(loaded: LoadedConfig) -> PolicyConfig:
    # no policy section: nothing is enforced (as if disabled)
    return loaded.config.policy or PolicyConfig(enabled=False)


def cmd_policy_diff(args: argparse.Namespace) -> int:
    try:
        old = load_config(args.old)
        new = load_config(args.new)
    except ConfigError as e:
        _err(str(e))
        return EXIT_CONFIG
    if old.config.homeserver.server_name != new.config.homeserver.server_name:
        _err("enclave policy diff: the two configs are for different homeservers "
             f"({old.config.homeserver.server_name} and {new.config.homeserver.server_name})")
        return EXIT_USAGE
    # the running config reads the homeserver; the new one only brings its policy
    base = old if old.config.policy is not None else new
    if base.config.policy is None:
        _err("enclave policy diff: neither configuration has a policy: section")
        return EXIT_CONFIG
    secrets = check_secrets(base)

    async def go() -> int:
        async with Root(base, secrets).opened() as root:
            sep = root.separation
            assert sep is not None  # checked above
            try:
                rooms, calls = await sep.scan(rooms=args.room or None)
            except Exception as e:  # the homeserver's answer, named for the operator
                _err(f"enclave policy diff: cannot read the rooms: {e}")
                return EXIT_ERROR
            staff = await root.stores.directory.directory_view()
            now = root.clock_ms()
            p_old = sep.build(_policy_of(old), staff, now)
            p_new = sep.build(_policy_of(new), staff, now)
            # an upgraded room without a record keeps its predecessor's class under either
            # policy (what the live service records), not the one the rules would give it
            rooms = [replace(f, class_state=cls) if (cls := await sep.inherited_class(f))
                     else f for f in rooms]
        r_old, r_new = old.config.retention, new.config.retention
        d = diff_policies(
            p_old, p_new, rooms,
            old_retention=RetentionPolicy(r_old) if r_old is not None else None,
            new_retention=RetentionPolicy(r_new) if r_new is not None else None,
            users=[*named_users(p_old), *named_users(p_new)])
        if args.format == "json":
            sys.stdout.write(orjson.dumps({"old": str(old.path), "new": str(new.path),
                                           "admin_calls": calls, **d.to_dict()}).decode()
                             + "\n")
        else:
            print_diff(d, str(old.path), str(new.path), calls)
        return EXIT_ERROR if (args.exit_code and d.changed) else EXIT_OK

    return asyncio.run(go())


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("policy", help="policy as code: test cases, diff before a reload")
    psub = s.add_subparsers(dest="policy_cmd", required=True)
    t = psub.add_parser(
        "test", parents=[common],
        help="run policy test cases against the config's policy (exit 1 on a failure)",
        description="Run the cases of CASES.yaml against the policy of the config. Actions: "
                    + "; ".join(f"{k}: {v}" for k, v in ACTIONS.items()))
    t.add_argument("cases", metavar="CASES.yaml")
    t.add_argument("--format", choices=["text", "json"], default="text")
    t.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    t.set_defaults(fn=cmd_policy_test)
    d = psub.add_parser(
        "diff", help="what a new config's policy would change for current rooms, direct "
                     "chats and people (read from the homeserver; nothing is changed)")
    d.add_argument("old", metavar="OLD.yaml", help="the running config (its homeserver, "
                                                   "store and policy)")
    d.add_argument("new", metavar="NEW.yaml", help="the config to compare (its policy)")
    d.add_argument("--room", action="append", metavar="ROOM_ID",
                   help="only these rooms (repeatable); default: every room on the server")
    d.add_argument("--format", choices=["text", "json"], default="text")
    d.add_argument("--exit-code", action="store_true",
                   help="exit 1 when anything would change (for CI)")
    d.set_defaults(fn=cmd_policy_diff)

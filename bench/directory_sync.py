"""Directory sync benchmark: real slapd -> Enclave -> real Synapse on PostgreSQL.

    .venv/bin/python bench/directory_sync.py [--people 10000] [--departments 20]
                                             [--rooms {none,departments,spaces}] [--concurrency 16]
                                             [--quick] [--json]

Everything is fresh per run: a private slapd loaded with ``generate_directory_ldif`` (N
people, D departments), a Synapse on a fresh PostgreSQL database on 127.0.0.1:5432 (dropped at
the end) that knows Enclave's registration, and Enclave's store on SQLite in a temp dir. The
sync is Enclave's own :class:`DirectorySync` (built by the CLI's composition root), in this process.

Three runs, each timed end to end (read LDAP, read the homeserver, diff, apply):

  (a) first provisioning of every person (and, with ``--rooms departments``, one managed room
      per department, department heads at power 50 through ``managers: true``);
  (b) a no-change resync: must write nothing;
  (c) 1% of people changed in LDAP (half display names, a quarter department moves, a
      quarter disabled), then a sync.

Admin writes are counted for real: the sync's MatrixClient.request is wrapped, and every
request that is not a GET (and not the admin's session ``/login`` and ``/logout``, which
change no account, room or profile) counts. Homeserver events are
``SELECT count(*) FROM events`` on Synapse's database before and after each run, once the
count stopped moving (deactivation parts rooms in the background). Prints figures and the
targets, met or not; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))

from _common import git_rev, pg_admin  # noqa: E402  (bench/ is on sys.path)

from bridge.config import check_secrets, load_config  # noqa: E402
from bridge.directory import sync as sync_mod  # noqa: E402
from bridge.directory.sync import DirectorySync, SyncResult  # noqa: E402
from bridge.root import Root  # noqa: E402
from devstack.slapd import (  # noqa: E402
    SlapdServer,
    generate_directory_ldif,
    person_dn,
)
from devstack.synapse import SynapseServer, free_port  # noqa: E402

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
SERVER_NAME = "corp.test"
SUFFIX = "dc=corp,dc=test"
OLD_TIMESTAMP = "20240101000000Z"
BOT_LOCALPART = "enclave"
ADMIN_LOCALPART = "enclave-admin"
LDAP_ROOTPW = "bench-bind-pw-1234"

TARGET_USERS_PER_S = 50.0
TARGET_RESYNC_S = 10.0


# -- small helpers ----------------------------------------------------------------------------

def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_backend_cpu(dbname: str) -> float:
    """CPU seconds of the PostgreSQL backends serving ``dbname`` (Synapse's pool)."""
    total = 0.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("postgres:") and f" {dbname} " in cmd:
            total += cpu_seconds(int(d))
    return total




_ID_SEGMENT = re.compile(r"/(%40|%21|%23|@|!|#)[^/]*")
_EMAIL_SEGMENT = re.compile(r"(/threepid/email/users)/[^/]*")


def endpoint(method: str, path: str) -> str:
    """``PUT /_synapse/admin/v2/users/{id}``: ids folded so requests group by endpoint."""
    path = _EMAIL_SEGMENT.sub(r"\1/{address}", path)
    return f"{method} {_ID_SEGMENT.sub('/{id}', path)}"


class RequestMeter:
    """Wraps ``client.request``: counts admin writes and times requests by endpoint."""

    def __init__(self, client: Any):
        self.writes = 0
        self.by_endpoint: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        inner = client.request

        async def request(method: str, path: str, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await inner(method, path, **kw)
            finally:
                e = self.by_endpoint[endpoint(method, path)]
                e[0] += 1
                e[1] += time.perf_counter() - t0
                if method != "GET" and not path.endswith(("/login", "/logout")):
                    self.writes += 1

        client.request = request

    def reset(self) -> None:
        self.writes = 0
        self.by_endpoint.clear()

    def table(self) -> list[dict[str, Any]]:
        rows = [{"endpoint": k, "count": int(v[0]), "total_s": v[1],
                 "mean_ms": v[1] / v[0] * 1000 if v[0] else 0.0}
                for k, v in self.by_endpoint.items()]
        return sorted(rows, key=lambda r: -r["total_s"])


def install_phase_timers(sync: DirectorySync, phases: dict[str, float]) -> None:
    """Time the parts of ``DirectorySync.plan`` (read LDAP, store, read homeserver, map,
    diff) by wrapping what it calls; ``phases`` accumulates seconds."""

    def timed(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    def timed_sync(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    sync.source.read = timed("read_ldap", sync.source.read)  # type: ignore[method-assign]
    sync.directory_store.directory_people = timed(  # type: ignore[method-assign]
        "read_store", sync.directory_store.directory_people)
    sync.read_homeserver = timed("read_homeserver", sync.read_homeserver)  # type: ignore
    sync_mod.map_people = timed_sync("map", _ORIG_MAP)  # type: ignore[assignment]
    sync_mod.diff_directory = timed_sync("diff", _ORIG_DIFF)  # type: ignore[assignment]
    sync.directory_store.save_directory_people = timed(  # type: ignore[method-assign]
        "save_records", sync.directory_store.save_directory_people)


_ORIG_MAP = sync_mod.map_people
_ORIG_DIFF = sync_mod.diff_directory


# -- the stack --------------------------------------------------------------------------------

class BenchStack:
    """slapd + Synapse (PostgreSQL) + an Enclave config with a ``directory:`` section."""

    def __init__(self, root: Path, args: argparse.Namespace):
        self.root = root
        self.args = args
        self.secrets = root / "secrets"
        self.secrets.mkdir()
        self.dbname = f"synapse_bench_{uuid.uuid4().hex[:10]}"
        self.dsn = f"postgresql://postgres@127.0.0.1:5432/{self.dbname}"
        self.slapd = SlapdServer(root / "slapd", suffix=SUFFIX, rootpw=LDAP_ROOTPW)
        self.synapse = SynapseServer(base_dir=root / "synapse", server_name=SERVER_NAME,
                                     database=self.dsn)
        self.config = root / "enclave" / "config.yaml"
        self.registration = root / "enclave-registration.yaml"
        self._pg: Any = None

    # slapd
    def start_slapd(self) -> float:
        t0 = time.perf_counter()
        self.slapd.load_ldif(generate_directory_ldif(
            self.args.people, suffix=SUFFIX, n_departments=self.args.departments,
            timestamp=OLD_TIMESTAMP))
        self.slapd.start()
        return time.perf_counter() - t0

    # Enclave config (written before the registration: one file for both)
    def directory_section(self) -> dict[str, Any]:
        pw = self.secrets / "ldap_password"
        pw.write_text(self.slapd.rootpw + "\n")
        rooms: list[dict[str, Any]] = []
        if self.args.rooms == "departments":
            rooms.append({"id": "dept", "for_each": "department", "name": "{value}",
                          "alias": "dept-{slug}", "power": [{"managers": True, "level": 50}]})
        elif self.args.rooms == "spaces":
            # a space per department with its general room inside (the room joins through
            # the space: no invite)
            rooms.append({"id": "dept-space", "kind": "space", "for_each": "department",
                          "name": "{value}", "alias": "space-{slug}"})
            rooms.append({"id": "dept", "for_each": "department", "parent": "dept-space",
                          "name": "{value} general", "alias": "dept-{slug}",
                          "power": [{"managers": True, "level": 50}]})
        n = self.args.people
        return {
            "source": {
                "type": "ldap", "dialect": "openldap", "url": self.slapd.url,
                "bind_dn": self.slapd.rootdn, "bind_password": {"file": str(pw)},
                "users": {"base_dn": f"ou=people,{SUFFIX}",
                          "filter": "(objectClass=inetOrgPerson)"},
                "groups": {"base_dn": f"ou=groups,{SUFFIX}",
                           "filter": "(objectClass=groupOfNames)"},
                "attributes": {"display_name": "displayName",
                               "disabled": "pwdAccountLockedTime"},
                "timeout_seconds": 60,
            },
            "interval_minutes": 0,
            "mapping": {"localpart_template": "{username}"},
            # the 1% change disables 0.25% of people; leave room so the run is not refused
            "safety": {"max_deactivations": max(25, n // 50), "max_deactivation_percent": 5},
            "max_concurrency": self.args.concurrency,
            "managed_rooms": rooms,
        }

    def write_config(self) -> None:
        as_port = free_port()
        cfg = {
            "homeserver": {
                "url": "http://127.0.0.1:1",  # rewritten once Synapse has its port
                "server_name": SERVER_NAME, "timeout_seconds": 60, "max_retries": 3,
                "registration_shared_secret": {
                    "file": str(self.secrets / "registration_shared_secret")},
            },
            "appservice": {
                "id": "enclave", "bind_host": "127.0.0.1", "port": as_port,
                "public_url": f"http://127.0.0.1:{as_port}",
                "as_token": {"file": str(self.secrets / "as_token")},
                "hs_token": {"file": str(self.secrets / "hs_token")},
                "bot_localpart": BOT_LOCALPART,
            },
            "database": {"url": "sqlite:///enclave.db"},
            "inbox": {"recovery_sweeps_seconds": []},
            "logging": {"level": "WARNING", "format": "text"},
            "directory": self.directory_section(),
        }
        (self.secrets / "registration_shared_secret").write_text(
            self.synapse.registration_shared_secret + "\n")
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def set_homeserver_url(self) -> None:
        cfg = yaml.safe_load(self.config.read_text())
        cfg["homeserver"]["url"] = self.synapse.base_url
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    async def start_synapse(self) -> float:
        t0 = time.perf_counter()
        await pg_admin(f"CREATE DATABASE \"{self.dbname}\" ENCODING 'UTF8' "
                       "LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0")
        self.write_config()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("ENCLAVE_CONFIG", None)
        res = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", "registration", "-c", str(self.config),
             "-o", str(self.registration)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"enclave registration failed:\n{res.stderr}")
        self.synapse.app_service_config_files = [self.registration]
        await asyncio.to_thread(self.synapse.start, 120)
        self.set_homeserver_url()
        # what Enclave's start-up does: its admin identity (a server admin) and its bot
        await asyncio.to_thread(self.synapse.register_user, ADMIN_LOCALPART,
                                "not-used-" + uuid.uuid4().hex, True)
        as_token = (self.secrets / "as_token").read_text().strip()
        with contextlib.suppress(RuntimeError):  # M_USER_IN_USE: fine
            await asyncio.to_thread(
                self.synapse.request, "POST", "/_matrix/client/v3/register",
                {"type": "m.login.application_service", "username": BOT_LOCALPART,
                 "inhibit_login": True}, as_token)
        # Enclave's store, migrated (the CLI's path)
        loaded = load_config(self.config)
        store = Root(loaded, check_secrets(loaded)).stores
        await store.database.open()
        await store.database.migrate()
        await store.database.close()
        import asyncpg
        self._pg = await asyncpg.connect(self.dsn)
        return time.perf_counter() - t0

    async def events(self) -> int:
        return int(await self._pg.fetchval("SELECT count(*) FROM events"))

    async def settled_events(self, *, within: float = 300.0) -> tuple[int, float]:
        """(event count once it stopped moving for a second, seconds waited)."""
        t0 = time.perf_counter()
        last = await self.events()
        while time.perf_counter() - t0 < within:
            await asyncio.sleep(1.0)
            now = await self.events()
            if now == last:
                return now, time.perf_counter() - t0
            last = now
        return last, time.perf_counter() - t0

    async def close(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                await self._pg.close()
        await asyncio.to_thread(self.synapse.stop)
        self.slapd.stop()
        with contextlib.suppress(Exception):
            await pg_admin(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')

    def ldap_changes(self, rng: random.Random) -> dict[str, Any]:
        """Change 1% of the people in LDAP (never a department head): half renamed, a
        quarter moved to the next department, a quarter disabled."""
        from ldap3 import MODIFY_REPLACE

        n, n_dep = self.args.people, self.args.departments
        total = max(4, round(n * 0.01))
        names, moves = total // 2, total // 4
        disabled = total - names - moves
        chosen = rng.sample(range(n_dep + 1, n + 1), total)
        conn = self.slapd.connection()
        try:
            for i, p in enumerate(chosen):
                dn = person_dn(p, suffix=SUFFIX)
                if i < names:
                    ch = {"displayName": [(MODIFY_REPLACE, [f"Renamed Person {p}"])]}
                elif i < names + moves:
                    d = (p - 1) % n_dep + 1
                    ch = {"departmentNumber": [(MODIFY_REPLACE,
                                                [f"Department {d % n_dep + 1:02d}"])]}
                else:
                    ch = {"pwdAccountLockedTime": [(MODIFY_REPLACE, ["000001010000Z"])]}
                conn.modify(dn, ch)
        finally:
            conn.unbind()
        # what each change should cost in admin writes: a rename one PUT, a disable one
        # deactivate, a move a kick from the old room and an invite + join in the new one
        # (with spaces: kicks from space and room, invite + join to the space, one join
        # through it to the room)
        expected = {"update_account": names, "deactivate_account": disabled}
        if self.args.rooms == "departments":
            expected.update({"kick": moves, "invite": moves, "join": moves})
        elif self.args.rooms == "spaces":
            expected.update({"kick": 2 * moves, "invite": moves, "join": moves,
                             "join_through_parent": moves})
        return {"people_changed": total, "renamed": names, "moved": moves,
                "disabled": disabled, "expected_actions": expected,
                "expected_writes": sum(expected.values())}


# -- one sync run -----------------------------------------------------------------------------

async def timed_run(stack: BenchStack, label: str) -> dict[str, Any]:
    before, waited_before = await stack.settled_events()
    phases: dict[str, float] = {}
    syn_cpu0 = cpu_seconds(stack.synapse.pid)
    pg_cpu0 = pg_backend_cpu(stack.dbname)
    own_cpu0 = time.process_time()
    async with open_sync(stack.config) as sync:
        meter = RequestMeter(sync.client)
        install_phase_timers(sync, phases)
        t0 = time.perf_counter()
        result: SyncResult = await sync.run(apply=True)
        wall = time.perf_counter() - t0
        ldap_full = getattr(sync.source, "last_read_full", None)
    own_cpu = time.process_time() - own_cpu0
    syn_cpu = cpu_seconds(stack.synapse.pid) - syn_cpu0
    pg_cpu = pg_backend_cpu(stack.dbname) - pg_cpu0
    after_api = await stack.events()
    after, waited = await stack.settled_events()
    plan_s = sum(phases.get(k, 0.0) for k in
                 ("read_ldap", "read_store", "read_homeserver", "map", "diff"))
    failures = [f"{a.describe()}: {why}" for a, why in result.failed]
    return {
        "run": label,
        "wall_s": wall,
        "people": len(result.snapshot.people),
        "ldap_full_read": ldap_full,
        "phases_s": {**phases, "plan_total": plan_s,
                     "apply": max(0.0, wall - plan_s - phases.get("save_records", 0.0))},
        "planned_actions": len(result.plan.actions),
        "planned_by_kind": result.plan.count(),
        "applied_by_kind": dict(result.applied),
        "failed": len(result.failed),
        "failures_sample": failures[:10],
        "findings": len(result.plan.findings),
        "admin_writes": meter.writes,
        "requests": meter.table(),
        "events_before": before,
        "events_at_return": after_api,
        "events_after": after,
        "events_created": after - before,
        "events_settle_wait_s": waited,
        "events_settle_wait_before_s": waited_before,
        "cpu_s": {"enclave_process": own_cpu, "synapse": syn_cpu, "postgres_backends": pg_cpu},
    }


@contextlib.asynccontextmanager
async def open_sync(config: Path) -> Any:
    loaded = load_config(config)
    secrets = check_secrets(loaded)
    async with Root(loaded, secrets).opened() as _root:
        sync = _root.directory
        assert sync is not None
        yield sync


# -- report -----------------------------------------------------------------------------------

def fmt_kinds(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


def targets(runs: dict[str, dict[str, Any]], change: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    a, b, c = runs["first"], runs["resync"], runs["change"]
    ups = a["people"] / a["wall_s"]
    out.append({"target": "first provisioning >= 50 users/s (end to end)",
                "value": f"{ups:.1f} users/s", "met": ups >= TARGET_USERS_PER_S and not
                a["failed"]})
    out.append({"target": "no-change resync: 0 admin writes",
                "value": f"{b['admin_writes']} writes, {b['planned_actions']} actions",
                "met": b["admin_writes"] == 0 and b["planned_actions"] == 0})
    out.append({"target": "no-change resync <= 10 s", "value": f"{b['wall_s']:.2f} s",
                "met": b["wall_s"] <= TARGET_RESYNC_S})
    exp = change["expected_writes"]
    out.append({"target": "1% change: admin writes = planned actions = changes",
                "value": f"{c['admin_writes']} writes, {c['planned_actions']} actions, "
                         f"{exp} expected ({change['people_changed']} people changed)",
                "met": c["admin_writes"] == c["planned_actions"] == exp and not c["failed"]
                and c["planned_by_kind"] == change["expected_actions"]})
    return out


def print_report(meta: dict[str, Any], runs: dict[str, dict[str, Any]],
                 change: dict[str, Any], tgts: list[dict[str, Any]]) -> None:
    print()
    print(f"directory sync: {meta['people']} people, {meta['departments']} departments, "
          f"rooms={meta['rooms']}, max_concurrency={meta['concurrency']}; slapd + Synapse "
          f"{meta['synapse_version']} on PostgreSQL; Enclave store SQLite; {meta['cpus']} CPUs")
    hdr = (f"{'run':8} {'wall s':>8} {'users/s':>8} {'actions':>8} {'writes':>7} "
           f"{'failed':>6} {'events':>7} {'LDAP s':>7} {'HS read s':>9} {'map+diff s':>10} "
           f"{'apply s':>8} {'Syn CPU':>8} {'PG CPU':>7} {'own CPU':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in runs.values():
        ph = r["phases_s"]
        ups = r["people"] / r["wall_s"] if r["run"] == "first" else float("nan")
        ups_s = f"{ups:8.1f}" if ups == ups else f"{'':8}"
        print(f"{r['run']:8} {r['wall_s']:8.2f} {ups_s} {r['planned_actions']:8d} "
              f"{r['admin_writes']:7d} {r['failed']:6d} {r['events_created']:7d} "
              f"{ph.get('read_ldap', 0):7.2f} {ph.get('read_homeserver', 0):9.2f} "
              f"{ph.get('map', 0) + ph.get('diff', 0):10.3f} {ph['apply']:8.2f} "
              f"{r['cpu_s']['synapse']:8.1f} {r['cpu_s']['postgres_backends']:7.1f} "
              f"{r['cpu_s']['enclave_process']:8.1f}")
    print()
    for r in runs.values():
        print(f"{r['run']:8} actions: {fmt_kinds(r['planned_by_kind'])}")
        if r["failures_sample"]:
            print(f"{'':8} failures (first {len(r['failures_sample'])}):")
            for f in r["failures_sample"]:
                print(f"{'':10}{f}")
    print(f"change   LDAP: {change['renamed']} renamed, {change['moved']} moved, "
          f"{change['disabled']} disabled; expected actions: "
          f"{fmt_kinds(change['expected_actions'])}")
    print()
    print("where the time goes (sum of request latencies; requests overlap up to "
          "max_concurrency):")
    for r in runs.values():
        rows = [x for x in r["requests"] if x["total_s"] >= 0.01 * r["wall_s"]][:6]
        for x in rows:
            print(f"  {r['run']:8} {x['endpoint'][:70]:70} {x['count']:7d} × "
                  f"{x['mean_ms']:7.1f} ms = {x['total_s']:8.1f} s")
    print()
    print("targets:")
    for t in tgts:
        print(f"  {'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['value']}")




async def amain(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = Path(tempfile.mkdtemp(prefix="enclave-dirsync-bench-"))
    stack = BenchStack(root, args)
    runs: dict[str, dict[str, Any]] = {}
    try:
        ldap_s = await asyncio.to_thread(stack.start_slapd)
        hs_s = await stack.start_synapse()
        version = await asyncio.to_thread(
            stack.synapse.request, "GET", "/_synapse/admin/v1/server_version")
        print(f"… slapd loaded and started in {ldap_s:.1f}s, Synapse on PostgreSQL up in "
              f"{hs_s:.1f}s; first provisioning of {args.people} people", file=sys.stderr,
              flush=True)
        runs["first"] = await timed_run(stack, "first")
        print(f"… first: {runs['first']['wall_s']:.1f}s; no-change resync", file=sys.stderr,
              flush=True)
        runs["resync"] = await timed_run(stack, "resync")
        change = await asyncio.to_thread(stack.ldap_changes, random.Random(args.seed))
        print(f"… 1% change ({change['people_changed']} people)", file=sys.stderr, flush=True)
        runs["change"] = await timed_run(stack, "change")
    finally:
        if args.keep:
            print(f"kept {root} (Synapse database {stack.dbname} dropped)", file=sys.stderr)
        await stack.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "people": args.people, "departments": args.departments, "rooms": args.rooms,
        "concurrency": args.concurrency, "synapse_version": version.get("server_version"),
        "synapse_database": "postgresql", "enclave_store": "sqlite",
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "git": git_rev(), "loadavg_at_end": os.getloadavg(),
    }
    tgts = targets(runs, change)
    print_report(meta, runs, change, tgts)
    if args.json:
        outdir = BENCH / "results"
        outdir.mkdir(exist_ok=True)
        path = outdir / (f"directory-sync-{dt.date.today().isoformat()}-{args.people}-"
                         f"{args.rooms}.json")
        path.write_text(json.dumps({"meta": meta, "runs": runs, "change": change,
                                    "targets": tgts}, indent=2))
        print(f"results written to {path.relative_to(REPO)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--people", type=int, default=10_000)
    p.add_argument("--departments", type=int, default=20)
    p.add_argument("--rooms", choices=["none", "departments", "spaces"], default="departments",
                   help="departments: one managed room per department (heads at power 50); "
                        "spaces: a space per department with that room inside it (the room "
                        "joins through the space); none: accounts only")
    p.add_argument("--concurrency", type=int, default=16, help="directory.max_concurrency")
    p.add_argument("--quick", action="store_true", help="1,000 people")
    p.add_argument("--seed", type=int, default=20_240_601)
    p.add_argument("--json", action="store_true",
                   help="also write bench/results/directory-sync-<date>-<people>-<rooms>.json")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args()
    if args.quick:
        args.people = 1000
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

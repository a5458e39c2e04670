"""Retention benchmark: archive + purge of one large room on a PostgreSQL-backed Synapse.

    .venv/bin/python bench/retention_purge.py [--events 100000] [--fill-concurrency 8]
        [--fill-users 4] [--window-events 5000] [--pause 0.5] [--poll 0.1] [--rate 10]
        [--baseline 600] [--settle 15] [--quick] [--no-json] [--keep]

Issue: "Archive + purge of a room with 100,000 events on a PostgreSQL-backed Synapse:
events/s archived and purged, the longest single homeserver lock (the slowest purge step),
and the p99 latency of a client sending messages to another room during the purge compared
with the same client without a purge running (target: <= 1.2x)." Prints figures and the
target; asserts nothing. Results go to ``bench/results/retention_purge.json``.

Set-up (not measured but the fill rate is reported): one Synapse on a fresh PostgreSQL
database with Enclave's appservice registration (no URL: Synapse pushes nothing) and the
devstack's test rate limits (every limiter opened wide, so the probe user below may send
10 messages/s). Enclave's admin identity is made a homeserver admin, as Enclave's start-up
does. One room is filled with ``--events`` ``m.room.message`` events through the client
API: ``--fill-concurrency`` requests in flight, as ``--fill-users`` namespace users
(appservice token with ``?user_id=``; the registration is not rate limited). Nothing is
written into Synapse's database directly. Concurrent sends into one room fork its DAG (each
in-flight event takes the same prev_events) and a new event refers to at most 10 forward
extremities: with 8 in flight they stay at ~5-10 and the rate steady (~90 events/s here);
with 32 in flight the room had 6,440 extremities after 10,000 events and the rate had
fallen to ~33/s. One room's sends are bounded by Synapse's per-room persistence, so more
senders or rooms do not help; the fill of 100,000 takes ~18 minutes on 2 cores. ``ANALYZE``
every 10,000 events and after the fill (as autovacuum would have by then on a server in
use), then ``--settle`` seconds of quiet.

Enclave does NOT run as a process: its :class:`~bridge.retention.service.RetentionService`
is built in this process the way ``enclave retention --apply`` builds it
(``bridge.root.Root``), with an SQLite store and the archive in the bench's temp dir,
and a ``retention:`` section of ``default: {keep: 1s}``, no visibility (no state, no
notice), no media copies, ``purge.window_events`` ``--window-events``, ``pause_seconds``
``--pause``, ``poll_seconds`` ``--poll``. Since no appservice transactions reach it, the
live archive path is not exercised: the run's backfill (admin ``/messages``, pages of 1000)
archives every event of the room, then the purge runs in windowed steps
(``purge_history`` up to the first kept event, polled until complete). One
``svc.run(apply=True, rooms=[room])``; its backfill and its purge steps are timed from
inside (the methods are wrapped, not changed).

The probe: a separate process (this script with ``--probe``), a normal user with its own
access token in a room of its own, sending ``--rate`` messages/s open loop (one request
every 1/rate s whether or not earlier ones finished, so a stall shows up as queueing, not
as fewer samples). Per-send latency is the client ``PUT /send`` round trip. Phases are
time windows over the one probe run: ``baseline`` (``--baseline`` sends with nothing else
running), ``archive`` (the run's backfill), ``purge`` (first purge step to the run's end,
pauses included), ``purge steps`` (only sends started while a step was in progress), and
``after`` (a second baseline once the run is over, to show drift on a shared machine).
Target: p99(purge) <= 1.2 x p99(baseline).

The slowest step is Enclave's view (purge request to the status poll that saw it
complete, so up to ``--poll`` late); Synapse's own log gives each purge's run from
``starting purge_id`` to ``complete`` (the room's purge lock is held for most of it) and
the main delete transaction (``looking for events to delete`` to ``done``).

Afterwards: the room's messages left on the homeserver (admin ``/messages``; the newest
event survives, Synapse keeps a room's last event), the archive's count of the room's
messages, and ``archive.verify()``.
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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _common import git_rev, pg_admin  # noqa: E402  (bench/ is on sys.path)
from separation import (  # noqa: E402  (the PG-backed Synapse + Enclave set-up helpers)
    Background,
    CpuMeter,
    RequestMeter,
    _json_safe,
    as_token,
    bounded,
    enclave_config,
    fmt,
    progress,
    q,
    start_synapse_for,
    subprocess_env,
    summary,
)

from bridge.matrix.client import MatrixClient  # noqa: E402
from bridge.retention.purge import PurgeStep  # noqa: E402
from bridge.root import Root  # noqa: E402
from devstack.synapse import SynapseServer  # noqa: E402

RESULTS = REPO / "bench" / "results" / "retention_purge.json"
TARGET_RATIO = 1.2
PROBE_TOKEN_ENV = "ENCLAVE_BENCH_PROBE_TOKEN"
_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_LOG_FOUND = re.compile(r"\[purge\] found (\d+) events before cutoff, of which (\d+) can be")


# -- the probe: another room's client, in its own process ----------------------------------------
async def probe_main(url: str, room: str, rate: float) -> dict[str, Any]:
    """Send ``rate`` messages/s to ``room`` until SIGTERM; return (start, latency ms) of
    each successful send, and the error count."""
    async with aiohttp.ClientSession(json_serialize=None) as session:
        # the user's own access token; no retries, so a failure is counted, not hidden
        client = MatrixClient(session, url, os.environ[PROBE_TOKEN_ENV], max_retries=0,
                              timeout=60)
        bg = Background(client, [(room, [None])], rate)  # type: ignore[list-item]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print("READY", flush=True)
        await bg.run(stop)
    starts = [end - ms / 1000 for end, ms in zip(bg.done, bg.latency_ms, strict=True)]
    return {"samples": list(zip(starts, bg.latency_ms, strict=True)), "errors": bg.errors,
            "dropped": bg.dropped}


class Probe:
    def __init__(self, url: str, token: str, room: str, rate: float, out: Path):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--probe", url, room, str(out), "--rate", str(rate)],
            cwd=REPO, env={**os.environ, PROBE_TOKEN_ENV: token}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=(out.parent / "probe.log").open("wb"))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if b"READY" not in line:
            raise RuntimeError("the probe did not start: "
                               + (out.parent / "probe.log").read_text(errors="replace"))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc.poll() is None else None

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        return json.loads(self.out.read_text())


def window(samples: Sequence[tuple[float, float]], spans: Sequence[tuple[float, float]]
           ) -> list[float]:
    """Latencies of the sends started inside any of ``spans`` (monotonic seconds)."""
    return [ms for t, ms in samples if any(a <= t < b for a, b in spans)]


# -- Synapse's own account of the purges -----------------------------------------------------------
def synapse_purges(log_path: Path) -> dict[str, Any]:
    """Seconds of each purge from Synapse's log: the whole run (``starting purge_id`` ->
    ``complete``) and its main delete transaction (``looking for events`` -> ``done``);
    events it found before each cutoff and deleted (state events are kept as outliers)."""
    marks: dict[str, list[float]] = defaultdict(list)
    found = deleted = 0
    with log_path.open(errors="replace") as f:
        for line in f:
            if "[purge]" not in line:
                continue
            if (c := _LOG_FOUND.search(line)) is not None:
                found, deleted = found + int(c.group(1)), deleted + int(c.group(2))
            m = _LOG_TS.match(line)
            if m is None:
                continue
            t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for key, needle in (("start", "[purge] starting purge_id"),
                                ("complete", "[purge] complete"),
                                ("txn_start", "[purge] looking for events to delete"),
                                ("txn_done", "[purge] done")):
                if needle in line:
                    marks[key].append(t)
    return {"found": found, "deleted": deleted,
            "run_s": [b - a for a, b in zip(marks["start"], marks["complete"], strict=False)],
            "delete_txn_s": [b - a for a, b in zip(marks["txn_start"], marks["txn_done"],
                                                  strict=False)]}


def fold_purge_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """RequestMeter's table with the purge ids of the status polls folded into one row."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = re.sub(r"/purge_history_status/[^/]+$", "/purge_history_status/{id}",
                     row["endpoint"])
        o = out.setdefault(key, {"endpoint": key, "count": 0, "total_s": 0.0})
        o["count"] += row["count"]
        o["total_s"] += row["total_s"]
    for o in out.values():
        o["mean_ms"] = o["total_s"] / o["count"] * 1000 if o["count"] else 0.0
    return sorted(out.values(), key=lambda o: -o["total_s"])


# -- set-up ---------------------------------------------------------------------------------------
def enclave_migrate(config: Path) -> None:
    """``enclave migrate`` (the operator's command) creates Enclave's store."""
    res = subprocess.run([sys.executable, "-m", "bridge", "migrate", "-c", str(config)],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"enclave migrate failed:\n{res.stderr}")


def write_config(root: Path, synapse: SynapseServer, args: argparse.Namespace) -> Path:
    """Enclave's config as separation.py writes it, without directory and policy, with a
    ``retention:`` section."""
    config, _ = enclave_config(root, server_name=synapse.server_name,
                               shared_secret=synapse.registration_shared_secret,
                               directory=root / "none.yaml", policy={})
    cfg = yaml.safe_load(config.read_text())
    cfg.pop("directory")
    cfg.pop("policy")
    cfg["retention"] = {
        "enabled": True,
        "default": {"keep": "1s"},
        "archive": {"path": str(root / "archive"), "media": False},
        "purge": {"interval_minutes": 0, "window_events": args.window_events,
                  "poll_seconds": args.poll, "step_timeout_seconds": 900,
                  "pause_seconds": args.pause},
        "visibility": {"set_state": False, "notice": "none"},
    }
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


async def fill(client: MatrixClient, room: str, senders: list[str], n: int,
               concurrency: int, analyze: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """``n`` messages into ``room``, ``concurrency`` in flight, round-robin over senders;
    ``analyze`` every 10,000 (a fresh database grows faster than autovacuum analyzes it)."""
    run = uuid.uuid4().hex[:8]
    nxt = 0
    t0 = time.monotonic()
    latency: list[float] = []

    async def worker() -> None:
        nonlocal nxt
        while nxt < n:
            i = nxt
            nxt += 1
            t = time.monotonic()
            await client.send_event(room, "m.room.message",
                                    {"msgtype": "m.text", "body": f"history message {i}"},
                                    f"fill-{run}-{i}", user_id=senders[i % len(senders)])
            latency.append((time.monotonic() - t) * 1000)
            if len(latency) % 10000 == 0:
                el = time.monotonic() - t0
                progress(f"  filled {len(latency)}/{n} ({len(latency) / el:.0f} events/s)")
                await analyze()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.monotonic() - t0
    return {"events": n, "seconds": seconds, "events_per_s": n / seconds,
            "concurrency": concurrency, "senders": len(senders),
            "send_latency_ms": summary(latency)}


async def room_left(client: MatrixClient, room: str, admin: str) -> dict[str, int]:
    """Events of the room the homeserver still serves (admin /messages), by type."""
    by_type: dict[str, int] = defaultdict(int)
    token: str | None = None
    while True:
        chunk, token = await client.admin_room_messages(room, admin=admin, from_token=token)
        for e in chunk:
            by_type[str(e.get("type"))] += 1
        if token is None:
            return dict(by_type)


# -- the measurement ------------------------------------------------------------------------------
async def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    dbname = f"synapse_ret_{uuid.uuid4().hex[:10]}"
    dsn = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    await pg_admin(f"CREATE DATABASE \"{dbname}\" ENCODING 'UTF8' LC_COLLATE='C' "
                   "LC_CTYPE='C' TEMPLATE template0")
    synapse = SynapseServer(base_dir=root / "synapse", server_name="corp.test", database=dsn)
    probe: Probe | None = None
    try:
        config = write_config(root, synapse, args)
        loaded, secrets = await start_synapse_for(config, synapse, root)
        await asyncio.to_thread(enclave_migrate, config)
        meter = CpuMeter({"synapse": lambda: synapse.pid,
                          "probe": lambda: probe.pid if probe else None}, dbname)
        prefix = loaded.config.appservice.namespace_prefix
        async with aiohttp.ClientSession(json_serialize=None) as session:
            setup = MatrixClient(session, synapse.base_url, as_token(config), max_retries=8,
                                 timeout=120)
            senders = [f"{prefix}history{k}" for k in range(args.fill_users)]
            await bounded(4, senders, setup.register_appservice_user)
            senders = [f"@{s}:{synapse.server_name}" for s in senders]
            room = await setup.create_room({"preset": "private_chat", "name": "big history",
                                            "invite": senders[1:]}, user_id=senders[0])
            await bounded(4, senders[1:], lambda u: setup.join(room, user_id=u))
            progress(f"Synapse on PostgreSQL up; filling {room} with {args.events} messages "
                     f"({args.fill_concurrency} in flight, {len(senders)} users)")
            c0 = meter.snapshot()
            filled = await fill(setup, room, senders, args.events, args.fill_concurrency,
                                lambda: pg_admin("ANALYZE", dsn))
            filled["cpu"] = CpuMeter.diff(c0, meter.snapshot())
            progress(f"filled in {filled['seconds']:.0f}s ({filled['events_per_s']:.0f} "
                     "events/s); ANALYZE, settle")
            await pg_admin("ANALYZE", dsn)
            probe_user, probe_token = await asyncio.to_thread(
                synapse.register_user, "probe", "not-used-" + uuid.uuid4().hex)
            probe_room = (await setup.request(
                "POST", "/_matrix/client/v3/createRoom", access_token=probe_token,
                json={"preset": "private_chat", "name": "elsewhere"}))["room_id"]
            version = (await setup.request("GET", "/_synapse/admin/v1/server_version",
                                           user_id=loaded.config.admin_user_id)
                       )["server_version"]
        await asyncio.sleep(args.settle)

        probe = await asyncio.to_thread(Probe, synapse.base_url, probe_token, probe_room,
                                        args.rate, root / "probe.json")
        await asyncio.sleep(2.0)  # the probe's first connection set up
        spans: dict[str, list[tuple[float, float]]] = {}
        cpu: dict[str, dict[str, float]] = {}

        async def quiet(label: str) -> None:
            c = meter.snapshot()
            t = time.monotonic()
            progress(f"{label}: {args.baseline} probe sends at {args.rate:g}/s, nothing else")
            await asyncio.sleep(args.baseline / args.rate)
            spans[label] = [(t, time.monotonic())]
            cpu[label] = CpuMeter.diff(c, meter.snapshot())

        await quiet("baseline")
        marks: dict[str, float] = {}
        steps_at: list[tuple[float, float]] = []
        async with Root(loaded, secrets).opened() as _root:
            svc = _root.retention
            assert svc is not None
            requests = RequestMeter(svc.client)
            inner_backfill, inner_step = svc.purger.backfill, svc.purger._purge_step
            snaps: dict[str, dict[str, float]] = {}

            async def timed_backfill(room_id: str, up_to_ts: int, *, write: bool) -> Any:
                marks["archive_start"] = time.monotonic()
                snaps["archive"] = meter.snapshot()
                try:
                    return await inner_backfill(room_id, up_to_ts, write=write)
                finally:
                    marks["archive_end"] = time.monotonic()
                    cpu["archive"] = CpuMeter.diff(snaps["archive"], meter.snapshot())

            async def timed_step(room_id: str, up_to_ts: int) -> PurgeStep:
                t = time.monotonic()
                if "purge_start" not in marks:
                    marks["purge_start"] = t
                    snaps["purge"] = meter.snapshot()
                try:
                    return await inner_step(room_id, up_to_ts)
                finally:
                    steps_at.append((t, time.monotonic()))

            # the purger's own methods: its run_room calls them
            svc.purger.backfill = timed_backfill  # type: ignore[method-assign]
            svc.purger._purge_step = timed_step  # type: ignore[method-assign]
            progress("retention run: archive (backfill) then purge")
            t_run = time.monotonic()
            result = await svc.run(apply=True, rooms=[room], progress=lambda s: progress(
                "  " + s))
            marks["run_end"] = time.monotonic()
            if "purge" in snaps:
                cpu["purge"] = CpuMeter.diff(snaps["purge"], meter.snapshot())
            rr = result.rooms[0]
            if rr.error:
                raise RuntimeError(f"retention run failed: {rr.error}")
            progress(f"run done in {marks['run_end'] - t_run:.1f}s: read {rr.read}, "
                     f"archived {rr.archived}, purged {rr.purged} in {len(rr.steps)} steps")
            await quiet("after")
            samples = await asyncio.to_thread(probe.stop)
            progress("verifying: homeserver, archive index, archive chain")
            left = await room_left(svc.client, room, svc.admin_user_id)
            archived_msgs = len(await svc.index.archive_timestamps(
                room, unpurged_only=False, messages_only=True))
            archived_all = (await svc.index.archive_rooms()).get(room, 0)
            report = await svc.archive.verify(room)
            extremities = (await svc.client.request(
                "GET", f"/_synapse/admin/v1/rooms/{q(room)}/forward_extremities",
                user_id=svc.admin_user_id))["count"]
            by_endpoint = fold_purge_ids(requests.table())
        spans["archive"] = [(marks["archive_start"], marks["archive_end"])]
        spans["purge"] = [(marks.get("purge_start", marks["run_end"]), marks["run_end"])]
        spans["purge_steps"] = steps_at
        lat = {k: window(samples["samples"], v) for k, v in spans.items()}
        plog = synapse_purges(synapse.log_path)
        archive_s = marks["archive_end"] - marks["archive_start"]
        purge_s = spans["purge"][0][1] - spans["purge"][0][0]
        step_s = [s.seconds for s in rr.steps]
        return {
            "synapse_version": version,
            "setup": {"synapse": "PostgreSQL (fresh database), appservice without URL, "
                                 "devstack test rate limits (wide open)",
                      "enclave": "not a process: RetentionService in the bench process "
                                 "(the composition root); SQLite store, local archive",
                      "live_archive_path": "not exercised (no appservice transactions): the "
                                           "run's backfill archives every event",
                      "room": room, "probe_user": probe_user, "probe_room": probe_room},
            "fill": filled,
            "retention": {
                "window_events": args.window_events, "pause_seconds": args.pause,
                "poll_seconds": args.poll, "keep": "1s",
                "run_s": marks["run_end"] - t_run,
                "archive": {"read": rr.read, "archived": rr.archived, "seconds": archive_s,
                            "events_per_s": rr.archived / archive_s if archive_s else None,
                            "read_per_s": rr.read / archive_s if archive_s else None},
                "purge": {"purged": rr.purged, "steps": len(rr.steps), "seconds": purge_s,
                          "events_per_s": rr.purged / purge_s if purge_s else None,
                          "step_seconds_total": sum(step_s),
                          "events_per_step_second": rr.purged / sum(step_s)
                          if step_s else None,
                          "slowest_step_s": max(step_s, default=None),
                          "step_s": summary(step_s), "steps_s": step_s,
                          "plan": rr.plan.reason if rr.plan else None},
                "synapse_log": {
                    "purges": len(plog["run_s"]), "found": plog["found"],
                    "deleted": plog["deleted"],
                    "longest_purge_s": max(plog["run_s"], default=None),
                    "longest_delete_txn_s": max(plog["delete_txn_s"], default=None),
                    "purge_s": plog["run_s"], "delete_txn_s": plog["delete_txn_s"]},
                "requests_by_endpoint": by_endpoint,
            },
            "latency_ms": {k: summary(v) for k, v in lat.items()},
            "probe": {"rate_per_s": args.rate, "errors": samples["errors"],
                      "dropped": samples["dropped"], "sends": len(samples["samples"])},
            "cpu": cpu,
            "verify": {"left_on_homeserver": left,
                       "messages_left": left.get("m.room.message", 0),
                       "forward_extremities": extremities,
                       "archive_messages": archived_msgs, "archive_events": archived_all,
                       "archive_ok": report.ok, "archive_events_verified": report.events,
                       "problems": [f"{p.kind}: {p.detail}" for p in report.problems[:5]]},
        }
    finally:
        if probe is not None and probe.pid is not None:
            probe.proc.kill()
        await asyncio.to_thread(synapse.stop)
        with contextlib.suppress(Exception):
            await pg_admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


# -- report ---------------------------------------------------------------------------------------
def target(r: dict[str, Any], n: int) -> dict[str, Any]:
    base, purge = r["latency_ms"]["baseline"]["p99"], r["latency_ms"]["purge"]["p99"]
    ratio = purge / base if base and base == base and purge == purge else float("nan")
    v = r["verify"]
    return {"target": f"p99 during the purge <= {TARGET_RATIO}x p99 without it",
            "value": f"{fmt(purge, '.1f')} ms / {fmt(base, '.1f')} ms = {fmt(ratio, '.2f')}x",
            "ratio": ratio, "met": bool(ratio == ratio and ratio <= TARGET_RATIO),
            # the room's tips (forward extremities) stay: Synapse purges by depth and keeps
            # them; concurrent senders fork the DAG, so there can be more than one
            "complete": bool(v["archive_ok"] and v["archive_messages"] == n
                             and v["messages_left"] <= max(1, v["forward_extremities"])
                             and r["probe"]["errors"] == 0)}


def print_report(r: dict[str, Any], meta: dict[str, Any], t: dict[str, Any]) -> None:
    f, ret, v = r["fill"], r["retention"], r["verify"]
    a, p, sl = ret["archive"], ret["purge"], ret["synapse_log"]
    print(f"\nretention purge benchmark — Synapse {r['synapse_version']} on PostgreSQL, "
          f"{meta['cpus']} CPUs, load average at start {meta['loadavg_at_start'][0]:.2f}, "
          f"at end {meta['loadavg_at_end'][0]:.2f}")
    print("  Enclave not running as a process: the retention service runs in the bench "
          "process (SQLite store, local archive); the live archive path (appservice "
          "transactions) is not exercised, so the run's backfill archives every event.")
    print(f"\nfill     {f['events']} messages in {f['seconds']:.0f}s = "
          f"{f['events_per_s']:.0f} events/s ({f['concurrency']} in flight, {f['senders']} "
          f"users, appservice token; send p50 {fmt(f['send_latency_ms']['p50'])} ms; "
          f"Synapse {f['cpu']['synapse'] / f['cpu']['wall_s']:.2f} cores, PostgreSQL "
          f"{f['cpu']['postgres_backends'] / f['cpu']['wall_s']:.2f})")
    print(f"archive  {a['read']} events read, {a['archived']} archived in {a['seconds']:.1f}s "
          f"= {fmt(a['events_per_s'])} events/s (admin /messages, pages of 1000)")
    print(f"purge    {p['purged']} events in {p['steps']} steps of <= {ret['window_events']} "
          f"(pause {ret['pause_seconds']:g}s, poll {ret['poll_seconds']:g}s): "
          f"{p['seconds']:.1f}s = {fmt(p['events_per_s'])} events/s "
          f"({p['step_seconds_total']:.1f}s in steps = {fmt(p['events_per_step_second'])}/s)")
    print(f"         slowest step {fmt(p['slowest_step_s'], '.2f')}s (Enclave: request -> "
          f"status complete), median {fmt(p['step_s']['p50'], '.2f')}s; Synapse log: "
          f"longest purge {fmt(sl['longest_purge_s'], '.2f')}s, longest delete transaction "
          f"{fmt(sl['longest_delete_txn_s'], '.2f')}s ({sl['purges']} purges)")
    print(f"         Synapse's log: {sl['deleted']} events deleted of {sl['found']} found "
          "before the cutoffs (it keeps state events, as outliers); Enclave counts "
          f"{p['purged']} archived events marked purged")
    print(f"\nprobe: another user in another room, PUT /send at {r['probe']['rate_per_s']:g}/s "
          f"open loop ({r['probe']['errors']} errors)")
    print(f"  {'phase':12} {'n':>5} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}"
          f"  {'Synapse':>7} {'PG':>5} {'bench':>5} {'others':>6}  (CPU cores)")
    for k in ("baseline", "archive", "purge", "purge_steps", "after"):
        s = r["latency_ms"][k]
        c = r["cpu"].get("purge" if k == "purge_steps" else k)
        cores = ""
        if c:
            w = c["wall_s"]
            cores = (f"  {c['synapse'] / w:7.2f} {c['postgres_backends'] / w:5.2f} "
                     f"{c['bench_process'] / w:5.2f} {c['other_programs_cores']:6.2f}")
        print(f"  {k:12} {s['n']:5d} {fmt(s['p50'], '.1f'):>7} {fmt(s['p90'], '.1f'):>7} "
              f"{fmt(s['p99'], '.1f'):>7} {fmt(s['max'], '.1f'):>7}{cores}")
    print(f"\nverify: {v['messages_left']} messages left on the homeserver "
          f"({sum(v['left_on_homeserver'].values())} events; the room has "
          f"{v['forward_extremities']} forward extremities, which a purge keeps), archive holds "
          f"{v['archive_messages']} messages ({v['archive_events']} events), archive verify "
          f"{'ok' if v['archive_ok'] else 'FAILED ' + '; '.join(v['problems'])}")
    print(f"\ntarget: {'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['value']}"
          f"{'' if t['complete'] else '  (run incomplete: see verify / probe errors)'}")


async def amain(args: argparse.Namespace, root: Path) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    load0 = os.getloadavg()
    try:
        r = await measure(args, root)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python", *sys.argv]),
            "parameters": {k: v for k, v in vars(args).items()
                           if k not in ("keep", "no_json", "probe")},
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "git": git_rev(),
            "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg()}
    t = target(r, args.events)
    print_report(r, meta, t)
    if not args.no_json:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(_json_safe({"meta": meta, **r, "target": t}), indent=2,
                                      allow_nan=False) + "\n")
        print(f"\nresults written to {RESULTS.relative_to(REPO)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=100_000, help="messages in the big room")
    p.add_argument("--fill-concurrency", type=int, default=8,
                   help="fill requests in flight (above ~10 the room's DAG forks faster "
                        "than Synapse merges it: see the module docstring)")
    p.add_argument("--fill-users", type=int, default=4)
    p.add_argument("--window-events", type=int, default=5000,
                   help="retention.purge.window_events")
    p.add_argument("--pause", type=float, default=0.5, help="retention.purge.pause_seconds")
    p.add_argument("--poll", type=float, default=0.1, help="retention.purge.poll_seconds")
    p.add_argument("--rate", type=float, default=10.0, help="probe messages/s")
    p.add_argument("--baseline", type=int, default=600,
                   help="probe sends in each quiet window (before and after the run)")
    p.add_argument("--settle", type=float, default=15.0,
                   help="seconds of quiet after the fill")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 5000 events, windows of 1000, 100 baseline sends")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--probe", nargs=3, metavar=("URL", "ROOM", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        url, room, out = args.probe
        Path(out).write_text(json.dumps(asyncio.run(probe_main(url, room, args.rate))))
        return 0
    if args.quick:
        args.events, args.window_events, args.baseline, args.settle = 5000, 1000, 100, 3.0
    root = Path(tempfile.mkdtemp(prefix="enclave-retention-bench-"))
    return asyncio.run(amain(args, root))


if __name__ == "__main__":
    sys.exit(main())

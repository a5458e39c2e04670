"""Gate latency: how long the Synapse module waits for Enclave's answer.

    .venv/bin/python bench/gate_latency.py [--rate 500] [--seconds 10] [--decider REF]
                                           [--invites 100] [--no-json]

Prints figures; asserts nothing. Two parts:

1. **Gate endpoint over loopback.** :class:`~bridge.gate.service.GateService` on aiohttp in
   its own process (this script with ``--serve``), driven open-loop from this process with
   an aiohttp client at a fixed arrival rate (one request every 1/rate s, scheduled in
   advance; a slow answer does not delay the next send, so queueing shows up). Requests
   are a realistic mix (invites into a 30-member room with power levels, joins, state
   events, user-directory candidates, createRoom with invites and initial state). Latency
   is measured from the scheduled send time to the last byte of the answer (so it includes
   any client lag; ``service`` is from the actual send). Reported: p50/p90/p99/max,
   achieved rate, errors, server CPU.
2. **End to end through Synapse** (skipped with ``--invites 0``): a real Synapse with and
   without ``bridge.gate.module.EnclaveGate`` pointing at the same gate server; N invites
   (each to a fresh user) through the client API, one at a time; p50/p99 of the invite
   request in each mode.

``--wait-quiet S`` (default 300) first waits for an idle machine (other programs below 0.3
cores), before the endpoint run and before each Synapse mode; the CPU other programs used
during the endpoint run is reported, so a noisy figure can be told apart.

``--decider module:callable`` plugs in another decider: an async or sync function
``GateRequest -> GateAnswer``; ``module:factory()`` calls a zero-argument factory first.
The default (``builtin``) does the kind of work a separation policy does: classify every
member of the room against a 10,000-person staff set, look up the room class, and refuse
external invitees into internal rooms. Results go to bench/results/gate_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import inspect
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _common import git_rev  # noqa: E402  (bench/ is on sys.path)

from bridge.gate.protocol import GateAnswer, GateRequest, parse_gate_request  # noqa: E402
from bridge.gate.service import GATE_PATH  # noqa: E402

RESULTS = REPO / "bench" / "results" / "gate_latency.json"
SERVER = "corp.test"


# -- the default decider ----------------------------------------------------------------------
STAFF = frozenset(f"@staff{i:05d}:{SERVER}" for i in range(10_000))
INTERNAL_CLASSES = frozenset({"internal", "department", "dm"})


def _kind(user_id: str) -> str:
    if user_id in STAFF:
        return "staff"
    return "local" if user_id.endswith(":" + SERVER) else "external"


def builtin_decider(req: GateRequest) -> GateAnswer:
    """Stand-in for the separation policy: O(members) classification and a class rule."""
    kinds = {u: _kind(u) for u in (req.room.members if req.room else ())}
    kinds[req.user] = _kind(req.user)
    if req.target:
        kinds[req.target] = _kind(req.target)
    room_class = req.room.room_class if req.room else None
    internal = room_class in INTERNAL_CLASSES or (req.room is not None and not req.room.federate)
    if req.check in ("invite", "join"):
        who = req.target if req.check == "invite" else req.user
        if internal and who and kinds[who] == "external":
            return GateAnswer.denied("bench.internal.external", "external into internal room",
                                     "Enclave policy (bench.internal.external): no.")
    if req.check == "user_search" and req.target and kinds[req.target] == "external":
        return GateAnswer.denied("bench.search.external", "external", "hidden")
    if req.check == "create_room":
        return GateAnswer.allowed("bench.create", "internal", edits={
            "creation_content": {"m.federate": False},
            "initial_state": [{"type": "org.enclave.room_class", "state_key": "",
                               "content": {"class": "internal", "set_by": "gate"}}]})
    return GateAnswer.allowed("bench.default", "ok")


def load_decider(ref: str) -> Callable[[GateRequest], Awaitable[GateAnswer]]:
    """``builtin`` | ``module:callable`` | ``module:factory()`` -> an async decider."""
    if ref == "builtin":
        fn: Any = builtin_decider
    else:
        mod_name, _, attr = ref.partition(":")
        call = attr.endswith("()")
        fn = getattr(importlib.import_module(mod_name), attr.removesuffix("()"))
        if call:
            fn = fn()
    if inspect.iscoroutinefunction(fn):
        return fn

    async def wrapped(req: GateRequest) -> GateAnswer:
        result = fn(req)
        return await result if inspect.isawaitable(result) else result
    return wrapped


# -- realistic requests -------------------------------------------------------------------------
def request_mix() -> list[bytes]:
    """Encoded request bodies in the proportions a busy server sends them."""
    members = {f"@staff{i:05d}:{SERVER}": "join" for i in range(0, 30 * 7, 7)}
    room = {"room_id": "!" + "x" * 43, "room_version": "12", "creator": "@staff00000:corp.test",
            "creators": ["@staff00000:corp.test"], "is_direct": None, "class": "internal",
            "aliases": ["#team:corp.test"], "name": "Team", "federate": False,
            "join_rule": "invite", "encrypted": True, "members": members,
            "power": {"users": {"@staff00000:corp.test": 100, "@enclave:corp.test": 100},
                      "users_default": 0, "events_default": 0, "state_default": 50,
                      "ban": 50, "kick": 50, "redact": 50, "invite": 0,
                      "events": {"m.room.name": 50, "m.room.power_levels": 100}}}
    base = {"federated": False, "create": None, "event": None, "target": None}
    reqs = [
        {**base, "check": "invite", "user": "@staff00000:corp.test",
         "target": "@staff04242:corp.test", "room": room},
        {**base, "check": "invite", "user": "@staff00000:corp.test",
         "target": "@pat:gmail.example", "room": room},
        {**base, "check": "join", "user": "@staff01234:corp.test", "room": room},
        {**base, "check": "state_event", "user": "@staff00000:corp.test", "room": room,
         "event": {"type": "m.room.topic", "state_key": "", "content": {"topic": "Q3"}}},
        {**base, "check": "user_search", "user": "@staff00007:corp.test",
         "target": "@staff09999:corp.test", "room": None},
        {**base, "check": "user_search", "user": "@staff00007:corp.test",
         "target": "@pat:gmail.example", "room": None},
        {**base, "check": "create_room", "user": "@staff00000:corp.test", "room": None,
         "create": {"preset": "private_chat", "name": "Plans", "is_direct": False,
                    "invite": ["@staff00001:corp.test", "@staff00002:corp.test"],
                    "initial_state": [{"type": "m.room.topic", "state_key": "",
                                       "content": {"topic": "t"}}],
                    "creation_content": {}}},
    ]
    weights = [4, 1, 3, 2, 6, 2, 1]  # user-directory results dominate
    out: list[bytes] = []
    for r, w in zip(reqs, weights, strict=True):
        parse_gate_request(json.dumps(r))  # every body is valid protocol
        out += [json.dumps(r).encode()] * w
    return out


# -- the server process ---------------------------------------------------------------------------
async def serve(port: int, secret: str, decider_ref: str) -> None:
    from aiohttp import web

    from bridge.gate.service import GateService

    app = web.Application()
    GateService(secret=secret, decide=load_decider(decider_ref)).add_routes(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (user+nice+system+irq+softirq+steal)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait: float, threshold_cores: float = 0.3, window: float = 5.0) -> float:
    """Wait (up to max_wait s) until the machine has been nearly idle for ``window`` s;
    return the busy cores seen over the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(window)
        busy = (machine_busy_seconds() - b0) / (time.monotonic() - t0)
        if busy < threshold_cores or time.monotonic() >= deadline:
            return busy


def start_server(port: int, secret: str, decider: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--port", str(port), "--secret", secret,
         "--decider", decider], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"gate server did not start: {line!r}")
    return proc


# -- part 1: open-loop load on the endpoint --------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
            "max_ms": max(ms) if ms else float("nan"),
            "mean_ms": statistics.fmean(ms) if ms else float("nan")}


async def drive(url: str, secret: str, rate: float, seconds: float, bodies: list[bytes],
                warmup: float) -> dict[str, Any]:
    import aiohttp

    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    latencies: list[float] = []
    service: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        async def one(scheduled: float, body: bytes, record: bool) -> None:
            sent = loop.time()
            try:
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    status = str(resp.status)
            except Exception as e:
                ok, status = False, type(e).__name__
            done = loop.time()
            if not record:
                return
            if ok:
                latencies.append((done - scheduled) * 1000)
                service.append((done - sent) * 1000)
            else:
                errors[status] = errors.get(status, 0) + 1

        interval = 1 / rate
        for phase, length in (("warmup", warmup), ("measure", seconds)):
            n = int(length * rate)
            tasks = []
            start = loop.time() + 0.05
            for i in range(n):
                when = start + i * interval
                delay = when - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(
                    one(when, bodies[i % len(bodies)], phase == "measure")))
            await asyncio.gather(*tasks)
            if phase == "measure":
                elapsed = loop.time() - start
    sent = int(seconds * rate)
    return {"sent": sent, "ok": len(latencies), "errors": errors,
            "achieved_rate_per_s": len(latencies) / elapsed, "seconds": elapsed,
            "latency": summary(latencies), "service": summary(service)}


# -- part 2: invites through a real Synapse ------------------------------------------------
def synapse_invites(gate_port: int, secret: str, n: int, base: Path,
                    quiet: float) -> dict[str, Any]:
    from devstack.synapse import SynapseServer

    secret_file = base / "gate_secret"
    secret_file.write_text(secret)
    module = {"modules": [{"module": "bridge.gate.module.EnclaveGate", "config": {
        "url": f"http://127.0.0.1:{gate_port}", "secret_path": str(secret_file),
        "timeout_ms": 500}}]}
    hs = SynapseServer(base_dir=base / "synapse", server_name=SERVER)
    out: dict[str, Any] = {"invites_per_mode": n}
    asked_before = 0
    try:
        for mode in ("off", "on", "off-again"):
            hs.extra_config = dict(module) if mode == "on" else {}
            hs.restart()
            tag = uuid.uuid4().hex[:6]
            _, token = hs.register_user(f"staff00000-{tag}", "pw")
            invitees = [hs.register_user(f"staff{i:05d}-{tag}", "pw")[0]
                        for i in range(1, n + 1)]
            room = hs.request("POST", "/_matrix/client/v3/createRoom",
                              {"preset": "private_chat", "name": f"bench {mode}"}, token)
            path = f"/_matrix/client/v3/rooms/{room['room_id']}/invite"
            for u in invitees[:3]:  # warm caches and connections, not measured
                hs.request("POST", path, {"user_id": u}, token)
            busy = wait_quiet(quiet) if quiet > 0 else None
            times = []
            for u in invitees[3:]:
                t0 = time.perf_counter()
                hs.request("POST", path, {"user_id": u}, token)
                times.append((time.perf_counter() - t0) * 1000)
            out[mode] = {**summary(times), "busy_cores_before": busy}
            # proof the module was (not) in the path: Synapse logs each gate response
            out[mode]["gate_checks_in_synapse_log"] = hs.log_path.read_text(
                errors="replace").count(f"{GATE_PATH}: 200") - asked_before
            asked_before += out[mode]["gate_checks_in_synapse_log"]
            print(f"  synapse invite, module {mode:9s}: p50 {out[mode]['p50_ms']:6.2f} ms  "
                  f"p99 {out[mode]['p99_ms']:6.2f} ms  max {out[mode]['max_ms']:6.2f} ms "
                  f"({len(times)} invites, {out[mode]['gate_checks_in_synapse_log']} gate checks)",
                  flush=True)
    finally:
        hs.stop()
    return out


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500.0, help="checks per second (open loop)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--decider", default="builtin",
                    help="builtin | module:callable | module:factory()")
    ap.add_argument("--invites", type=int, default=100,
                    help="invites per mode through Synapse (0: skip that part)")
    ap.add_argument("--wait-quiet", type=float, default=300,
                    help="wait up to this many seconds for an idle machine first (0: don't)")
    ap.add_argument("--no-json", action="store_true", help="do not write the results file")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--secret", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve:
        asyncio.run(serve(args.port, args.secret, args.decider))
        return

    secret = secrets.token_hex(32)
    port = free_port()
    server = start_server(port, secret, args.decider)
    result: dict[str, Any] = {"meta": {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/gate_latency.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "git": git_rev(), "decider": args.decider,
        "rate_per_s": args.rate, "seconds": args.seconds, "warmup_seconds": args.warmup,
    }}
    try:
        if args.wait_quiet > 0:
            result["meta"]["busy_cores_before"] = wait_quiet(args.wait_quiet)
        cpu0, own0, busy0, t0 = (cpu_seconds(server.pid), cpu_seconds(os.getpid()),
                                 machine_busy_seconds(), time.monotonic())
        endpoint = asyncio.run(drive(f"http://127.0.0.1:{port}{GATE_PATH}", secret, args.rate,
                                     args.seconds, request_mix(), args.warmup))
        wall = time.monotonic() - t0
        server_cpu = cpu_seconds(server.pid) - cpu0
        client_cpu = cpu_seconds(os.getpid()) - own0
        endpoint["server_cpu_pct"] = 100 * server_cpu / wall
        endpoint["client_cpu_pct"] = 100 * client_cpu / wall
        # everything else the machine did meanwhile: other programs' noise
        endpoint["other_busy_cores"] = (machine_busy_seconds() - busy0 - server_cpu
                                        - client_cpu) / wall
        result["endpoint"] = endpoint
        lat, svc = endpoint["latency"], endpoint["service"]
        print(f"gate endpoint, {args.rate:.0f}/s open loop for {args.seconds:.0f} s "
              f"(decider {args.decider}):")
        print(f"  from scheduled send (open loop, incl. client timer lag):\n"
              f"           p50 {lat['p50_ms']:.2f} ms  p90 {lat['p90_ms']:.2f} ms  "
              f"p99 {lat['p99_ms']:.2f} ms  max {lat['max_ms']:.2f} ms")
        print(f"  from actual send:\n"
              f"           p50 {svc['p50_ms']:.2f} ms  p90 {svc['p90_ms']:.2f} ms  "
              f"p99 {svc['p99_ms']:.2f} ms  max {svc['max_ms']:.2f} ms")
        print(f"  achieved {endpoint['achieved_rate_per_s']:.1f}/s, {endpoint['ok']} ok, "
              f"errors {endpoint['errors'] or 0}; CPU: server {endpoint['server_cpu_pct']:.0f}%"
              f", client {endpoint['client_cpu_pct']:.0f}% of a core, other programs "
              f"{endpoint['other_busy_cores']:.2f} cores", flush=True)
        if args.invites > 0:
            print("end to end through Synapse (client invite request):", flush=True)
            with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
                result["synapse"] = synapse_invites(port, secret, args.invites, Path(tmp),
                                                   min(args.wait_quiet, 60))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    result["meta"]["loadavg_at_end"] = list(os.getloadavg())
    if not args.no_json:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()

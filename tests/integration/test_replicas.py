"""Two Enclave replicas on one PostgreSQL database behind a round-robin of a real Synapse's
transactions: every event processed exactly once and in order per room, the leader's jobs
taken over after a SIGKILL, never two runs of a job at once. And: a SQLite store refuses a
second ``enclave run``.

The observable is the ledger (ledger_handler.py): the leading replica posts the id of every
processed message into a ledger room; duplicates or gaps show there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.proxy import RoundRobinProxy

from .directory_helpers import ensure_enclave_admin
from .harness import (
    LEDGER_HANDLER,
    REPO_ROOT,
    EnclaveProcess,
    Stack,
    appservice_port,
    fresh_pg_database,
    nio,
    subprocess_env,
    wait_until,
)
from .ledger_handler import LEDGER_ROOM_ENV
from .test_delivery import assert_ledger_exactly_once, create_room, send_text

pytestmark = pytest.mark.integration

TTL_SECONDS = 3
JOB_MINUTES = 0.05  # the directory sync every 3 s: several runs per phase of the test
ROOMS, PER_ROOM = 4, 25


@pytest.fixture
def enclave_pg() -> Iterator[str]:
    """A fresh PostgreSQL database for the replicas; dropped afterwards."""
    with fresh_pg_database("enclave_replicas") as dsn:
        yield dsn


def replica_config(stack: Stack, base: Path, name: str, port: int, dsn: str) -> Path:
    cfg_path = stack.write_enclave_config(base / name / "config.yaml",
                                          handlers=[LEDGER_HANDLER], database=dsn)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["appservice"]["port"] = port  # public_url stays the proxy's: Synapse's one URL
    cfg["cluster"] = {"lease_ttl_seconds": TTL_SECONDS, "replica_name": name}
    # the job runs' start and end lines (DEBUG: which replica ran which job when)
    cfg["logging"] = {**cfg.get("logging", {}), "loggers": {"bridge.app": "DEBUG"}}
    cfg["directory"] = {
        "source": {"type": "file", "path": str(base / "directory.yaml")},
        "interval_minutes": JOB_MINUTES,
        "sync_on_start": True,
    }
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path


LINE = re.compile(r"^(\S+ \S+) DEBUG bridge\.app: job directory-sync \((\S+)\) "
                  r"(starts|ends) on (\S+)$")


def job_runs(log: Path) -> list[tuple[float, float | None, str]]:
    """(start, end or None, replica) of each directory-sync run in a replica's log."""
    runs: list[tuple[float, float | None, str]] = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = LINE.match(line)
        if not m:
            continue
        t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if m.group(3) == "starts":
            runs.append((t, None, m.group(4)))
        elif runs and runs[-1][1] is None:
            runs[-1] = (runs[-1][0], t, runs[-1][2])
    return runs


async def cluster_status(p: EnclaveProcess) -> dict[str, Any] | None:
    try:
        _, body = await p.get_json("/ready", within=2)
    except Exception:
        return None
    return body.get("cluster") if isinstance(body, dict) else None


async def test_two_replicas_process_each_event_once_in_order_and_take_over(
    shared_stack: Stack, staff: list[nio.AsyncClient], enclave_pg: str, tmp_path: Path,
) -> None:
    stack = shared_stack
    ensure_enclave_admin(stack)
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump({"people": [
        {"id": "1", "username": "rita", "display_name": "Rita Replica", "department": "Ops"},
    ]}))
    ledger_room = await stack.create_ledger_room()
    ports = {"replica-a": appservice_port(), "replica-b": appservice_port()}
    procs = {
        name: EnclaveProcess(replica_config(stack, tmp_path, name, port, enclave_pg), port,
                             env={LEDGER_ROOM_ENV: ledger_room})
        for name, port in ports.items()
    }
    a, b = procs["replica-a"], procs["replica-b"]
    proxy = RoundRobinProxy([p.base_url for p in procs.values()])
    await proxy.start("127.0.0.1", stack.as_port)
    try:
        await a.start()  # first: it leads
        await b.start()
        assert (await cluster_status(a) or {}).get("leader") is True
        assert (await cluster_status(b) or {}).get("leader") is False
        await stack.wait_as_up()

        senders = [await stack.new_staff(f"r{i}") for i in range(ROOMS)]
        staff.extend(senders)
        rooms = [await create_room(c) for c in senders]
        sent: dict[str, list[str]] = {room: [] for room in rooms}

        async def stream(label: str, n: int) -> None:
            async def one(client: nio.AsyncClient, room: str) -> None:
                for i in range(n):  # sequential per room: the room's order is defined
                    sent[room].append(await send_text(client, room, f"{label} {i}"))
            await asyncio.gather(*(one(c, r) for c, r in zip(senders, rooms, strict=True)))

        async def ledger_complete() -> bool:
            want = sum(len(v) for v in sent.values())
            return len(await stack.ledger(ledger_room)) >= want

        # phase 1: both replicas up, transactions alternate between them
        await stream("before", PER_ROOM)
        await wait_until(ledger_complete, within=90, interval=0.5,
                         what="every message in the ledger", describe=a.describe)
        assert_ledger_exactly_once(await stack.ledger(ledger_room), sent)
        txns = {backend: n for backend, n in proxy.sent.items()}
        assert all(n > 0 for n in txns.values()) and len(txns) == 2, (
            f"the proxy did not spread the homeserver's requests: {txns}")
        await asyncio.sleep(JOB_MINUTES * 60 * 2)  # a few directory runs on the leader

        # phase 2: SIGKILL the leader in the middle of a stream
        later = asyncio.create_task(stream("after", PER_ROOM))
        await wait_until(lambda: asyncio.sleep(0, sum(len(v) for v in sent.values())
                                               >= ROOMS * PER_ROOM + 20),
                         within=60, interval=0.05, what="the kill point")
        killed_at = time.time()
        assert await a.kill() == -9

        async def b_leads() -> bool:
            return (await cluster_status(b) or {}).get("leader") is True

        await wait_until(b_leads, within=TTL_SECONDS * 4, interval=0.1,
                         what="replica-b taking over", describe=b.describe)
        takeover = time.time() - killed_at
        await later
        await wait_until(ledger_complete, within=90, interval=0.5,
                         what="every message in the ledger after the takeover",
                         describe=b.describe)
        await asyncio.sleep(JOB_MINUTES * 60 * 2)
        ledger = await stack.ledger(ledger_room)
        assert_ledger_exactly_once(ledger, sent)
    finally:
        for p in procs.values():
            if p.running:
                await p.stop()
        await proxy.stop()

    # the lease ttl (3 s) plus one campaign period (0.5 s), with a margin for the machine
    assert takeover <= TTL_SECONDS + 2.5, f"takeover took {takeover:.1f}s"
    runs_a, runs_b = job_runs(a.log_path), job_runs(b.log_path)
    assert runs_a and all(r[2] == "replica-a" for r in runs_a)
    assert runs_b and all(r[2] == "replica-b" for r in runs_b)
    # the standby ran nothing while the leader lived, and took the job over after the kill
    assert all(start > killed_at for start, _, _ in runs_b), runs_b
    assert runs_b[0][0] - killed_at <= TTL_SECONDS + 2.5 + 1, (runs_b[0], killed_at)
    # no two runs at once, across both replicas (a killed run ends at the kill)
    spans = sorted((s, e if e is not None else killed_at) for s, e, _ in runs_a + runs_b)
    for (s1, e1), (s2, _) in itertools.pairwise(spans):
        assert s2 >= e1, f"two directory-sync runs overlapped: {s1}-{e1} and {s2}"


async def test_a_second_enclave_on_one_sqlite_store_is_refused(
    shared_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
) -> None:
    first = enclave_factory(shared_stack)
    await first.start()
    try:
        cfg = yaml.safe_load(first.config.read_text())
        cfg["appservice"]["port"] = appservice_port()
        cfg["database"]["url"] = f"sqlite:///{first.config.parent / 'enclave.db'}"
        second = first.config.parent / "second.yaml"
        second.write_text(yaml.safe_dump(cfg))
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bridge", "run", "-c", str(second)],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 4, result.stderr
        assert "another `enclave run`" in result.stderr and "PostgreSQL" in result.stderr
        assert first.running  # the first one goes on
    finally:
        await first.stop()

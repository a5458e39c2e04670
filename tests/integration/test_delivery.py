"""Events sent by real clients reach Enclave and are processed exactly once — also across
SIGKILL crashes and while Enclave is down.

The observable is the ledger (see ledger_handler.py): for every m.room.message Enclave
posts the source event id into a ledger room as its bot, through the durable outbox. The
tests read the ledger back from Synapse (admin API) and require every source event id
EXACTLY once, and, per source room, in the order the room received them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from .harness import (
    EnclaveProcess,
    Stack,
    ledger_enclave,
    metric,
    nio,
    wait_until,
)
from .ledger_handler import RULE_ID

pytestmark = pytest.mark.integration


# -- helpers -----------------------------------------------------------------------------------
async def create_room(owner: nio.AsyncClient, *, invite: tuple[nio.AsyncClient, ...] = ()) -> str:
    resp = await owner.room_create(name="enclave e2e", invite=[c.user_id for c in invite])
    assert isinstance(resp, nio.RoomCreateResponse), resp
    for member in invite:
        joined = await member.join(resp.room_id)
        assert isinstance(joined, nio.JoinResponse), joined
    return resp.room_id


async def send_text(client: nio.AsyncClient, room_id: str, body: str) -> str:
    resp = await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    assert isinstance(resp, nio.RoomSendResponse), resp
    return resp.event_id


async def send_sequence(client: nio.AsyncClient, room_id: str, n: int, sent: list[str],
                        label: str = "msg") -> None:
    """Send n messages one after the other; ``sent`` gets their ids in room order."""
    for i in range(n):
        sent.append(await send_text(client, room_id, f"{label} {i}"))


def assert_ledger_exactly_once(ledger: list[tuple[str, str]], sent: dict[str, list[str]],
                               *, in_order: bool = True) -> None:
    """Every sent event exactly once, nothing else, and (``in_order``) per room in send
    order."""
    counts = Counter(event_id for _, event_id in ledger)
    expected = {e for ids in sent.values() for e in ids}
    missing = sorted(expected - counts.keys())
    duplicated = {e: n for e, n in counts.items() if n > 1}
    unexpected = sorted(counts.keys() - expected)
    assert not missing, f"{len(missing)} of {len(expected)} events never processed: {missing[:5]}"
    assert not duplicated, f"{len(duplicated)} events processed more than once: " \
                           f"{list(duplicated.items())[:5]}"
    assert not unexpected, f"ledger holds events nobody sent in this test: {unexpected[:5]}"
    for room, ids in sent.items() if in_order else ():
        in_ledger = [e for r, e in ledger if r == room]
        assert in_ledger == ids, (
            f"room {room}: processed out of order; first difference at position "
            f"{next(i for i, (a, b) in enumerate(zip(in_ledger, ids, strict=False)) if a != b)}"
            if len(in_ledger) == len(ids) else f"room {room}: ledger has {len(in_ledger)} "
            f"entries for {len(ids)} messages")


async def assert_store_clean(enclave: EnclaveProcess, n_actions: int) -> dict[str, Any]:
    """`enclave inbox status`: nothing pending or parked, exactly one applied action each."""
    status = await enclave.inbox_status()
    assert status["events"]["pending"] == 0, status
    assert status["events"]["parked"] == 0, status
    assert status["events"]["done"] >= n_actions, status
    assert status["actions"] == {"applied": n_actions}, status
    assert status["quarantined"] == 0, status
    return status


def db_counts(enclave: EnclaveProcess) -> dict[str, int]:
    """Read the (stopped) Enclave's SQLite database: what the crash left in flight."""
    db = sqlite3.connect(enclave.config.parent / "enclave.db")
    try:
        return {
            "pending_events": db.execute(
                "SELECT COUNT(*) FROM inbox WHERE status = 'pending'").fetchone()[0],
            "pending_actions": db.execute(
                "SELECT COUNT(*) FROM actions WHERE status = 'pending'").fetchone()[0],
            "applied_actions": db.execute(
                "SELECT COUNT(*) FROM actions WHERE status = 'applied'").fetchone()[0],
        }
    finally:
        db.close()


# -- (a) ---------------------------------------------------------------------------------------
async def test_messages_from_clients_are_processed_exactly_once(
    shared_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
    staff: list[nio.AsyncClient],
) -> None:
    stack = shared_stack
    enclave, ledger_room = await ledger_enclave(stack, enclave_factory)
    alice, bob = await stack.new_staff("alice"), await stack.new_staff("bob")
    staff.extend([alice, bob])
    shared = await create_room(alice, invite=(bob,))
    private = await create_room(bob)

    sent: dict[str, list[str]] = {shared: [], private: []}
    for i in range(15):  # interleave two senders in one room, one in another
        sent[shared].append(await send_text(alice, shared, f"alice {i}"))
        sent[shared].append(await send_text(bob, shared, f"bob {i}"))
        sent[private].append(await send_text(bob, private, f"note {i}"))
    n = sum(len(v) for v in sent.values())

    await enclave.wait_idle(min_applied=n, within=60, also=stack.stranded_report)
    assert_ledger_exactly_once(await stack.ledger(ledger_room), sent)
    await assert_store_clean(enclave, n)

    r = await enclave.cli("audit", "--rule", RULE_ID, "--format", "json")
    assert r.returncode == 0, r.stderr
    outcomes = Counter(json.loads(line)["outcome"] for line in r.stdout.splitlines() if line)
    assert outcomes == {"applied": n}, outcomes
    assert await enclave.stop() == 0, enclave.describe()


# -- (b) ---------------------------------------------------------------------------------------
ROOMS, PER_ROOM = 5, 100
# Synapse (1.163) can strand an event created at the very moment its appservice recoverer
# finishes catching up (see Stack.stranded). Enclave's recovery sweeps after each start make
# Synapse deliver such an event, late, but a sweep is itself a short recovery, so an event
# created during the LAST sweep can be stranded again: the mitigation narrows the window, it
# does not close it. So the default run pauses the senders during each catch-up (no sweeps)
# and checks exactly-once AND per-room order deterministically. The variant that keeps
# sending through the catch-ups (checks exactly-once, not order) runs with
# ENCLAVE_E2E_SEND_DURING_RECOVERY=1; measured here: without sweeps (ENCLAVE_E2E_NO_SWEEPS=1)
# it lost events in 3 runs of 3, with sweeps it passed 5 runs of 5.
SEND_VARIANT = os.environ.get("ENCLAVE_E2E_SEND_DURING_RECOVERY") == "1"
SWEEPS = [] if os.environ.get("ENCLAVE_E2E_NO_SWEEPS") == "1" else [3.0, 8.0, 15.0]


@pytest.mark.parametrize("send_during_recovery", [
    pytest.param(False, id="paused-during-catch-up"),
    pytest.param(True, id="sending-through-catch-up", marks=pytest.mark.skipif(
        not SEND_VARIANT, reason="timing-dependent upstream race; opt in with "
                                 "ENCLAVE_E2E_SEND_DURING_RECOVERY=1")),
])
async def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    shared_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
    staff: list[nio.AsyncClient], send_during_recovery: bool,
) -> None:
    stack = shared_stack
    # sweeps shortly after each start deliver what Synapse strands while catching up
    enclave, ledger_room = await ledger_enclave(
        stack, enclave_factory,
        inbox={"recovery_sweeps_seconds": SWEEPS if send_during_recovery else []})
    senders = [await stack.new_staff(f"s{i}") for i in range(ROOMS)]
    staff.extend(senders)
    rooms = [await create_room(c) for c in senders]
    sent: dict[str, list[str]] = {room: [] for room in rooms}
    gate = asyncio.Event()
    gate.set()
    in_flight = 0

    def n_sent() -> int:
        return sum(len(v) for v in sent.values())

    async def sender(client: nio.AsyncClient, room: str) -> None:
        # one sequential sender per room, so "source order" is unambiguous
        nonlocal in_flight
        for i in range(PER_ROOM):
            await gate.wait()
            in_flight += 1
            try:
                sent[room].append(await send_text(client, room, f"msg {i}"))
            finally:
                in_flight -= 1

    stream = asyncio.gather(*(sender(c, r) for c, r in zip(senders, rooms, strict=True)))
    crashes: list[dict[str, Any]] = []
    try:
        for sent_at_least, applied_more in ((150, 50), (330, 30)):
            start_applied = crashes[-1]["applied_actions"] if crashes else 0

            async def due(sent_at_least: int = sent_at_least,
                          target: int = start_applied + applied_more) -> bool:
                if stream.done():
                    return True  # let the assertion below say why
                m = await enclave.metrics()
                return (n_sent() >= sent_at_least
                        and metric(m, "enclave_outbox_actions", status="applied") >= target)

            await wait_until(due, within=90, interval=0.05, what="the kill point",
                             describe=enclave.describe)
            assert not stream.done(), (
                f"the stream of {ROOMS * PER_ROOM} messages ended before the kill "
                f"({n_sent()} sent): the crash would not be mid-stream")
            assert await enclave.kill() == -9
            crash: dict[str, Any] = {"sent_at_kill": n_sent(), **db_counts(enclave)}

            async def backlog(since: int = n_sent()) -> bool:
                return n_sent() >= since + 25 or stream.done()

            await wait_until(backlog, within=30, what="messages sent while Enclave is dead")
            if not send_during_recovery:
                gate.clear()

                async def quiet() -> bool:
                    return in_flight == 0

                await wait_until(quiet, within=30, what="in-flight sends to finish")
            crash["sent_at_restart"] = n_sent()
            crashes.append(crash)
            await enclave.start()
            if not send_during_recovery:
                await stack.wait_as_up()
                gate.set()
        await stream
    finally:
        gate.set()
        if not stream.done():
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
    total = ROOMS * PER_ROOM
    assert n_sent() == total

    m = await enclave.wait_idle(min_applied=total, within=120, also=stack.stranded_report)
    print(f"\ncrashes: {crashes}; duplicate transactions after restart: "
          f"{metric(m, 'enclave_transactions_total', result='duplicate')}")
    assert_ledger_exactly_once(await stack.ledger(ledger_room), sent,
                               in_order=not send_during_recovery)
    await assert_store_clean(enclave, total)
    assert await enclave.stop() == 0, enclave.describe()


# -- (c) ---------------------------------------------------------------------------------------
async def test_backlog_while_down_is_delivered_after_restart(
    shared_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
    staff: list[nio.AsyncClient],
) -> None:
    stack = shared_stack
    hs_log = stack.synapse.log_path
    enclave, ledger_room = await ledger_enclave(stack, enclave_factory)
    carol, dave = await stack.new_staff("carol"), await stack.new_staff("dave")
    staff.extend([carol, dave])
    room_a = await create_room(carol, invite=(dave,))
    room_b = await create_room(dave)
    sent: dict[str, list[str]] = {room_a: [], room_b: []}
    sent[room_a].append(await send_text(carol, room_a, "before the stop"))
    await enclave.wait_idle(min_applied=1)

    assert await enclave.stop() == 0, "SIGTERM must shut Enclave down cleanly"
    log_offset = hs_log.stat().st_size

    def new_hs_log() -> str:
        with hs_log.open(encoding="utf-8", errors="replace") as f:
            f.seek(log_offset)
            return f.read()

    await asyncio.gather(
        send_sequence(carol, room_a, 15, sent[room_a], "while down"),
        send_sequence(dave, room_b, 15, sent[room_b], "while down"),
    )

    # Down "for a while": Synapse failed to deliver, retried after 2 s, failed again and
    # backed off to 4 s (scheduler._Recoverer). Without Enclave's start-up ping it would
    # now wait for that timer.
    async def backed_off() -> bool:
        return "Scheduling retries on enclave in 4" in new_hs_log()

    await wait_until(backed_off, within=30, what="Synapse to back off from the down Enclave",
                     describe=lambda: new_hs_log()[-3000:])
    await send_sequence(carol, room_a, 5, sent[room_a], "still down")

    restarted_at = time.monotonic()
    await enclave.start()
    n = sum(len(v) for v in sent.values())
    await enclave.wait_idle(min_applied=n, within=60, also=stack.stranded_report)
    caught_up_s = time.monotonic() - restarted_at

    # The ping made Synapse retry at once: a forced retry ("retry-N" background process),
    # not the recoverer's timer ("as-recoverer-N").
    assert "homeserver pinged us" in enclave.log_path.read_text()
    assert re.search(r" - retry-\d+ - Starting retries on enclave", new_hs_log()), \
        new_hs_log()[-3000:]
    print(f"\nbacklog of {n - 1} events processed {caught_up_s:.1f}s after the restart")
    assert_ledger_exactly_once(await stack.ledger(ledger_room), sent)
    await assert_store_clean(enclave, n)
    assert await enclave.stop() == 0

"""A new or restored database must not reuse send transaction ids (Synapse would drop them)."""
from __future__ import annotations

import pytest

from .harness import LEDGER_HANDLER, LEDGER_ROOM_ENV, ledger_enclave
from .test_delivery import create_room, send_text

pytestmark = pytest.mark.integration


async def test_fresh_database_sends_are_not_swallowed(shared_stack, enclave_factory, staff):
    stack = shared_stack
    a, ledger_room = await ledger_enclave(stack, enclave_factory, name="a")
    u = await stack.new_staff("u")
    staff.append(u)
    room = await create_room(u)
    first = [await send_text(u, room, f"a{i}") for i in range(3)]
    await a.wait_idle(min_applied=3)
    await a.stop()
    # same ledger room, new (empty) database: e.g. a restored backup or a reinstall
    b = enclave_factory(stack, name="b", handlers=[LEDGER_HANDLER],
                        env={LEDGER_ROOM_ENV: ledger_room})
    await b.start()
    await stack.wait_as_up()
    second = [await send_text(u, room, f"b{i}") for i in range(3)]
    await b.wait_idle(min_applied=3)
    ledger = [e for _, e in await stack.ledger(ledger_room)]
    assert all(e in ledger for e in first + second), "messages missing from the ledger"

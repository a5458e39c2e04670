"""/metrics exposes what docs/operators/monitoring.md documents; /ready follows the
homeserver's health.

Uses its own Synapse, because it stops it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from .harness import REPO_ROOT, EnclaveProcess, Stack, metric, nio, parse_metrics, wait_until

pytestmark = pytest.mark.integration


def documented_metrics() -> dict[str, set[str]]:
    """Metric names (with label names) listed in the /metrics paragraph of
    docs/operators/monitoring.md."""
    doc = REPO_ROOT / "docs" / "operators" / "monitoring.md"
    text = doc.read_text(encoding="utf-8")
    start = text.index("`GET /metrics`")
    end = text.find("\n\n", start)
    end = len(text) if end < 0 else end
    paragraph = text[start:end]
    # stop at the next bullet if the paragraph is a list item
    nxt = paragraph.find("\n- ", 1)
    paragraph = paragraph if nxt < 0 else paragraph[:nxt]
    names = {m.group(1): set(filter(None, (m.group(2) or "").split(",")))
             for m in re.finditer(r"`(enclave_[a-z_]+)(?:\{([a-z_,]*)\})?`", paragraph)}
    assert len(names) >= 8, f"could not find the documented metrics in {doc}: {paragraph!r}"
    return names


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack.create(tmp_path / "own-stack")
    try:
        yield stack
    finally:
        stack.stop()


async def test_metrics_and_readiness_follow_the_homeserver(
    own_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
    staff: list[nio.AsyncClient],
) -> None:
    stack = own_stack
    enclave = enclave_factory(stack)
    await enclave.start()

    status, ready = await enclave.get_json("/ready")
    assert status == 200, ready
    assert ready["ready"] is True and ready["homeserver"]["ok"] is True
    assert ready["store"]["ok"] is True and ready["bot"] is True, ready

    # some traffic, so counters with labels have samples
    erin = await stack.new_staff("erin")
    staff.append(erin)
    created = await erin.room_create(name="metrics")
    assert isinstance(created, nio.RoomCreateResponse), created

    async def room_in_and_idle() -> bool:
        # a room creation is ≥ 5 events, pushed in one or more transactions: wait for all
        # of them, not for the first moment nothing is pending
        m = await enclave.metrics()
        return (metric(m, "enclave_inbox_events", status="done") >= 5
                and metric(m, "enclave_inbox_events", status="pending") == 0)

    await wait_until(room_in_and_idle, within=30, what="the new room's events processed",
                     describe=enclave.describe)

    async with aiohttp.ClientSession() as s, s.get(enclave.base_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
        text = await resp.text()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    samples = parse_metrics(text)
    problems = []
    for name, labels in documented_metrics().items():
        # prometheus_client's TYPE line names a counter with or without _total by version
        family = name if name in types else name.removesuffix("_total")
        if family not in types:
            problems.append(f"{name}: not exposed")
            continue
        if name.endswith("_total") and types[family] != "counter":
            problems.append(f"{name}: type {types[family]}, documented as a counter")
        seen = {k for (n, lab), _ in samples.items()
                if n in (name, f"{family}_bucket") for k, _v in lab} - {"le"}
        if seen and seen != labels:
            problems.append(f"{name}: labels {sorted(seen)}, documented {sorted(labels)}")
    assert not problems, "\n".join(problems)
    assert metric(samples, "enclave_transactions_total", result="accepted") >= 1
    assert metric(samples, "enclave_events_received_total", kind="pdu") >= 1
    assert metric(samples, "enclave_inbox_events", status="done") >= 1
    assert metric(samples, "enclave_inbox_events", status="pending") == 0

    # Homeserver gone: not ready (503, saying why), but alive.
    await asyncio.to_thread(stack.synapse.stop)

    async def not_ready() -> dict | None:
        status, body = await enclave.get_json("/ready")
        return body if status == 503 else None

    body = await wait_until(not_ready, within=20, what="/ready to answer 503",
                            describe=enclave.describe)
    assert body["ready"] is False and body["homeserver"]["ok"] is False, body
    # the homeserver's error is named, not just "not ok"
    assert "Cannot connect" in (body["homeserver"]["error"] or ""), body
    assert body["store"]["ok"] is True, body
    assert await enclave.get_json("/health") == (200, {"status": "ok"})
    async with aiohttp.ClientSession() as s, s.get(enclave.base_url + "/metrics") as resp:
        assert resp.status == 200

    # And back.
    await asyncio.to_thread(stack.synapse.start)

    async def is_ready() -> dict | None:
        status, body = await enclave.get_json("/ready")
        return body if status == 200 else None

    body = await wait_until(is_ready, within=30, what="/ready to answer 200 again",
                            describe=enclave.describe)
    assert body["homeserver"]["error"] is None, body
    # the completeness check reports its lag against its bound
    assert body["completeness"]["bound_seconds"] == 60, body
    assert await enclave.stop() == 0, enclave.describe()

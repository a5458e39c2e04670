"""Audit streaming against a REAL rsyslog: every audit record of a running Enclave reaches a
private rsyslogd over TCP (octet-counted RFC 5424), UDP and a unix datagram socket, and a
JSON-lines file, at least once and in audit id order, across a SIGKILL of Enclave in the
middle of the stream (SQLite and PostgreSQL stores).

Records come from two producers at once: Enclave itself (the ledger handler's actions, one
audit record each, for messages a staff user sends through Synapse) and another process
writing the audit table directly (as a CLI command does), with characters RFC 5424 escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.auditstream.syslog import BOM
from bridge.store.audit import AUDIT_INSERT
from devstack.rsyslog import RsyslogServer, rsyslog_available

from .harness import LEDGER_HANDLER, LEDGER_ROOM_ENV, EnclaveProcess, Stack, fresh_pg_database

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not rsyslog_available(), reason="rsyslogd not installed")]

SINKS = ("tcp", "udp", "unix")
SD_ID_RE = re.compile(r'\[enclave@32473 id="(\d+)"')
TRICKY_RULE = 'rule "quoted" \\ back]slash'


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[RsyslogServer]:
    server = RsyslogServer(tmp_path / "rsyslog")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield "sqlite:///enclave.db"
        return
    with fresh_pg_database("enclave_auditstream") as dsn:
        yield dsn


class Producer:
    """Writes audit records straight into Enclave's database (another process's writes)."""

    def __init__(self, url: str, base: Path):
        self.url, self.base = url, base
        self.written = 0

    def _row(self, n: int) -> tuple[Any, ...]:
        return (1_765_000_000_000 + n, "test", "@ops:corp.test", "test.producer",
                "@zoë:corp.test", "!room:corp.test", TRICKY_RULE, f"Zoë's record {n}",
                "applied", json.dumps({"n": n}))

    def write(self, count: int) -> None:
        rows = [self._row(self.written + i) for i in range(count)]
        if self.url.startswith("sqlite"):
            db = sqlite3.connect(self.base / "enclave.db", timeout=30)
            try:
                with db:
                    db.executemany(AUDIT_INSERT, rows)
            finally:
                db.close()
        else:
            import psycopg2

            conn = psycopg2.connect(self.url)
            try:
                with conn, conn.cursor() as cur:
                    cur.executemany(AUDIT_INSERT.replace("?", "%s"), rows)
            finally:
                conn.close()
        self.written += count

    def audit_ids(self) -> list[int]:
        if self.url.startswith("sqlite"):
            db = sqlite3.connect(self.base / "enclave.db", timeout=30)
            try:
                return [r[0] for r in db.execute("SELECT id FROM audit ORDER BY id")]
            finally:
                db.close()
        import psycopg2

        conn = psycopg2.connect(self.url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT id FROM audit ORDER BY id")
                return [r[0] for r in cur.fetchall()]
        finally:
            conn.close()


def first_occurrences(ids: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


async def test_every_record_reaches_rsyslog_and_the_file_in_order_across_sigkill(
    shared_stack: Stack, enclave_factory: Callable[..., EnclaveProcess],
    rsyslog: RsyslogServer, database: str, tmp_path: Path,
) -> None:
    stack = shared_stack
    ledger_room = await stack.create_ledger_room()
    enclave = enclave_factory(stack, handlers=[LEDGER_HANDLER], database=database,
                              env={LEDGER_ROOM_ENV: ledger_room})
    cfg = yaml.safe_load(enclave.config.read_text())
    jsonl = tmp_path / "enclave" / "audit" / "audit.jsonl"
    cfg["audit"] = {"poll_seconds": 0.5, "stream": [
        {"name": "tcp", "type": "syslog", "transport": "tcp",
         "address": f"127.0.0.1:{rsyslog.tcp_port}", "facility": "local3",
         "hostname": "enclave-test", "batch_size": 7},
        {"name": "udp", "type": "syslog", "transport": "udp",
         "address": f"127.0.0.1:{rsyslog.udp_port}", "batch_size": 7},
        {"name": "unix", "type": "syslog", "transport": "unix",
         "path": str(rsyslog.socket_path), "batch_size": 7},
        {"name": "file", "type": "jsonl", "path": "audit/audit.jsonl", "batch_size": 7},
    ]}
    enclave.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    producer = Producer(database, enclave.config.parent)

    alice = f"alice{random.randrange(10**6)}"
    stack.synapse.register_user(alice, "pw-" + alice)
    alice_id = f"@{alice}:{stack.server_name}"
    room = (await stack.hs("POST", "/_matrix/client/v3/createRoom",
                           {"preset": "private_chat", "name": "audited"},
                           as_user=alice_id))["room_id"]
    sent = 0

    async def say(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            await stack.hs("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/"
                                  f"m{sent}", {"msgtype": "m.text", "body": f"msg {sent}"},
                           as_user=alice_id)
            sent += 1

    await enclave.start()
    await stack.wait_as_up()
    await asyncio.to_thread(producer.write, 150)  # written before Enclave reads: a backlog
    await say(10)

    def received() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {name: [] for name in SINKS}
        for line in rsyslog.lines():
            m = SD_ID_RE.match(line.structured_data)
            assert m, line
            name = {"imtcp": "tcp", "imudp": "udp", "imuxsock": "unix"}[line.input]
            out[name].append(int(m.group(1)))
        out["file"] = [json.loads(x)["id"] for x in jsonl.read_text().splitlines()] \
            if jsonl.exists() else []
        return out

    # SIGKILL in the middle of the stream: a burst bigger than the sinks take in a moment
    # (batches of 7, each fsynced to the file and its cursor committed)
    await say(2)
    before = len(await asyncio.to_thread(producer.audit_ids))
    await asyncio.to_thread(producer.write, 2000)
    for _ in range(200):
        if len(received()["file"]) > before:
            break
        await asyncio.sleep(0.02)
    total = len(await asyncio.to_thread(producer.audit_ids))
    assert any(len(v) < total for v in received().values()), \
        "the stream had already caught up: the kill would not be mid-stream"
    await enclave.kill()
    killed_at = received()
    await asyncio.to_thread(producer.write, 60)  # while Enclave is down
    await enclave.start()
    await stack.wait_as_up()
    await say(5)
    await asyncio.to_thread(producer.write, 30)
    await enclave.wait_idle(min_applied=sent, within=120)

    expected: list[int] = []

    async def complete() -> bool:
        nonlocal expected
        expected = await asyncio.to_thread(producer.audit_ids)
        got = received()
        return all(set(expected) <= set(got[name]) for name in (*SINKS, "file"))

    with contextlib.suppress(AssertionError):
        for _ in range(600):
            if await complete():
                break
            await asyncio.sleep(0.2)
    got = received()
    for name in (*SINKS, "file"):
        missing = sorted(set(expected) - set(got[name]))
        assert not missing, f"{name}: {len(missing)} audit ids never arrived: {missing[:20]}"
        # at least once, in order: the first copy of every record in audit id order
        assert first_occurrences(got[name]) == sorted(set(got[name])), name
        assert set(got[name]) == set(expected), f"{name}: ids that are not audit records"
    # /ready shows each sink caught up (a sink's cursor moves just after its send)
    caught_up: list[tuple[str, bool, Any]] = []
    for _ in range(300):
        _, ready = await enclave.get_json("/ready")
        caught_up = [(x["sink"], (x["cursor"] or 0) >= max(expected), x["error"])
                     for x in ready["audit_stream"]]
        if all(ok for _, ok, _ in caught_up):
            break
        await asyncio.sleep(0.1)
    assert caught_up == [(name, True, None) for name in (*SINKS, "file")]
    # Enclave's own records (the ledger actions) are among them
    assert len(expected) >= producer.written + sent
    # what each sink had at the kill is a prefix of what it has now (nothing re-ordered)
    for name, ids in killed_at.items():
        assert got[name][:len(ids)] == ids, name

    # the messages as rsyslog parsed them: RFC 5424 header, structured data, JSON
    lines = [x for x in rsyslog.lines() if x.input == "imtcp"]
    tricky = next(x for x in lines if x.msgid == "test.producer")
    assert tricky.pri == 19 * 8 + 5  # local3.notice
    assert tricky.app_name == "enclave"
    assert 'rule="rule \\"quoted\\" \\\\ back\\]slash"' in tricky.structured_data
    assert 'user="@zoë:corp.test"' in tricky.structured_data
    body = json.loads(tricky.msg.encode().removeprefix(BOM).decode())
    assert tricky.msg.startswith(BOM.decode())  # non-ASCII MSG: UTF-8 with the BOM
    assert body["rule_id"] == TRICKY_RULE and body["reason"].startswith("Zoë's record")
    own = [x for x in lines if x.msgid != "test.producer"]
    assert own, "no record of Enclave's own actions reached rsyslog"
    file_rows = {json.loads(x)["id"]: json.loads(x) for x in jsonl.read_text().splitlines()}
    assert file_rows[int(SD_ID_RE.match(tricky.structured_data).group(1))] == body  # type: ignore[union-attr]


async def test_a_restarted_rsyslog_gets_what_was_written_while_it_was_down(
        rsyslog: RsyslogServer, tmp_path: Path) -> None:
    """rsyslogd stopped while the stream is idle: the TCP sink notices the closed
    connection before its next batch, retries with backoff while rsyslog is down, and
    sends everything once it is back (same port)."""
    import time

    from bridge.auditstream.service import AuditStreamer
    from bridge.config.audit import AuditConfig
    from bridge.metrics import Metrics
    from bridge.store import AuditRecord, open_stores

    stores = open_stores("sqlite:///enclave.db", base_dir=tmp_path)
    await stores.database.open()
    await stores.database.migrate()
    cfg = AuditConfig.model_validate({"poll_seconds": 0.2, "stream": [
        {"name": "tcp", "type": "syslog", "address": f"127.0.0.1:{rsyslog.tcp_port}"}]})
    metrics = Metrics()
    streamer = AuditStreamer(cfg, stores.audit_feed, stores.kv, metrics,
                             lambda: int(time.time() * 1000), tmp_path)
    task = asyncio.create_task(streamer.run())

    def ids() -> list[int]:
        return [int(m.group(1)) for x in rsyslog.lines()
                if (m := SD_ID_RE.match(x.structured_data))]

    async def until(cond: Callable[[], bool], what: str) -> None:
        for _ in range(600):
            if cond():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out: {what}; rsyslog has {ids()}")

    async def write(n: int) -> None:
        for i in range(n):
            await stores.audit.add_audit(AuditRecord(ts=1000 + i, source="test",
                                                     kind="restart", outcome="applied"))

    try:
        await write(5)
        await until(lambda: ids() == [1, 2, 3, 4, 5], "the first five")
        rsyslog.stop()
        await asyncio.sleep(0.5)  # its FIN reaches the idle connection
        await write(5)  # ids 6-10 while rsyslog is down
        await until(lambda: streamer.streamers[0].last_error is not None, "a failed send")
        rsyslog.start()
        await write(2)
        await until(lambda: set(range(1, 13)) <= set(ids()), "every record")
        # rsyslog may have them before the sink's step has committed its cursor
        await until(lambda: streamer.streamers[0].last_error is None, "the error cleared")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stores.database.close()
    assert first_occurrences(ids()) == list(range(1, 13))
    assert streamer.status()[0]["cursor"] == 12


async def test_tls_to_rsyslog_and_a_certificate_it_cannot_verify(tmp_path: Path) -> None:
    """TCP with TLS to rsyslog's OpenSSL input: delivered with the right CA; with a CA that
    did not sign the server's certificate nothing is sent and the sink reports why."""
    import time

    from bridge.auditstream.service import AuditStreamer
    from bridge.config.audit import AuditConfig
    from bridge.metrics import Metrics
    from bridge.store import AuditRecord, open_stores
    from devstack.rsyslog import tls_available

    if not tls_available():
        pytest.skip("rsyslog's OpenSSL driver (rsyslog-openssl) is not installed")
    server = RsyslogServer(tmp_path / "rsyslog", tls=True)
    server.start()
    other = RsyslogServer(tmp_path / "other", tls=True)
    other._make_cert()  # a certificate of another CA, never used by the server
    stores = open_stores("sqlite:///enclave.db", base_dir=tmp_path)
    await stores.database.open()
    await stores.database.migrate()
    address = f"127.0.0.1:{server.tls_port}"
    cfg = AuditConfig.model_validate({"poll_seconds": 0.2, "stream": [
        {"name": "good", "type": "syslog", "address": address,
         "tls": {"ca_file": str(server.cert_path)}},
        {"name": "wrong-ca", "type": "syslog", "address": address,
         "tls": {"ca_file": str(other.cert_path)}}]})
    streamer = AuditStreamer(cfg, stores.audit_feed, stores.kv, Metrics(),
                             lambda: int(time.time() * 1000), tmp_path)
    task = asyncio.create_task(streamer.run())
    try:
        for i in range(3):
            await stores.audit.add_audit(AuditRecord(ts=1000 + i, source="test",
                                                     kind="tls", outcome="applied"))
        good, wrong = streamer.streamers
        for _ in range(300):
            if (len(server.lines()) >= 3 and good.cursor == 3
                    and wrong.last_error is not None):
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stores.database.close()
        server.stop()
    got = server.lines()
    assert [(x.input, SD_ID_RE.match(x.structured_data).group(1))  # type: ignore[union-attr]
            for x in got] == [("imtcp-tls", "1"), ("imtcp-tls", "2"), ("imtcp-tls", "3")]
    assert good.cursor == 3 and good.last_error is None
    assert wrong.cursor == 0 and wrong.sent == 0
    assert "CERTIFICATE_VERIFY_FAILED" in (wrong.last_error or "")

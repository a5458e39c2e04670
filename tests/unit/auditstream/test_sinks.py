"""The syslog sink's transports on loopback (tests/integration/test_audit_stream.py runs
them against a real rsyslogd): framing per transport, and a TCP server that went away is
noticed before the next batch is written into a dead connection."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from bridge.auditstream.sinks import SyslogSink
from bridge.config.audit import SyslogSinkConfig
from bridge.store.base import AuditEntry, AuditRecord


def entries(*ids: int) -> list[AuditEntry]:
    return [AuditEntry(i, AuditRecord(ts=1, source="t", kind="k", outcome="applied"))
            for i in ids]


def frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        length, _, rest = data.partition(b" ")
        n = int(length)
        out.append(rest[:n])
        data = rest[n:]
    return out


async def test_tcp_octet_counted_and_reconnects_after_the_server_closed() -> None:
    conns: list[bytes] = []
    first_closed = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not conns:
            conns.append(await r.read(65536))
            w.close()  # the server goes away after the first batch
            first_closed.set()
            return
        conns.append(await r.read(65536))
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = SyslogSink(SyslogSinkConfig.model_validate(
        {"name": "t", "type": "syslog", "address": f"127.0.0.1:{port}"}), Path("."))
    await sink.send(entries(1, 2))
    await first_closed.wait()
    await asyncio.sleep(0.1)  # the FIN reaches the client
    await sink.send(entries(3))  # a new connection, not the dead one
    for _ in range(100):
        if len(conns) == 2:
            break
        await asyncio.sleep(0.02)
    await sink.close()
    server.close()
    await server.wait_closed()
    assert [b'id="1"' in f for f in frames(conns[0])] == [True, False]
    assert len(frames(conns[0])) == 2 and b'id="2"' in frames(conns[0])[1]
    assert len(frames(conns[1])) == 1 and b'id="3"' in frames(conns[1])[0]


async def test_unix_datagram_one_message_per_datagram(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    recv.bind(str(path))
    recv.settimeout(5)
    sink = SyslogSink(SyslogSinkConfig.model_validate(
        {"name": "u", "type": "syslog", "transport": "unix", "path": str(path)}), tmp_path)
    try:
        await sink.send(entries(1, 2))
        got = [recv.recv(65536), recv.recv(65536)]
    finally:
        await sink.close()
        recv.close()
    assert [g.startswith(b"<85>1 ") for g in got] == [True, True]
    assert b'id="1"' in got[0] and b'id="2"' in got[1]


async def test_unix_stream_octet_counted(tmp_path: Path) -> None:
    path = tmp_path / "stream.sock"
    got: list[bytes] = []
    done = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = b""
        while len(frames_complete(data)) < 3:
            chunk = await r.read(65536)
            if not chunk:
                break
            data += chunk
        got.extend(frames(data))
        w.close()
        done.set()

    server = await asyncio.start_unix_server(handle, str(path))
    sink = SyslogSink(SyslogSinkConfig.model_validate(
        {"name": "s", "type": "syslog", "transport": "unix_stream", "path": str(path)}),
        tmp_path)
    await sink.send(entries(1, 2))
    await sink.send(entries(3))
    await asyncio.wait_for(done.wait(), 10)
    await sink.close()
    server.close()
    await server.wait_closed()
    assert [next(i for i in (1, 2, 3) if f'id="{i}"'.encode() in g) for g in got] == [1, 2, 3]


def frames_complete(data: bytes) -> list[bytes]:
    """The whole frames at the start of ``data`` (a partial last one left out)."""
    out = []
    while data:
        length, sep, rest = data.partition(b" ")
        if not sep or len(rest) < int(length):
            break
        out.append(rest[:int(length)])
        data = rest[int(length):]
    return out

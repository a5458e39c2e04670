"""Where the audit stream sends records: a syslog server (TCP, UDP, unix socket) or a
JSON-lines file. A sink raises ``OSError`` when a batch may not have gone out; the
streamer then reconnects with backoff and sends the batch again (at least once)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..config.audit import FACILITIES, JsonlSinkConfig, SyslogSinkConfig, SyslogTlsConfig
from ..store.base import AuditEntry
from .syslog import format_rfc5424, octet_counted, record_json


class Sink(Protocol):
    name: str

    async def send(self, entries: Sequence[AuditEntry]) -> None:
        """Hand ``entries`` over, in order; raise ``OSError`` if some may not have gone."""

    async def close(self) -> None: ...


class SyslogSink:
    """RFC 5424 over TCP or a unix stream socket (octet-counted, RFC 6587) or over UDP or
    a unix datagram socket (one message per datagram)."""

    def __init__(self, cfg: SyslogSinkConfig, base_dir: Path):
        self.cfg = cfg
        self.name = cfg.name
        self._facility = FACILITIES[cfg.facility]
        self._hostname = cfg.hostname or socket.gethostname()
        self._procid = str(os.getpid())
        self._path = None if cfg.path is None else (
            cfg.path if cfg.path.is_absolute() else base_dir / cfg.path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sock: socket.socket | None = None
        self._base_dir = base_dir

    def format(self, entry: AuditEntry) -> bytes:
        return format_rfc5424(entry, facility=self._facility, hostname=self._hostname,
                              app_name=self.cfg.app_name, procid=self._procid,
                              max_bytes=self.cfg.max_message_bytes)

    @property
    def _stream(self) -> bool:
        return self.cfg.transport in ("tcp", "unix_stream")

    async def _connect(self) -> None:
        t = self.cfg.transport
        if t == "tcp":
            host, port = self.cfg.host_port
            tls = self.cfg.tls
            # built per connection: a renewed CA file or client certificate is picked up,
            # and a missing one is a failed (retried, reported) send, not a failed start
            ctx = None if tls is None else _client_context(tls, self._base_dir)
            self._reader, self._writer = await asyncio.open_connection(
                host, port, ssl=ctx,
                server_hostname=None if tls is None else (tls.server_name or host))
        elif t == "unix_stream":
            self._reader, self._writer = await asyncio.open_unix_connection(str(self._path))
        else:
            if t == "udp":
                host, port = self.cfg.host_port
                info = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_DGRAM)
                family, _, _, _, addr = info[0]
                sock = socket.socket(family, socket.SOCK_DGRAM)
            else:
                addr = str(self._path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.connect(addr)  # datagram: no handshake, only the peer address
            except OSError:
                sock.close()
                raise
            self._sock = sock

    def _broken(self) -> bool:
        # the server closed or reset the connection since the last batch: what we write
        # now would vanish into a dead socket
        if self._writer is None:
            return True
        return self._writer.is_closing() or (self._reader is not None
                                             and self._reader.at_eof())

    async def send(self, entries: Sequence[AuditEntry]) -> None:
        if self._stream:
            if self._broken():
                await self.close()
                await self._connect()
            assert self._writer is not None
            self._writer.write(b"".join(octet_counted(self.format(e)) for e in entries))
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                await self.close()
                raise
            return
        if self._sock is None:
            await self._connect()
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        try:
            for e in entries:
                await loop.sock_sendall(self._sock, self.format(e))
        except OSError:
            await self.close()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class JsonlSink:
    """Appends one JSON object per record and line, fsynced per batch (so a batch is on
    disk before the cursor moves past it)."""

    def __init__(self, cfg: JsonlSinkConfig, base_dir: Path):
        self.cfg = cfg
        self.name = cfg.name
        self.path = cfg.path if cfg.path.is_absolute() else base_dir / cfg.path
        self._tail_checked = False

    async def send(self, entries: Sequence[AuditEntry]) -> None:
        data = "".join(json.dumps(record_json(e), ensure_ascii=False,
                                  separators=(",", ":")) + "\n" for e in entries).encode()
        await asyncio.to_thread(self._append, data)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            if not self._tail_checked:
                _drop_torn_line(fd)
                self._tail_checked = True
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    async def close(self) -> None:
        return None


def _client_context(tls: SyslogTlsConfig, base_dir: Path) -> ssl.SSLContext:
    """A verifying TLS client context (certificate and host name always checked)."""

    def resolve(p: Path) -> str:
        return str(p if p.is_absolute() else base_dir / p)

    ctx = ssl.create_default_context(
        cafile=resolve(tls.ca_file) if tls.ca_file is not None else None)
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(resolve(tls.cert_file), resolve(tls.key_file))
    return ctx


def _drop_torn_line(fd: int) -> None:
    """Cut a last line without its newline: a batch a killed process was writing (its
    records are sent again, the cursor never moved past them)."""
    size = os.fstat(fd).st_size
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        chunk = os.pread(fd, pos - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            pos = start + nl + 1
            break
        pos = start
    if pos != size:
        os.ftruncate(fd, pos)
        os.fsync(fd)


def build_sink(cfg: SyslogSinkConfig | JsonlSinkConfig, base_dir: Path) -> Sink:
    if isinstance(cfg, SyslogSinkConfig):
        return SyslogSink(cfg, base_dir)
    return JsonlSink(cfg, base_dir)

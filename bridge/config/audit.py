"""The ``audit:`` section: where every audit record is streamed besides the audit table
(docs/operators/audit-streaming.md).

The audit table stays the source of truth; each sink gets every record at least once, in
audit id order, from a cursor kept in the store (a sink added later starts from the first
record still in the table, or from the newest with ``start: end``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .base import StrictModel

# RFC 5424 section 6.2.1 facility names and codes (the keywords of syslog.conf)
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13,
    "console": 14, "solaris-cron": 15, "local0": 16, "local1": 17, "local2": 18,
    "local3": 19, "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}
_PRINTUSASCII = re.compile(r"^[\x21-\x7e]+$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


class _SinkBase(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.\-]{0,63}$",
                      description="Names the sink's cursor in the store: keep it stable")
    start: Literal["beginning", "end"] = Field(
        "beginning", description="Where a sink with no cursor yet starts: the oldest audit "
                                 "record still in the table, or only records written from now")
    batch_size: int = Field(500, ge=1, le=10000)


class SyslogTlsConfig(StrictModel):
    """TLS for syslog over TCP (RFC 5425 uses the same octet-counted framing)."""

    ca_file: Path | None = Field(
        None, strict=False, description="CA bundle that signed the server's certificate "
                                        "(default: the system's)")
    server_name: str | None = Field(
        None, description="Name the certificate must carry (default: the address's host)")
    cert_file: Path | None = Field(None, strict=False,
                                   description="Client certificate, for mutual TLS")
    key_file: Path | None = Field(None, strict=False,
                                  description="Its private key (a file, never inline)")

    @model_validator(mode="after")
    def _pair(self) -> SyslogTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file, or neither")
        return self


class SyslogSinkConfig(_SinkBase):
    """RFC 5424 messages: TCP (octet-counted framing, RFC 6587), UDP (one datagram per
    message) or a unix socket (``unix``: datagram, ``unix_stream``: octet-counted)."""

    type: Literal["syslog"]
    transport: Literal["tcp", "udp", "unix", "unix_stream"] = "tcp"
    address: str | None = Field(None, description="host:port (tcp, udp)")
    path: Path | None = Field(None, strict=False, description="socket path (unix, unix_stream)")
    facility: str = Field("authpriv", description="An RFC 5424 facility keyword")
    hostname: str | None = Field(None, description="HOSTNAME field; default: this machine's")
    app_name: str = "enclave"
    tls: SyslogTlsConfig | None = Field(None, description="TCP only: connect with TLS")
    max_message_bytes: int = Field(
        65000, ge=480, le=1_048_576,
        description="A longer message has its MSG shortened (the JSON's 'detail' first); UDP "
                    "datagrams cannot exceed 65,507 bytes")

    @field_validator("facility")
    @classmethod
    def _facility(cls, v: str) -> str:
        if v not in FACILITIES:
            raise ValueError(f"unknown facility {v!r}; one of {', '.join(FACILITIES)}")
        return v

    @field_validator("hostname", "app_name")
    @classmethod
    def _printusascii(cls, v: str | None) -> str | None:
        if v is not None and (not _PRINTUSASCII.match(v) or len(v) > 255):
            raise ValueError("must be printable US-ASCII without spaces (RFC 5424)")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            m = _HOST_PORT.match(v)
            if not m or not 0 < int(m.group(2)) < 65536:
                raise ValueError("must be host:port, e.g. '127.0.0.1:514' or '[::1]:514'")
        return v

    @model_validator(mode="after")
    def _where(self) -> SyslogSinkConfig:
        if self.transport in ("tcp", "udp"):
            if self.address is None or self.path is not None:
                raise ValueError(f"transport {self.transport} needs 'address' (host:port) "
                                 "and no 'path'")
        elif self.path is None or self.address is not None:
            raise ValueError(f"transport {self.transport} needs 'path' (a socket) and no "
                             "'address'")
        if self.tls is not None and self.transport != "tcp":
            raise ValueError("tls: only for transport tcp")
        if self.transport == "udp" and self.max_message_bytes > 65507:
            raise ValueError("max_message_bytes: a UDP datagram holds at most 65507 bytes")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        assert self.address is not None
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


class JsonlSinkConfig(_SinkBase):
    """One JSON object per line per record, appended and fsynced per batch."""

    type: Literal["jsonl"]
    path: Path = Field(strict=False, description="The file (relative: to the config file)")


SinkConfig = Annotated[SyslogSinkConfig | JsonlSinkConfig, Field(discriminator="type")]


class AuditConfig(StrictModel):
    stream: list[SinkConfig] = Field(
        default_factory=list, description="Where every audit record is also sent")
    poll_seconds: float = Field(
        2.0, gt=0, le=300,
        description="How often the store is read for records written by other processes "
                    "(this process's own records wake the streamer at once)")

    @field_validator("stream")
    @classmethod
    def _unique_names(cls, v: list[SinkConfig]) -> list[SinkConfig]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sink names must be unique (cursor per name): {', '.join(dup)}")
        return v

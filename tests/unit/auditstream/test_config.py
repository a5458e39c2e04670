"""The ``audit:`` section: strict, with errors naming the key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bridge.config.audit import AuditConfig


def parse(stream: list[dict[str, object]]) -> AuditConfig:
    return AuditConfig.model_validate({"stream": stream})


def test_defaults() -> None:
    cfg = parse([{"name": "siem", "type": "syslog", "address": "127.0.0.1:514"}])
    s = cfg.stream[0]
    assert (s.transport, s.facility, s.start, s.batch_size) == ("tcp", "authpriv",
                                                                 "beginning", 500)
    assert s.host_port == ("127.0.0.1", 514)  # type: ignore[union-attr]
    assert AuditConfig().stream == []


@pytest.mark.parametrize(("sink", "error"), [
    ({"name": "s", "type": "syslog"}, "needs 'address'"),
    ({"name": "s", "type": "syslog", "transport": "unix", "address": "a:1"}, "needs 'path'"),
    ({"name": "s", "type": "syslog", "address": "nohost"}, "host:port"),
    ({"name": "s", "type": "syslog", "address": "h:1", "facility": "local9"},
     "unknown facility"),
    ({"name": "s", "type": "syslog", "address": "h:1", "hostname": "a b"}, "US-ASCII"),
    ({"name": "s", "type": "syslog", "transport": "udp", "address": "h:1",
      "max_message_bytes": 70000}, "65507"),
    ({"name": "s", "type": "jsonl"}, "path"),
    ({"name": "s", "type": "syslog", "transport": "udp", "address": "h:1", "tls": {}},
     "only for transport tcp"),
    ({"name": "s", "type": "syslog", "address": "h:1", "tls": {"cert_file": "c.pem"}},
     "both cert_file and key_file"),
    ({"name": "s", "type": "kafka"}, "type"),
    ({"name": "Bad Name", "type": "jsonl", "path": "x"}, "name"),
    ({"name": "s", "type": "jsonl", "path": "x", "colour": "red"}, "colour"),
])
def test_refused(sink: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        parse([sink])


def test_names_unique() -> None:
    with pytest.raises(ValidationError, match="unique"):
        parse([{"name": "a", "type": "jsonl", "path": "x"},
               {"name": "a", "type": "jsonl", "path": "y"}])

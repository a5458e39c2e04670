"""RFC 5424 messages of audit records (bridge/auditstream/syslog.py), table-driven."""

from __future__ import annotations

import json
import re

import pytest

from bridge.auditstream.syslog import (
    BOM,
    format_rfc5424,
    octet_counted,
    printusascii,
    rfc3339,
    sd_escape,
    structured_data,
)
from bridge.store.base import AuditEntry, AuditRecord

TS = 1_765_062_759_123  # 2025-12-06T23:12:39.123Z


def entry(id: int = 7, **kw: object) -> AuditEntry:
    fields: dict[str, object] = dict(ts=TS, source="inbox", kind="kick", outcome="applied")
    fields.update(kw)
    return AuditEntry(id, AuditRecord(**fields))  # type: ignore[arg-type]


def fmt(e: AuditEntry, *, facility: int = 10, max_bytes: int = 65000,
        hostname: str = "host1", procid: str | None = "42") -> bytes:
    return format_rfc5424(e, facility=facility, hostname=hostname, app_name="enclave",
                          procid=procid, max_bytes=max_bytes)


@pytest.mark.parametrize(("value", "escaped"), [
    ("plain", "plain"),
    ('say "hi"', 'say \\"hi\\"'),
    ("back\\slash", "back\\\\slash"),
    ("a]b", "a\\]b"),
    ('\\"]', '\\\\\\"\\]'),
    ("[open", "[open"),  # only ] is special, not [
    ("Zoë 日本", "Zoë 日本"),  # UTF-8 as it is
    ("", ""),
])
def test_sd_param_escaping(value: str, escaped: str) -> None:
    assert sd_escape(value) == escaped


@pytest.mark.parametrize(("params", "expected"), [
    ({}, "[enclave@32473]"),
    ({"id": 1}, '[enclave@32473 id="1"]'),
    ({"id": 1, "user": None, "room": "!r"}, '[enclave@32473 id="1" room="!r"]'),  # nil: left out
    ({"rule": 'a"b]'}, '[enclave@32473 rule="a\\"b\\]"]'),
])
def test_structured_data(params: dict[str, object], expected: str) -> None:
    assert structured_data(params) == expected


@pytest.mark.parametrize(("value", "max_len", "out"), [
    (None, 32, "-"), ("", 32, "-"), ("membership.kick", 32, "membership.kick"),
    ("has space", 32, "has_space"), ("é", 32, "_"), ("x" * 40, 32, "x" * 32),
])
def test_header_fields(value: str | None, max_len: int, out: str) -> None:
    assert printusascii(value, max_len) == out


def test_timestamp_is_utc_with_milliseconds() -> None:
    assert rfc3339(TS) == "2025-12-06T23:12:39.123Z"
    assert rfc3339(5) == "1970-01-01T00:00:00.005Z"


HEADER = re.compile(
    rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) "
    rb"(\[enclave@32473(?: [a-z]+=\"(?:[^\"\\\]]|\\.)*\")*\])"
    rb"(?: (.*))?$", re.S)


@pytest.mark.parametrize(("outcome", "facility", "pri"), [
    ("applied", 10, 10 * 8 + 5),  # authpriv.notice
    ("failed", 10, 10 * 8 + 4),  # authpriv.warning
    ("parked", 16, 16 * 8 + 4),  # local0.warning
    ("skipped", 16, 16 * 8 + 5),
])
def test_priority(outcome: str, facility: int, pri: int) -> None:
    m = HEADER.match(fmt(entry(outcome=outcome), facility=facility))
    assert m is not None and int(m.group(1)) == pri


def test_whole_message() -> None:
    e = entry(12, actor="@admin:corp", user_id="@bob:corp", room_id="!room", rule_id='r"1]',
              reason="because", detail='{"x": 1}')
    msg = fmt(e)
    m = HEADER.match(msg)
    assert m is not None
    assert m.group(2, 3, 4, 5, 6) == (b"2025-12-06T23:12:39.123Z", b"host1", b"enclave", b"42",
                                      b"kick")
    assert m.group(7) == (b'[enclave@32473 id="12" kind="kick" outcome="applied" '
                          b'actor="@admin:corp" user="@bob:corp" room="!room" '
                          b'rule="r\\"1\\]" source="inbox"]')
    body = json.loads(m.group(8))
    assert body == {"id": 12, "time": "2025-12-06T23:12:39.123Z", "ts": TS, "source": "inbox",
                    "actor": "@admin:corp", "kind": "kick", "user_id": "@bob:corp",
                    "room_id": "!room", "rule_id": 'r"1]', "reason": "because",
                    "outcome": "applied", "detail": '{"x": 1}'}


@pytest.mark.parametrize(("reason", "bom"), [
    ("ascii only", False),
    ("Zoë left", True),  # MSG-UTF8 starts with the BOM
    ("日本", True),
])
def test_bom_only_for_non_ascii_msg(reason: str, bom: bool) -> None:
    msg = fmt(entry(reason=reason))
    m = HEADER.match(msg)
    assert m is not None
    assert m.group(8).startswith(BOM) is bom
    assert json.loads(m.group(8).removeprefix(BOM).decode())["reason"] == reason


def test_nil_fields_left_out_of_sd_and_null_in_json() -> None:
    msg = fmt(entry(), procid=None, hostname="")
    m = HEADER.match(msg)
    assert m is not None
    assert m.group(3) == b"-" and m.group(5) == b"-"
    assert m.group(7) == b'[enclave@32473 id="7" kind="kick" outcome="applied" source="inbox"]'
    assert json.loads(m.group(8))["user_id"] is None


def test_long_message_drops_detail_first_then_cuts() -> None:
    e = entry(detail="d" * 5000, reason="r" * 300)
    msg = fmt(e, max_bytes=1000)
    assert len(msg) <= 1000
    body = json.loads(HEADER.match(msg).group(8))  # type: ignore[union-attr]
    assert body["detail"] is None and body["truncated"] is True and body["id"] == 7
    cut = fmt(entry(reason="é" * 2000), max_bytes=600)
    assert len(cut) <= 600
    cut.decode()  # never splits a UTF-8 character


@pytest.mark.parametrize("message", [b"", b"x", b"<13>1 - - - - - -", "é".encode() * 100])
def test_octet_counting(message: bytes) -> None:
    framed = octet_counted(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(message) and rest == message

"""RFC 5424 syslog messages for audit records, and their framing (RFC 6587 octet counting).

Pure: a record and the sink's settings in, bytes out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..kernel.timestamps import utc_datetime
from ..store.base import AuditEntry

# The structured data element every message carries. 32473 is the private enterprise
# number RFC 5612 reserves for documentation and examples; an operator with a PEN of their
# own changes the sink's sd_id.
SD_ID = "enclave@32473"
BOM = b"\xef\xbb\xbf"
NILVALUE = "-"
# severities (RFC 5424 table 2): outcomes that mean something did not happen are warnings
SEV_WARNING, SEV_NOTICE = 4, 5
WARNING_OUTCOMES = frozenset({"failed", "error", "parked", "refused", "unauthorized",
                              "unavailable", "denied", "not_done"})
# SD-PARAM name -> the record's field
SD_PARAMS = (("id", "id"), ("kind", "kind"), ("outcome", "outcome"), ("actor", "actor"),
             ("user", "user_id"), ("room", "room_id"), ("rule", "rule_id"),
             ("source", "source"))


def record_json(entry: AuditEntry) -> dict[str, Any]:
    """The record as one JSON object: the audit id (a consumer dedupes the at-least-once
    resend by it), every column, and the time in RFC 3339."""
    r = entry.record
    return {"id": entry.id, "time": rfc3339(r.ts), "ts": r.ts, "source": r.source,
            "actor": r.actor, "kind": r.kind, "user_id": r.user_id, "room_id": r.room_id,
            "rule_id": r.rule_id, "reason": r.reason, "outcome": r.outcome,
            "detail": r.detail}


def rfc3339(ts_ms: int) -> str:
    """``2026-12-06T23:12:39.123Z`` (UTC, milliseconds: RFC 5424's TIMESTAMP)."""
    return utc_datetime(ts_ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def printusascii(value: str | None, max_len: int) -> str:
    """A header field (HOSTNAME, APP-NAME, PROCID, MSGID): printable US-ASCII without
    spaces, at most ``max_len`` characters; anything else becomes ``_``; empty or None is
    the NILVALUE."""
    if not value:
        return NILVALUE
    out = "".join(c if "\x21" <= c <= "\x7e" else "_" for c in value)[:max_len]
    return out


def sd_escape(value: str) -> str:
    """An SD-PARAM value: ``"``, ``\\`` and ``]`` escaped with a backslash (RFC 5424
    section 6.3.3); any other character, UTF-8 included, as it is."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def structured_data(params: Mapping[str, Any], sd_id: str = SD_ID) -> str:
    """One SD-ELEMENT with the non-None ``params`` (a missing value is left out: RFC 5424
    has no nil parameter value)."""
    parts = [f'{name}="{sd_escape(str(v))}"' for name, v in params.items() if v is not None]
    return "[" + " ".join([sd_id, *parts]) + "]"


def severity(outcome: str) -> int:
    return SEV_WARNING if outcome in WARNING_OUTCOMES else SEV_NOTICE


def format_rfc5424(entry: AuditEntry, *, facility: int, hostname: str, app_name: str,
                   procid: str | None, max_bytes: int, sd_id: str = SD_ID) -> bytes:
    """One RFC 5424 message for an audit record.

    PRI from ``facility`` and the outcome (warning for failures, notice otherwise),
    TIMESTAMP the record's time, MSGID its kind, one SD-ELEMENT with the record's id,
    kind, outcome, actor, user, room, rule and source, and the whole record as JSON in MSG
    (UTF-8 with the BOM when it is not plain ASCII: RFC 5424 section 6.4). A message longer
    than ``max_bytes`` drops the record's ``detail`` (``"truncated": true`` says so), then
    cuts the JSON.
    """
    r = entry.record
    fields = {"id": entry.id, **{k: getattr(r, f) for k, f in SD_PARAMS[1:]}}
    header = (f"<{facility * 8 + severity(r.outcome)}>1 {rfc3339(r.ts)} "
              f"{printusascii(hostname, 255)} {printusascii(app_name, 48)} "
              f"{printusascii(procid, 128)} {printusascii(r.kind, 32)} "
              f"{structured_data(fields, sd_id)}").encode()
    body = record_json(entry)
    msg = _msg(body)
    if len(header) + 1 + len(msg) > max_bytes and body["detail"] is not None:
        body["detail"], body["truncated"] = None, True
        msg = _msg(body)
    room = max_bytes - len(header) - 1
    if len(msg) > room:
        msg = msg[:max(room, 0)]
        msg = msg[:len(msg.decode("utf-8", "ignore").encode())]  # no split character
    return header + b" " + msg if msg else header


def _msg(body: Mapping[str, Any]) -> bytes:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    raw = text.encode()
    return raw if text.isascii() else BOM + raw


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 section 3.4.1 framing for a stream transport: ``LEN SP MSG``."""
    return str(len(message)).encode() + b" " + message

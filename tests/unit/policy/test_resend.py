"""decide_resend / read_back_done: is an action whose answer was lost already in the room?"""

from __future__ import annotations

from typing import Any

import pytest

from bridge.policy.resend import ACTION_KEY, decide_resend, read_back_done

BOT = "@enclave:corp.example.com"


def ev(key: Any = "k1", *, sender: str = BOT, type_: str = "m.notice", eid: Any = "$a",
       ts: int = 1000) -> dict[str, Any]:
    return {"type": type_, "sender": sender, "event_id": eid, "origin_server_ts": ts,
            "content": {"body": "x", ACTION_KEY: key}}


@pytest.mark.parametrize(
    ("events", "resend", "event_id", "rule"),
    [
        ([], True, None, "resend.not_found"),
        ([ev()], False, "$a", "resend.already_applied"),
        ([ev("k2"), ev(eid="$b")], False, "$b", "resend.already_applied"),
        ([ev(sender="@mallory:corp.example.com")], True, None, "resend.not_found"),
        ([ev(type_="m.room.message")], True, None, "resend.not_found"),
        ([ev(key=None)], True, None, "resend.not_found"),
        ([ev(eid=None)], True, None, "resend.not_found"),
        ([{"type": "m.notice", "sender": BOT, "event_id": "$c", "content": "redacted"}],
         True, None, "resend.not_found"),
        ([{"type": "m.notice", "sender": BOT, "event_id": "$c"}], True, None,
         "resend.not_found"),
    ],
    ids=["empty", "found", "found-among-others", "other-sender", "other-type", "no-key",
         "no-event-id", "content-not-object", "no-content"],
)
def test_decide_resend(events: list[dict[str, Any]], resend: bool, event_id: str | None,
                       rule: str) -> None:
    d = decide_resend(events, key="k1", sender=BOT, event_type="m.notice")
    assert (d.resend, d.event_id, d.rule_id) == (resend, event_id, rule)
    assert d.reason


@pytest.mark.parametrize(
    ("timestamps", "since", "done"),
    [([], 5000, False), ([9000, 8000], None, False), ([9000, 8000], 5000, False),
     ([9000, 3999], 5000, True), ([4500], 5000, False)],
    ids=["empty-page", "since-unknown", "all-newer", "reached-older", "within-skew"],
)
def test_read_back_done(timestamps: list[int], since: int | None, done: bool) -> None:
    events = [ev(ts=t) for t in timestamps]
    assert read_back_done(events, since_ts=since, skew_ms=1000) is done

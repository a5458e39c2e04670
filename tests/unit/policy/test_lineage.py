"""The lineage of a message (bridge.policy.lineage): original, valid and rejected edits,
the redaction; as a table."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.policy.lineage import message_lineage

A, B, MOD = "@a:x", "@b:x", "@mod:x"


def msg(eid: str, sender: str = A, body: str = "hi", ts: int = 1, **extra: Any
        ) -> dict[str, Any]:
    return {"type": "m.room.message", "sender": sender, "event_id": eid,
            "origin_server_ts": ts, "content": {"msgtype": "m.text", "body": body, **extra}}


def edit(eid: str, target: str, body: str, sender: str = A, ts: int = 2,
         new: bool = True, type_: str = "m.room.message") -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": "m.text", "body": f"* {body}",
                               "m.relates_to": {"rel_type": "m.replace", "event_id": target}}
    if new:
        content["m.new_content"] = {"msgtype": "m.text", "body": body}
    return {"type": type_, "sender": sender, "event_id": eid, "origin_server_ts": ts,
            "content": content}


def redact(eid: str, target: str, by: str = MOD, reason: str | None = "spam",
           ts: int = 9) -> dict[str, Any]:
    content = {"redacts": target, **({"reason": reason} if reason else {})}
    return {"type": "m.room.redaction", "sender": by, "event_id": eid, "origin_server_ts": ts,
            "redacts": target, "content": content}


# (case, events, original id, valid edit ids, rejected (id, why), redaction (by, reason))
CASES: list[tuple[str, list[dict[str, Any]], str, list[str], list[tuple[str, str]],
                  tuple[str, str | None] | None]] = [
    ("plain message", [msg("$o")], "$o", [], [], None),
    ("two edits by the sender, in order",
     [msg("$o"), edit("$e1", "$o", "one"), edit("$e2", "$o", "two", ts=3)],
     "$o", ["$e1", "$e2"], [], None),
    ("an edit by someone else is rejected",
     [msg("$o"), edit("$f", "$o", "forged", sender=B)],
     "$o", [], [("$f", "not sent by the original sender")], None),
    ("an edit without m.new_content is rejected",
     [msg("$o"), edit("$e", "$o", "x", new=False)],
     "$o", [], [("$e", "no m.new_content")], None),
    ("an edit of another type is rejected",
     [msg("$o"), edit("$e", "$o", "x", type_="m.sticker")],
     "$o", [], [("$e", "not the original's event type")], None),
    ("redacted by a moderator, with reason",
     [msg("$o"), redact("$r", "$o")], "$o", [], [], (MOD, "spam")),
    ("the first redaction counts",
     [msg("$o"), redact("$r1", "$o", by=A, reason=None), redact("$r2", "$o")],
     "$o", [], [], (A, None)),
    ("edited twice then redacted",
     [msg("$o"), edit("$e1", "$o", "one"), edit("$e2", "$o", "two"), redact("$r", "$o")],
     "$o", ["$e1", "$e2"], [], (MOD, "spam")),
]


@pytest.mark.parametrize("case,events,oid,edits,rejected,redaction", CASES,
                         ids=[c[0] for c in CASES])
def test_lineage(case: str, events: list[dict[str, Any]], oid: str, edits: list[str],
                 rejected: list[tuple[str, str]],
                 redaction: tuple[str, str | None] | None) -> None:
    lin = message_lineage(events)[oid]
    assert lin.original.event_id == oid and lin.original.content["body"] == "hi"
    assert [v.event_id for v in lin.edits] == edits, case
    assert [(v.event_id, v.rejected) for v in lin.rejected_edits] == rejected, case
    got = None if lin.redaction is None else (lin.redaction.by, lin.redaction.reason)
    assert got == redaction, case


def test_edit_content_is_the_new_content_and_current_skips_redacted_edits() -> None:
    events = [msg("$o"), edit("$e1", "$o", "one"), edit("$e2", "$o", "two"),
              redact("$r", "$e2", by=A)]
    lin = message_lineage(events)["$o"]
    assert [v.content["body"] for v in lin.edits] == ["one", "two"]
    assert lin.edits[1].redaction is not None and lin.edits[1].redaction.by == A
    assert lin.current.event_id == "$e1"
    assert lin.redaction is None


def test_edits_and_redactions_have_no_lineage_of_their_own() -> None:
    events = [msg("$o"), edit("$e", "$o", "x"), redact("$r", "$o"),
              edit("$ee", "$e", "edit of an edit"), edit("$lost", "$nowhere", "x"),
              {"type": "m.room.name", "state_key": "", "event_id": "$n", "content": {}}]
    got = message_lineage(events)
    assert set(got) == {"$o"}


def test_archived_redacted_copy_is_flagged() -> None:
    gone = {**msg("$o"), "content": {}, "unsigned": {"redacted_because": {"sender": MOD}}}
    assert message_lineage([gone])["$o"].archived_redacted is True
    assert message_lineage([msg("$o")])["$o"].archived_redacted is False

"""The export's readers, lineage, CSV and subject bundle: the pure helpers, then a whole
export of a real LocalArchive (files on disk, the store on SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import email
import io
from email import policy as email_policy
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.policy.lineage import message_lineage
from bridge.policy.readers import replay_readers
from bridge.retention.archive import LocalArchive
from bridge.retention.export import (
    CSV_COLUMNS,
    ExportRequest,
    csv_rows,
    export_archive,
    export_record,
    render_csv,
    render_eml,
)
from bridge.retention.transcript import render_html
from bridge.store import Stores

ROOM = "!room:corp.example.com"
A, B, C, MOD = ("@alice:corp.example.com", "@bob:corp.example.com", "@carol:corp.example.com",
                "@mod:corp.example.com")
T0 = 1_714_560_000_000


def _e(eid: str, sender: str, content: dict[str, Any], type_: str = "m.room.message",
       n: int = 0, **extra: Any) -> dict[str, Any]:
    return {"event_id": eid, "room_id": ROOM, "sender": sender, "type": type_,
            "origin_server_ts": T0 + n, "content": content, **extra}


def member(user: str, membership: str, n: int, by: str | None = None) -> dict[str, Any]:
    return _e(f"$m{n}", by or user, {"membership": membership}, "m.room.member", n,
              state_key=user)


def text(eid: str, sender: str, body: str, n: int, **content: Any) -> dict[str, Any]:
    return _e(eid, sender, {"msgtype": "m.text", "body": body, **content}, n=n)


def edit(eid: str, target: str, body: str, n: int, sender: str = A) -> dict[str, Any]:
    return text(eid, sender, f"* {body}", n, **{
        "m.new_content": {"msgtype": "m.text", "body": body},
        "m.relates_to": {"rel_type": "m.replace", "event_id": target}})


def room() -> list[dict[str, Any]]:
    return [
        _e("$create", A, {"room_version": "12"}, "m.room.create", 0, state_key=""),
        member(A, "join", 1),
        _e("$vis", A, {"history_visibility": "shared"}, "m.room.history_visibility", 2,
           state_key=""),
        member(B, "join", 3),
        text("$1", A, "=HYPERLINK(\"http://evil\")", 4),
        member(C, "invite", 5, by=A),
        text("$2", B, "second, with \"quotes\", commas\nand a newline", 6),
        edit("$2e", "$2", "forged", 7, sender=A),
        member(B, "leave", 8),
        _e("$vis2", A, {"history_visibility": "joined"}, "m.room.history_visibility", 9,
           state_key=""),
        text("$3", A, "typo", 10),
        edit("$3a", "$3", "first fix", 11),
        edit("$3b", "$3", "final fix", 12),
        text("$4", A, "oops", 13),
        member(MOD, "join", 14),
        _e("$r", MOD, {"redacts": "$4", "reason": "leak"}, "m.room.redaction", 15,
           redacts="$4"),
        member(C, "join", 16),
    ]


def test_export_record_readers_and_lineage() -> None:
    events = room()
    by_id = {e["event_id"]: e for e in events}
    readers, lineages = replay_readers(events), message_lineage(events)
    rec = {e["event_id"]: export_record(e, "Room", readers, lineages, by_id) for e in events}
    assert rec["$1"]["readers"] == {"history_visibility": "shared", "joined": [A, B],
                                    "invited": [], "could_read": [A, B], "anyone": False}
    assert rec["$1"]["could_read_later"] == [C, MOD] and rec["$1"]["room_name"] == "Room"
    assert rec["$3"]["readers"]["could_read"] == [A] and rec["$3"]["could_read_later"] == []
    lin = rec["$3"]["lineage"]
    assert lin["original"]["body"] == "typo"
    assert [x["body"] for x in lin["edits"]] == ["first fix", "final fix"]
    assert lin["current_body"] == "final fix" and lin["redaction"] is None
    assert rec["$2"]["lineage"]["rejected_edits"][0]["rejected"] == \
        "not sent by the original sender"
    assert rec["$2e"]["lineage"] == {"edit_of": "$2", "rejected":
                                     "not sent by the original sender",
                                     "original_archived": True}
    red = rec["$4"]["lineage"]["redaction"]
    assert (red["by"], red["reason"]) == (MOD, "leak")
    assert rec["$4"]["lineage"]["original"]["body"] == "oops"  # the archive keeps it
    assert rec["$4"]["lineage"]["current_body"] is None
    assert rec["$r"]["lineage"] == {"redacts": "$4"}
    # state events stay exactly as archived
    assert rec["$m1"] == by_id["$m1"]


def test_csv_round_trip() -> None:
    events = room()
    by_id = {e["event_id"]: e for e in events}
    rows = csv_rows(ROOM, "=Room", events, replay_readers(events), message_lineage(events),
                    by_id, {})
    back = list(csv.DictReader(io.StringIO(render_csv(rows).decode(), newline="")))
    assert tuple(back[0]) == CSV_COLUMNS
    assert [r["event_id"] for r in back] == ["$1", "$2", "$3", "$4"]  # edits are columns
    one, two, three, four = back
    assert one["body"] == "'=HYPERLINK(\"http://evil\")" and one["room_name"] == "'=Room"
    assert one["sender"] == A and one["readers_count"] == "2"
    assert one["readers"] == f"'{A}; {B}" and one["could_read_later"] == f"'{C}; {MOD}"
    assert two["body"] == "second, with \"quotes\", commas\nand a newline"
    assert (two["edits"], two["rejected_edits"]) == ("0", "1")
    assert (three["current_body"], three["edits"], three["history_visibility"]) == (
        "final fix", "2", "joined")
    assert (four["redacted_by"], four["redaction_reason"], four["current_body"]) == (
        MOD, "leak", "")


def test_eml_and_html_carry_readers_and_edits() -> None:
    events = room()
    by_id = {e["event_id"]: e for e in events}
    readers, lineages = replay_readers(events), message_lineage(events)
    mail = email.message_from_bytes(render_eml(
        ROOM, "Room", by_id["$3"], {}, None, readers=readers["$3"],
        edits=[by_id[v.event_id] for v in lineages["$3"].edits]), policy=email_policy.default)
    assert mail["X-Matrix-History-Visibility"] == "joined"
    assert mail["X-Matrix-Readers"] == A and mail["X-Matrix-Readers-Count"] == "1"
    assert mail["X-Matrix-Edits"] == "2"
    body = mail.get_content()
    assert "typo" in body and "edited to: first fix" in body and "edited to: final fix" in body
    page = render_html(ROOM, "Room", events, {}, {}, readers=readers)
    assert "2 people could read this when it was sent (history visibility shared)" in page
    assert "joined later (could read it):" in page
    # the deleted message keeps its readers, and an edited-then-shown message its history
    assert "1 person could read this when it was sent (history visibility joined)" in page


async def test_whole_export_with_csv_and_subject_bundle(tmp_path: Path, store: Stores) -> None:
    archive = LocalArchive(tmp_path / "archive", store.archive, clock_ms=lambda: T0)
    await archive.append(ROOM, room())
    other = "!other:corp.example.com"
    await archive.append(other, [
        {**member(A, "join", 1), "room_id": other, "event_id": "$o1"},
        {**text("$o2", A, "elsewhere", 2), "room_id": other},
        {**text("$o3", B, "not alice", 3), "room_id": other}])
    out = tmp_path / "out"
    report = await export_archive(
        archive, store.archive, store.holds, store.directory, out,
        ExportRequest(users=(A,), formats=frozenset({"jsonl", "csv", "html"})),
        clock_ms=lambda: T0)
    lines = [orjson.loads(x) for x in (out / "events.jsonl").read_bytes().splitlines()]
    assert {x["sender"] for x in lines} == {A}
    by = {x["event_id"]: x for x in lines}
    # the readers come from the whole room (Bob's join is not in the selection)
    assert by["$1"]["readers"]["joined"] == [A, B]
    # the redaction by the moderator (outside the selection) is on Alice's message
    assert by["$4"]["lineage"]["redaction"]["by"] == MOD
    assert by["$o2"]["room_name"] is None
    rows = list(csv.DictReader(io.StringIO((out / "messages.csv").read_text(), newline="")))
    assert sorted(r["event_id"] for r in rows) == ["$1", "$3", "$4", "$o2"]
    subject = orjson.loads((out / "subject.json").read_bytes())
    assert subject["users"] == [A]
    assert {r["room_id"]: r["messages"] for r in subject["rooms"]} == {ROOM: 3, other: 1}
    assert "messages.csv" in report.files and "subject.json" in report.files


async def test_unknown_format_refused(tmp_path: Path, store: Stores) -> None:
    archive = LocalArchive(tmp_path / "archive", store.archive, clock_ms=lambda: T0)
    with pytest.raises(ValueError, match="unknown export formats"):
        await export_archive(archive, store.archive, store.holds, store.directory,
                             tmp_path / "o", ExportRequest(formats=frozenset({"xls"})),
                             clock_ms=lambda: T0)


def test_big_rooms_list_a_bounded_number_of_readers_in_html_and_eml() -> None:
    people = [f"@p{i:04d}:corp.example.com" for i in range(300)]
    events = [member(u, "join", i) for i, u in enumerate(people)]
    events.append(text("$big", people[0], "to everyone", 1000))
    readers = replay_readers(events)
    assert len(readers["$big"].could_read) == 300
    page = render_html(ROOM, "Big", events, {}, {}, readers=readers)
    assert "300 people could read this" in page and "and 250 more (see events.jsonl)" in page
    assert people[49] in page and people[299] not in page.split("could read this")[1]
    mail = email.message_from_bytes(render_eml(ROOM, "Big", events[-1], {}, None,
                                               readers=readers["$big"]),
                                    policy=email_policy.default)
    assert mail["X-Matrix-Readers-Count"] == "300"
    assert mail["X-Matrix-Readers"].endswith("and 200 more (see events.jsonl)")


async def test_a_deleted_encrypted_message_is_deleted_in_its_plaintext_and_counted_once(
        tmp_path: Path, store: Stores) -> None:
    from bridge.retention.events import decrypted_record

    archive = LocalArchive(tmp_path / "archive", store.archive, clock_ms=lambda: T0)
    cipher = _e("$enc", A, {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x"},
                "m.room.encrypted", 5)
    record = decrypted_record(ROOM, cipher, {"type": "m.room.message", "content": {
        "msgtype": "m.text", "body": "the secret plan"}}, by="@enclave_archive:x",
        device="D", at_ms=T0 + 6)
    # the moderator deletes the message: the redaction names the ciphertext event
    gone = _e("$red", MOD, {"redacts": "$enc", "reason": "oops"}, "m.room.redaction", 7,
              redacts="$enc")
    await archive.append(ROOM, [*room(), cipher, record, gone])
    out = tmp_path / "out"
    await export_archive(archive, store.archive, store.holds, store.directory, out,
                         ExportRequest(users=(A,), formats=frozenset({"jsonl", "html", "eml"})),
                         clock_ms=lambda: T0)
    by = {x["event_id"]: x for x in map(orjson.loads,
                                         (out / "events.jsonl").read_bytes().splitlines())}
    # the plaintext of the deleted message is shown as deleted, by whom, like its ciphertext
    assert by["$enc#decrypted"]["lineage"]["redaction"]["by"] == MOD
    assert by["$enc"]["lineage"]["redaction"]["by"] == MOD
    page = next(out.glob("rooms/*/transcript.html")).read_text()
    assert page.count(">message deleted by ") == 3  # $4 (Alice's), the ciphertext, its plaintext
    emls = [email.message_from_bytes(p.read_bytes(), policy=email_policy.default)
            for p in out.glob("rooms/*/eml/*.eml")]
    plain = next(m for m in emls if "the secret plan" in m.get_content())
    assert "deleted" in plain.get_content().lower()
    # one message sent, one counted (the ciphertext and its plaintext are the same message)
    subject = orjson.loads((out / "subject.json").read_bytes())
    assert {r["room_id"]: r["messages"] for r in subject["rooms"]} == {ROOM: 4}

"""Who could read each message, and what it was before an edit, end to end: a real Synapse,
Enclave archiving everything it is sent, matrix-nio clients as staff, and ``enclave export``.

In one room people join, leave, are invited, kicked and banned, the history visibility goes
from ``shared`` to ``joined`` and back, a message is edited twice (and one edit is forged
by someone else), one is redacted by a moderator. The export's ``readers`` of every message
are compared with the homeserver's own state at that event (the admin context API): the
server is the oracle, not Enclave's replay; so is its visibility filter (who may fetch each
event now, as each of the seven people). Then the lineage, the CSV parsed back, the
``--user`` subject-access bundle across two rooms with its media, and the audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import email
import email.policy
import io
import json
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .directory_helpers import ensure_enclave_admin
from .harness import EnclaveProcess, Stack, nio, wait_until

pytestmark = pytest.mark.integration

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a5f9d5"
    "6f0000000049454e44ae426082")
NAMES = ("alice", "mod", "bob", "carol", "dave", "erin", "frank")


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


@dataclass
class Setup:
    stack: Stack
    enclave: EnclaveProcess
    config: Path
    base: Path
    people: dict[str, nio.AsyncClient] = field(default_factory=dict)

    def uid(self, name: str) -> str:
        return self.people[name].user_id


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("export-readers")
    stack = Stack.create(base / "stack")
    enclave: EnclaveProcess | None = None
    try:
        ensure_enclave_admin(stack)
        config = base / "enclave" / "config.yaml"
        stack.write_enclave_config(config)
        cfg = yaml.safe_load(config.read_text())
        # nothing is due during the test: the archive and the export are what is tested
        cfg["retention"] = {"enabled": True, "default": {"keep": "30d"},
                            "archive": {"path": str(base / "archive")},
                            "purge": {"interval_minutes": 0},
                            "visibility": {"set_state": False, "notice": "none"}}
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        enclave = EnclaveProcess(config, stack.as_port)
        yield Setup(stack=stack, enclave=enclave, config=config, base=base)
    finally:
        if enclave is not None:
            enclave.cleanup()
        stack.stop()


@pytest.fixture
async def s(setup: Setup) -> AsyncIterator[Setup]:
    if not setup.enclave.running:
        await setup.enclave.start()
    for name in NAMES:
        if name not in setup.people:
            setup.people[name] = await setup.stack.new_staff(name)
    yield setup
    for c in setup.people.values():
        with contextlib.suppress(Exception):
            await c.close()
    setup.people.clear()


def ok(resp: Any, kind: type) -> Any:
    assert isinstance(resp, kind), resp
    return resp


async def say(s: Setup, who: str, room: str, body: str, **extra: Any) -> str:
    resp = await s.people[who].room_send(room, "m.room.message",
                                         {"msgtype": "m.text", "body": body, **extra})
    return ok(resp, nio.RoomSendResponse).event_id


async def edit(s: Setup, who: str, room: str, target: str, body: str) -> str:
    return await say(s, who, room, f"* {body}", **{
        "m.new_content": {"msgtype": "m.text", "body": body},
        "m.relates_to": {"rel_type": "m.replace", "event_id": target}})


async def visibility(s: Setup, room: str, value: str) -> None:
    ok(await s.people["alice"].room_put_state(
        room, "m.room.history_visibility", {"history_visibility": value}),
        nio.RoomPutStateResponse)


async def invite(s: Setup, room: str, name: str) -> None:
    ok(await s.people["alice"].room_invite(room, s.uid(name)), nio.RoomInviteResponse)


async def join(s: Setup, room: str, name: str) -> None:
    ok(await s.people[name].join(room), nio.JoinResponse)


def archived_ids(s: Setup, room: str) -> set[str]:
    con = sqlite3.connect(f"file:{s.config.parent / 'enclave.db'}?mode=ro", uri=True,
                          timeout=10)
    try:
        return {r[0] for r in con.execute(
            "SELECT event_id FROM archive_events WHERE room_id = ?", (room,))}
    finally:
        con.close()


async def state_at(s: Setup, room: str, event_id: str) -> tuple[str, set[str], set[str]]:
    """The homeserver's answer: (history visibility, joined, invited) at the event."""
    body = await s.stack.hs("GET", f"/_synapse/admin/v1/rooms/{q(room)}/context/"
                                   f"{q(event_id)}?limit=0")
    vis = "shared"
    joined: set[str] = set()
    invited: set[str] = set()
    for ev in body["state"]:
        if ev["type"] == "m.room.history_visibility":
            vis = ev["content"].get("history_visibility", "shared")
        elif ev["type"] == "m.room.member":
            m = ev["content"].get("membership")
            (joined if m == "join" else invited if m == "invite" else set()).add(
                ev["state_key"])
    return vis, joined, invited


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]


async def test_readers_and_lineage_match_the_homeserver(s: Setup) -> None:
    alice = s.people["alice"]
    resp = ok(await alice.room_create(
        name="Readers room", invite=[s.uid("mod")],
        power_level_override={"users": {s.uid("mod"): 50}}), nio.RoomCreateResponse)
    room = resp.room_id
    await join(s, room, "mod")
    m: dict[str, str] = {}
    m["m1"] = await say(s, "alice", room, "hello, shared history")  # private_chat: shared
    await invite(s, room, "bob")
    m["m2"] = await say(s, "alice", room, "=1+2 looks like a formula")
    await join(s, room, "bob")
    m["m3"] = await say(s, "bob", room, "bob here")
    await visibility(s, room, "joined")
    await invite(s, room, "carol")
    m["m4"] = await say(s, "alice", room, "teh typo")
    await join(s, room, "carol")
    ok(await s.people["bob"].room_leave(room), nio.RoomLeaveResponse)
    m["m5"] = await say(s, "alice", room, "for carol")
    await invite(s, room, "dave")
    ok(await alice.room_kick(room, s.uid("dave"), "not this one"), nio.RoomKickResponse)
    await invite(s, room, "erin")
    await join(s, room, "erin")
    ok(await s.people["mod"].room_ban(room, s.uid("erin"), "spam"), nio.RoomBanResponse)
    m["m6"] = await say(s, "carol", room, "a secret")
    m["e1"] = await edit(s, "alice", room, m["m4"], "the typo")
    m["e2"] = await edit(s, "alice", room, m["m4"], "the typo, fixed")
    m["forged"] = await edit(s, "carol", room, m["m5"], "carol rewrites alice")
    red = ok(await s.people["mod"].room_redact(room, m["m6"], "leaked"),
             nio.RoomRedactResponse)
    await visibility(s, room, "shared")
    await invite(s, room, "frank")
    await join(s, room, "frank")
    m["m7"] = await say(s, "alice", room, "the end")

    await wait_until(lambda: asyncio.to_thread(
        lambda: {*m.values(), red.event_id} <= archived_ids(s, room)),
        within=60, what="every event archived", describe=s.enclave.describe)

    out = s.base / "export-room"
    r = await s.enclave.cli("export", "--room", room, "--out", str(out), "--formats",
                            "jsonl,html,eml,csv", "--by", "legal@corp", "--reason", "case 7")
    assert r.returncode == 0, r.stderr
    recs = {x["event_id"]: x for x in records(out)}
    # every non-state event carries readers; each is the homeserver's state at the event
    checked = 0
    for eid, rec in recs.items():
        if "state_key" in rec:
            assert "readers" not in rec
            continue
        vis, joined, invited = await state_at(s, room, eid)
        got = rec["readers"]
        assert (got["history_visibility"], set(got["joined"]), set(got["invited"])) == (
            vis, joined, invited), (eid, rec.get("content"))
        assert set(got["could_read"]) == (joined | invited if vis == "invited" else joined)
        assert rec["room_name"] == "Readers room"
        checked += 1
    assert checked >= len(m) + 1  # the messages, the edits and the redaction
    # the scenario's shape (so the comparison above covered every kind of change)
    u = s.uid
    assert set(recs[m["m2"]]["readers"]["invited"]) == {u("bob")}
    assert recs[m["m4"]]["readers"]["history_visibility"] == "joined"
    assert u("bob") not in recs[m["m5"]]["readers"]["joined"]
    assert u("erin") not in recs[m["m6"]]["readers"]["joined"]
    assert u("dave") not in recs[m["m6"]]["readers"]["invited"]
    # later joiners: only where the visibility at the event was shared
    assert set(recs[m["m1"]]["could_read_later"]) == {u("bob"), u("carol"), u("erin"),
                                                      u("frank")}
    assert set(recs[m["m3"]]["could_read_later"]) == {u("carol"), u("erin"), u("frank")}
    assert recs[m["m4"]]["could_read_later"] == [] and recs[m["m7"]]["could_read_later"] == []

    # and Synapse's own visibility filter: whoever the server lets fetch an event now is
    # among those the export says could read it (then or later); for the people still in
    # the room it is exactly them
    current = {u(n) for n in ("alice", "mod", "carol", "frank")}
    for eid, rec in recs.items():
        if "state_key" in rec:
            continue
        got = rec["readers"]
        could = set(got["could_read"]) | set(rec["could_read_later"])
        for name in NAMES:
            resp = await s.people[name].room_get_event(room, eid)
            visible = isinstance(resp, nio.RoomGetEventResponse)
            if visible:
                assert u(name) in could or got["anyone"], (name, eid, rec.get("content"))
            if u(name) in current:
                assert visible == (u(name) in could), (name, eid, rec.get("content"))

    # lineage: the original, both edits in order, the forged one rejected, the redaction
    lin = recs[m["m4"]]["lineage"]
    assert lin["original"]["body"] == "teh typo"
    assert [(e["event_id"], e["sender"], e["body"]) for e in lin["edits"]] == [
        (m["e1"], u("alice"), "the typo"), (m["e2"], u("alice"), "the typo, fixed")]
    assert lin["current_body"] == "the typo, fixed" and lin["redaction"] is None
    lin5 = recs[m["m5"]]["lineage"]
    assert lin5["edits"] == [] and lin5["current_body"] == "for carol"
    assert [(e["event_id"], e["rejected"]) for e in lin5["rejected_edits"]] == [
        (m["forged"], "not sent by the original sender")]
    lin6 = recs[m["m6"]]["lineage"]
    assert (lin6["redaction"]["event_id"], lin6["redaction"]["by"],
            lin6["redaction"]["reason"]) == (red.event_id, u("mod"), "leaked")
    # the homeserver redacted it; the archive (and so the export) keeps what was said
    ctx = await s.stack.hs("GET", f"/_synapse/admin/v1/rooms/{q(room)}/context/"
                                  f"{q(m['m6'])}?limit=0")
    assert "body" not in ctx["event"]["content"]
    assert lin6["original"]["body"] == "a secret" and lin6["current_body"] is None

    # CSV: one row per message, parsed back; formula cells defused
    rows = list(csv.DictReader(io.StringIO((out / "messages.csv").read_text(), newline="")))
    by = {row["event_id"].lstrip("'"): row for row in rows}
    assert set(by) == {m[k] for k in ("m1", "m2", "m3", "m4", "m5", "m6", "m7")}
    assert by[m["m2"]]["body"] == "'=1+2 looks like a formula"
    for k in ("m1", "m4", "m6"):
        rec = recs[m[k]]
        assert int(by[m[k]]["readers_count"]) == len(rec["readers"]["could_read"])
        assert set(by[m[k]]["readers"].lstrip("'").split("; ")) == set(
            rec["readers"]["could_read"])
    assert (by[m["m4"]]["edits"], by[m["m4"]]["current_body"]) == ("2", "the typo, fixed")
    assert (by[m["m6"]]["redacted_by"], by[m["m6"]]["redaction_reason"]) == (
        u("mod"), "leaked")

    # the transcript and the mails carry them too
    page = next((out / "rooms").glob("*/transcript.html")).read_text()
    assert "could read this when it was sent" in page and "joined later" in page
    mails = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
             for p in sorted((out / "rooms").glob("*/eml/*.eml"))]
    mail4 = next(x for x in mails if x["X-Matrix-Event-ID"] == m["m4"])
    assert mail4["X-Matrix-History-Visibility"] == "joined" and mail4["X-Matrix-Edits"] == "2"
    assert "edited to: the typo, fixed" in mail4.get_content()

    # the export is audited under the operator's name
    r = await s.enclave.cli("audit", "--rule", "builtin.export", "--format", "json")
    assert r.returncode == 0, r.stderr
    audits = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert any(a["actor"] == "legal@corp" and a["kind"] == "export"
               and a["outcome"] == "applied" and a["reason"] == "case 7"
               and a["room_id"] == room for a in audits), audits


async def test_subject_access_bundle_across_rooms(s: Setup) -> None:
    alice = s.people["alice"]
    shared = ok(await alice.room_create(name="Team", invite=[s.uid("bob")]),
                nio.RoomCreateResponse).room_id
    await join(s, shared, "bob")
    own = ok(await alice.room_create(name="Alice notes"), nio.RoomCreateResponse).room_id
    mine = [await say(s, "alice", shared, "alice in team")]
    theirs = await say(s, "bob", shared, "bob in team")
    up, _ = await alice.upload(io.BytesIO(PNG), content_type="image/png", filename="dot.png",
                               filesize=len(PNG))
    up = ok(up, nio.UploadResponse)
    img = ok(await alice.room_send(own, "m.room.message", {
        "msgtype": "m.image", "body": "dot.png", "url": up.content_uri,
        "info": {"mimetype": "image/png", "size": len(PNG)}}), nio.RoomSendResponse)
    mine.append(img.event_id)
    await wait_until(lambda: asyncio.to_thread(
        lambda: {*mine, theirs} <= archived_ids(s, shared) | archived_ids(s, own)),
        within=60, what="the messages archived", describe=s.enclave.describe)
    media_copied = s.base / "archive" / "media"
    await wait_until(lambda: asyncio.to_thread(
        lambda: any(p.is_file() for p in media_copied.rglob("*"))),
        within=30, what="the image archived")

    out = s.base / "export-alice"
    r = await s.enclave.cli("export", "--user", s.uid("alice"), "--out", str(out),
                            "--formats", "jsonl,csv", "--by", "dpo@corp")
    assert r.returncode == 0, r.stderr
    recs = records(out)
    assert {x["sender"] for x in recs} == {s.uid("alice")}
    assert set(mine) <= {x["event_id"] for x in recs} and theirs not in {
        x["event_id"] for x in recs}
    subject = json.loads((out / "subject.json").read_text())
    rooms = {x["room_id"]: x for x in subject["rooms"]}
    assert subject["users"] == [s.uid("alice")]
    assert rooms[shared]["name"] == "Team" and rooms[own]["name"] == "Alice notes"
    assert rooms[shared]["messages"] >= 1 and rooms[own]["messages"] == 1
    (media,) = rooms[own]["media"]
    assert (out / media).read_bytes() == PNG
    # her message in the team room: bob could read it (the readers span the whole room)
    rec = next(x for x in recs if x["event_id"] == mine[0])
    assert s.uid("bob") in rec["readers"]["could_read"] and rec["room_name"] == "Team"
    rows = list(csv.DictReader(io.StringIO((out / "messages.csv").read_text(), newline="")))
    assert {row["event_id"] for row in rows} >= set(mine)
    assert {row["room_name"] for row in rows} >= {"Team", "Alice notes"}
    assert {row["sender"] for row in rows} == {s.uid("alice")}

    r = await s.enclave.cli("audit", "--user", s.uid("alice"), "--rule", "builtin.export",
                            "--format", "json")
    audits = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [(a["actor"], a["kind"], a["outcome"]) for a in audits] == [
        ("dpo@corp", "export", "applied")], r.stdout + r.stderr

    # someone who never said anything is told (and gets an empty bundle)
    r = await s.enclave.cli("export", "--user", "@nobody:" + s.stack.server_name, "--out",
                            str(s.base / "export-nobody"), "--formats", "jsonl")
    assert r.returncode == 0 and "sent no archived event" in r.stdout, (r.stdout, r.stderr)
    assert (s.base / "export-nobody" / "events.jsonl").read_text() == ""

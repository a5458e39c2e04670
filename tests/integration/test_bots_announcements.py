"""The announcement bot against a real Synapse, with staff on matrix-nio.

Enclave runs in-process (``build_app`` with an injected clock) so the test moves time:
a scheduled announcement reaches exactly its audience; acknowledgements by reaction and by
``!ack``; a reminder only to the one who did not acknowledge, then their manager; the
report CLI; ``!announce`` refused for the unauthorised (with the reason) and sent for the
permitted; webhooks with good and bad tokens and signatures.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import subprocess
import sys
import zoneinfo
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bots.announcements.webhooks import sign
from bridge.store import AuditFilter

from .bots_helpers import (
    ANNOUNCE_BOT,
    Clock,
    InProcessEnclave,
    announcement_copies,
    bot_messages,
    login,
    person,
    sync,
    uid,
    write_bots_config,
)
from .harness import REPO_ROOT, Stack, nio, subprocess_env, wait_until

pytestmark = pytest.mark.integration

HOUR = 3_600_000
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")

PEOPLE = [
    person("1", "hanna", "Sales", title="Head of Sales", groups=["comms"]),
    person("2", "sam", "Sales", manager="1"),
    person("3", "sue", "Sales", manager="1"),
    person("4", "otto", "Ops"),
    person("5", "olga", "Ops", manager="4"),
]
SALES = ["hanna", "sam", "sue"]
OPS = ["otto", "olga"]


def bots_config(secrets: Path) -> dict[str, Any]:
    # encryption off: the encrypted room below shows the report without an E2EE sender
    # (the E2EE path: test_bots_e2ee_announcement.py)
    return {"encryption": {"enabled": False}, "announcements": {
        "poll_seconds": 0.5,
        "misfire_grace_seconds": 60,
        "timezone": "Europe/Berlin",
        "control": {"room": "#ann-control:corp.test", "announce_groups": ["comms"]},
        "announcements": [{
            "id": "sales-update",
            "title": "Sales update",
            "body": "Hello {first_name}, the new price list is valid from {date}.",
            "schedule": {"cron": "0 9 * * *", "timezone": "Europe/Berlin"},
            "audience": {"department": ["Sales"]},
            "require_ack": True,
            "reminders": {"after": "1h", "count": 1, "escalate_to_manager": True},
        }],
        "webhooks": [
            {"id": "alerts", "auth": {"type": "hmac", "secret": {"file": str(secrets / "hmac")}},
             "title": "Alert: {{alert.name}}", "body": "{{alert.summary}}",
             "audience": {"department": ["Ops"]}},
            {"id": "hr", "auth": {"type": "token", "token": {"file": str(secrets / "token")}},
             "title": "{{headline}}", "body": "{{text}}", "audience": {"users": [uid("sam")]},
             "rate_limit": {"per_minute": 60, "burst": 2}},
            {"id": "rooms", "auth": {"type": "token", "token": {"file": str(secrets / "token")}},
             "title": "To the rooms", "body": "{{text}}", "require_ack": True,
             "audience": {"rooms": ["#plain-room:corp.test", "#secret-room:corp.test"]}},
        ],
    }}


def next_nine_berlin(after_ms: int) -> int:
    """A 09:00 Berlin at least two hours after ``after_ms`` (clear of the start-up tick)."""
    t = dt.datetime.fromtimestamp(after_ms / 1000 + 2 * 3600, BERLIN)
    nine = t.replace(hour=9, minute=0, second=0, microsecond=0)
    if nine <= t:
        nine += dt.timedelta(days=1)
    return int(nine.timestamp() * 1000)


@pytest.fixture
async def enclave(stack: Stack, tmp_path: Path) -> AsyncIterator[InProcessEnclave]:
    secrets = tmp_path / "hook-secrets"
    secrets.mkdir()
    (secrets / "hmac").write_text("hmac-secret-for-tests\n")
    (secrets / "token").write_text("token-for-tests\n")
    config = write_bots_config(stack, tmp_path / "enclave", PEOPLE,
                               bots=bots_config(secrets))
    e = InProcessEnclave(config, stack.as_port, Clock())
    await e.start()
    try:
        await e.wait_directory()
        await e.wait_bots_ready()
        yield e
    finally:
        await e.stop()


async def test_scheduled_announcement_acks_reminders_escalation_report(
        stack: Stack, enclave: InProcessEnclave, staff: list[nio.AsyncClient]) -> None:
    bot = enclave.bots.announcements
    assert bot is not None
    ann = enclave.announcements
    clock = enclave.clock

    # -- nothing before 09:00; at 09:00 Berlin exactly the Sales people get it --------------
    nine = next_nine_berlin(clock.t)
    clock.t = nine - 60_000
    await bot.tick()
    assert await ann.announcement_occurrences() == []
    clock.t = nine + 30_000
    await bot.tick()
    occs = await ann.announcement_occurrences(announcement_id="sales-update")
    assert [(o.kind, o.status) for o in occs] == [("scheduled", "delivered")]
    occ = occs[0].occurrence_id
    rows = {r.target: r for r in await ann.announcement_deliveries("sales-update", occ)}
    assert set(rows) == {uid(u) for u in SALES}
    assert all(r.status == "sent" for r in rows.values()), rows
    # a second tick (and a restart's first tick) fires nothing again
    await bot.tick()
    assert len(await ann.announcement_occurrences()) == 1

    clients = {}
    for name in SALES + OPS:
        clients[name] = await login(stack, name)
        staff.append(clients[name])
    for name in SALES:
        resp = await sync(clients[name])
        room = rows[uid(name)].room_id
        assert room in resp.rooms.join, f"{name} is not in their DM {room}"
        texts = [e.body for e in resp.rooms.join[room].timeline.events
                 if isinstance(e, nio.RoomMessageText) and e.sender == ANNOUNCE_BOT]
        assert len(texts) == 1 and "Sales update" in texts[0], texts
        assert f"Hello {name.title()}, the new price list" in texts[0]
        copies = await announcement_copies(stack, uid(name), "sales-update")
        assert copies == [(room, rows[uid(name)].event_id)]
    for name in OPS:  # nobody else: no invite from the bot, no copy in any of their rooms
        resp = await sync(clients[name])
        assert not resp.rooms.invite
        assert await announcement_copies(stack, uid(name), "sales-update") == []

    # -- sam acknowledges with ✅, hanna with !ack; sue does not ----------------------------
    sam_room, hanna_room, sue_room = (rows[uid(n)].room_id for n in ("sam", "hanna", "sue"))
    r = await clients["sam"].room_send(sam_room, "m.reaction", {"m.relates_to": {
        "rel_type": "m.annotation", "event_id": rows[uid("sam")].event_id, "key": "✅"}})
    assert isinstance(r, nio.RoomSendResponse), r
    r = await clients["hanna"].room_send(hanna_room, "m.room.message",
                                         {"msgtype": "m.text", "body": "!ack"})
    assert isinstance(r, nio.RoomSendResponse), r
    # sue reacts to someone else's message? she cannot see it; a 👀 on her own is no ack
    r = await clients["sue"].room_send(sue_room, "m.reaction", {"m.relates_to": {
        "rel_type": "m.annotation", "event_id": rows[uid("sue")].event_id, "key": "👀"}})
    assert isinstance(r, nio.RoomSendResponse), r

    async def acked() -> dict[str, Any] | None:
        got = {d.target: d for d in await ann.announcement_deliveries("sales-update", occ)}
        done = {u for u, d in got.items() if d.acked_at is not None}
        return got if done == {uid("sam"), uid("hanna")} else None

    got = await wait_until(acked, within=30, what="sam's and hanna's acknowledgements")
    assert got[uid("sam")].ack_method == "reaction"
    assert got[uid("hanna")].ack_method == "command"
    await enclave.wait_idle()
    hanna_said = [e["content"]["body"] for e in await bot_messages(stack, hanna_room)]
    assert hanna_said[-1].startswith("✅ Acknowledged: **Sales update**")

    # -- an hour later: a reminder to sue alone ---------------------------------------------
    before = {n: len(await bot_messages(stack, rows[uid(n)].room_id)) for n in SALES}
    clock.t = nine + HOUR + 60_000
    await bot.tick()
    after = {n: len(await bot_messages(stack, rows[uid(n)].room_id)) for n in SALES}
    assert after == {**before, "sue": before["sue"] + 1}
    reminder = (await bot_messages(stack, sue_room))[-1]["content"]
    assert reminder["body"].startswith("⏰ Reminder 1 of 1: please acknowledge **Sales update**")
    assert reminder["m.relates_to"]["m.in_reply_to"]["event_id"] == rows[uid("sue")].event_id

    # -- another hour: sue's manager hanna is told; nothing more for anyone else ------------
    clock.t = nine + 2 * HOUR + 120_000
    await bot.tick()
    escalation = (await bot_messages(stack, hanna_room))[-1]["content"]["body"]
    assert escalation.startswith(f"👀 Sue Test ({uid('sue')}) has not acknowledged "
                                 "**Sales update**")
    assert len(await bot_messages(stack, sam_room)) == before["sam"]
    assert len(await bot_messages(stack, sue_room)) == before["sue"] + 1
    # everything followed up: closed, and the control room would get the summary
    (closed,) = await ann.announcement_occurrences(announcement_id="sales-update")
    assert closed.status == "closed"

    # -- the report: counts and who/when as CSV ----------------------------------------------
    out = enclave.config.parent / "report.csv"
    res = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", "announcements", "report",
                         "sales-update", "--csv", str(out), "-c", str(enclave.config)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert ("3 recipient(s): 3 delivered, 0 failed, 0 pending; 2 acknowledged, 1 reminded, "
            "1 escalated") in res.stdout
    table = {r["recipient"]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    assert set(table) == {uid(u) for u in SALES}
    assert table[uid("sam")]["ack_method"] == "reaction" and table[uid("sam")]["acknowledged_at"]
    assert table[uid("hanna")]["ack_method"] == "command"
    assert table[uid("sue")]["acknowledged_at"] == ""
    assert table[uid("sue")]["reminders"] == "1"
    assert table[uid("sue")]["escalated_to"] == uid("hanna")
    assert table[uid("sue")]["department"] == "Sales"


async def _create_control_room(hanna: nio.AsyncClient, invite: list[str]) -> str:
    resp = await hanna.room_create(alias="ann-control", name="Announcements control",
                                   invite=invite)
    assert isinstance(resp, nio.RoomCreateResponse), resp
    return resp.room_id


async def test_announce_refused_then_sent_by_the_permitted(
        stack: Stack, enclave: InProcessEnclave, staff: list[nio.AsyncClient]) -> None:
    bot = enclave.bots.announcements
    assert bot is not None
    ann = enclave.announcements
    hanna, sam = await login(stack, "hanna"), await login(stack, "sam")
    staff.extend([hanna, sam])
    room = await _create_control_room(hanna, [ANNOUNCE_BOT, uid("sam")])
    assert isinstance(await sam.join(room), nio.JoinResponse)

    async def bot_joined() -> bool:
        return room in bot.rooms

    await wait_until(bot_joined, within=30, what="the bot accepting hanna's invite")
    await sync(hanna)
    await sync(sam)

    async def bot_said(*prefixes: str) -> list[str] | None:
        """The bot's messages in the control room once one starts with each prefix."""
        msgs = [e["content"]["body"] for e in await bot_messages(stack, room)]
        if all(any(m.startswith(p) for m in msgs) for p in prefixes):
            return msgs
        return None

    def one(msgs: list[str], prefix: str) -> str:
        (hit,) = [m for m in msgs if m.startswith(prefix)]
        return hit

    # sam is staff but not in 'comms': refused, with the reason
    await sam.room_send(room, "m.room.message", {
        "msgtype": "m.text", "body": "!announce all Free pizza for everyone!"})
    said = await wait_until(lambda: bot_said("Refused: `!announce`"), within=30,
                            what="the refusal")
    assert one(said, "Refused") == "Refused: `!announce` needs membership of comms."
    await sam.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "!confirm"})
    said = await wait_until(lambda: bot_said("Refused: `!confirm`"), within=30,
                            what="the second refusal")
    assert one(said, "Refused: `!confirm`") == (
        "Refused: `!confirm` needs membership of comms.")
    assert await ann.announcement_occurrences() == []

    # hanna (comms): a preview with the count, then !confirm sends it
    await hanna.room_send(room, "m.room.message", {
        "msgtype": "m.text",
        "body": "!announce --ack department:Ops Maintenance tonight\nThe VPN is down 22-23h."})
    said = await wait_until(lambda: bot_said("**Preview**"), within=30, what="the preview")
    preview = one(said, "**Preview**")
    assert "To **2 people**" in preview and "Ops 2" in preview, preview
    assert "acknowledgement required" in preview and "The VPN is down 22-23h." in preview
    assert await ann.announcement_occurrences() == []  # nothing until confirmed
    await hanna.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "!confirm"})
    said = await wait_until(lambda: bot_said("📣 Sending"), within=30,
                            what="the confirmation")
    assert one(said, "📣 Sending").startswith("📣 Sending **Maintenance tonight** to 2 people")

    async def delivered() -> Any:
        occs = await ann.announcement_occurrences()
        # acknowledgement asked, no reminders and no expiry: closed at once (acks still count)
        return occs if occs and occs[0].status in ("delivered", "closed") else None

    (occ,) = await wait_until(delivered, within=30, what="the ad-hoc fan-out")
    assert occ.kind == "adhoc" and occ.created_by == uid("hanna")
    rows = await ann.announcement_deliveries(occ.announcement_id, occ.occurrence_id)
    assert sorted(r.target for r in rows) == [uid("olga"), uid("otto")]
    for u in OPS:
        assert len(await announcement_copies(stack, uid(u), occ.announcement_id)) == 1
    for u in SALES:
        assert await announcement_copies(stack, uid(u), occ.announcement_id) == []
    said = await wait_until(lambda: bot_said("📊"), within=30, what="the summary")
    summary = one(said, "📊")
    assert summary.startswith("📊 **Maintenance tonight** — delivered"), summary
    assert "2 recipient(s): 2 delivered, 0 failed" in summary
    # a second !confirm has nothing left to send
    await hanna.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "!confirm"})
    await wait_until(lambda: bot_said("Not sent: there is nothing to confirm"), within=30,
                     what="nothing to confirm")
    assert len(await ann.announcement_occurrences()) == 1


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_webhooks_good_and_bad_signatures(stack: Stack,
                                                enclave: InProcessEnclave) -> None:
    ann = enclave.announcements
    base = f"http://127.0.0.1:{stack.as_port}/hooks"
    payload = json.dumps({"alert": {"name": "Disk full", "summary":
                                    "db1 is at *99%*, see [click](https://evil.example)"}}
                         ).encode()
    json_ct = {"Content-Type": "application/json"}
    # bad, missing and wrong-secret signatures: 401, nothing stored
    for headers in ({"X-Enclave-Signature": "sha256=" + "0" * 64}, {},
                    {"X-Enclave-Signature": sign("not-the-secret", payload)},
                    {"X-Enclave-Signature": sign("hmac-secret-for-tests", payload + b" ")}):
        status, body = await _post(f"{base}/alerts", payload, {**json_ct, **headers})
        assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED"), headers
    assert await ann.announcement_occurrences() == []
    status, _ = await _post(f"{base}/nope", payload, json_ct)
    assert status == 404
    # the good signature: 202, the Ops people get the filled template
    status, body = await _post(
        f"{base}/alerts", payload,
        {**json_ct, "X-Enclave-Signature": sign("hmac-secret-for-tests", payload),
         "Idempotency-Key": "alert-1"})
    assert status == 202, body
    assert body == {"announcement": "alerts", "occurrence": "alert-1", "created": True,
                    "recipients": 2, "rooms": 0}
    # the sender retries the same call: recognised, not sent twice
    status, body = await _post(
        f"{base}/alerts", payload,
        {**json_ct, "X-Enclave-Signature": sign("hmac-secret-for-tests", payload),
         "Idempotency-Key": "alert-1"})
    assert (status, body["created"]) == (200, False)

    async def delivered() -> Any:
        o = await ann.announcement_occurrence("alerts", "alert-1")
        # no acknowledgement asked: closed as soon as it is delivered
        return o if o is not None and o.status in ("delivered", "closed") else None

    await wait_until(delivered, within=30, what="the webhook's fan-out")
    for u in OPS:
        (room, event_id), = await announcement_copies(stack, uid(u), "alerts")
        (msg,) = [m for m in await bot_messages(stack, room) if m["event_id"] == event_id]
        assert msg["content"]["body"].startswith("### 📣 Alert: Disk full")
        # the payload is text: plain in body (no Markdown escapes), inert in the HTML
        assert ("db1 is at *99%*, see [click](https://evil.example)"
                in msg["content"]["body"]), msg["content"]["body"]
        assert "\\" not in msg["content"]["body"], msg["content"]["body"]
        html_body = msg["content"]["formatted_body"]
        assert "*99%*" in html_body and "<em>" not in html_body and "<a " not in html_body
    for u in SALES:
        assert await announcement_copies(stack, uid(u), "alerts") == []

    # token hook: a wrong token is refused; the right one goes to its one user
    hr = json.dumps({"headline": "Holiday", "text": "Office closed Friday"}).encode()
    status, _ = await _post(f"{base}/hr", hr, {**json_ct, "Authorization": "Bearer nope"})
    assert status == 401
    assert await ann.announcement_occurrences(announcement_id="hr") == []
    status, body = await _post(f"{base}/hr", hr,
                               {**json_ct, "Authorization": "Bearer token-for-tests"})
    assert (status, body["recipients"]) == (202, 1)
    # burst of 2: the third call within the second is rate limited
    status, _ = await _post(f"{base}/hr", hr,
                            {**json_ct, "Authorization": "Bearer token-for-tests"})
    assert status == 202
    status, body = await _post(f"{base}/hr", hr,
                               {**json_ct, "Authorization": "Bearer token-for-tests"})
    assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
    assert len(await ann.announcement_occurrences(announcement_id="hr")) == 2
    for o in await ann.announcement_occurrences(announcement_id="hr"):
        assert [d.target for d in await ann.announcement_deliveries(
            "hr", o.occurrence_id)] == [uid("sam")]


async def test_explicit_rooms_and_an_encrypted_one_is_reported_not_skipped(
        stack: Stack, enclave: InProcessEnclave, staff: list[nio.AsyncClient]) -> None:
    store, ann = enclave.svc.stores, enclave.announcements
    otto, olga = await login(stack, "otto"), await login(stack, "olga")
    staff.extend([otto, olga])
    plain = await otto.room_create(alias="plain-room", name="plain", invite=[
        ANNOUNCE_BOT, uid("olga")])
    secret = await otto.room_create(alias="secret-room", name="secret", invite=[ANNOUNCE_BOT],
                                    initial_state=[{"type": "m.room.encryption",
                                                    "state_key": "", "content": {
                                                        "algorithm": "m.megolm.v1.aes-sha2"}}])
    assert isinstance(plain, nio.RoomCreateResponse) and isinstance(
        secret, nio.RoomCreateResponse)
    assert isinstance(await olga.join(plain.room_id), nio.JoinResponse)
    body = json.dumps({"text": "Fire drill at 11:00"}).encode()
    status, resp = await _post(f"http://127.0.0.1:{stack.as_port}/hooks/rooms", body,
                               {"Authorization": "Bearer token-for-tests"})
    assert (status, resp["rooms"], resp["recipients"]) == (202, 2, 0), resp

    async def delivered() -> Any:
        o = await ann.announcement_occurrence("rooms", resp["occurrence"])
        return o if o is not None and o.status in ("delivered", "closed") else None

    await wait_until(delivered, within=30, what="the fan-out to the two rooms")
    rows = {d.target: d for d in await ann.announcement_deliveries(
        "rooms", resp["occurrence"])}
    # the plain room got it, and its members became recipients who can acknowledge
    assert rows["#plain-room:corp.test"].status == "sent"
    assert rows[uid("otto")].status == rows[uid("olga")].status == "sent"
    (msg,) = [m for m in await bot_messages(stack, plain.room_id)
              if m["event_id"] == rows["#plain-room:corp.test"].event_id]
    assert "Fire drill at 11:00" in msg["content"]["body"]
    # the encrypted room: not sent in plaintext, not skipped: failed, with the reason
    bad = rows["#secret-room:corp.test"]
    assert (bad.status, bad.detail) == ("failed", "encrypted room, no E2EE sender")
    assert [m for m in await stack.room_messages(secret.room_id)
            if m.get("sender") == ANNOUNCE_BOT] == []
    audit = await store.audit.query_audit(AuditFilter(rule_id="announcements.rooms",
                                                      outcome="failed"))
    assert [(a["kind"], a["detail"]) for a in audit] == [
        ("announcement_send", "encrypted room, no E2EE sender")]
    # olga acknowledges in the plain room with a reaction
    await sync(olga)
    r = await olga.room_send(plain.room_id, "m.reaction", {"m.relates_to": {
        "rel_type": "m.annotation", "event_id": msg["event_id"], "key": "✅"}})
    assert isinstance(r, nio.RoomSendResponse), r

    async def olga_acked() -> bool:
        rows = {d.target: d for d in await ann.announcement_deliveries(
            "rooms", resp["occurrence"])}
        return rows[uid("olga")].acked_at is not None

    await wait_until(olga_acked, within=30, what="olga's acknowledgement")



async def test_a_failed_reminder_is_reported_as_failed_not_sent(
        stack: Stack, enclave: InProcessEnclave) -> None:
    """Sam's DM with the bot becomes encrypted after the announcement, and this Enclave has
    no E2EE sender: his reminder is refused. The report counts only the reminders the
    homeserver accepted and shows sam's failure with its reason; the escalation says what
    he really got."""
    bot = enclave.bots.announcements
    assert bot is not None
    store, clock = enclave.svc.stores, enclave.clock
    ann = enclave.announcements
    nine = next_nine_berlin(clock.t + 24 * HOUR)  # an occurrence of its own
    clock.t = nine + 30_000
    await bot.tick()
    (occ,) = [o for o in await ann.announcement_occurrences(announcement_id="sales-update")
              if o.scheduled_at == nine]
    rows = {r.target: r for r in await ann.announcement_deliveries("sales-update",
                                                                       occ.occurrence_id)}
    assert all(r.status == "sent" for r in rows.values()), rows
    sam_room = rows[uid("sam")].room_id
    await stack.hs("PUT", f"/_matrix/client/v3/rooms/{sam_room}/state/m.room.encryption/",
                   {"algorithm": "m.megolm.v1.aes-sha2"}, as_user=ANNOUNCE_BOT)

    async def seen() -> bool:
        return bot.svc.encryption.known(sam_room) is True

    await wait_until(seen, within=30, what="Enclave seeing the DM's encryption")

    clock.t = nine + HOUR + 60_000
    await bot.tick()
    clock.t = nine + 2 * HOUR + 120_000
    await bot.tick()
    got = {r.target: r for r in await ann.announcement_deliveries("sales-update",
                                                                      occ.occurrence_id)}
    assert (got[uid("sam")].reminders, got[uid("sam")].reminder_failures) == (0, 1), got
    assert (got[uid("sue")].reminders, got[uid("sue")].reminder_failures) == (1, 0), got
    hanna_room = rows[uid("hanna")].room_id
    told = [e["content"]["body"] for e in await bot_messages(stack, hanna_room)
            if e["content"]["body"].startswith("👀")]
    about_sam = [t for t in told if uid("sam") in t]
    assert len(about_sam) == 1 and "0 reminder(s), 1 more could not be sent" in about_sam[0]

    out = enclave.config.parent / "report-failed.csv"
    res = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", "announcements", "report",
                         "sales-update", "--occurrence", occ.occurrence_id, "--csv", str(out),
                         "-c", str(enclave.config)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # hanna has no manager: her escalation told nobody, so it is not counted
    assert ("3 recipient(s): 3 delivered, 0 failed, 0 pending; 0 acknowledged, 2 reminded, "
            "2 escalated; reminder failed for 1") in res.stdout, res.stdout
    table = {r["recipient"]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    sam = table[uid("sam")]
    assert (sam["reminders"], sam["reminders_failed"]) == ("0", "1"), sam
    assert "reminder(s) failed: encrypted room, no E2EE sender" in sam["detail"], sam
    assert table[uid("sue")]["reminders"] == "1" and table[uid("sue")]["detail"] == ""
    hanna = table[uid("hanna")]
    assert hanna["escalated_at"] == "" and "no active manager" in hanna["detail"], hanna
    audit = await store.audit.query_audit(AuditFilter(user_id=uid("sam")))
    assert any(a["kind"] == "announcement_reminder" and a["outcome"] == "failed"
               for a in audit), audit

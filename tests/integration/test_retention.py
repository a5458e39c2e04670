"""Retention end to end: a real Synapse with the gate module, Enclave (directory file, policy,
retention with periods of seconds), matrix-nio clients as staff, and the ``enclave`` CLI.

The tests run in file order on one module-scoped setup: the gate-side tests first, the
reactive revert last but one (it restarts Synapse without the gate), and the tampering last
(it breaks the archive on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .directory_helpers import ADMIN_LOCALPART, ensure_enclave_admin, room_state
from .harness import BOT_LOCALPART, REPO_ROOT, EnclaveProcess, Stack, nio, wait_until

pytestmark = pytest.mark.integration

KEEP_SECONDS = 8
PEOPLE = ("alice", "bob", "carol")
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a5f9d5"
    "6f0000000049454e44ae426082")


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


@dataclass
class Setup:
    stack: Stack
    enclave: EnclaveProcess
    config: Path
    gate_secret: Path
    archive: Path
    base: Path
    clients: dict[str, nio.AsyncClient] = field(default_factory=dict)

    def uid(self, name: str) -> str:
        return f"@{name}:{self.stack.server_name}"

    async def staff(self, name: str) -> nio.AsyncClient:
        if name not in self.clients:
            c = nio.AsyncClient(self.stack.synapse.base_url, self.uid(name))
            resp = await c.login(f"pw-{name}")
            assert isinstance(resp, nio.LoginResponse), resp
            self.clients[name] = c
        return self.clients[name]

    def gate_module(self) -> list[dict[str, Any]]:
        return [{"module": "bridge.gate.module.EnclaveGate", "config": {
            "url": f"http://127.0.0.1:{self.stack.as_port}",
            "secret_path": str(self.gate_secret),
            "enclave_users": [self.uid(BOT_LOCALPART), self.uid(ADMIN_LOCALPART)],
            "timeout_ms": 2000}}]

    async def cli(self, *args: str) -> Any:
        return await self.enclave.cli(*args)

    def archived(self, room_id: str, event_type: str = "m.room.message") -> list[str]:
        """Event ids of the room's archived events of a type, in archive order (the index)."""
        db = self.config.parent / "enclave.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute("SELECT event_id FROM archive_events WHERE room_id = ? AND "
                               "type = ? ORDER BY ts, segment, line",
                               (room_id, event_type)).fetchall()
        finally:
            con.close()
        return [r[0] for r in rows]


def write_directory(path: Path) -> None:
    people = [{"id": str(3000 + i), "username": name, "display_name": name.title(),
               "email": f"{name}.mail@example.com",
               "department": "Ops", "groups": ["ops"], "initial_password": f"pw-{name}"}
              for i, name in enumerate(PEOPLE)]
    path.write_text(yaml.safe_dump({"people": people}, sort_keys=False))


def retention_config(archive: Path) -> dict[str, Any]:
    keep = f"{KEEP_SECONDS}s"
    return {
        "enabled": True,
        "default": {"keep": keep},
        "classes": [{"id": "retention-internal", "room_class": "internal", "keep": keep,
                     "adjustable_by": "moderators", "min": "5s", "max": "1d"}],
        "dms": {"id": "retention-dms", "keep": keep},
        "archive": {"path": str(archive)},
        # small steps, so even these rooms are purged in several
        "purge": {"interval_minutes": 0, "window_events": 3, "poll_seconds": 0.2,
                  "pause_seconds": 0},
        "visibility": {"set_state": True, "notice": "message",
                       "text": "Messages here are kept for {period}."},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("retention")
    stack = Stack.prepare(base / "stack")
    enclave: EnclaveProcess | None = None
    try:
        gate_secret = base / "gate_secret"
        gate_secret.write_text("gate-" + os.urandom(12).hex() + "\n")
        config = base / "enclave" / "config.yaml"
        s = Setup(stack=stack, enclave=None,  # type: ignore[arg-type]
                  config=config, gate_secret=gate_secret, archive=base / "archive",
                  base=base)
        stack.synapse.extra_config["modules"] = s.gate_module()
        stack.synapse.start()
        stack.bootstrap()
        ensure_enclave_admin(stack)
        directory = base / "directory.yaml"
        write_directory(directory)
        stack.write_enclave_config(config)
        cfg = yaml.safe_load(config.read_text())
        cfg["directory"] = {"source": {"type": "file", "path": str(directory),
                                       "allow_initial_passwords": True},
                            "interval_minutes": 0}
        cfg["gate"] = {"secret": {"file": str(gate_secret)}}
        cfg["policy"] = {"default_class": "internal",
                         "room_classes": [{"id": "internal", "federate": False}],
                         "reconcile": {"interval_minutes": 0}}
        cfg["retention"] = retention_config(s.archive)
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        enclave = EnclaveProcess(config, stack.as_port)
        s.enclave = enclave
        yield s
    finally:
        if enclave is not None:
            enclave.cleanup()
        stack.stop()


@pytest.fixture
async def ret(setup: Setup) -> AsyncIterator[Setup]:
    if not setup.enclave.running:
        await setup.enclave.start()

        async def provisioned() -> bool:
            _, body = await setup.enclave.get_json("/ready")
            return (body.get("directory") or {}).get("outcome") == "ok"

        await wait_until(provisioned, within=60, what="the first directory sync",
                         describe=setup.enclave.describe)
    yield setup
    for c in setup.clients.values():
        with contextlib.suppress(Exception):
            await c.close()
    setup.clients.clear()


# -- helpers ---------------------------------------------------------------------------------
async def new_room(s: Setup, owner: str, *others: str, name: str) -> str:
    c = await s.staff(owner)
    resp = await c.room_create(name=name, invite=[s.uid(o) for o in others])
    assert isinstance(resp, nio.RoomCreateResponse), resp
    for o in others:
        j = await (await s.staff(o)).join(resp.room_id)
        assert isinstance(j, nio.JoinResponse), j
    return resp.room_id


async def say(s: Setup, who: str, room_id: str, body: str) -> str:
    resp = await (await s.staff(who)).room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    assert isinstance(resp, nio.RoomSendResponse), resp
    return resp.event_id


async def upload_image(s: Setup, who: str, room_id: str) -> tuple[str, str]:
    c = await s.staff(who)
    up, _ = await c.upload(io.BytesIO(PNG), content_type="image/png", filename="dot.png",
                           filesize=len(PNG))
    assert isinstance(up, nio.UploadResponse), up
    resp = await c.room_send(room_id, "m.room.message", {
        "msgtype": "m.image", "body": "dot.png", "url": up.content_uri,
        "info": {"mimetype": "image/png", "size": len(PNG)}})
    assert isinstance(resp, nio.RoomSendResponse), resp
    return resp.event_id, up.content_uri


async def room_events(s: Setup, room_id: str) -> list[dict[str, Any]]:
    """Every event of the room the homeserver still has, oldest first (admin API)."""
    out: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        path = f"/_synapse/admin/v1/rooms/{q(room_id)}/messages?dir=f&limit=1000"
        if token:
            path += f"&from={q(token)}"
        page = await s.stack.hs("GET", path)
        out += page.get("chunk", [])
        token = page.get("end")
        if not page.get("chunk") or not token:
            return out


async def invite_enclave(s: Setup, who: str, room_id: str, power: int) -> None:
    """``who`` (a member with the power) invites Enclave's bot and gives it ``power``: the
    room's own people let Enclave in, under their own names. (With the gate the bot is in
    every group room from its creation, with power 100: then only the power is set.)"""
    c = await s.staff(who)
    bot = s.stack.bot_user_id
    resp = await c.room_invite(room_id, bot)
    assert isinstance(resp, nio.RoomInviteResponse) or (
        "already in the room" in getattr(resp, "message", "")), resp
    pl = await s.stack.hs("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state/"
                                 "m.room.power_levels/", as_user=s.uid(who))
    pl.setdefault("users", {})[bot] = power
    put = await c.room_put_state(room_id, "m.room.power_levels", pl)
    assert isinstance(put, nio.RoomPutStateResponse), put


async def on_homeserver(s: Setup, room_id: str) -> dict[str, dict[str, Any]]:
    """The room's staff messages the homeserver still serves: event id -> content."""
    msgs = await s.stack.room_messages(room_id)
    return {e["event_id"]: e.get("content") or {} for e in msgs
            if e.get("sender") != s.stack.bot_user_id}


async def wait_archived(s: Setup, room_id: str, event_ids: list[str]) -> None:
    async def done() -> bool:
        return set(event_ids) <= set(s.archived(room_id))

    await wait_until(done, within=30, what="the live feed archiving the messages",
                     describe=s.enclave.describe)


async def wait_due(sent_at: float) -> None:
    """Until events sent at ``sent_at`` are past the period (plus clock slack)."""
    await asyncio.sleep(max(0.0, sent_at + KEEP_SECONDS + 1.5 - time.time()))


async def retention_apply(s: Setup, *rooms: str, config: Path | None = None,
                          expect: int = 0) -> list[dict[str, Any]]:
    args = ["retention", "--apply", "--format", "json"]
    for r in rooms:
        args += ["--room", r]
    if config is None:
        r = await s.cli(*args)
    else:
        r = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bridge", *args, "-c", str(config)],
            cwd=REPO_ROOT, env=s.enclave.env,
            capture_output=True, text=True, timeout=120)
    assert r.returncode == expect, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return [x for x in lines if "room" in x]  # findings are lines of their own


def in_browser(page_path: Path, check: Any) -> Any:
    """Open a transcript in headless Chromium (Debian's, driven by Playwright) and run
    ``check(page)`` on it: what a reviewer's browser shows, not what the HTML source has."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(page_path.resolve().as_uri())
            page.wait_for_load_state("load")
            return check(page)
        finally:
            browser.close()


async def media_served(s: Setup, who: str, mxc: str) -> bool:
    server, media_id = mxc.removeprefix("mxc://").split("/", 1)
    c = await s.staff(who)
    url = f"{s.stack.synapse.base_url}/_matrix/client/v1/media/download/{server}/{media_id}"
    async with aiohttp.ClientSession() as http, http.get(
            url, headers={"Authorization": f"Bearer {c.access_token}"}) as resp:
        if resp.status == 404:
            return False
        assert resp.status == 200, (resp.status, await resp.text())
        return await resp.read() == PNG


# -- the tests, in file order ---------------------------------------------------------------------
async def test_new_rooms_carry_the_period_and_the_gate_refuses_moderators(ret: Setup) -> None:
    room = await new_room(ret, "alice", name="period")
    state = await room_state(ret.stack, room, "m.room.retention")
    assert state == {"max_lifetime": KEEP_SECONDS * 1000}, state
    alice = await ret.staff("alice")  # the creator: a moderator and more
    resp = await alice.room_put_state(room, "m.room.retention", {"max_lifetime": 10 ** 12})
    assert isinstance(resp, nio.RoomPutStateError), resp
    assert "managed by Enclave" in resp.message
    assert await room_state(ret.stack, room, "m.room.retention") == state


async def test_events_and_media_are_archived_then_purged_and_exported(ret: Setup) -> None:
    room = await new_room(ret, "alice", "bob", name="purge me")
    # invited by alice (under her name), Enclave's bot joins at the run and posts the notice
    await invite_enclave(ret, "alice", room, 0)
    sent = []
    for i in range(3):
        sent.append(await say(ret, "alice", room, f"old alice {i}"))
        sent.append(await say(ret, "bob", room, f"old bob {i}"))
    image_event, mxc = await upload_image(ret, "bob", room)
    sent.append(image_event)
    last_old = time.time()
    await wait_archived(ret, room, sent)
    assert await media_served(ret, "alice", mxc)
    await wait_due(last_old)
    fresh = await say(ret, "alice", room, "fresh")

    [out] = await retention_apply(ret, room)
    assert out["error"] is None, out
    assert out["purged"] >= len(sent) and len(out["steps"]) >= 3, out  # windows of 3
    assert out["media_deleted"] == 1, out

    left = await on_homeserver(ret, room)
    assert not set(sent) & set(left), "due messages still on the homeserver"
    assert fresh in left
    assert not await media_served(ret, "alice", mxc)
    # the period is shown: state and the bot's notice
    assert await room_state(ret.stack, room, "m.room.retention") == {
        "max_lifetime": KEEP_SECONDS * 1000}

    async def noticed() -> bool:
        return any(e.get("sender") == ret.stack.bot_user_id and
                   "kept for 8 seconds" in (e.get("content") or {}).get("body", "")
                   for e in await ret.stack.room_messages(room))

    await wait_until(noticed, within=20, what="the retention notice")

    # the archive keeps everything, in order; the export reads it
    assert set(sent) <= set(ret.archived(room))
    out_dir = ret.base / "export-purged"
    r = await ret.cli("export", "--room", room, "--out", str(out_dir))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]
    bodies = [e["content"].get("body") for e in events
              if e["type"] == "m.room.message" and e["sender"] != ret.stack.bot_user_id]
    assert bodies[:7] == ["old alice 0", "old bob 0", "old alice 1", "old bob 1",
                          "old alice 2", "old bob 2", "dot.png"], bodies
    manifest = json.loads((out_dir / "manifest.json").read_text())
    media = [f for f in manifest["files"] if f.startswith("media/")]
    assert media, manifest
    copied = next((out_dir / "media").iterdir())
    assert copied.read_bytes() == PNG and copied.suffix == ".png", copied
    page_path = next((out_dir / "rooms").glob("*/transcript.html"))
    html = page_path.read_text()
    assert "old bob 2" in html and "Alice" in html

    def purged_shown(page: Any) -> tuple[bool, bool, bool]:
        msg = page.locator(".msg", has_text="old bob 2")
        return (msg.get_by_text("old bob 2").is_visible(),
                msg.get_by_text("gone from the homeserver").is_visible(),
                page.locator(".msg img").first.evaluate(
                    "img => img.complete && img.naturalWidth > 0"))

    # the archived text of a purged message, its mark, and the image (media/x.png) load
    assert await asyncio.to_thread(in_browser, page_path, purged_shown) == (True, True, True)
    assert list((out_dir / "rooms").glob("*/eml/*.eml"))

    # a second run has nothing more to do
    [again] = await retention_apply(ret, room)
    assert again["purged"] == 0 and again["archived"] == 0, again
    r = await ret.cli("archive", "verify")
    assert r.returncode == 0, r.stdout + r.stderr


async def test_holds_keep_exactly_their_events_until_released(ret: Setup) -> None:
    mixed = await new_room(ret, "alice", "bob", name="user hold")
    # the room's creator lets Enclave in, with the power to redact
    await invite_enclave(ret, "alice", mixed, 50)
    a0 = await say(ret, "alice", mixed, "a0 before the held user")
    b1 = await say(ret, "bob", mixed, "b1 held")
    a2 = await say(ret, "alice", mixed, "a2 after a held one")
    img, _ = await upload_image(ret, "alice", mixed)
    b3 = await say(ret, "bob", mixed, "b3 held")
    # the same in a room Enclave's bot is not in (the gate brought it in; it leaves): it
    # cannot redact there as itself
    nobot = await new_room(ret, "alice", "bob", name="user hold, no Enclave")
    bot = ret.stack.bot_user_id
    await ret.stack.hs("POST", f"/_matrix/client/v3/rooms/{q(nobot)}/leave", {}, as_user=bot)
    await say(ret, "alice", nobot, "n0 before the held user")
    await say(ret, "bob", nobot, "n1 held")
    n2 = await say(ret, "alice", nobot, "n2 after a held one")
    held_room = await new_room(ret, "carol", name="room hold")
    c = [await say(ret, "carol", held_room, f"c{i} held by the room hold") for i in range(3)]
    last_old = time.time()
    await wait_archived(ret, mixed, [a0, b1, a2, img, b3])
    await wait_archived(ret, held_room, c)
    await wait_archived(ret, nobot, [n2])

    r = await ret.cli("hold", "add", "--id", "hold-bob", "--case", "CASE-1", "--reason",
                      "litigation", "--by", "legal@corp", "--user", ret.uid("bob"))
    assert r.returncode == 0, r.stderr
    r = await ret.cli("hold", "add", "--id", "hold-room", "--case", "CASE-2", "--reason",
                      "audit", "--by", "legal@corp", "--room", held_room)
    assert r.returncode == 0, r.stderr
    r = await ret.cli("hold", "list", "--format", "json")
    assert {json.loads(x)["id"] for x in r.stdout.splitlines()} >= {"hold-bob", "hold-room"}

    await wait_due(last_old)
    fresh = [await say(ret, "alice", mixed, "fresh"), await say(ret, "carol", held_room, "fr")]
    await say(ret, "alice", nobot, "fresh")
    plan = await ret.cli("retention", "--plan", "--room", mixed, "--room", held_room)
    assert plan.returncode == 0 and "hold-bob" in plan.stdout and "hold-room" in plan.stdout
    outs = {o["room"]: o for o in await retention_apply(ret, mixed, held_room, nobot)}
    assert outs[mixed]["redacted"] == 2 and outs[mixed]["not_redacted"] == 0, outs[mixed]

    left = await on_homeserver(ret, mixed)
    assert a0 not in left  # before the first held event: purged
    assert left[b1]["body"] == "b1 held" and left[b3]["body"] == "b3 held"
    # after a held one: the homeserver cannot purge past it, so its content is redacted,
    # by Enclave's bot (never by the message's author or another member)
    assert "body" not in left.get(a2, {}), left.get(a2)
    assert fresh[0] in left
    redactions = [e for e in await room_events(ret, mixed) if e["type"] == "m.room.redaction"]
    assert [(e["sender"], e.get("redacts") or e["content"].get("redacts"))
            for e in redactions] == [(bot, a2), (bot, img)], redactions
    # where the bot is not in the room, nothing is done as anyone else: it is reported
    assert outs[nobot]["redacted"] == 0 and outs[nobot]["not_redacted"] == 1, outs[nobot]
    assert bot in outs[nobot]["not_redacted_reason"], outs[nobot]
    nobot_events = await room_events(ret, nobot)
    assert not [e for e in nobot_events if e["type"] == "m.room.redaction"]
    st = await ret.stack.hs("GET", f"/_synapse/admin/v1/rooms/{q(nobot)}/state")
    assert [e["content"]["membership"] for e in st["state"] if e["type"] == "m.room.member"
            and e["state_key"] == bot] == ["leave"], "Enclave was invited again"
    assert (await on_homeserver(ret, nobot))[n2]["body"] == "n2 after a held one"
    r = await ret.cli("audit", "--room", nobot, "--format", "json")
    refused = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert any(a["kind"] == "redact" and a["outcome"] == "failed" and a["room_id"] == nobot
               for a in refused), r.stdout[-2000:]
    # the transcript and the EML name Enclave as the redactor
    out_dir = ret.base / "export-redacted"
    r = await ret.cli("export", "--room", mixed, "--out", str(out_dir))
    assert r.returncode == 0, r.stderr
    page_path = next((out_dir / "rooms").glob("*/transcript.html"))
    html_text = page_path.read_text()
    deleted = [ln for ln in html_text.split('<div class="body">') if ln.startswith(
        "message deleted by")]
    assert len(deleted) == 2 and all(bot in d and "@alice" not in d for d in deleted), deleted
    mails = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
             for p in (out_dir / "rooms").glob("*/eml/*.eml")]
    redacted_mails = [m for m in mails if m["X-Matrix-Redacted-By"]]
    assert [str(m["X-Matrix-Redacted-By"]) for m in redacted_mails] == [bot, bot]
    # From: the sender's directory email, not localpart@server
    assert {m["From"].addresses[0].addr_spec for m in mails
            if str(m["X-Matrix-Sender"]) == ret.uid("alice")} == {"alice.mail@example.com"}

    def reviewer_sees(page: Any) -> dict[str, bool]:
        a2_msg = page.locator(".msg", has_text="a2 after a held one")
        b1_msg = page.locator(".msg", has_text="b1 held")
        img_msg = page.locator(".msg.deleted").filter(has=page.locator("img"))
        return {
            # the archived text of the redacted message, visible without a click
            "a2 text": a2_msg.get_by_text("a2 after a held one").is_visible(),
            # the archived image of the redacted image message, shown and loaded
            "image": img_msg.locator("img").is_visible() and img_msg.locator("img").evaluate(
                "img => img.complete && img.naturalWidth > 0"),
            # a held message is marked as such
            "hold mark": b1_msg.get_by_text("legal hold hold-bob").is_visible(),
        }

    seen = await asyncio.to_thread(in_browser, page_path, reviewer_sees)
    assert seen == {"a2 text": True, "image": True, "hold mark": True}, seen
    left_held = await on_homeserver(ret, held_room)
    assert all(left_held[e]["body"].startswith("c") for e in c)

    for hold in ("hold-bob", "hold-room"):
        r = await ret.cli("hold", "release", hold, "--by", "legal@corp", "--reason", "closed")
        assert r.returncode == 0, r.stderr
    # the first "fresh" messages may be past the period by now (the export and the browser
    # take seconds on a busy machine): these are certainly inside it
    fresh = [await say(ret, "alice", mixed, "fresh again"),
             await say(ret, "carol", held_room, "fr again")]
    await retention_apply(ret, mixed, held_room)
    left = await on_homeserver(ret, mixed)
    assert not {a0, b1, a2, b3} & set(left) and fresh[0] in left
    left_held = await on_homeserver(ret, held_room)
    assert not set(c) & set(left_held) and fresh[1] in left_held
    # everything stays in the archive, and the audit log has the holds
    assert {a0, b1, a2, b3} <= set(ret.archived(mixed))
    r = await ret.cli("audit", "--format", "json")
    assert "hold_add" in r.stdout and "hold_release" in r.stdout, r.stdout[-2000:]


async def test_holds_and_exports_refuse_what_nobody_knows(ret: Setup) -> None:
    r = await ret.cli("hold", "add", "--id", "typo", "--case", "CASE-9", "--reason", "x",
                      "--by", "legal@corp", "--user", ret.uid("nosuchuser"))
    assert r.returncode == 2 and "unknown user" in r.stderr, (r.returncode, r.stderr)
    r = await ret.cli("hold", "add", "--id", "typo-room", "--case", "CASE-9", "--reason", "x",
                      "--by", "legal@corp", "--room", "!unknown")
    assert r.returncode == 2 and "unknown room" in r.stderr, (r.returncode, r.stderr)
    r = await ret.cli("hold", "list", "--all", "--format", "json")
    assert "typo" not in r.stdout, r.stdout
    # a deactivated account is known: its history may well be what a case needs
    gone = await ret.stack.new_staff("leaver")
    await gone.close()
    await ret.stack.hs("POST", f"/_synapse/admin/v1/deactivate/{q(gone.user_id)}",
                       {"erase": False})
    r = await ret.cli("hold", "add", "--id", "leaver", "--case", "CASE-9", "--reason", "x",
                      "--by", "legal@corp", "--user", gone.user_id)
    assert r.returncode == 0, r.stderr
    r = await ret.cli("hold", "release", "leaver", "--by", "legal@corp")
    assert r.returncode == 0, r.stderr
    # an export of a room the archive does not know is an error, not an empty export
    out_dir = ret.base / "export-unknown"
    r = await ret.cli("export", "--room", "!unknown", "--out", str(out_dir))
    assert r.returncode == 1 and "!unknown" in r.stderr, (r.returncode, r.stderr)
    assert not (out_dir / "manifest.json").exists()


async def test_a_purge_whose_boundary_event_is_gone_takes_the_next(ret: Setup) -> None:
    """The boundary event the archive names for a purge step may be gone from the homeserver
    (on a loaded machine an earlier step took it); here an operator purged it by hand. The
    run must pick the next event, not fail."""
    room = await new_room(ret, "alice", name="boundary gone")
    sent = [await say(ret, "alice", room, f"m{i}") for i in range(6)]
    last_old = time.time()
    await wait_archived(ret, room, sent)
    # behind Enclave's back: everything before m4 goes (m3, the first step's boundary too)
    resp = await ret.stack.hs("POST", f"/_synapse/admin/v1/purge_history/{q(room)}",
                              {"purge_up_to_event_id": sent[4], "delete_local_events": True})

    async def purged() -> bool:
        st = await ret.stack.hs("GET",
                                f"/_synapse/admin/v1/purge_history_status/{resp['purge_id']}")
        return st["status"] == "complete"

    await wait_until(purged, within=30, what="the hand-made purge")
    assert not set(sent[:4]) & set(await on_homeserver(ret, room))
    await wait_due(last_old)
    fresh = await say(ret, "alice", room, "fresh")
    [out] = await retention_apply(ret, room)  # exit 0: asserted by the helper
    assert out["error"] is None and out["steps"], out
    left = await on_homeserver(ret, room)
    assert not set(sent) & set(left) and fresh in left, left
    assert set(sent) <= set(ret.archived(room))
    [again] = await retention_apply(ret, room)
    assert again["error"] is None and again["plan"]["due_events"] == 0, again


async def test_a_failing_archive_write_prevents_the_purge(ret: Setup) -> None:
    room = await new_room(ret, "alice", name="archive fails")
    # Enclave stopped: the live feed cannot archive these, so the run must archive them
    await ret.enclave.stop()
    try:
        sent = [await say(ret, "alice", room, f"unarchived {i}") for i in range(4)]
        last_old = time.time()
        broken = ret.base / "broken.yaml"
        cfg = yaml.safe_load(ret.config.read_text())
        blocker = ret.base / "not-a-directory"
        blocker.write_text("a file where the archive volume should be\n")
        cfg["retention"]["archive"]["path"] = str(blocker / "archive")
        cfg["database"]["url"] = f"sqlite:///{ret.config.parent / 'enclave.db'}"
        broken.write_text(yaml.safe_dump(cfg, sort_keys=False))
        await wait_due(last_old)
        await say(ret, "alice", room, "fresh")
        [out] = await retention_apply(ret, room, config=broken, expect=1)
        assert out["error"] and "archive" in out["error"].lower(), out
        assert out["purged"] == 0 and not out["steps"], out
        left = await on_homeserver(ret, room)
        assert set(sent) <= set(left), "purged without an archive"
        assert not set(sent) & set(ret.archived(room))
    finally:
        await ret.enclave.start()
    [out] = await retention_apply(ret, room)
    assert out["error"] is None and out["purged"] >= 4, out
    assert set(sent) <= set(ret.archived(room))
    assert not set(sent) & set(await on_homeserver(ret, room))


async def test_a_moderator_changing_retention_is_reverted_without_the_gate(
        ret: Setup) -> None:
    ret.stack.synapse.extra_config.pop("modules", None)
    await asyncio.to_thread(ret.stack.synapse.restart)
    try:
        room = await new_room(ret, "alice", "bob", name="no gate")
        alice = await ret.staff("alice")
        expected = {"max_lifetime": KEEP_SECONDS * 1000}
        # without the gate the room starts without the state; Enclave's bot is not in the
        # room, so a run reports that it cannot show the period (and does not set it as
        # one of the members, nor invite itself as one)
        r = await ret.cli("retention", "--apply", "--format", "json", "--room", room)
        assert r.returncode == 0, r.stdout + r.stderr
        findings = [json.loads(x)["finding"] for x in r.stdout.splitlines()
                    if x.startswith('{"finding"')]
        assert any("m.room.retention not set" in f for f in findings), r.stdout
        assert await room_state(ret.stack, room, "m.room.retention") is None
        assert not [e for e in await room_events(ret, room)
                    if e.get("state_key") == ret.stack.bot_user_id]
        # once alice lets Enclave in, a run shows the period under Enclave's name
        await invite_enclave(ret, "alice", room, 100)
        await retention_apply(ret, room)
        assert await room_state(ret.stack, room, "m.room.retention") == expected

        async def state_sender() -> str | None:
            st = await ret.stack.hs("GET", f"/_synapse/admin/v1/rooms/{q(room)}/state")
            return next((e["sender"] for e in st["state"]
                         if e["type"] == "m.room.retention"), None)

        assert await state_sender() == ret.stack.bot_user_id
        resp = await alice.room_put_state(room, "m.room.retention",
                                          {"max_lifetime": 10 ** 12})
        assert isinstance(resp, nio.RoomPutStateResponse), resp

        async def reverted() -> bool:
            return await room_state(ret.stack, room, "m.room.retention") == expected

        await wait_until(reverted, within=30, what="the reactive revert",
                         describe=ret.enclave.describe)
        assert await state_sender() == ret.stack.bot_user_id
        # moderators may adjust it within the class bounds, through Enclave
        await say(ret, "alice", room, "!retention 30s")

        async def adjusted() -> bool:
            return await room_state(ret.stack, room, "m.room.retention") == {
                "max_lifetime": 30_000}

        try:
            await wait_until(adjusted, within=30, what="the !retention adjustment",
                             describe=ret.enclave.describe)
        except AssertionError as e:
            said = [(e.get("content") or {}).get("body")
                    for e in await ret.stack.room_messages(room)]
            raise AssertionError(f"{e}\nthe room said: {said}") from None
        assert await state_sender() == ret.stack.bot_user_id
        await say(ret, "bob", room, "!retention 1y")  # bob: no power, and out of bounds
        await asyncio.sleep(2)
        assert await room_state(ret.stack, room, "m.room.retention") == {
            "max_lifetime": 30_000}
    finally:
        ret.stack.synapse.extra_config["modules"] = ret.gate_module()
        await asyncio.to_thread(ret.stack.synapse.restart)


async def test_archive_verify_reports_a_changed_segment_and_manifest(ret: Setup) -> None:
    r = await ret.cli("archive", "verify", "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    segment = next(ret.archive.glob("rooms/*/seg-*.jsonl"))
    room_dir = segment.parent
    backup = ret.base / "archive-backup"
    shutil.copytree(room_dir, backup)

    # one changed character in an archived message
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"content":{', b'"content":{"x":1,', 1)
    segment.write_bytes(b"".join(lines))
    r = await ret.cli("archive", "verify", "--format", "json")
    assert r.returncode == 1, r.stdout
    report = json.loads(r.stdout)
    assert not report["ok"] and report["problems"], report
    assert report["problems"][0]["entry"] is not None

    # restored, then a manifest entry removed from the middle of the chain
    shutil.rmtree(room_dir)
    shutil.copytree(backup, room_dir)
    assert (await ret.cli("archive", "verify")).returncode == 0
    manifest = room_dir / "manifest.jsonl"
    entries = manifest.read_bytes().splitlines(keepends=True)
    assert len(entries) >= 2
    manifest.write_bytes(b"".join(entries[:1] + entries[2:]))
    r = await ret.cli("archive", "verify")
    assert r.returncode == 1 and "BROKEN" in r.stdout, r.stdout

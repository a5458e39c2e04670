"""deploy/backup: a backup of the running local stack, restored into a wiped state folder.

The real thing end to end: the local stack (``python -m devstack.stack``, Synapse and
Enclave on SQLite, as ``make run`` starts it) in a temporary state folder on free ports; demo
staff chat in two rooms with matrix-nio and upload an image; once Enclave has archived it all,
``enclave-backup`` runs while both servers keep running. Then the stack stops, the state
folder is deleted, a corrupted copy of the backup is refused (and changes nothing),
``enclave-restore`` rebuilds the folder, and the stack starts again on it: every message reads
back, the accounts, rooms, sessions, media and signing key are there, ``enclave archive
verify`` passes with the backup's event count, and new messages are archived again.

A second, smaller test covers the PostgreSQL branch for Enclave's database (pg_dump with an
exported snapshot, pg_restore --clean) against the machine's PostgreSQL at 127.0.0.1:5432.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.synapse import SynapseServer, free_port

from .harness import appservice_port, fresh_pg_database, nio, tail, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BACKUP = REPO / "deploy" / "backup" / "enclave-backup"
RESTORE = REPO / "deploy" / "backup" / "enclave-restore"
SERVER = "corp.test"
PEOPLE = {p["username"]: p for p in
          yaml.safe_load((REPO / "deploy/local/directory.yaml").read_text())["people"]}
# a 1x1 PNG
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360f8ffff3f0005fe02fea7d6a4bb0000000049454e44ae426082")


# -- helpers -------------------------------------------------------------------------------------
def run(*cmd: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENCLAVE_PYTHON": sys.executable}
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def verify_archive(config: Path) -> dict[str, Any]:
    r = run(sys.executable, "-m", "bridge", "archive", "verify", "-c", config,
            "--format", "json", timeout=120)
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> its sha256 (and folders), to show nothing changed."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[str(Path(dirpath, d).relative_to(root)) + "/"] = "dir"
        for f in filenames:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class LocalStack:
    """``python -m devstack.stack`` on a state folder and two ports, as make run."""

    def __init__(self, state: Path, log: Path):
        self.state = state
        self.log = log
        self.hs_port = free_port()
        self.enc_port = appservice_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hs_url(self) -> str:
        return f"http://127.0.0.1:{self.hs_port}"

    def start(self, timeout: float = 120) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devstack.stack", "--state-dir", str(self.state),
                 "--synapse-port", str(self.hs_port), "--enclave-port", str(self.enc_port)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while "Press Ctrl-C" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the local stack did not start:\n{tail(self.log)}\n"
                                     f"{tail(self.state / 'enclave.log')}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # a stop request: SIGKILL of the launcher would orphan Synapse and Enclave
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        assert "stopped." in self.log.read_text(errors="replace"), tail(self.log)

    def describe(self) -> str:
        return tail(self.state / "enclave.log", 30)

    def accounts(self) -> dict[str, tuple[bool, bool]]:
        """The demo staff's and Enclave's accounts: user id -> (deactivated, admin)."""
        out = {}
        for local in [*PEOPLE, "enclave", "enclave-admin", "enclave_announce",
                      "enclave_welcome"]:
            user = self.as_admin("GET", "/_synapse/admin/v2/users/"
                                 + urllib.parse.quote(f"@{local}:{SERVER}"))
            out[user["name"]] = (bool(user["deactivated"]), bool(user["admin"]))
        return out

    def as_admin(self, method: str, path: str) -> Any:
        """The admin API as Enclave's admin identity (the appservice token masquerading)."""
        token = (self.state / "secrets" / "as_token").read_text().strip()
        sep = "&" if "?" in path else "?"
        url = (f"{self.hs_url}{path}{sep}user_id="
               f"{urllib.parse.quote(f'@enclave-admin:{SERVER}')}")
        req = urllib.request.Request(url, method=method,
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


def archived_ids(db: Path, event_ids: list[str]) -> set[str]:
    if not db.exists():
        return set()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        marks = ",".join("?" * len(event_ids))
        return {r[0] for r in conn.execute(
            f"SELECT event_id FROM archive_events WHERE event_id IN ({marks})", event_ids)}
    except sqlite3.OperationalError:
        return set()
    finally:
        conn.close()


def archived_media(db: Path, mxc: str) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT COUNT(*) FROM archive_media WHERE mxc = ?",
                            (mxc,)).fetchone()[0] == 1
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


async def login(hs_url: str, who: str) -> nio.AsyncClient:
    c = nio.AsyncClient(hs_url, who)
    resp = await c.login(PEOPLE[who]["initial_password"])
    assert isinstance(resp, nio.LoginResponse), resp
    return c


async def room_named(c: nio.AsyncClient, name: str) -> str:
    rooms = await c.joined_rooms()
    assert isinstance(rooms, nio.JoinedRoomsResponse), rooms
    for rid in rooms.rooms:
        state = await c.room_get_state_event(rid, "m.room.name")
        if getattr(state, "content", {}).get("name") == name:
            return rid
    raise AssertionError(f"{c.user_id} is not in a room named {name!r}")


async def say(c: nio.AsyncClient, room_id: str, body: str) -> str:
    resp = await c.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    assert isinstance(resp, nio.RoomSendResponse), resp
    return resp.event_id


async def read_room(c: nio.AsyncClient, room_id: str) -> dict[str, dict[str, Any]]:
    """Every event of the room the user can read (room messages API, newest first)."""
    out: dict[str, dict[str, Any]] = {}
    start: str | None = None
    for _ in range(50):
        resp = await c.room_messages(room_id, start=start, limit=100)
        assert isinstance(resp, nio.RoomMessagesResponse), resp
        for ev in resp.chunk:
            out[ev.event_id] = ev.source
        if not resp.chunk or not resp.end or resp.end == start:
            break
        start = resp.end
    return out


async def download(hs_url: str, token: str, mxc: str) -> bytes:
    server, media_id = mxc.removeprefix("mxc://").split("/", 1)
    req = urllib.request.Request(
        f"{hs_url}/_matrix/client/v1/media/download/{server}/{media_id}",
        headers={"Authorization": f"Bearer {token}"})

    def get() -> bytes:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    return await asyncio.to_thread(get)


# -- the whole installation, SQLite ------------------------------------------------------------
async def test_backup_of_running_stack_restores_into_wiped_state(tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    state = tmp_path / "state"
    stack = LocalStack(state, tmp_path / "stack-1.out")
    backups = tmp_path / "backups"
    config = state / "enclave.yaml"
    enclave_db = state / "enclave.db"
    stack.start()
    timings["first start"] = time.monotonic() - t0
    clients: list[nio.AsyncClient] = []
    try:
        # -- staff chat in two rooms, one image -----------------------------------------------
        alice = await login(stack.hs_url, "alice")
        bob = await login(stack.hs_url, "bob")
        clients += [alice, bob]
        general = await room_named(alice, "Engineering general")
        created = await alice.room_create(name="Backup drill", invite=[f"@bob:{SERVER}"])
        assert isinstance(created, nio.RoomCreateResponse), created
        drill = created.room_id
        assert isinstance(await bob.join(drill), nio.JoinResponse)
        sent: dict[str, tuple[str, str]] = {}  # event id -> (room, body)
        for i, (who, room) in enumerate([(alice, general), (bob, general), (alice, general),
                                         (alice, drill), (bob, drill), (bob, drill)]):
            body = f"before the backup #{i} from {who.user_id}"
            sent[await say(who, room, body)] = (room, body)
        up, _ = await alice.upload(io.BytesIO(PNG), content_type="image/png",
                                   filename="drill.png", filesize=len(PNG))
        assert isinstance(up, nio.UploadResponse), up
        mxc = up.content_uri
        img = await alice.room_send(drill, "m.room.message", {
            "msgtype": "m.image", "body": "drill.png", "url": mxc,
            "info": {"mimetype": "image/png", "size": len(PNG)}})
        assert isinstance(img, nio.RoomSendResponse), img
        sent[img.event_id] = (drill, "drill.png")
        ids = list(sent)

        async def all_archived() -> bool:
            return archived_ids(enclave_db, ids) == set(ids) and archived_media(enclave_db, mxc)

        await wait_until(all_archived, within=60, what="Enclave archiving every message and "
                         "the image", describe=stack.describe)
        users_before = stack.accounts()
        assert all(not deactivated for deactivated, _ in users_before.values()), users_before
        rooms_before = {r["room_id"] for r in stack.as_admin(
            "GET", "/_synapse/admin/v1/rooms?limit=1000")["rooms"]}
        assert {general, drill} <= rooms_before
        before = verify_archive(config)
        assert before["ok"], before

        # -- the backup, while both servers run and bob keeps chatting -------------------------
        t = time.monotonic()
        backing_up = asyncio.create_task(asyncio.to_thread(
            run, BACKUP, "--synapse-config", state / "synapse" / "homeserver.yaml",
            "--synapse-config", state / "synapse" / "overrides.yaml",
            "--enclave-config", config, "--out", backups))
        during: list[str] = []  # may or may not make it into the backup
        while not backing_up.done() and len(during) < 6:  # within the message rate limit
            during.append(await say(bob, general, f"during the backup #{len(during)}"))
            await asyncio.sleep(0.1)
        r = await backing_up
        timings["backup"] = time.monotonic() - t
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        assert stack.proc is not None and stack.proc.poll() is None, "the stack stopped"
        after = verify_archive(config)
        (backup,) = [d for d in backups.iterdir() if d.name.startswith("enclave-backup-")]
        assert not backup.name.endswith(".partial")
        manifest = json.loads((backup / "MANIFEST.json").read_text())
        parts = {p["name"]: p for p in manifest["parts"]}
        assert {"synapse-config", "synapse-signing-key", "appservice-registration",
                "synapse-db", "synapse-media", "enclave-config", "enclave-secret",
                "enclave-journal", "enclave-db", "enclave-archive", "enclave-crypto"} <= set(parts)
        assert parts["synapse-db"]["kind"] == parts["enclave-db"]["kind"] == "sqlite"
        assert manifest["warnings"] == []
        # the order deploy/backup/README.md promises ("Order, and what a restore
        # guarantees"): Synapse, then Enclave's journal, database + archive
        order = [p["name"] for p in manifest["parts"]]
        assert order.index("synapse-db") < order.index("synapse-media") \
            < order.index("enclave-journal") < order.index("enclave-db") \
            < order.index("enclave-archive")
        for p in manifest["parts"]:  # sizes and SHA-256 of every part
            f = backup / p["file"]
            assert f.stat().st_size == p["size"]
            assert hashlib.sha256(f.read_bytes()).hexdigest() == p["sha256"], p["file"]
        archived = parts["enclave-archive"]
        assert archived["events"] == parts["enclave-db"]["counts"]["archive_events"]
        # everything archived before the backup is in it; nothing it holds is made up
        assert before["events"] <= archived["events"] <= after["events"], (before, archived,
                                                                             after)
        assert archived_ids(backup / "enclave-db.sqlite", ids) == set(ids)
        assert archived["media_files"] >= 1 and parts["synapse-media"]["files"] >= 1
        # a restore while the servers run is refused before it looks at anything else
        r = run(RESTORE, backup, "--force")
        assert r.returncode == 5, f"{r.stdout}\n{r.stderr}"
        assert "Synapse answers at" in r.stderr and "Enclave answers at" in r.stderr
        signing_key = (state / "synapse" / f"{SERVER}.signing.key").read_bytes()
        secrets_before = tree_digest(state / "secrets")
        old_token, old_device = alice.access_token, alice.device_id
    finally:
        for c in clients:
            await c.close()
        clients.clear()
        stack.stop()

    # -- the state is gone --------------------------------------------------------------------
    shutil.rmtree(state)
    assert not state.exists()

    # a corrupted backup is refused before anything is written
    corrupt = tmp_path / "corrupt"
    shutil.copytree(backup, corrupt)
    victim = corrupt / "synapse-db.sqlite"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = run(RESTORE, corrupt)
    assert r.returncode == 3, f"{r.stdout}\n{r.stderr}"
    assert "SHA-256 checksum mismatch" in r.stderr and "synapse-db.sqlite" in r.stderr
    assert "nothing was restored" in r.stderr
    assert not state.exists(), "a refused restore wrote something"
    r = run(RESTORE, "--check", corrupt)
    assert r.returncode == 3, r.stderr

    # -- the restore --------------------------------------------------------------------------
    t = time.monotonic()
    r = run(RESTORE, backup)
    timings["restore"] = time.monotonic() - t
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    for step in ("start Synapse", "enclave migrate", "start Enclave", "enclave archive verify"):
        assert step in r.stdout, r.stdout
    assert (state / "synapse" / f"{SERVER}.signing.key").read_bytes() == signing_key
    assert tree_digest(state / "secrets") == secrets_before

    restored = tree_digest(state)
    # a second restore over it is refused without --force, the corrupted one even with it
    r = run(RESTORE, backup)
    assert r.returncode == 4, f"{r.stdout}\n{r.stderr}"
    assert "target not empty" in r.stderr
    r = run(RESTORE, corrupt, "--force")
    assert r.returncode == 3, f"{r.stdout}\n{r.stderr}"
    assert tree_digest(state) == restored, "a refused restore changed the state"

    # the archive verifies offline, with exactly the backup's events
    offline = verify_archive(config)
    assert offline["ok"], offline
    assert offline["events"] == archived["events"], (offline, archived)

    # -- the stack on the restored state --------------------------------------------------------
    stack = LocalStack(state, tmp_path / "stack-2.out")  # fresh ports: the configs are rewritten
    t = time.monotonic()
    stack.start()
    timings["second start"] = time.monotonic() - t
    try:
        # alice's session survived (the token is in Synapse's database), bob logs in anew
        alice = nio.AsyncClient(stack.hs_url, f"@alice:{SERVER}")
        alice.restore_login(f"@alice:{SERVER}", old_device, old_token)
        clients.append(alice)
        who = await alice.whoami()
        assert isinstance(who, nio.WhoamiResponse), who
        bob = await login(stack.hs_url, "bob")
        clients.append(bob)
        # every message reads back, by the staff user, through the room messages API
        for reader in (alice, bob):
            seen: dict[str, dict[str, Any]] = {}
            for room in (general, drill):
                seen.update(await read_room(reader, room))
            for event_id, (room, body) in sent.items():
                assert event_id in seen, f"{event_id} ({body!r}) is gone for {reader.user_id}"
                assert seen[event_id]["room_id"] == room
                assert seen[event_id]["content"]["body"] == body
        joined = await bob.joined_rooms()
        assert isinstance(joined, nio.JoinedRoomsResponse)
        assert {general, drill} <= set(joined.rooms)
        assert stack.accounts() == users_before
        rooms_after = {r["room_id"] for r in stack.as_admin(
            "GET", "/_synapse/admin/v1/rooms?limit=1000")["rooms"]}
        assert rooms_before <= rooms_after, rooms_before - rooms_after
        assert await download(stack.hs_url, bob.access_token, mxc) == PNG

        # Synapse was backed up first, so whatever of the messages sent during the backup
        # the restored homeserver has, Enclave has archived or is given again: none is lost
        kept = [e for e in during if e in seen]

        async def kept_archived() -> bool:
            return archived_ids(enclave_db, kept) == set(kept) if kept else True

        await wait_until(kept_archived, within=90, what="the messages sent during the backup "
                         "that the restored homeserver has, archived", describe=stack.describe)

        # Enclave goes on: the archive verifies and a new message is archived too
        live = verify_archive(config)
        assert live["ok"], live
        assert live["events"] >= archived["events"]
        new = await say(alice, drill, "after the restore")

        async def new_archived() -> bool:
            return archived_ids(enclave_db, [new]) == {new}

        await wait_until(new_archived, within=60, what="the first message after the restore "
                         "archived", describe=stack.describe)
        final = verify_archive(config)
        assert final["ok"], final
        assert final["events"] > archived["events"]
    finally:
        for c in clients:
            await c.close()
        stack.stop()
    timings["total"] = time.monotonic() - t0
    print(f"sent during the backup: {len(during)}, in the restored homeserver: {len(kept)}; "
          "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


# -- Enclave's database on PostgreSQL -------------------------------------------------------------
@pytest.fixture
def pg_database() -> Iterator[str]:
    with fresh_pg_database("enclave_backup") as dsn:
        yield dsn


def _pg_exec(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


async def _fill(config: Path, dsn: str, rooms: dict[str, int], *, start: int = 0) -> None:
    """Archive ``count`` events per room (and one media file) through Enclave's own code."""
    from bridge.retention.archive import LocalArchive
    from bridge.store import open_stores

    store = open_stores(dsn, base_dir=config.parent)
    await store.database.open()
    try:
        archive = LocalArchive(config.parent / "archive", store.archive)
        for room, count in rooms.items():
            events = [{"event_id": f"$e{start + i}-{room[1:6]}", "room_id": room,
                       "type": "m.room.message", "sender": f"@alice:{SERVER}",
                       "origin_server_ts": 1_700_000_000_000 + start + i,
                       "content": {"msgtype": "m.text", "body": f"message {start + i}"}}
                      for i in range(count)]
            assert (await archive.append(room, events)).written == count
        room = next(iter(rooms))
        await archive.put_media(room, f"$img{start}", f"mxc://{SERVER}/img{start}", PNG,
                                "image/png", 1_700_000_000_000 + start)
        assert await store.journal.journal_append(f"txn-{start}", b'{"events": []}', 1)
    finally:
        await store.database.close()


def _enclave_site(site: Path, database_url: str) -> Path:
    """A minimal Enclave config (retention on, no homeserver needed) with its tokens."""
    (site / "secrets").mkdir(parents=True)
    for name in ("as_token", "hs_token"):
        (site / "secrets" / name).write_text(secrets.token_urlsafe(24) + "\n")
    config = site / "config.yaml"
    config.write_text(yaml.safe_dump({
        "homeserver": {"url": "http://127.0.0.1:9", "server_name": SERVER},
        "appservice": {"public_url": "http://127.0.0.1:29330",
                       "as_token": {"file": "secrets/as_token"},
                       "hs_token": {"file": "secrets/hs_token"}},
        "database": {"url": database_url},
        "retention": {"enabled": True, "archive": {"path": "archive"}},
    }))
    r = run(sys.executable, "-m", "bridge", "migrate", "-c", config)
    assert r.returncode == 0, r.stderr
    return config


async def test_archive_is_cut_to_the_database_heads(tmp_path: Path) -> None:
    """Archive files ahead of the database (written, not yet committed: a write in flight,
    or what a crash leaves) are cut off in the backup, so the restored pair verifies; the
    live archive reports them as uncommitted until Enclave's next write reconciles them."""
    site = tmp_path / "enclave"
    config = _enclave_site(site, "sqlite:///enclave.db")
    await _fill(config, "sqlite:///enclave.db", {"!one:corp.test": 4, "!two:corp.test": 2})
    committed = verify_archive(config)
    assert committed["ok"] and committed["events"] == 6, committed
    shutil.copyfile(site / "enclave.db", tmp_path / "enclave.db.then")
    await _fill(config, "sqlite:///enclave.db", {"!one:corp.test": 3, "!three:corp.test": 2},
                start=100)
    shutil.copyfile(tmp_path / "enclave.db.then", site / "enclave.db")  # the files run ahead
    live = verify_archive(config)
    assert not live["ok"] and {p["kind"] for p in live["problems"]} == {"uncommitted"}, live

    r = run(BACKUP, "--enclave-config", config, "--out", tmp_path / "backups")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    (backup,) = (tmp_path / "backups").iterdir()
    parts = {p["name"]: p for p in json.loads((backup / "MANIFEST.json").read_text())["parts"]}
    assert parts["enclave-archive"]["events"] == 6
    assert len(parts["enclave-archive"]["skipped_uncommitted_rooms"]) == 1  # !three
    shutil.rmtree(site)
    r = run(RESTORE, backup)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    got = verify_archive(config)
    assert got["ok"], got
    assert (got["events"], got["media"], got["rooms"]) == (
        committed["events"], committed["media"], committed["rooms"])


async def test_enclave_postgres_database_backup_and_restore(tmp_path: Path,
                                                            pg_database: str) -> None:
    site = tmp_path / "enclave"
    config = _enclave_site(site, pg_database)
    rooms = {"!one:corp.test": 5, "!two:corp.test": 3}
    await _fill(config, pg_database, rooms)

    r = run(BACKUP, "--enclave-config", config, "--out", tmp_path / "backups")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    (backup,) = (tmp_path / "backups").iterdir()
    manifest = json.loads((backup / "MANIFEST.json").read_text())
    parts = {p["name"]: p for p in manifest["parts"]}
    assert parts["enclave-db"]["kind"] == "pg_dump"
    assert "password" not in json.dumps(parts["enclave-db"]["conninfo"])
    assert "enclave-journal" not in parts  # a table of the PostgreSQL database
    assert parts["enclave-archive"]["events"] == 8
    assert parts["enclave-db"]["counts"]["archive_events"] == 8
    expected = verify_archive(config)
    assert expected["ok"] and expected["events"] == 8, expected

    # after the backup the installation moves on; a restore over it needs --force
    await _fill(config, pg_database, {"!one:corp.test": 2}, start=100)
    r = run(RESTORE, backup)
    assert r.returncode == 4, f"{r.stdout}\n{r.stderr}"
    assert "tables" in r.stderr and "target not empty" in r.stderr
    assert verify_archive(config)["events"] == 10  # untouched

    # wiped: an empty database (as a DBA would create it) and no files at all
    _pg_exec(pg_database, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    shutil.rmtree(site)
    r = run(RESTORE, backup)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "pg_restore" in r.stdout
    got = verify_archive(config)
    assert got["ok"], got
    assert (got["events"], got["media"], got["rooms"]) == (
        expected["events"], expected["media"], expected["rooms"])
    assert _pg_exec(pg_database, "SELECT txn_id FROM txn_journal") == [("txn-0",)]
    assert _pg_exec(pg_database, "SELECT COUNT(*) FROM archive_events") == [(8,)]

    # --force over a live (non-empty) installation: pg_restore --clean, files moved aside
    await _fill(config, pg_database, {"!two:corp.test": 4}, start=200)
    r = run(RESTORE, backup, "--force")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert _pg_exec(pg_database, "SELECT COUNT(*) FROM archive_events") == [(8,)]
    got = verify_archive(config)
    assert got["ok"] and got["events"] == 8, got
    assert list(site.glob("archive.pre-restore-*")), "the replaced archive was not kept"


async def test_synapse_postgres_database_backup_and_restore(tmp_path: Path,
                                                            pg_database: str) -> None:
    """Synapse's branch: pg_dump -Fc of a running homeserver, pg_restore into an emptied
    database, the homeserver back with its account, room, message and signing key."""
    hs = SynapseServer(base_dir=tmp_path / "synapse", database=pg_database)
    hs.start()
    try:
        user_id, token = hs.register_user("erin", "erin-password-1")
        room = hs.request("POST", "/_matrix/client/v3/createRoom", {"name": "pg"},
                          access_token=token)["room_id"]
        event_id = hs.request(
            "PUT", f"/_matrix/client/v3/rooms/{urllib.parse.quote(room)}/send/m.room.message/t1",
            {"msgtype": "m.text", "body": "kept in PostgreSQL"}, access_token=token)["event_id"]
        r = run(BACKUP, "--synapse-config", hs.config_path, "--synapse-config",
                hs.overrides_path, "--out", tmp_path / "backups")
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    finally:
        hs.stop()
    (backup,) = (tmp_path / "backups").iterdir()
    parts = {p["name"]: p for p in json.loads((backup / "MANIFEST.json").read_text())["parts"]}
    assert parts["synapse-db"]["kind"] == "pg_dump"
    assert "enclave-db" not in parts
    signing_key = (hs.base_dir / "corp.test.signing.key").read_bytes()

    _pg_exec(pg_database, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    shutil.rmtree(hs.base_dir)
    r = run(RESTORE, backup)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert (hs.base_dir / "corp.test.signing.key").read_bytes() == signing_key

    again = SynapseServer(base_dir=tmp_path / "synapse", database=pg_database)
    again.start()
    try:
        client = nio.AsyncClient(again.base_url, "erin")
        try:
            assert isinstance(await client.login("erin-password-1"), nio.LoginResponse)
            seen = await read_room(client, room)
            assert seen[event_id]["content"]["body"] == "kept in PostgreSQL"
        finally:
            await client.close()
        assert again.request("GET", "/_matrix/client/v3/account/whoami",
                             access_token=token)["user_id"] == user_id
    finally:
        again.stop()

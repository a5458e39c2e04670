"""The local compliance archive: append, read, media, crash safety and tamper evidence."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.retention.archive import (
    ZERO_HASH,
    ArchiveCorrupt,
    ArchiveWriteError,
    LocalArchive,
    VerifyProblem,
    entry_hash,
    parse_manifest,
    room_dir_name,
)
from bridge.retention.archive import files as archive_files
from bridge.store import Stores

ROOM = "!room:corp.example.com"
OTHER = "!other:corp.example.com"
T0 = 1_714_560_000_000


def ev(n: int, room: str = ROOM, *, sender: str = "@alice:corp.example.com",
       body: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"$e{n}-{room[1:6]}", "room_id": room, "sender": sender,
            "type": "m.room.message", "origin_server_ts": T0 + n,
            "content": {"msgtype": "m.text", "body": body or f"message {n}"},
            "unsigned": {"age": 5}, **extra}


@pytest.fixture
def make_archive(tmp_path: Path, store: Stores) -> Callable[..., LocalArchive]:
    """A new LocalArchive over the same directory and store (a new process)."""

    def make(segment_max_bytes: int = 1 << 20) -> LocalArchive:
        return LocalArchive(tmp_path / "archive", store.archive,
                            segment_max_bytes=segment_max_bytes, clock_ms=lambda: T0 + 10_000)
    return make


@pytest.fixture
def archive(make_archive: Callable[..., LocalArchive]) -> LocalArchive:
    return make_archive()


def manifest(a: LocalArchive, room: str = ROOM) -> Path:
    return a.room_dir(room) / "manifest.jsonl"


def seg(a: LocalArchive, n: int = 1, room: str = ROOM) -> Path:
    return a.room_dir(room) / f"seg-{n:06d}.jsonl"


async def all_rows(store: Stores, room: str = ROOM) -> list[Any]:
    return await store.archive.archive_query(room_id=room)


async def first_problem(a: LocalArchive, room: str = ROOM) -> VerifyProblem:
    report = await a.verify()
    assert not report.ok
    mine = [p for p in report.problems if p.room_id == room]
    assert mine, report.problems
    return mine[0]


# -- pure helpers ----------------------------------------------------------------------------
def test_entry_hash_chains_prev_and_body() -> None:
    e = {"n": 1, "op": "media", "room": ROOM, "at": 1, "prev": ZERO_HASH}
    h = entry_hash(e)
    assert h == hashlib.sha256(ZERO_HASH.encode() + orjson.dumps(
        e, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert entry_hash({**e, "hash": "ignored"}) == h
    assert entry_hash({**e, "prev": "1" * 64}) != h


@pytest.mark.parametrize(("room", "expected"), [
    ("!abc:corp.example.com", "%21abc%3Acorp.example.com"),
    ("!a/b:x", "%21a%2Fb%3Ax"),
    ("!" + "x" * 300, "h-" + hashlib.sha256(("!" + "x" * 300).encode()).hexdigest()),
])
def test_room_dir_name(room: str, expected: str) -> None:
    assert room_dir_name(room) == expected


def test_parse_manifest_stops_at_first_bad_line() -> None:
    assert parse_manifest(b"", ROOM).entries == []
    m = parse_manifest(b'{"not": "an entry"}\n', ROOM)
    assert m.entries == [] and m.problem == (1, "manifest_entry", "not a manifest entry")
    m = parse_manifest(b"garbage", ROOM)
    assert m.partial_tail and m.lines == 0 and m.problem is None


# -- append and read -------------------------------------------------------------------------
async def test_append_indexes_and_reads_back_in_order(archive: LocalArchive,
                                                      store: Stores) -> None:
    events = [ev(n) for n in range(1, 6)]
    res = await archive.append(ROOM, events)
    assert (res.written, res.skipped) == (5, 0)
    rows = await all_rows(store)
    assert [r.event_id for r in rows] == [e["event_id"] for e in events]
    assert [(r.segment, r.line) for r in rows] == [("seg-000001.jsonl", i) for i in range(1, 6)]
    assert rows[0].sender == "@alice:corp.example.com" and rows[0].ts == T0 + 1
    assert await archive.read(rows) == events  # stored as given (unsigned.age too)
    # one canonical (sorted keys) line per event
    first = seg(archive).read_bytes().split(b"\n")[0]
    assert first == orjson.dumps(events[0], option=orjson.OPT_SORT_KEYS)
    head = await store.archive.archive_head(ROOM)
    assert head is not None and head.entries == 1 and head.segment == "seg-000001.jsonl"
    assert head.segment_bytes == seg(archive).stat().st_size
    report = await archive.verify()
    assert report.ok and (report.rooms, report.entries, report.events) == (1, 1, 5)


async def test_append_is_idempotent(archive: LocalArchive, store: Stores) -> None:
    assert (await archive.append(ROOM, [ev(1), ev(2), ev(1)])).written == 2  # batch duplicate
    res = await archive.append(ROOM, [ev(1), ev(2), ev(3)])
    assert (res.written, res.skipped) == (1, 2)
    res = await archive.append(ROOM, [ev(1), ev(3)])
    assert (res.written, res.skipped) == (0, 2)
    assert [r.line for r in await all_rows(store)] == [1, 2, 3]
    assert len(seg(archive).read_bytes().splitlines()) == 3
    assert (await store.archive.archive_head(ROOM)).entries == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [
    {"type": "m.room.message", "origin_server_ts": 1},  # no event id
    {"event_id": "", "type": "m.room.message", "origin_server_ts": 1},
    {"event_id": "$x", "origin_server_ts": 1},  # no type
    {"event_id": "$x", "type": "m.room.message"},  # no timestamp
    {"event_id": "$x", "type": "m.room.message", "origin_server_ts": "1"},
])
async def test_events_without_index_fields_are_skipped(archive: LocalArchive, store: Stores,
                                                       bad: dict[str, Any]) -> None:
    res = await archive.append(ROOM, [bad, ev(1)])
    assert (res.written, res.skipped) == (1, 1)
    assert [r.event_id for r in await all_rows(store)] == [ev(1)["event_id"]]


async def test_event_of_another_room_is_refused(archive: LocalArchive) -> None:
    with pytest.raises(ValueError, match="belongs to"):
        await archive.append(ROOM, [ev(1, OTHER)])


async def test_segments_roll_over(make_archive: Callable[..., LocalArchive],
                                  store: Stores) -> None:
    size = len(orjson.dumps(ev(1), option=orjson.OPT_SORT_KEYS)) + 1
    a = make_archive(segment_max_bytes=size * 3)
    assert (await a.append(ROOM, [ev(n) for n in range(1, 5)])).written == 4
    assert (await a.append(ROOM, [ev(n) for n in range(5, 8)])).written == 3
    rows = await all_rows(store)
    assert [(r.segment[4:10], r.line) for r in rows] == [
        ("000001", 1), ("000001", 2), ("000001", 3), ("000002", 1), ("000002", 2),
        ("000002", 3), ("000003", 1)]
    assert all(p.stat().st_size <= size * 3 for p in a.room_dir(ROOM).glob("seg-*"))
    infos = await a.segments(ROOM)
    assert [(i.name, i.events, i.sealed) for i in infos] == [
        ("seg-000001.jsonl", 3, True), ("seg-000002.jsonl", 3, True),
        ("seg-000003.jsonl", 1, False)]
    assert (infos[0].first_ts, infos[0].last_ts) == (T0 + 1, T0 + 3)
    assert await a.read(rows) == [ev(n) for n in range(1, 8)]
    # a new process continues the last segment
    b = make_archive(segment_max_bytes=size * 3)
    await b.append(ROOM, [ev(8)])
    assert [(r.segment[4:10], r.line) for r in await all_rows(store)][-1] == ("000003", 2)
    assert (await b.verify()).ok


async def test_an_event_larger_than_a_segment_gets_its_own(
        make_archive: Callable[..., LocalArchive], store: Stores) -> None:
    a = make_archive(segment_max_bytes=100)
    await a.append(ROOM, [ev(1, body="x" * 500), ev(2, body="y" * 500)])
    assert [r.segment for r in await all_rows(store)] == ["seg-000001.jsonl",
                                                          "seg-000002.jsonl"]
    assert (await a.verify()).ok


async def test_rooms_are_separate(archive: LocalArchive, store: Stores) -> None:
    await archive.append(ROOM, [ev(1)])
    await archive.append(OTHER, [ev(1, OTHER), ev(2, OTHER)])
    assert await store.archive.archive_rooms() == {ROOM: 1, OTHER: 2}
    report = await archive.verify()
    assert report.ok and report.rooms == 2 and report.events == 3
    assert (await archive.verify(OTHER)).rooms == 1


# -- media -----------------------------------------------------------------------------------
async def test_media_is_content_addressed_and_deduplicated(archive: LocalArchive,
                                                           store: Stores) -> None:
    data = b"\x89PNG fake image"
    sha = hashlib.sha256(data).hexdigest()
    assert not await archive.has_media("mxc://corp/a")
    assert await archive.put_media(ROOM, "$e1", "mxc://corp/a", data, "image/png", T0) == sha
    assert await archive.put_media(ROOM, "$e1", "mxc://corp/a", data, "image/png", T0) == sha
    assert await archive.put_media(OTHER, "$e9", "mxc://corp/b", data, None, T0 + 5) == sha
    path = archive.media_path(sha)
    assert path == archive.root / "media" / sha[:2] / sha and path.read_bytes() == data
    assert archive.media_path("0" * 64) is None and archive.media_path("../x") is None
    assert await archive.has_media("mxc://corp/a") and await archive.has_media("mxc://corp/b")
    rows = await store.archive.archive_media_list()
    assert [(m.mxc, m.sha256, m.size, m.room_id) for m in rows] == [
        ("mxc://corp/a", sha, len(data), ROOM), ("mxc://corp/b", sha, len(data), OTHER)]
    assert len(list((archive.root / "media").rglob("*"))) == 2  # one folder, one file
    assert (await store.archive.archive_head(ROOM)).entries == 1  # type: ignore[union-attr]
    report = await archive.verify()
    assert report.ok and report.media == 2


# -- tampering -------------------------------------------------------------------------------
async def _two_entries(a: LocalArchive) -> None:
    await a.append(ROOM, [ev(1), ev(2)])
    await a.append(ROOM, [ev(3)])
    await a.append(OTHER, [ev(1, OTHER)])
    assert (await a.verify()).ok


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest_line(path: Path, n: int, change: Callable[[dict[str, Any]], None]) -> None:
    lines = path.read_bytes().split(b"\n")
    entry = orjson.loads(lines[n - 1])
    change(entry)
    lines[n - 1] = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)
    path.write_bytes(b"\n".join(lines))


def _rechain(entry: dict[str, Any]) -> None:
    entry["hash"] = entry_hash(entry)


async def test_flipped_segment_byte_is_reported(archive: LocalArchive) -> None:
    await _two_entries(archive)
    size_first = orjson.loads(manifest(archive).read_bytes().split(b"\n")[0])["length"]
    _flip_byte(seg(archive), size_first + 10)  # inside the second append
    p = await first_problem(archive)
    assert (p.room_id, p.entry, p.kind) == (ROOM, 2, "segment_hash")
    assert "seg-000001.jsonl" in p.detail
    report = await archive.verify()
    assert all(q.room_id == ROOM for q in report.problems)  # the other room is fine


async def test_deleted_segment_is_reported(archive: LocalArchive) -> None:
    await _two_entries(archive)
    seg(archive).unlink()
    p = await first_problem(archive)
    assert (p.entry, p.kind) == (1, "segment_missing")


@pytest.mark.parametrize(("change", "entry", "kind"), [
    # the line's content changed, hash left as it was
    (lambda e: e.update(count=5), 2, "manifest_entry"),
    # changed and re-hashed: the chain no longer links
    (lambda e: (e.update(prev="1" * 64), _rechain(e)), 2, "chain"),
])
async def test_edited_manifest_line_is_reported(archive: LocalArchive, change: Any,
                                                entry: int, kind: str) -> None:
    await _two_entries(archive)
    _edit_manifest_line(manifest(archive), 2, change)
    p = await first_problem(archive)
    assert (p.entry, p.kind) == (entry, kind)


async def test_rewritten_manifest_is_reported_against_the_store_head(
        archive: LocalArchive) -> None:
    await _two_entries(archive)
    # a consistent but different chain: only the store head shows it
    path = manifest(archive)
    lines = path.read_bytes().split(b"\n")
    e1, e2 = orjson.loads(lines[0]), orjson.loads(lines[1])
    e1["at"] += 1
    _rechain(e1)
    e2["prev"] = e1["hash"]
    _rechain(e2)
    path.write_bytes(b"\n".join([orjson.dumps(e1, option=orjson.OPT_SORT_KEYS),
                                 orjson.dumps(e2, option=orjson.OPT_SORT_KEYS), b""]))
    p = await first_problem(archive)
    assert (p.entry, p.kind) == (2, "head_mismatch")


async def test_truncated_manifest_is_reported_and_refuses_writes(
        make_archive: Callable[..., LocalArchive]) -> None:
    a = make_archive()
    await _two_entries(a)
    path = manifest(a)
    path.write_bytes(path.read_bytes().split(b"\n")[0] + b"\n")
    p = await first_problem(a)
    assert (p.entry, p.kind) == (2, "manifest_short")
    with pytest.raises(ArchiveCorrupt, match="1 valid entries, the store head says 2"):
        await make_archive().append(ROOM, [ev(9)])


async def test_removed_manifest_is_reported(archive: LocalArchive) -> None:
    await _two_entries(archive)
    manifest(archive).unlink()
    p = await first_problem(archive)
    assert (p.entry, p.kind) == (1, "manifest_missing")


async def test_appended_manifest_entry_is_reported(archive: LocalArchive) -> None:
    await _two_entries(archive)
    path = manifest(archive)
    last = orjson.loads(path.read_bytes().split(b"\n")[1])
    extra = {"n": 3, "op": "prune", "room": ROOM, "at": 1, "prev": last["hash"],
             "segment": "seg-000001.jsonl", "sha256": "0" * 64, "reason": "x"}
    _rechain(extra)
    path.write_bytes(path.read_bytes() + orjson.dumps(extra, option=orjson.OPT_SORT_KEYS)
                     + b"\n")
    p = await first_problem(archive)
    assert (p.entry, p.kind) == (3, "uncommitted")


@pytest.mark.parametrize("how", ["delete", "change"])
async def test_media_tampering_is_reported(archive: LocalArchive, how: str) -> None:
    await archive.append(ROOM, [ev(1)])
    sha = await archive.put_media(ROOM, "$e1", "mxc://corp/a", b"bytes", "text/plain", T0)
    path = archive.media_path(sha)
    assert path is not None
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(b"other")
    p = await first_problem(archive)
    assert (p.entry, p.kind) == (2, "media_missing" if how == "delete" else "media_hash")
    assert sha in p.detail
    assert not await archive.has_media("mxc://corp/a") or how == "change"


async def test_bytes_added_to_a_segment_are_reported(archive: LocalArchive) -> None:
    await _two_entries(archive)
    with seg(archive).open("ab") as f:
        f.write(orjson.dumps(ev(99)) + b"\n")
    p = await first_problem(archive)
    assert (p.entry, p.kind) == (2, "segment_tail")


async def test_deleted_index_rows_are_reported(archive: LocalArchive, store: Stores) -> None:
    await _two_entries(archive)
    async with store.database.db.transaction() as c:  # type: ignore[attr-defined]
        await c.execute("DELETE FROM archive_events WHERE event_id = ?", ev(3)["event_id"])
    p = await first_problem(archive)
    assert (p.entry, p.kind) == (None, "index")


# -- crash safety ----------------------------------------------------------------------------
async def test_crash_between_files_and_store_commit(
        make_archive: Callable[..., LocalArchive], store: Stores,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_archive()
    await a.append(ROOM, [ev(1)])
    real = store.archive.archive_commit
    calls = {"n": 0}

    async def fail_once(*args: Any, **kw: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database went away")
        return await real(*args, **kw)

    monkeypatch.setattr(store.archive, "archive_commit", fail_once)
    with pytest.raises(ArchiveWriteError, match="written but not indexed"):
        await a.append(ROOM, [ev(2), ev(3)])
    assert [r.event_id for r in await all_rows(store)] == [ev(1)["event_id"]]
    p = await first_problem(a)  # visible until the room is written to again
    assert (p.entry, p.kind) == (2, "uncommitted")
    # a restarted process: reconciles the room, indexes entry 2, then skips the redelivery
    b = make_archive()
    res = await b.append(ROOM, [ev(2), ev(3), ev(4)])
    assert (res.written, res.skipped) == (1, 2)
    rows = await all_rows(store)
    assert [r.event_id for r in rows] == [ev(n)["event_id"] for n in range(1, 5)]
    assert await b.read(rows) == [ev(n) for n in range(1, 5)]
    assert len(seg(b).read_bytes().splitlines()) == 4  # nothing written twice
    assert (await b.verify()).ok
    # the same process also recovers on its next touch
    c = make_archive()
    await c.append(ROOM, [ev(5)])
    assert (await c.verify()).ok


async def test_torn_writes_are_cut_on_first_touch(make_archive: Callable[..., LocalArchive],
                                                  store: Stores) -> None:
    a = make_archive()
    await a.append(ROOM, [ev(1)])
    # a crash mid-write: segment bytes never recorded, a partial manifest line, and a new
    # segment file created but never recorded
    with seg(a).open("ab") as f:
        f.write(b'{"event_id": "$half')
    with manifest(a).open("ab") as f:
        f.write(b'{"n": 2, "op": "app')
    seg(a, 2).write_bytes(b"junk\n")
    report = await a.verify()
    assert {p.kind for p in report.problems} >= {"segment_tail", "manifest_tail",
                                                 "segment_unreferenced"}
    b = make_archive()
    assert (await b.append(ROOM, [ev(2)])).written == 1
    assert not seg(b, 2).exists()
    assert [r.line for r in await all_rows(store)] == [1, 2]
    assert (await b.verify()).ok


async def test_torn_manifest_line_past_the_head_is_not_a_committed_entry(
        make_archive: Callable[..., LocalArchive]) -> None:
    a = make_archive()
    await a.append(ROOM, [ev(1)])
    with manifest(a).open("ab") as f:
        f.write(b"\x00" * 40 + b"\n")  # zero-filled block after a power cut
    b = make_archive()
    await b.append(ROOM, [ev(2)])
    assert (await b.verify()).ok


@pytest.mark.parametrize("fail_on", [1, 2])  # 1: the segment write, 2: the manifest write
async def test_failing_write_raises_and_indexes_nothing(
        archive: LocalArchive, store: Stores, monkeypatch: pytest.MonkeyPatch,
        fail_on: int) -> None:
    await archive.append(ROOM, [ev(1)])
    before = (seg(archive).read_bytes(), manifest(archive).read_bytes())
    real_write = os.write
    calls = {"n": 0}

    def failing(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(archive_files.os, "write", failing)
    with pytest.raises(ArchiveWriteError, match="No space left"):
        await archive.append(ROOM, [ev(2)])
    monkeypatch.setattr(archive_files.os, "write", real_write)
    assert [r.event_id for r in await all_rows(store)] == [ev(1)["event_id"]]
    assert await store.archive.archive_known([ev(2)["event_id"]]) == set()
    assert (seg(archive).read_bytes(), manifest(archive).read_bytes()) == before
    assert (await archive.verify()).ok
    assert (await archive.append(ROOM, [ev(2)])).written == 1
    assert (await archive.verify()).ok


async def test_unwritable_archive_raises(tmp_path: Path, store: Stores) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    a = LocalArchive(blocker / "archive", store.archive)
    with pytest.raises(ArchiveWriteError):
        await a.append(ROOM, [ev(1)])
    assert await store.archive.archive_rooms() == {}


# -- archive retention -----------------------------------------------------------------------
async def test_prune_segment(make_archive: Callable[..., LocalArchive], store: Stores) -> None:
    size = len(orjson.dumps(ev(1), option=orjson.OPT_SORT_KEYS)) + 1
    a = make_archive(segment_max_bytes=size * 2)
    await a.append(ROOM, [ev(n) for n in range(1, 6)])
    first = seg(a, 1).read_bytes()
    assert await a.prune_segment(ROOM, "seg-000001.jsonl", "archive.keep expired") == 2
    assert not seg(a, 1).exists()
    assert [r.event_id for r in await all_rows(store)] == [ev(n)["event_id"]
                                                            for n in range(3, 6)]
    last = orjson.loads(manifest(a).read_bytes().split(b"\n")[-2])
    assert (last["op"], last["segment"], last["reason"]) == (
        "prune", "seg-000001.jsonl", "archive.keep expired")
    assert last["sha256"] == hashlib.sha256(first).hexdigest()
    report = await a.verify()
    assert report.ok and report.events == 3
    assert await a.prune_segment(ROOM, "seg-000001.jsonl", "again") == 0
    assert [i.name for i in await a.segments(ROOM)] == ["seg-000002.jsonl",
                                                        "seg-000003.jsonl"]
    with pytest.raises(ValueError, match="not a segment"):
        await a.prune_segment(ROOM, "seg-000042.jsonl", "x")
    # pruning the open segment: the next append starts a new one
    assert await a.prune_segment(ROOM, "seg-000003.jsonl", "x") == 1
    await a.append(ROOM, [ev(6)])
    assert (await all_rows(store))[-1].segment == "seg-000004.jsonl"
    b = make_archive(segment_max_bytes=size * 2)
    await b.append(ROOM, [ev(7)])
    assert (await b.verify()).ok


async def test_prune_interrupted_before_the_store_commit(
        make_archive: Callable[..., LocalArchive], store: Stores,
        monkeypatch: pytest.MonkeyPatch) -> None:
    size = len(orjson.dumps(ev(1), option=orjson.OPT_SORT_KEYS)) + 1
    a = make_archive(segment_max_bytes=size * 2)
    await a.append(ROOM, [ev(n) for n in range(1, 4)])

    async def boom(*args: Any, **kw: Any) -> int:
        raise RuntimeError("database went away")

    real = store.archive.archive_drop_segment
    monkeypatch.setattr(store.archive, "archive_drop_segment", boom)
    with pytest.raises(ArchiveWriteError):
        await a.prune_segment(ROOM, "seg-000001.jsonl", "x")
    monkeypatch.setattr(store.archive, "archive_drop_segment", real)
    b = make_archive(segment_max_bytes=size * 2)
    await b.append(ROOM, [ev(4)])
    assert [r.event_id for r in await all_rows(store)] == [ev(n)["event_id"]
                                                            for n in (3, 4)]
    assert (await b.verify()).ok


async def test_pruned_segment_still_present_is_ignored(archive: LocalArchive) -> None:
    await archive.append(ROOM, [ev(1)])
    content = seg(archive).read_bytes()
    await archive.prune_segment(ROOM, "seg-000001.jsonl", "x")
    seg(archive).write_bytes(content)  # restored from a backup, say
    assert (await archive.verify()).ok


async def test_store_failure_on_first_touch_is_a_write_error(
        archive: LocalArchive, store: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(room_id: str) -> Any:
        raise RuntimeError("database went away")

    monkeypatch.setattr(store.archive, "archive_head", boom)
    with pytest.raises(ArchiveWriteError, match="database went away") as info:
        await archive.append(ROOM, [ev(1)])
    assert isinstance(info.value, OSError)  # a purge run stops on it like on any I/O error
    assert not archive.room_dir(ROOM).exists()


async def test_read_of_a_missing_or_moved_line_is_corrupt(archive: LocalArchive,
                                                          store: Stores) -> None:
    await archive.append(ROOM, [ev(1), ev(2)])
    rows = await all_rows(store)
    with pytest.raises(ArchiveCorrupt, match="line 3 is not event"):
        await archive.read([dataclasses.replace(rows[1], line=3)])
    with pytest.raises(ArchiveCorrupt, match="line 1 is not event"):
        await archive.read([dataclasses.replace(rows[1], line=1)])
    seg(archive).unlink()
    with pytest.raises(ArchiveCorrupt, match="missing"):
        await archive.read(rows)


async def test_two_writers_on_one_archive_take_turns(
        make_archive: Callable[..., LocalArchive], store: Stores) -> None:
    """``enclave run`` and a CLI run share the archive: each sees what the other wrote
    (the file lock and the store head), so nothing is overwritten and the chain holds."""
    live, cli = make_archive(segment_max_bytes=2000), make_archive(segment_max_bytes=2000)
    for n in range(1, 21):
        writer = live if n % 3 else cli
        await writer.append(ROOM, [ev(n)])
    await asyncio.gather(*(w.append(ROOM, [ev(n)]) for n, w in
                           zip(range(21, 41), [live, cli] * 10, strict=True)))
    rows = await all_rows(store)
    assert sorted(r.event_id for r in rows) == sorted(ev(n)["event_id"] for n in range(1, 41))
    assert [e["event_id"] for e in await live.read(rows)] == [r.event_id for r in rows]
    report = await make_archive().verify()
    assert report.ok and report.events == 40, report.problems


async def test_export_is_in_archive_order_not_timestamp_order(
        make_archive: Callable[..., LocalArchive], store: Stores, tmp_path: Path) -> None:
    """An event recovered late (or a remote server's wrong clock) is archived after events
    with later timestamps; the export keeps the archive's (hash chain) order, across
    segments and pages, which ``archive verify`` proves."""
    from bridge.retention import export as export_mod

    archive = make_archive(segment_max_bytes=600)  # a few events per segment
    late = ev(1)  # the earliest timestamp, archived last
    events = [ev(n) for n in range(2, 12)] + [late]
    for e in events:
        await archive.append(ROOM, [e])
    rows = await store.archive.archive_query(room_id=ROOM)
    assert rows[0].event_id == late["event_id"]  # by timestamp it would come first
    old_page = export_mod.PAGE
    export_mod.PAGE = 3  # several keyset pages
    try:
        await export_mod.export_archive(
            archive, store.archive, store.holds, store.directory, tmp_path / "out",
            export_mod.ExportRequest(rooms=(ROOM,), formats=frozenset({"jsonl"})),
            clock_ms=lambda: 1_700_000_000_000)
    finally:
        export_mod.PAGE = old_page
    lines = (tmp_path / "out" / "events.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["event_id"] for x in lines] == [e["event_id"] for e in events]

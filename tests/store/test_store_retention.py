"""The retention part of the Stores contract, on both engines (archive index, holds, rooms)."""

from __future__ import annotations

import dataclasses

import pytest

from bridge.store import AuditFilter, AuditRecord, Stores
from bridge.store.base import (
    ArchiveConflict,
    ArchivedEvent,
    ArchivedMedia,
    ArchiveHead,
    HoldRecord,
    RetentionRoom,
)

from .conftest import MakeStore

NOW = 1_700_000_000_000
R1, R2 = "!r1:x", "!r2:x"
ALICE, BOB = "@alice:x", "@bob:x"


def aev(n: int, room: str = R1, *, ts: int | None = None, sender: str | None = ALICE,
        segment: str = "seg-000001.jsonl", line: int | None = None) -> ArchivedEvent:
    return ArchivedEvent(f"$e{n}{room}", room, sender, "m.room.message", None,
                         ts if ts is not None else NOW + n, segment,
                         line if line is not None else n, NOW)


def head(room: str = R1, entries: int = 1, segment: str | None = "seg-000001.jsonl"
         ) -> ArchiveHead:
    return ArchiveHead(room, entries, f"{entries:064x}", segment, 100 * entries, NOW)


def hold(hid: str = "h1", *, users: tuple[str, ...] = (ALICE,), rooms: tuple[str, ...] = (),
         created_at: int = NOW) -> HoldRecord:
    return HoldRecord(hid, "CASE-1", "litigation", "@legal:x", users, rooms, NOW - 1000,
                      None, created_at)


def audit(kind: str) -> AuditRecord:
    return AuditRecord(ts=NOW, source="cli", kind=kind, outcome="applied", actor="@legal:x")


async def test_archive_commit_is_idempotent_and_moves_the_head(store: Stores) -> None:
    assert await store.archive.archive_head(R1) is None
    assert await store.archive.archive_commit([aev(1), aev(2)], head(entries=1)) == 2
    assert await store.archive.archive_commit([aev(2), aev(3)], head(entries=2)) == 1
    assert await store.archive.archive_known([aev(n).event_id for n in (1, 3, 4)]) == {
        aev(1).event_id, aev(3).event_id}
    assert await store.archive.archive_known([]) == set()
    assert await store.archive.archive_head(R1) == head(entries=2)
    assert await store.archive.archive_heads() == [head(entries=2)]
    assert await store.archive.archive_events_by_id(
        [aev(3).event_id, aev(1).event_id, "$nope"]) == [aev(1), aev(3)]


async def test_archive_commit_refuses_a_stale_head(store: Stores) -> None:
    await store.archive.archive_commit([aev(1)], head(entries=2))
    for stale in (1, 2):
        with pytest.raises(ArchiveConflict):
            await store.archive.archive_commit([aev(5)], head(entries=stale))
    assert await store.archive.archive_known([aev(5).event_id]) == set()  # nothing written
    assert (await store.archive.archive_head(R1)).entries == 2  # type: ignore[union-attr]


def staged(n: int, data: str = "") -> tuple[int, str, str]:
    return (n, f'{{"n":{n}}}', data)


async def test_archive_stage_moves_the_head_by_compare_and_set(store: Stores) -> None:
    a = store.archive
    assert await a.archive_stage(R1, [staged(1, '{"e":1}\n'), staged(2, "é\n")],
                                 [aev(1), aev(2)], head(entries=2), prev_entries=0,
                                 prev_head="0" * 64, staged_at=NOW) == 2
    assert await a.archive_head(R1) == head(entries=2)
    assert await a.archive_staged(R1) == [(1, '{"n":1}', '{"e":1}\n', NOW),
                                          (2, '{"n":2}', "é\n", NOW)]
    # a writer that still thinks the head is at 1 (or a new room) is refused, writes nothing
    for prev in (0, 1):
        with pytest.raises(ArchiveConflict):
            await a.archive_stage(R1, [staged(prev + 1)], [aev(9)], head(entries=prev + 1),
                                  prev_entries=prev, prev_head=f"{prev:064x}", staged_at=NOW)
    with pytest.raises(ArchiveConflict):  # the right number, another hash: a fork
        await a.archive_stage(R1, [staged(3)], [aev(9)], head(entries=3), prev_entries=2,
                              prev_head="f" * 64, staged_at=NOW)
    assert await a.archive_known([aev(9).event_id]) == set()
    assert len(await a.archive_staged(R1)) == 2
    # the right head, but an event that must be new is indexed already: refused
    with pytest.raises(ArchiveConflict):
        await a.archive_stage(R1, [staged(3)], [aev(9)], head(entries=3), prev_entries=2,
                              prev_head=f"{2:064x}", staged_at=NOW,
                              absent=[aev(9).event_id, aev(2).event_id])
    assert (await a.archive_head(R1)) == head(entries=2)
    # the expected head: staged, with media rows and a pruned segment's rows dropped
    media = ArchivedMedia("mxc://x/m", "ab" * 32, 3, None, R1, None, None, NOW)
    assert await a.archive_stage(R1, [staged(3)], [], head(entries=3), prev_entries=2,
                                 prev_head=f"{2:064x}", staged_at=NOW + 5, media=[media],
                                 drop_segment="seg-000001.jsonl", absent=["$new"]) == 0
    assert await a.archive_media_get("mxc://x/m") == media
    assert await a.archive_rooms() == {}
    await a.archive_stage(R2, [staged(1, "xyz\n")], [aev(1, R2)], head(R2), prev_entries=0,
                          prev_head="0" * 64, staged_at=NOW + 1)
    assert await a.archive_staged_rooms() == [(R1, 8 + 2, NOW, 3), (R2, 4, NOW + 1, 1)]
    # sealed: the rows up to an entry go, the others stay
    assert await a.archive_unstage(R1, 2) == 2
    assert [r[0] for r in await a.archive_staged(R1)] == [3]
    assert await a.archive_unstage(R1, 2) == 0
    assert await a.archive_staged_rooms() == [(R1, 0, NOW + 5, 1), (R2, 4, NOW + 1, 1)]
    assert await a.archive_head(R1) == head(entries=3)


async def test_archive_commit_many_events(store: Stores) -> None:
    events = [aev(n) for n in range(1, 1203)]  # more than one multi-row insert
    assert await store.archive.archive_commit(events, head()) == 1202
    assert len(await store.archive.archive_known([e.event_id for e in events])) == 1202
    assert await store.archive.archive_rooms() == {R1: 1202}


async def test_archive_query_filters_and_order(store: Stores) -> None:
    await store.archive.archive_commit([
        aev(1, ts=NOW + 10, line=1), aev(2, ts=NOW + 5, line=2, sender=BOB),
        aev(3, ts=NOW + 10, segment="seg-000002.jsonl", line=1),
        aev(4, ts=NOW + 20, line=3, sender=None)], head())
    await store.archive.archive_commit([aev(1, R2, ts=NOW + 10, line=1)], head(R2))

    def ids(rows: list[ArchivedEvent]) -> list[str]:
        return [r.event_id for r in rows]

    assert ids(await store.archive.archive_query(room_id=R1)) == [
        aev(2).event_id, aev(1).event_id, aev(3).event_id, aev(4).event_id]
    assert ids(await store.archive.archive_query()) == [
        aev(2).event_id, aev(1).event_id, aev(1, R2).event_id, aev(3).event_id,
        aev(4).event_id]
    assert ids(await store.archive.archive_query(senders=[BOB])) == [aev(2).event_id]
    assert await store.archive.archive_query(senders=[]) == []
    assert ids(await store.archive.archive_query(
        room_id=R1, since_ms=NOW + 10, until_ms=NOW + 10)) == [
            aev(1).event_id, aev(3).event_id]  # both bounds inclusive
    # keyset paging within one room
    page1 = await store.archive.archive_query(room_id=R1, limit=2)
    last = page1[-1]
    page2 = await store.archive.archive_query(room_id=R1, after=(last.ts, last.segment, last.line))
    assert ids(page1 + page2) == ids(await store.archive.archive_query(room_id=R1))
    # across rooms: the room id breaks ties
    everything = await store.archive.archive_query()
    pages, after = [], None
    while True:
        page = await store.archive.archive_query(after=after, limit=1)
        if not page:
            break
        pages += page
        p = page[-1]
        after = (p.ts, p.segment, p.line, p.room_id)
    assert pages == everything
    assert await store.archive.archive_timestamps(R1) == [
        (NOW + 5, BOB), (NOW + 10, ALICE), (NOW + 10, ALICE), (NOW + 20, None)]
    assert await store.archive.archive_segments(R1) == [
        ("seg-000001.jsonl", 3, NOW + 5, NOW + 20), ("seg-000002.jsonl", 1, NOW + 10,
                                                     NOW + 10)]


async def test_archive_mark_purged(store: Stores) -> None:
    await store.archive.archive_commit([aev(n) for n in range(1, 6)], head())
    await store.archive.archive_commit([aev(1, R2)], head(R2))
    assert await store.archive.archive_mark_purged(R1, NOW + 3, NOW + 99) == 2  # ts < up_to
    assert await store.archive.archive_mark_purged(R1, NOW + 3, NOW + 100) == 0  # already purged
    assert [ts for ts, _ in await store.archive.archive_timestamps(R1)] == [
        NOW + 3, NOW + 4, NOW + 5]
    assert len(await store.archive.archive_timestamps(R1, unpurged_only=False)) == 5

    rows = await store.archive.archive_query(room_id=R1)
    assert [r.purged_at for r in rows] == [NOW + 99, NOW + 99, None, None, None]
    assert len(await store.archive.archive_query(room_id=R1, include_purged=False)) == 3
    assert await store.archive.archive_rooms() == {R1: 5, R2: 1}
    assert (await store.archive.archive_query(room_id=R2))[0].purged_at is None

async def test_archive_mark_gone(store: Stores) -> None:
    from dataclasses import replace

    join = replace(aev(2), type="m.room.member", state_key=ALICE)
    await store.archive.archive_commit([aev(1), join, aev(3)], head())
    await store.archive.archive_commit([aev(3, R2)], head(R2))
    ids = [aev(1).event_id, join.event_id, aev(3).event_id, aev(3, R2).event_id]
    # only the room's messages: state events stay on the homeserver, other rooms untouched
    assert await store.archive.archive_mark_gone(R1, ids, NOW + 7) == 2
    assert await store.archive.archive_mark_gone(R1, ids, NOW + 8) == 0
    assert await store.archive.archive_mark_gone(R1, [], NOW + 8) == 0
    assert [r.purged_at for r in await store.archive.archive_query(room_id=R1)] == [
        NOW + 7, None, NOW + 7]
    assert (await store.archive.archive_query(room_id=R2))[0].purged_at is None


async def test_archive_timestamps_of_messages_only(store: Stores) -> None:
    from dataclasses import replace

    join = replace(aev(2), type="m.room.member", state_key=ALICE)
    await store.archive.archive_commit([aev(1), join, aev(3)], head())
    assert await store.archive.archive_timestamps(R1, messages_only=True) == [
        (NOW + 1, ALICE), (NOW + 3, ALICE)]
    assert len(await store.archive.archive_timestamps(R1)) == 3
    # the homeserver keeps state events through a purge: they are not marked purged
    assert await store.archive.archive_mark_purged(R1, NOW + 10, NOW + 99) == 2
    assert [(r.type, r.purged_at) for r in await store.archive.archive_query(room_id=R1)] == [
        ("m.room.message", NOW + 99), ("m.room.member", None), ("m.room.message", NOW + 99)]



async def test_archive_drop_segment(store: Stores) -> None:
    await store.archive.archive_commit([aev(1), aev(2), aev(3, segment="seg-000002.jsonl", line=1)],
                                       head(entries=2))
    assert await store.archive.archive_drop_segment(R1, "seg-000001.jsonl", head(entries=3)) == 2
    assert [r.event_id for r in await store.archive.archive_query(room_id=R1)] == [aev(3).event_id]
    assert (await store.archive.archive_head(R1)).entries == 3  # type: ignore[union-attr]
    assert await store.archive.archive_drop_segment(R1, "seg-000001.jsonl") == 0
    with pytest.raises(ArchiveConflict):
        await store.archive.archive_drop_segment(R1, "seg-000002.jsonl", head(entries=3))
    assert len(await store.archive.archive_query(room_id=R1)) == 1


async def test_archive_media(store: Stores) -> None:
    m1 = ArchivedMedia("mxc://x/a", "a" * 64, 10, "image/png", R1, "$e1", NOW + 2, NOW)
    m2 = ArchivedMedia("mxc://x/b", "a" * 64, 10, None, R2, None, NOW + 1, NOW)
    await store.archive.archive_commit([], head(), [m1])
    await store.archive.archive_commit([], head(R2), [m2])
    await store.archive.archive_commit([], head(entries=2), [dataclasses.replace(m1, size=99)])
    assert await store.archive.archive_media_get("mxc://x/a") == m1  # first record kept
    assert await store.archive.archive_media_get("mxc://x/none") is None
    assert await store.archive.archive_media_list() == [m2, m1]
    assert await store.archive.archive_media_list(R1) == [m1]
    assert await store.archive.archive_media_list(sha256="a" * 64) == [m2, m1]
    assert await store.archive.archive_media_list(sha256="b" * 64) == []
    await store.archive.archive_media_mark_deleted(["mxc://x/a"], NOW + 5)
    await store.archive.archive_media_mark_deleted(["mxc://x/a"], NOW + 6)  # first time kept
    await store.archive.archive_media_mark_deleted([], NOW + 7)
    assert (await store.archive.archive_media_get("mxc://x/a")).deleted_at == NOW + 5  # type: ignore
    assert (await store.archive.archive_media_get("mxc://x/b")).deleted_at is None  # type: ignore


async def test_holds(store: Stores) -> None:
    h1 = hold("h1", created_at=NOW)
    h2 = hold("h2", users=(), rooms=(R1, R2), created_at=NOW + 1)
    assert await store.holds.hold_add(h1, audit("hold_add"))
    assert await store.holds.hold_add(h2, audit("hold_add"))
    assert not await store.holds.hold_add(dataclasses.replace(h1, reason="other"),
                                          audit("hold_add"))
    assert await store.holds.hold_get("h1") == h1
    assert await store.holds.hold_get("h2") == h2  # tuples round-trip
    assert await store.holds.hold_get("nope") is None
    assert await store.holds.holds() == [h1, h2]
    assert await store.holds.hold_release("h1", "@legal:x", NOW + 50, audit("hold_release"))
    assert not await store.holds.hold_release("h1", "@legal:x", NOW + 60, audit("hold_release"))
    assert not await store.holds.hold_release("nope", "@legal:x", NOW + 60, audit("hold_release"))
    released = dataclasses.replace(h1, released_at=NOW + 50, released_by="@legal:x")
    assert await store.holds.holds() == [h2]
    assert await store.holds.holds(include_released=True) == [released, h2]
    # the audit record is written only with a change
    kinds = [r["kind"] for r in await store.audit.query_audit(AuditFilter())]
    assert kinds == ["hold_add", "hold_add", "hold_release"]


async def test_retention_rooms(store: Stores) -> None:
    r = RetentionRoom(R1, "internal", None, None, None, None, None, None, NOW)
    assert await store.retention_rooms.retention_room_get(R1) is None
    await store.retention_rooms.retention_room_put(r)
    assert await store.retention_rooms.retention_room_get(R1) == r
    r2 = dataclasses.replace(r, override_ms=86_400_000, override_by="@mod:x",
                             purged_up_to=NOW - 5, last_purge_at=NOW, notice_event_id="$n",
                             state_set_at=NOW, updated_at=NOW + 1)
    await store.retention_rooms.retention_room_put(r2)
    await store.retention_rooms.retention_room_put(
        RetentionRoom(R2, None, None, None, None, None, None, None, NOW))
    assert await store.retention_rooms.retention_room_get(R1) == r2
    assert [x.room_id for x in await store.retention_rooms.retention_rooms()] == [R1, R2]


async def test_archive_index_survives_a_restart(make_store: MakeStore) -> None:
    s1 = await make_store()
    await s1.archive.archive_commit([aev(1)], head())
    await s1.holds.hold_add(hold(), audit("hold_add"))
    s2 = await make_store()
    assert await s2.archive.archive_head(R1) == head()
    assert await s2.holds.holds() == [hold()]


async def test_archive_query_in_archive_order(store: Stores) -> None:
    """One room in the order of its hash chain (segment, line), keyset-paged."""
    await store.archive.archive_commit([
        aev(1, ts=NOW + 30, line=1), aev(2, ts=NOW + 10, line=2),
        aev(3, ts=NOW + 20, segment="seg-000002.jsonl", line=1),
        aev(4, ts=NOW + 5, segment="seg-000002.jsonl", line=2)], head())
    rows = await store.archive.archive_query(room_id=R1, archive_order=True)
    assert [r.event_id for r in rows] == [aev(n).event_id for n in (1, 2, 3, 4)]
    page1 = await store.archive.archive_query(room_id=R1, archive_order=True, limit=3)
    last = page1[-1]
    page2 = await store.archive.archive_query(room_id=R1, archive_order=True,
                                              after=(last.ts, last.segment, last.line))
    assert page1 + page2 == rows
    with pytest.raises(ValueError):
        await store.archive.archive_query(archive_order=True)

"""The archive mapped onto S3 objects, pure: key names and the Object Lock decisions."""

from __future__ import annotations

import datetime as dt

import pytest

from bridge.policy.archive_lock import (
    FOREVER_MS,
    decide_deletable,
    decide_object_lock,
    room_held,
)
from bridge.policy.retention import Hold
from bridge.retention.archive.layout import (
    RoomState,
    advance,
    canonical,
    manifest_entry,
    parse_manifest,
    room_state,
)
from bridge.retention.archive.objects import (
    contiguous,
    manifest_first_entry,
    manifest_key,
    media_key,
    part_key,
    part_of,
    room_prefix,
)

ROOM = "!room:corp.example.com"
SHA = "ab" * 32


def hold(**kw: object) -> Hold:
    base: dict[str, object] = {"id": "h", "case_id": "c", "reason": "r", "placed_by": "@l:x",
                               "users": frozenset(), "rooms": frozenset(), "since_ms": None,
                               "until_ms": None, "created_at": 0}
    return Hold(**{**base, **kw})  # type: ignore[arg-type]


def test_keys() -> None:
    assert room_prefix("p/", ROOM) == "p/rooms/%21room%3Acorp.example.com/"
    key = manifest_key("p/", ROOM, 42)
    assert key == "p/rooms/%21room%3Acorp.example.com/manifest/000000000042.jsonl"
    assert manifest_first_entry("p/", ROOM, key) == 42
    assert manifest_first_entry("p/", ROOM, key + ".x") is None
    assert manifest_first_entry("p/", "!other:x", key) is None
    pk = part_key("p/", ROOM, "seg-000003.jsonl", 4096, SHA)
    assert part_of("p/", ROOM, pk) == ("seg-000003.jsonl", 4096, SHA)
    assert part_of("p/", ROOM, key) is None
    assert part_of("p/", ROOM, pk.replace(SHA, "zz")) is None
    assert media_key("", SHA) == f"media/ab/{SHA}"


def test_keys_sort_in_entry_order() -> None:
    # a listing (lexicographic) is the chain's order: the numbers are zero-padded
    keys = [manifest_key("", ROOM, n) for n in (1, 2, 10, 100, 99)]
    assert sorted(keys) == [manifest_key("", ROOM, n) for n in (1, 2, 10, 99, 100)]


@pytest.mark.parametrize(("firsts", "start", "ok"), [
    ([], 1, True), ([1, 3, 4], 1, True), ([5], 5, True), ([2], 1, False),
    ([1, 1], 1, False), ([1, 3, 2], 1, False),
])
def test_contiguous(firsts: list[int], start: int, ok: bool) -> None:
    assert contiguous(firsts, start) is ok


def test_object_lock_decision() -> None:
    d = decide_object_lock(now_ms=1_000_000, keep_ms=5000, mode="compliance", held=False)
    assert d.mode == "COMPLIANCE" and not d.legal_hold
    assert d.retain_until == dt.datetime.fromtimestamp(1005, dt.UTC)
    forever = decide_object_lock(now_ms=0, keep_ms=None, mode="governance", held=True)
    assert forever.mode == "GOVERNANCE" and forever.legal_hold
    assert forever.retain_until.timestamp() * 1000 == FOREVER_MS


def test_deletable_only_after_retention_and_without_hold() -> None:
    until = dt.datetime.fromtimestamp(100, dt.UTC)
    assert not decide_deletable(retain_until=until, legal_hold=False, now_ms=99_999)
    assert decide_deletable(retain_until=until, legal_hold=False, now_ms=100_000)
    assert not decide_deletable(retain_until=until, legal_hold=True, now_ms=10**12)
    assert decide_deletable(retain_until=None, legal_hold=False, now_ms=0)


def test_room_held() -> None:
    assert room_held(ROOM, [hold(rooms=frozenset({ROOM}))])
    assert not room_held(ROOM, [hold(rooms=frozenset({"!else:x"}))])
    # a hold on users may cover any room they wrote in
    assert room_held(ROOM, [hold(users=frozenset({"@a:x"}))])
    assert not room_held(ROOM, [hold(rooms=frozenset({ROOM}), released_at=5)])
    assert not room_held(ROOM, [])


def test_advance_matches_a_whole_parse() -> None:
    entries = []
    prev = "0" * 64
    spec = [("append", "seg-000001.jsonl", 0, 10), ("media", None, 0, 0),
            ("append", "seg-000001.jsonl", 10, 5), ("append", "seg-000002.jsonl", 0, 7),
            ("prune", "seg-000001.jsonl", 0, 0)]
    for n, (op, seg, off, length) in enumerate(spec, start=1):
        f: dict[str, object] = {"sha256": SHA}
        if op == "append":
            f.update(segment=seg, offset=off, length=length, first_line=1, count=1)
        elif op == "media":
            f.update(mxc="mxc://x/y", size=3)
        else:
            f.update(segment=seg)
        entries.append(manifest_entry(ROOM, n, prev, op, 1, **f))
        prev = entries[-1]["hash"]
    data = b"".join(canonical(e) + b"\n" for e in entries)
    whole = room_state(parse_manifest(data, ROOM))
    step = RoomState(entries=0, head="0" * 64, manifest_bytes=0, segment=None, last_number=0)
    advance(step, entries[:2])
    tail = parse_manifest(data.split(b"\n", 2)[2], ROOM, first=3, prev=entries[1]["hash"])
    assert tail.problem is None and len(tail.entries) == 3
    advance(step, tail.entries)
    assert (step.entries, step.head, step.segment, step.ends, step.pruned, step.parts) == (
        whole.entries, whole.head, whole.segment, whole.ends, whole.pruned, whole.parts)
    assert step.segment == "seg-000002.jsonl" and step.pruned == {"seg-000001.jsonl"}
    assert step.parts["seg-000001.jsonl"] == [(0, 10, SHA), (10, 5, SHA)]

"""The archive's own retention (``RetentionService.prune_archive``) over a real SQLite store
and a real local archive: only sealed segments past the archive period and the longest live
period go, and never one a hold could cover. No homeserver is involved in this path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config.retention import RetentionConfig
from bridge.metrics import Metrics
from bridge.retention.archive import LocalArchive
from bridge.retention.service import RetentionService
from bridge.store import Stores
from bridge.store.base import AuditRecord, HoldRecord

ROOM = "!room:corp.example.com"
DAY = 86_400_000
T0 = 1_714_560_000_000


def ev(n: int, ts: int, sender: str = "@alice:corp.example.com") -> dict[str, Any]:
    return {"event_id": f"$e{n}", "room_id": ROOM, "sender": sender,
            "type": "m.room.message", "origin_server_ts": ts,
            "content": {"msgtype": "m.text", "body": "x" * 200}}


def service(store: Stores, archive: LocalArchive | None, now: int,
            client: Any = None) -> RetentionService:
    cfg = RetentionConfig.model_validate({
        "default": {"keep": "30d"}, "archive": {"path": "unused", "keep": "90d"}})
    return RetentionService(
        cfg, audit=store.audit, index=store.archive, holds=store.holds,
        retention_rooms=store.retention_rooms, kv=store.kv, directory_store=store.directory,
        leases=store.leases, client=client, executor=None, archive=archive,  # type: ignore[arg-type]
        metrics=Metrics(), clock_ms=lambda: now, server_name="corp.example.com",
        bot_user_id="@enclave:corp.example.com", admin_user_id="@enclave-admin:corp.example.com",
        service_prefix="enclave_")


async def fill(tmp_path: Path, store: Stores, now: int) -> LocalArchive:
    # small segments: one event each, every new one seals the one before
    archive = LocalArchive(tmp_path / "archive", store.archive, segment_max_bytes=300,
                           clock_ms=lambda: now)
    for day in range(0, 200, 20):  # one event every 20 days, T0 to T0 + 180 days
        await archive.append(ROOM, [ev(day, T0 + day * DAY)])
    return archive


@pytest.mark.parametrize(("hold", "expect_kept_from_day"), [
    (None, 120),  # the archive keeps 90 days: day 100 (100 days old) and older go
    ({"users": ("@bob:corp.example.com",), "since": 0, "until": 200}, 0),  # any user hold
    ({"rooms": ("!elsewhere:corp.example.com",)}, 120),  # another room's hold
    ({"rooms": (ROOM,), "since": 40, "until": 41}, 40),  # keeps the segment of day 40
])
async def test_archive_retention_prunes_old_sealed_segments_except_held(
        tmp_path: Path, store: Stores, hold: dict[str, Any] | None,
        expect_kept_from_day: int) -> None:
    now = T0 + 200 * DAY
    archive = await fill(tmp_path, store, now)
    svc = service(store, archive, now)
    if hold is not None:
        await store.holds.hold_add(HoldRecord(
            id="h1", case_id="C-1", reason="test", placed_by="legal", created_at=now,
            users=hold.get("users", ()), rooms=hold.get("rooms", ()),
            since_ms=T0 + hold["since"] * DAY if "since" in hold else None,
            until_ms=T0 + hold["until"] * DAY if "until" in hold else None),
            AuditRecord(ts=now, source="test", kind="hold_add", outcome="applied"))
    before = await archive.segments(ROOM)
    assert len(before) == 10 and all(s.sealed for s in before[:-1])
    pruned = await svc.prune_archive(now, await svc.active_holds())
    after = await archive.segments(ROOM)
    assert pruned == len(before) - len(after)
    kept_first = min(s.first_ts for s in after if s.first_ts is not None)
    oldest_kept_day = (kept_first - T0) // DAY
    if expect_kept_from_day == 0:
        assert pruned == 0
    elif hold is not None and "since" in hold:
        # the held segment stays, the others older than 90 days go
        assert {(s.first_ts - T0) // DAY for s in after} == {40, *range(120, 200, 20)}
    else:
        assert oldest_kept_day == expect_kept_from_day
    rows = await store.archive.archive_query(room_id=ROOM)
    assert {(r.ts - T0) // DAY for r in rows} == {(s.first_ts - T0) // DAY for s in after}
    assert (await archive.verify()).ok
    # a second pass has nothing more to do
    assert await svc.prune_archive(now, await svc.active_holds()) == 0

"""The live feed's snapshot of a room's state when the archive first sees the room: the
replay of who could read each message then starts from the homeserver's state, even for a
room Enclave met late. A real store and local archive; the homeserver's answers are given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config.retention import RetentionConfig
from bridge.matrix.client import HomeserverUnavailable, MatrixRequestError
from bridge.metrics import Metrics
from bridge.policy.readers import SNAPSHOT_KEY, replay_readers
from bridge.retention.archive import LocalArchive
from bridge.retention.service import RetentionService
from bridge.store import Stores
from bridge.store.base import AuditFilter

ROOM = "!late:corp.example.com"
A, B, C = "@alice:corp.example.com", "@bob:corp.example.com", "@carol:corp.example.com"
T0 = 1_714_560_000_000


def member(user: str, membership: str, n: int) -> dict[str, Any]:
    return {"event_id": f"$m{n}", "room_id": ROOM, "sender": user, "type": "m.room.member",
            "state_key": user, "origin_server_ts": T0 + n, "content": {"membership": membership}}


def msg(n: int, sender: str = A) -> dict[str, Any]:
    return {"event_id": f"$x{n}", "room_id": ROOM, "sender": sender, "type": "m.room.message",
            "origin_server_ts": T0 + n, "content": {"msgtype": "m.text", "body": f"m{n}"}}


class Homeserver:
    """Answers the admin context API with a given state, or an error."""

    def __init__(self, state: list[dict[str, Any]] | None, error: Exception | None = None):
        self.state, self.error = state, error
        self.calls: list[tuple[str, str, str]] = []

    async def admin_event_state(self, room_id: str, event_id: str, *,
                                admin: str) -> list[dict[str, Any]] | None:
        self.calls.append((room_id, event_id, admin))
        if self.error is not None:
            raise self.error
        return self.state


def feed_of(store: Stores, archive: LocalArchive, hs: Homeserver) -> Any:
    cfg = RetentionConfig.model_validate({
        "default": {"keep": "30d"}, "archive": {"path": "unused", "media": False}})
    svc = RetentionService(
        cfg, audit=store.audit, index=store.archive, holds=store.holds,
        retention_rooms=store.retention_rooms, kv=store.kv, directory_store=store.directory,
        leases=store.leases, client=hs, executor=None, archive=archive,  # type: ignore[arg-type]
        metrics=Metrics(), clock_ms=lambda: T0, server_name="corp.example.com",
        bot_user_id="@enclave:corp.example.com", admin_user_id="@enclave-admin:corp.example.com",
        service_prefix="enclave_")
    return svc.feed


async def archived(store: Stores, archive: LocalArchive) -> list[dict[str, Any]]:
    rows = await store.archive.archive_query(room_id=ROOM, archive_order=True)
    return await archive.read(rows)


async def test_first_event_of_a_room_gets_the_state_before_it(tmp_path: Path,
                                                               store: Stores) -> None:
    archive = LocalArchive(tmp_path / "a", store.archive, clock_ms=lambda: T0)
    create = {"event_id": "$c", "room_id": ROOM, "sender": A, "type": "m.room.create",
              "state_key": "", "origin_server_ts": T0, "content": {}}
    # the homeserver's state at $x10: Alice and Bob joined, Carol invited, joined-only
    state = [member(B, "join", 2), create, member(A, "join", 1), member(C, "invite", 3),
             {"event_id": "$v", "room_id": ROOM, "sender": A, "state_key": "",
              "type": "m.room.history_visibility", "origin_server_ts": T0 + 4,
              "content": {"history_visibility": "joined"}}]
    hs = Homeserver(state)
    feed = feed_of(store, archive, hs)
    await feed.handle_event(msg(10), None)
    await feed.handle_event(member(C, "join", 11), None)
    await feed.handle_event(msg(12, C), None)
    assert hs.calls == [(ROOM, "$x10", "@enclave-admin:corp.example.com")]  # once per room
    events = await archived(store, archive)
    assert [e["event_id"] for e in events] == ["$c", "$m2", "$m1", "$m3", "$v", "$x10",
                                               "$m11", "$x12"]
    assert all(e["unsigned"][SNAPSHOT_KEY] == {"at": "$x10"} for e in events[:5])
    assert "unsigned" not in events[5]
    readers = replay_readers(events)
    assert readers["$x10"].joined == (A, B) and readers["$x10"].invited == (C,)
    assert readers["$x10"].history_visibility == "joined"
    assert readers["$x12"].joined == (A, B, C)


async def test_a_room_seen_from_its_creation_needs_no_snapshot(tmp_path: Path,
                                                              store: Stores) -> None:
    archive = LocalArchive(tmp_path / "a", store.archive, clock_ms=lambda: T0)
    hs = Homeserver([])
    feed = feed_of(store, archive, hs)
    await feed.handle_event({"event_id": "$c", "room_id": ROOM, "sender": A,
                             "type": "m.room.create", "state_key": "", "content": {},
                             "origin_server_ts": T0}, None)
    await feed.handle_event(msg(1), None)
    assert hs.calls == []
    assert [e["event_id"] for e in await archived(store, archive)] == ["$c", "$x1"]


async def test_a_refused_snapshot_is_audited_and_the_event_archived(tmp_path: Path,
                                                                   store: Stores) -> None:
    archive = LocalArchive(tmp_path / "a", store.archive, clock_ms=lambda: T0)
    hs = Homeserver(None, MatrixRequestError(403, "M_FORBIDDEN", "not admin"))
    await feed_of(store, archive, hs).handle_event(msg(1), None)
    assert [e["event_id"] for e in await archived(store, archive)] == ["$x1"]
    rows = [r for r in await store.audit.query_audit(AuditFilter(room_id=ROOM))
            if r["kind"] == "archive_snapshot"]
    assert rows and rows[0]["outcome"] == "failed" and "not admin" in rows[0]["detail"]


async def test_an_unreachable_homeserver_leaves_the_event_for_a_retry(tmp_path: Path,
                                                                     store: Stores) -> None:
    archive = LocalArchive(tmp_path / "a", store.archive, clock_ms=lambda: T0)
    hs = Homeserver(None, HomeserverUnavailable("down"))
    with pytest.raises(HomeserverUnavailable):
        await feed_of(store, archive, hs).handle_event(msg(1), None)
    assert await archived(store, archive) == []

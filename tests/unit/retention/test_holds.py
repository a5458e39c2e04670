"""Legal holds are placed and released through ``RetentionService`` (the one place, which
``enclave hold`` calls): who and what a hold names is checked first, the hold is validated,
and the audit record is written with it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bridge.matrix.client import HomeserverUnavailable
from bridge.retention.holds import HoldCheckFailed, UnknownHoldSubjects
from bridge.retention.service import RetentionService
from bridge.store import AuditFilter, Stores
from bridge.store.base import HoldRecord

from .test_purge import service as prune_service

NOW = 1_714_560_000_000
KNOWN = "@bob:corp.example.com"


class Homeserver:
    """The one call the subject check makes for a local user."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down

    async def admin_get_user(self, user_id: str, *, admin: str) -> dict[str, Any] | None:
        if self.down:
            raise HomeserverUnavailable("connection refused")
        return {"name": user_id} if user_id == KNOWN else None


def service(store: Stores, client: Homeserver) -> RetentionService:
    return prune_service(store, None, NOW, client=client)


def hold(**kw: Any) -> HoldRecord:
    return HoldRecord(**{"id": "h1", "case_id": "CASE-1", "reason": "litigation",
                         "placed_by": "legal@corp", "users": (KNOWN,), "rooms": (),
                         "since_ms": None, "until_ms": None, "created_at": NOW, **kw})


async def audit(store: Stores) -> list[tuple[str, str, str]]:
    return [(r["kind"], r["actor"], r["detail"])
            for r in await store.audit.query_audit(AuditFilter(limit=100))]


async def test_a_hold_is_placed_once_and_released_once_each_audited(store: Stores) -> None:
    svc = service(store, Homeserver())
    assert await svc.add_hold(hold())
    assert not await svc.add_hold(dataclasses.replace(hold(), reason="again"))
    assert [h.id for h in await store.holds.holds()] == ["h1"]
    assert await svc.release_hold("h1", by="legal2@corp", reason="closed")
    assert not await svc.release_hold("h1", by="legal2@corp", reason="closed")
    assert not await svc.release_hold("nope", by="legal2@corp", reason="closed")
    detail = f"hold h1 case CASE-1: users=['{KNOWN}'] rooms=[] since=None until=None"
    assert sorted(await audit(store)) == [("hold_add", "legal@corp", detail),
                                          ("hold_release", "legal2@corp", detail)]


async def test_a_hold_on_someone_nobody_knows_is_not_placed(store: Stores) -> None:
    svc = service(store, Homeserver())
    with pytest.raises(UnknownHoldSubjects) as e:
        await svc.add_hold(hold(users=("@typo:corp.example.com",)))
    assert "unknown user" in e.value.problems[0]
    with pytest.raises(HoldCheckFailed):
        await service(store, Homeserver(down=True)).add_hold(hold())
    # checked first, then the hold itself (an id with a space)
    with pytest.raises(ValueError, match="hold id"):
        await svc.add_hold(hold(id="bad id"))
    assert await store.holds.holds(include_released=True) == []
    assert await audit(store) == []

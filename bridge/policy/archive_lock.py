"""The Object Lock of the archive's objects in S3, decided: how long an object is locked,
whether it carries a legal hold, whether the storage will let a version be deleted."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from ..kernel.timestamps import utc_datetime
from .retention import Hold
from .retention_rooms import segment_held

# "forever" cannot be an Object Lock date: a century stands for it (compliance mode: the
# bucket's owner cannot shorten it either, so the docs say so before anyone sets it)
FOREVER_MS = 100 * 365 * 24 * 3600 * 1000


@dataclass(frozen=True)
class LockDecision:
    mode: str  # "COMPLIANCE" | "GOVERNANCE"
    retain_until: dt.datetime
    legal_hold: bool


def decide_object_lock(*, now_ms: int, keep_ms: int | None, mode: str,
                       held: bool) -> LockDecision:
    """The Object Lock of an object written at ``now_ms`` for an archive that keeps it
    ``keep_ms`` (None: forever): locked at least that long, under a legal hold while a
    hold covers its room."""
    until = now_ms + (FOREVER_MS if keep_ms is None else keep_ms)
    return LockDecision(mode.upper(), utc_datetime(until), held)


def room_held(room_id: str, holds: Sequence[Hold]) -> bool:
    """Whether an active hold could cover any event of the room (its room list names it,
    or it has none): the room's objects then carry an S3 legal hold."""
    return segment_held(room_id, -(1 << 62), 1 << 62, holds)


def decide_deletable(*, retain_until: dt.datetime | None, legal_hold: bool,
                     now_ms: int) -> bool:
    """Whether the storage will let a version be deleted now: its retention has passed
    and no legal hold is on it."""
    if legal_hold:
        return False
    return retain_until is None or retain_until.timestamp() * 1000 <= now_ms

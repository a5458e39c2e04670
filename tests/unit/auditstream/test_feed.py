"""Which audit rows the stream may send (bridge/auditstream/feed.py): never past a hole in
the ids that may still fill."""

from __future__ import annotations

from bridge.auditstream.feed import GapWatch
from bridge.store.base import AuditEntry, AuditFeedPage, AuditRecord


def page(ids: list[int], horizon: tuple[int, int] | None) -> AuditFeedPage:
    rec = AuditRecord(ts=1, source="t", kind="k", outcome="applied")
    return AuditFeedPage(tuple(AuditEntry(i, rec) for i in ids), horizon)


def ids(entries: list[AuditEntry]) -> list[int]:
    return [e.id for e in entries]


def test_sqlite_holes_are_final() -> None:
    assert ids(GapWatch().ready(0, page([2, 3, 7], None), 0.0)) == [2, 3, 7]


def test_contiguous_run_is_sent_at_once() -> None:
    assert ids(GapWatch().ready(4, page([5, 6, 7], (100, 101)), 0.0)) == [5, 6, 7]


def test_stops_at_a_hole_until_it_fills() -> None:
    w = GapWatch(settle_seconds=1.0)
    assert ids(w.ready(4, page([5, 7, 8], (100, 103)), 0.0)) == [5]
    assert w.waiting
    # the transaction holding 6 is still open (xmin 101 < 103): wait, even after long
    assert ids(w.ready(5, page([7, 8], (101, 104)), 30.0)) == []
    # it committed: 6 is there, everything goes, in order
    assert ids(w.ready(5, page([6, 7, 8], (104, 104)), 31.0)) == [6, 7, 8]


def test_a_hole_is_final_once_its_transactions_ended_and_it_settled() -> None:
    w = GapWatch(settle_seconds=1.0)
    assert ids(w.ready(0, page([1, 3], (50, 52)), 0.0)) == [1]
    # every transaction below xmax 52 ended, but not settled yet
    assert ids(w.ready(1, page([3], (52, 52)), 0.5)) == []
    # settled too: 2 was rolled back, 3 goes
    assert ids(w.ready(1, page([3, 4], (53, 53)), 1.5)) == [3, 4]
    assert not w.waiting


def test_a_later_hole_past_the_probe_waits_again() -> None:
    w = GapWatch(settle_seconds=0.0)
    assert ids(w.ready(0, page([1, 3], (10, 11)), 0.0)) == [1]
    # 2 final (xmin passed 11); a new hole at 5, taken after the first probe's snapshot
    assert ids(w.ready(1, page([3, 4, 6], (11, 13)), 1.0)) == [3, 4]
    assert ids(w.ready(4, page([6], (12, 14)), 2.0)) == []
    assert ids(w.ready(4, page([5, 6], (14, 14)), 3.0)) == [5, 6]

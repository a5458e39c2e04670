"""Which audit rows after the cursor may be sent now without ever skipping one.

Audit ids come from a sequence (PostgreSQL identity, SQLite AUTOINCREMENT). On SQLite one
writer commits them in order, so a missing id never appears later. On PostgreSQL a
transaction takes its id when it inserts and may commit after a transaction that took a
higher one: a reader that moved its cursor past the hole would never send that record. So
only the gap-free run after the cursor is sent; a hole is waited for until it is known to
be permanent (a rolled-back insert, a sequence jump after a crash): every transaction that
was running when the hole was first seen (ids below that snapshot's xmax) has ended, and at
least ``settle_seconds`` have passed (covering the instant between an insert taking its id
and its transaction getting a transaction id).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..store.base import AuditEntry, AuditFeedPage

SETTLE_SECONDS = 1.0


@dataclass
class _Probe:
    below: int  # every id below this was taken before the snapshot...
    xmax: int  # ...whose xmax this is
    seen_at: float  # monotonic seconds


class GapWatch:
    """Tracks holes in the audit id sequence for one reader (one sink)."""

    def __init__(self, settle_seconds: float = SETTLE_SECONDS):
        self.settle_seconds = settle_seconds
        self._probe: _Probe | None = None
        self._permanent_below = 0  # holes below this id will never fill

    @property
    def waiting(self) -> bool:
        """True while a hole is being waited for (read again soon)."""
        return self._probe is not None

    def ready(self, cursor: int, page: AuditFeedPage, now: float) -> list[AuditEntry]:
        """The entries of ``page`` (read after ``cursor`` at monotonic time ``now``) that
        can be sent now: the run up to the first hole that may still fill."""
        if page.horizon is None:
            return list(page.entries)  # one writer: a hole is final
        xmin, xmax = page.horizon
        probe = self._probe
        if (probe is not None and xmin >= probe.xmax
                and now - probe.seen_at >= self.settle_seconds):
            self._permanent_below = max(self._permanent_below, probe.below)
            self._probe = None
        out: list[AuditEntry] = []
        expected = cursor + 1
        for e in page.entries:
            if e.id != expected and e.id > self._permanent_below:
                if self._probe is None:
                    self._probe = _Probe(below=page.entries[-1].id, xmax=xmax, seen_at=now)
                break
            out.append(e)
            expected = e.id + 1
        return out

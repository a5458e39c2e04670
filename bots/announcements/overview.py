"""What ``enclave announcements list | report | send`` and the console's announcements page
both show and do: one copy, on the bots' store and the directory view."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.kernel.timestamps import iso_utc
from bridge.model.people import StaffRecord

from ..store import AnnouncementDelivery, AnnouncementOccurrence, AnnouncementStore
from .acks import Summary, summarise
from .report import report_rows
from .service import make_occurrence, spec_for
from .spec import AnnouncementSpec


async def announcement_list(store: AnnouncementStore,
                            configured: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Configured and sent announcements, one row each (configured first): schedule,
    occurrences, the latest one's status and counts."""
    occs = await store.announcement_occurrences()
    latest: dict[str, Any] = {}
    for o in occs:
        latest[o.announcement_id] = o
    rows = []
    for aid in [*configured, *(k for k in latest if k not in configured)]:
        a = configured.get(aid)
        o = latest.get(aid)
        counts = ""
        if o is not None:
            s = summarise(await store.announcement_deliveries(aid, o.occurrence_id))
            spec = AnnouncementSpec.from_json(o.spec)
            counts = s.line(spec.require_ack)
        sched = "-"
        if a is not None and a.schedule is not None:
            sched = a.schedule.cron or a.schedule.at or "-"
            sched += f" ({a.schedule.timezone})"
        elif a is not None:
            sched = "manual"
        rows.append({
            "id": aid, "source": "config" if a else (o.kind if o else ""),
            "title": a.title if a else (AnnouncementSpec.from_json(o.spec).title
                                        if o else ""),
            "schedule": sched,
            "occurrences": sum(1 for x in occs if x.announcement_id == aid),
            "latest": o.occurrence_id if o else "", "status": o.status if o else "",
            "counts": counts,
        })
    return rows


@dataclass(frozen=True)
class OccurrenceReport:
    occurrence: AnnouncementOccurrence
    spec: AnnouncementSpec
    deliveries: Sequence[AnnouncementDelivery]
    rows: list[dict[str, Any]]
    summary: Summary

    @property
    def head(self) -> str:
        occ, spec = self.occurrence, self.spec
        return (f"{occ.announcement_id} / {occ.occurrence_id}: {spec.title} ({occ.kind}, "
                f"{occ.status})\n{self.summary.line(spec.require_ack)}")


async def occurrence_report(store: AnnouncementStore, staff: Sequence[StaffRecord],
                            announcement_id: str, occurrence_id: str | None,
                            timezone: str) -> OccurrenceReport | None:
    """The report of an announcement's latest occurrence (or ``occurrence_id``); None when
    nothing was sent."""
    occs = await store.announcement_occurrences(announcement_id=announcement_id)
    if occurrence_id:
        occs = [o for o in occs if o.occurrence_id == occurrence_id]
    if not occs:
        return None
    occ = occs[-1]
    deliveries = await store.announcement_deliveries(occ.announcement_id, occ.occurrence_id)
    by_id = {r.user_id: r for r in staff}
    return OccurrenceReport(occ, AnnouncementSpec.from_json(occ.spec), deliveries,
                            report_rows(deliveries, by_id, timezone), summarise(deliveries))


@dataclass(frozen=True)
class Queued:
    created: bool
    occurrence_id: str
    users: int
    rooms: int


async def queue_send(store: AnnouncementStore, staff: Sequence[StaffRecord], cfg: Any,
                     timezone: str, *, occurrence_id: str | None, now_ms: int,
                     created_by: str, actor: str | None = None) -> Queued:
    """Queue a configured announcement now (the running Enclave's bot delivers it);
    ``created`` False when that occurrence exists already (nothing queued)."""
    occ_id = occurrence_id or "manual-" + iso_utc(now_ms)
    created, sel = await make_occurrence(
        store, staff, announcement_id=cfg.id, occurrence_id=occ_id, kind="manual",
        spec=spec_for(cfg, timezone), scheduled_at=now_ms, created_by=created_by,
        now_ms=now_ms, actor=actor)
    return Queued(created, occ_id, len(sel.users), len(sel.rooms))


def ack_series(deliveries: Sequence[AnnouncementDelivery]) -> list[tuple[int, int]]:
    """(time, acknowledgements so far) at each acknowledgement, for the chart. Pure."""
    times = sorted(d.acked_at for d in deliveries
                   if d.target.startswith("@") and d.acked_at is not None)
    return [(t, i + 1) for i, t in enumerate(times)]

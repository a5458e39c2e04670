"""Making occurrences: shared by the running bot, webhooks and the CLI (no Matrix needed)."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.bots import AnnouncementConfig
from bridge.model.people import StaffRecord
from bridge.store import AuditRecord

from ..store import AnnouncementOccurrence, AnnouncementStore
from .audience import Selection, select_audience
from .spec import AnnouncementSpec


def spec_for(cfg: AnnouncementConfig, default_timezone: str = "UTC") -> AnnouncementSpec:
    """The spec of a configured announcement (its schedule's time zone for {date})."""
    tz = cfg.schedule.timezone if cfg.schedule is not None else default_timezone
    return AnnouncementSpec.from_config(cfg, title=cfg.title, body=cfg.body, timezone=tz)


async def make_occurrence(
    store: AnnouncementStore, staff: Sequence[StaffRecord], *, announcement_id: str,
    occurrence_id: str,
    kind: str, spec: AnnouncementSpec, scheduled_at: int, created_by: str | None,
    now_ms: int, actor: str | None = None,
) -> tuple[bool, Selection]:
    """Select the audience now and store the occurrence with one pending row per target.

    Only the first call for an occurrence id creates it (returns True), audited in the
    same transaction; a repeat after a crash, or from a second process, changes nothing."""
    sel = select_audience(spec.audience, staff)
    occ = AnnouncementOccurrence(
        announcement_id=announcement_id, occurrence_id=occurrence_id, kind=kind,
        spec=spec.to_json(), status="pending", scheduled_at=scheduled_at, created_at=now_ms,
        created_by=created_by)
    skipped = "; ".join(f"{u}: {why}" for u, why in sel.skipped)
    audit = AuditRecord(
        ts=now_ms, source="bots.announcements", kind="announcement_created",
        outcome="applied", actor=actor or created_by,
        rule_id=f"announcements.{announcement_id}",
        reason=f"{kind} occurrence {occurrence_id} for {spec.audience.describe()}",
        detail=f"{len(sel.users)} people, {len(sel.rooms)} room(s)"
               + (f"; left out: {skipped}" if skipped else ""))
    created = await store.announcement_create(occ, sel.targets, audit=[audit])
    return created, sel

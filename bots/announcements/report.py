"""Reports of an occurrence: counts and one row per recipient (who, when). Pure."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from bridge.kernel.spreadsheet import csv_cell
from bridge.kernel.timestamps import local_datetime
from bridge.model.people import StaffRecord

if TYPE_CHECKING:
    from ..store import AnnouncementDelivery

CSV_COLUMNS = ["recipient", "name", "department", "status", "delivered_at", "room_id",
               "acknowledged_at", "ack_method", "reminders", "reminders_failed", "escalated_at",
               "escalated_to", "detail"]


def iso(ms: int | None, timezone: str = "UTC") -> str:
    if ms is None:
        return ""
    return local_datetime(ms, timezone).isoformat(timespec="seconds")


def report_rows(deliveries: Sequence[AnnouncementDelivery], staff: Mapping[str, StaffRecord],
                timezone: str = "UTC") -> list[dict[str, Any]]:
    """One row per target (people first, then explicit rooms), times as ISO 8601."""
    out = []
    ordered = sorted(deliveries, key=lambda d: (not d.target.startswith("@"), d.target))
    for d in ordered:
        rec = staff.get(d.target)
        # only what the homeserver accepted counts; failures are shown with their reason
        detail = [d.detail] if d.detail else []
        if d.reminder_failures:
            detail.append(f"{d.reminder_failures} reminder(s) failed: {d.reminder_error}")
        if d.escalation_error is not None:
            detail.append(f"escalation to {d.escalated_to} failed: {d.escalation_error}")
        elif d.escalated_at is not None and d.escalated_to is None:
            detail.append("not escalated: no active manager in the directory")
        out.append({
            "recipient": d.target, "name": rec.display_name if rec else "",
            "department": (rec.department or "") if rec else "", "status": d.status,
            "delivered_at": iso(d.sent_at, timezone), "room_id": d.room_id or "",
            "acknowledged_at": iso(d.acked_at, timezone), "ack_method": d.ack_method or "",
            "reminders": d.reminders, "reminders_failed": d.reminder_failures,
            "escalated_at": iso(d.escalated_at, timezone) if d.escalated else "",
            "escalated_to": (d.escalated_to or "") if d.escalated else "",
            "detail": "; ".join(detail),
        })
    return out


def write_csv(rows: Sequence[dict[str, Any]], out: IO[str]) -> None:
    w = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(v) for k, v in r.items()})

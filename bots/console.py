"""The announcements page of the operators' console (``/console/x/announcements``),
contributed through the extension seam (``Plugin.console_pages``): the list, a send of a
configured announcement (operator role), and per person delivered / acknowledged /
reminded / escalated with a chart of acknowledgements over time.

The console checked the session, role and CSRF token before a handler runs and audits
each POST; the page calls the same functions as ``enclave announcements``
(:mod:`bots.announcements.overview`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from bridge.extension import ConsolePage, ConsoleRequest, ConsoleView
from bridge.kernel.timestamps import readable_utc
from bridge.store.domains import DirectoryStore

from .announcements.overview import ack_series, announcement_list, occurrence_report, queue_send
from .announcements.report import write_csv
from .store import AnnouncementStore


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *,
           link: Callable[[dict[str, Any]], str] | None = None, table_id: str = "") -> str:
    head = "".join(f'<th scope="col">{escape(c)}</th>' for c in columns)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(columns):
            text = escape(str(r.get(c, "") if r.get(c) is not None else ""))
            if i == 0 and link is not None:
                text = f'<a href="{escape(link(r))}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(columns)}">none</td></tr>')
    tid = f' id="{escape(table_id)}"' if table_id else ""
    return (f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table>")


def ack_chart_svg(series: Sequence[tuple[int, int]], recipients: int, *,
                  start_ms: int | None = None, width: int = 640, height: int = 220) -> str:
    """Acknowledgements over time as an inline SVG step line (no script); a text
    alternative says the same for screen readers."""
    if not series:
        return "<p>No acknowledgements yet.</p>"
    pad = 40
    # from the first delivery (the curve's rise shows), to the last acknowledgement
    t0 = min(series[0][0], start_ms) if start_ms is not None else series[0][0]
    t1 = series[-1][0]
    span = max(t1 - t0, 1)
    top = max(recipients, series[-1][1], 1)

    def x(t: int) -> float:
        return pad + (width - 2 * pad) * (t - t0) / span

    def y(n: int) -> float:
        return height - pad - (height - 2 * pad) * n / top

    points = [f"{x(t0):.1f},{y(0):.1f}"]
    prev = 0
    for t, n in series:
        points.append(f"{x(t):.1f},{y(prev):.1f}")
        points.append(f"{x(t):.1f},{y(n):.1f}")
        prev = n
    desc = (f"{series[-1][1]} of {recipients} acknowledged between {readable_utc(t0)} and "
            f"{readable_utc(t1)} UTC")
    return (
        f'<svg class="chart" id="ack-chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="ack-chart-title"><title id="ack-chart-title">{escape(desc)}'
        f'</title>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        f'stroke="#57606a"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" '
        f'stroke="#57606a"/>'
        f'<line x1="{pad}" y1="{y(recipients):.1f}" x2="{width - pad}" '
        f'y2="{y(recipients):.1f}" stroke="#d0d7de" stroke-dasharray="4 4"/>'
        f'<polyline fill="none" stroke="#0b5cad" stroke-width="2.5" '
        f'points="{" ".join(points)}"/>'
        f'<text x="{pad}" y="{pad - 8}" font-size="12">{top}</text>'
        f'<text x="{pad}" y="{height - 12}" font-size="12">{escape(readable_utc(t0))}</text>'
        f'<text x="{width - pad}" y="{height - 12}" font-size="12" text-anchor="end">'
        f'{escape(readable_utc(t1))}</text></svg><p class="mono">{escape(desc)}</p>')


def announcements_page(store: AnnouncementStore, directory: DirectoryStore,
                       configured: dict[str, Any], timezone: str,
                       clock_ms: Callable[[], int]) -> ConsolePage:
    """The console page over the bots' store (``configured``: id -> announcement config)."""

    async def handle(req: ConsoleRequest) -> ConsoleView:
        notice, outcome, detail = "", "applied", None
        if req.method == "POST":
            aid = req.form.get("id", "")
            a = configured.get(aid)
            if a is None:
                notice = f"no configured announcement {aid!r}"
                outcome, detail = "refused", notice
            else:
                q = await queue_send(store, await directory.directory_view(), a, timezone,
                                     occurrence_id=None, now_ms=clock_ms(),
                                     created_by=f"console:{req.actor}", actor=req.actor)
                if q.created:
                    notice = (f"queued {aid} / {q.occurrence_id} for {q.users} people and "
                              f"{q.rooms} room(s); the bot delivers it shortly")
                    detail = f"announcement {aid} occurrence {q.occurrence_id}"
                else:
                    notice = f"occurrence {q.occurrence_id!r} exists already; nothing queued"
                    outcome, detail = "refused", notice
        parts = []
        if notice:
            parts.append(f'<p class="notice" role="status" id="message">{escape(notice)}</p>')
        aid = req.query.get("id", "") if req.method == "GET" else ""
        if aid:
            rep = await occurrence_report(store, await directory.directory_view(), aid,
                                          req.query.get("occurrence") or None, timezone)
            if rep is None:
                parts.append(f"<p>Nothing sent for {escape(aid)} yet.</p>")
            else:
                if req.query.get("csv"):
                    # the report's own writer: every cell through kernel csv_cell
                    buf = io.StringIO()
                    write_csv(rep.rows, buf)
                    return ConsoleView(csv=(f"{aid}-{rep.occurrence.occurrence_id}.csv",
                                            buf.getvalue()))
                s = rep.summary
                parts.append(f"<h2>{escape(rep.occurrence.announcement_id)} / "
                             f"{escape(rep.occurrence.occurrence_id)}: "
                             f"{escape(rep.spec.title)}</h2>")
                parts.append(f'<p id="summary">{escape(s.line(rep.spec.require_ack))}</p>')
                parts.append("<h3>Acknowledgements over time</h3>")
                sent = [d.sent_at for d in rep.deliveries if d.sent_at is not None]
                parts.append(ack_chart_svg(ack_series(rep.deliveries), s.recipients,
                                           start_ms=min(sent) if sent else None))
                csv_q = urlencode({"id": aid, "occurrence": rep.occurrence.occurrence_id,
                                   "csv": "1"})
                parts.append(f'<p><a href="{escape(req.base)}?{escape(csv_q)}">'
                             "Download CSV</a></p>")
                parts.append(_table(rep.rows, ["recipient", "name", "status", "delivered_at",
                                               "acknowledged_at", "ack_method", "reminders",
                                               "escalated_at", "escalated_to", "detail"],
                                    table_id="recipients"))
        rows = await announcement_list(store, configured)
        parts.append("<h2>Announcements</h2>")
        parts.append(_table(rows, ["id", "source", "title", "schedule", "occurrences",
                                   "latest", "status", "counts"],
                            link=lambda r: f"{req.base}?{urlencode({'id': r['id']})}",
                            table_id="announcements"))
        if "operator" in req.roles and configured:
            options = "".join(f'<option value="{escape(k)}">{escape(k)}: '
                              f'{escape(v.title)}</option>' for k, v in configured.items())
            parts.append(
                f'<h2>Send now</h2><form method="post" action="{escape(req.base)}">'
                f'<input type="hidden" name="csrf" value="{escape(req.csrf)}">'
                f'<label><span>Announcement</span><select name="id">{options}</select>'
                f'</label> <button type="submit" id="send">Send to its audience</button>'
                "</form>")
        return ConsoleView(body_html="".join(parts), outcome=outcome, detail=detail)

    return ConsolePage(path="announcements", title="Announcements", handler=handle,
                       role="viewer", post_role="operator")

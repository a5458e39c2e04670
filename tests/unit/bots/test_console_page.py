"""The announcements console page's pure parts: the acknowledgement series and its chart."""

from __future__ import annotations

from bots.announcements.overview import ack_series
from bots.console import ack_chart_svg
from bots.store import AnnouncementDelivery


def d(target: str, acked_at: int | None) -> AnnouncementDelivery:
    return AnnouncementDelivery(announcement_id="a", occurrence_id="o", target=target,
                                status="sent", sent_at=1000, acked_at=acked_at)


def test_ack_series_counts_people_in_time_order() -> None:
    got = ack_series([d("@c:x", 5000), d("@a:x", 3000), d("@b:x", None),
                      d("!room:x", 2000)])  # a room's "acknowledgement" is no person's
    assert got == [(3000, 1), (5000, 2)]


def test_chart_says_what_it_shows() -> None:
    svg = ack_chart_svg([(3000, 1), (5000, 2)], 4, start_ms=1000)
    assert svg.startswith("<svg") and 'role="img"' in svg
    assert "2 of 4 acknowledged" in svg
    # the step line starts at the first delivery, at zero
    points = svg.split('points="')[1].split('"')[0].split()
    assert points[0] == "40.0,180.0" and len(points) == 5
    assert ack_chart_svg([], 4) == "<p>No acknowledgements yet.</p>"


def test_chart_escapes_nothing_unsafe() -> None:
    svg = ack_chart_svg([(3000, 1)], 1)
    assert "<script" not in svg

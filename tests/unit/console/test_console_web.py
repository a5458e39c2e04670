"""The console's small web guards: where a sign-in may send the browser next, and the CSV
cells a spreadsheet would run as formulas."""

from __future__ import annotations

import pytest

from bridge.console.web import ConsoleWeb
from bridge.kernel.timestamps import MIN_WHEN_MS, parse_when_ms


@pytest.mark.parametrize(("given", "went"), [
    ("/console/holds", "/console/holds"),
    ("/console/audit?user=%40a%3Ab", "/console/audit?user=%40a%3Ab"),
    (None, "/console/"),
    ("", "/console/"),
    ("https://evil.example/console/", "/console/"),
    ("//evil.example/console/", "/console/"),
    ("/console//evil.example", "/console/"),
    ("/console/\\evil", "/console/"),
    ("/_matrix/client/v3/login", "/console/"),
    # a line break would split the Location header (aiohttp raises: a 500), a tab or space
    # is dropped by browsers
    ("/console/audit\r\nSet-Cookie: x=y", "/console/"),
    ("/console/\t/evil.example", "/console/"),
    ("/console/ a", "/console/"),
])
def test_next_is_a_console_path_only(given: str | None, went: str) -> None:
    assert ConsoleWeb._next(given) == went




def test_a_relative_time_before_year_one_is_no_time() -> None:
    now = 1_800_000_000_000
    assert parse_when_ms("7d", now) == now - 7 * 86_400_000
    # would overflow a 64-bit column (PostgreSQL: an error, SQLite: OverflowError)
    assert parse_when_ms("99999999999999999d", now) is None
    assert parse_when_ms("0001-01-01T00:00:00", now) == MIN_WHEN_MS

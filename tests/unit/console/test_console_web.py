"""The console's small web guards: where a sign-in may send the browser next, and the CSV
cells a spreadsheet would run as formulas."""

from __future__ import annotations

import pytest

from bridge.console.web import ConsoleWeb, _csv_safe


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
])
def test_next_is_a_console_path_only(given: str | None, went: str) -> None:
    assert ConsoleWeb._next(given) == went


@pytest.mark.parametrize(("cell", "out"), [
    ("=HYPERLINK(\"x\")", "'=HYPERLINK(\"x\")"), ("+1", "'+1"), ("-1", "'-1"),
    ("@SUM(A1)", "'@SUM(A1)"), ("@alice:corp.test", "@alice:corp.test"),
    ("@a(1):x", "'@a(1):x"),
    ("plain", "plain"), (None, ""), (42, 42),
])
def test_csv_cells(cell: object, out: object) -> None:
    assert _csv_safe(cell) == out

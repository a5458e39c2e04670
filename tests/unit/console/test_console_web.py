"""The console's small web guards: where a sign-in may send the browser next, and the CSV
cells a spreadsheet would run as formulas."""

from __future__ import annotations

import pytest

from bridge.console.web import ConsoleWeb


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



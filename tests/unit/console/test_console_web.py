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




async def test_a_refused_sign_in_never_names_the_typed_user_as_its_actor() -> None:
    """The user name typed at the sign-in form is only a claim until the homeserver
    vouches for it: a failed or throttled sign-in is audited without an actor."""
    from types import SimpleNamespace
    from typing import Any

    from bridge.config.console import ConsoleConfig
    from bridge.console.auth import ConsoleAuth

    records: list[Any] = []

    async def add_audit(rec: Any) -> None:
        records.append(rec)

    auth = ConsoleAuth(ConsoleConfig.model_validate({"max_failed_logins": 1}),
                       sessions=None, directory=None,  # type: ignore[arg-type]
                       audit=SimpleNamespace(add_audit=add_audit),  # type: ignore[arg-type]
                       http=None, homeserver_url="http://127.0.0.1:1",  # type: ignore[arg-type]
                       clock_ms=lambda: 1_000)

    async def refused(body: Any) -> tuple[None, str]:
        return None, "the homeserver refused the sign-in (M_FORBIDDEN)"

    auth._homeserver_login = refused  # type: ignore[method-assign]
    for _ in range(2):  # refused by the homeserver, then throttled
        got = await auth.sign_in_password("@alice:corp.test", "guess", "10.0.0.9")
        assert not got.ok
    assert [r.rule_id for r in records] == ["console.homeserver", "console.throttled"]
    assert [r.actor for r in records] == [None, None]
    assert all("'@alice:corp.test'" in (r.detail or "") for r in records)


def test_a_relative_time_before_year_one_is_no_time() -> None:
    now = 1_800_000_000_000
    assert parse_when_ms("7d", now) == now - 7 * 86_400_000
    # would overflow a 64-bit column (PostgreSQL: an error, SQLite: OverflowError)
    assert parse_when_ms("99999999999999999d", now) is None
    assert parse_when_ms("0001-01-01T00:00:00", now) == MIN_WHEN_MS

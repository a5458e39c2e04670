"""The console's pure decisions: roles from directory groups, session liveness, CSRF,
sign-in throttling."""

from __future__ import annotations

import pytest

from bridge.model.people import StaffRecord
from bridge.policy.console import (
    SessionState,
    csrf_ok,
    decide_client_address,
    decide_console_access,
    decide_login_throttle,
    decide_session_alive,
    keep_recent,
)

GROUPS = {"legal-team": "legal", "it-ops": "operator", "staff-ops": "viewer"}


def staff(groups: set[str], *, active: bool = True,
          user_id: str = "@ann:corp.test") -> StaffRecord:
    return StaffRecord(user_id=user_id, person_id="1", active=active, username="ann",
                       display_name="Ann", groups=frozenset(groups))


@pytest.mark.parametrize(("record", "allow", "roles", "rule"), [
    (None, False, set(), "console.unknown"),
    (staff({"legal-team"}, active=False), False, set(), "console.deactivated"),
    (staff({"sales"}), False, set(), "console.no_group"),
    (staff(set()), False, set(), "console.no_group"),
    (staff({"staff-ops"}), True, {"viewer"}, "console.group"),
    (staff({"legal-team", "sales"}), True, {"legal"}, "console.group"),
    (staff({"legal-team", "it-ops"}), True, {"legal", "operator"}, "console.group"),
    (staff({"legal-team"}, user_id="@bob:corp.test"), False, set(), "console.unknown"),
])
def test_access_from_groups(record: StaffRecord | None, allow: bool, roles: set[str],
                            rule: str) -> None:
    got = decide_console_access("@ann:corp.test", record, GROUPS)
    assert (got.allow, set(got.roles), got.rule_id) == (allow, roles, rule)
    assert got.reason


def test_roles_are_not_a_ladder() -> None:
    viewer = decide_console_access("@ann:corp.test", staff({"staff-ops"}), GROUPS)
    legal = decide_console_access("@ann:corp.test", staff({"legal-team"}), GROUPS)
    op = decide_console_access("@ann:corp.test", staff({"it-ops"}), GROUPS)
    refused = decide_console_access("@ann:corp.test", staff({"sales"}), GROUPS)
    assert viewer.has("viewer") and not viewer.has("operator") and not viewer.has("legal")
    assert legal.has("viewer") and legal.has("legal") and not legal.has("operator")
    assert op.has("operator") and not op.has("legal")
    assert not refused.has("viewer")


MIN = 60_000


@pytest.mark.parametrize(("state", "now", "alive", "why"), [
    (None, 0, False, "no such session"),
    (SessionState(0, 0), 29 * MIN, True, ""),
    (SessionState(0, 0), 30 * MIN, False, "idle timeout"),
    (SessionState(0, 100 * MIN), 101 * MIN, True, ""),
    (SessionState(0, 719 * MIN), 720 * MIN, False, "session too old"),
    (SessionState(10 * MIN, 10 * MIN), 5 * MIN, False, "session from the future"),
])
def test_session_alive(state: SessionState | None, now: int, alive: bool, why: str) -> None:
    assert decide_session_alive(state, now, idle_ms=30 * MIN, max_age_ms=720 * MIN) == (
        alive, why)


@pytest.mark.parametrize(("expected", "given", "ok"), [
    ("tok", "tok", True), ("tok", "tok2", False), ("tok", "", False), ("tok", None, False),
    ("", "", False), ("", None, False), ("tok", "TOK", False),
])
def test_csrf(expected: str, given: str | None, ok: bool) -> None:
    assert csrf_ok(expected, given) is ok


def test_login_throttle() -> None:
    window = 15 * MIN
    fails = [0, MIN, 2 * MIN, 3 * MIN]
    assert decide_login_throttle(fails, 4 * MIN, window_ms=window, limit=5)
    assert not decide_login_throttle([*fails, 4 * MIN], 4 * MIN, window_ms=window, limit=5)
    # the window moves on: old failures stop counting
    assert decide_login_throttle([*fails, 4 * MIN], 16 * MIN, window_ms=window, limit=5)
    assert keep_recent([*fails, 4 * MIN], 16 * MIN, window) == [2 * MIN, 3 * MIN, 4 * MIN]


@pytest.mark.parametrize(("peer", "xff", "trusted", "client"), [
    # no proxy configured: the peer, whatever the header claims
    ("203.0.113.9", "198.51.100.1", [], "203.0.113.9"),
    # behind the proxy: the address the proxy saw (the last entry it appended)
    ("127.0.0.1", "198.51.100.7", ["127.0.0.1"], "198.51.100.7"),
    ("10.0.0.2", "1.2.3.4, 198.51.100.7", ["10.0.0.0/8"], "198.51.100.7"),
    # two proxies: skip both
    ("10.0.0.2", "198.51.100.7, 10.0.0.3", ["10.0.0.0/8"], "198.51.100.7"),
    # a client cannot pick its address by writing the header to a peer not trusted
    ("198.51.100.66", "127.0.0.1", ["127.0.0.1"], "198.51.100.66"),
    # the proxy wrote none, or garbage
    ("127.0.0.1", None, ["127.0.0.1"], "127.0.0.1"),
    ("127.0.0.1", "not-an-address", ["127.0.0.1"], "127.0.0.1"),
    ("::1", "2001:db8::5", ["::1"], "2001:db8::5"),
    (None, None, [], "?"),
])
def test_client_address_behind_trusted_proxies(peer: str | None, xff: str | None,
                                               trusted: list[str], client: str) -> None:
    assert decide_client_address(peer, xff, trusted) == client

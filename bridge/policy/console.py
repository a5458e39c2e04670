"""Pure decisions of the operators' console: who may sign in with which roles, whether a
session is still alive, whether a form's CSRF token is the session's, and when failed
sign-ins are refused before the homeserver is even asked.

The console calls these on every request (a session is re-decided against the directory
each time: a person deactivated or moved out of a listed group loses access at once).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..model.people import StaffRecord

ROLES = ("viewer", "operator", "legal")


@dataclass(frozen=True)
class ConsoleAccess:
    """Whether a person may use the console, with which roles, and why (audited)."""

    allow: bool
    roles: frozenset[str]
    rule_id: str
    reason: str

    def has(self, role: str) -> bool:
        """``viewer`` is any signed-in person; the others must be granted by a group."""
        return self.allow and (role == "viewer" or role in self.roles)


def decide_console_access(user_id: str, staff: StaffRecord | None,
                          groups: Mapping[str, str]) -> ConsoleAccess:
    """The roles ``user_id`` gets from the directory (``staff``: their entry in the
    directory view Enclave syncs; ``groups``: ``console.groups``, group -> role).

    Refused: unknown to the directory, deactivated, or in none of the listed groups.
    """
    if staff is None:
        return ConsoleAccess(False, frozenset(), "console.unknown",
                             f"{user_id} is not in the directory Enclave syncs")
    if staff.user_id != user_id:
        return ConsoleAccess(False, frozenset(), "console.unknown",
                             f"{user_id} does not match the directory entry")
    if not staff.active:
        return ConsoleAccess(False, frozenset(), "console.deactivated",
                             f"{user_id} is deactivated in the directory")
    listed = sorted(g for g in staff.groups if g in groups)
    if not listed:
        return ConsoleAccess(False, frozenset(), "console.no_group",
                             f"{user_id} is in none of the groups console.groups lists")
    roles = frozenset(groups[g] for g in listed)
    return ConsoleAccess(True, roles, "console.group",
                         f"groups {', '.join(listed)} give {', '.join(sorted(roles))}")


@dataclass(frozen=True)
class SessionState:
    """What the console knows of a session when a request comes in."""

    created_at: int
    last_seen: int


def decide_session_alive(state: SessionState | None, now_ms: int, *, idle_ms: int,
                         max_age_ms: int) -> tuple[bool, str]:
    """(alive, why not): a session dies after ``idle_ms`` without a request or
    ``max_age_ms`` after sign-in, whichever comes first."""
    if state is None:
        return False, "no such session"
    if now_ms - state.last_seen >= idle_ms:
        return False, "idle timeout"
    if now_ms - state.created_at >= max_age_ms:
        return False, "session too old"
    if now_ms < state.created_at:
        return False, "session from the future"
    return True, ""


def csrf_ok(expected: str, given: str | None) -> bool:
    """The form's token is the session's (constant-time; an empty expectation never
    matches, so a session without a token accepts no POST)."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def decide_login_throttle(failures: Iterable[int], now_ms: int, *, window_ms: int,
                          limit: int) -> bool:
    """True when a new sign-in attempt may be tried: fewer than ``limit`` failures (their
    times, ms) within ``window_ms`` before ``now_ms``."""
    recent = sum(1 for t in failures if now_ms - t < window_ms)
    return recent < limit


def decide_client_address(peer: str | None, forwarded_for: str | None,
                          trusted: Sequence[str]) -> str:
    """The address a request came from: the peer's, or, when the peer is one of the
    ``trusted`` proxies (addresses or CIDR networks), the last ``X-Forwarded-For`` entry
    not itself a trusted proxy (entries before it are whatever the client wrote). Behind
    a proxy without this every sign-in shares the proxy's address, so a few failures
    would refuse everyone's sign-in."""
    nets = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr.strip())
        except ValueError:
            return False
        return any(ip in n for n in nets)

    if not peer:
        return "?"
    if not nets or not is_trusted(peer) or not forwarded_for:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # not an address: the proxy did not write it
    return hops[0] if hops else peer


def keep_recent(failures: Sequence[int], now_ms: int, window_ms: int) -> list[int]:
    """The failure times still inside the window (what a throttle needs to remember)."""
    return [t for t in failures if now_ms - t < window_ms]

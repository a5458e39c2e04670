"""The sender's pure decisions: whom a room's Megolm session must be (re)shared with
(:func:`decide_share`), whether every member is reached (:func:`assess_coverage`) and how
long to wait after a join before sending a key (:func:`join_settle_wait`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# -- pure decisions ------------------------------------------------------------------------------
Device = tuple[str, str]  # (user id, device id)


@dataclass(frozen=True)
class SessionView:
    """What matters about a room's current outbound Megolm session."""

    session_id: str
    shared: bool
    expired: bool
    shared_with: frozenset[Device]
    # devices that could not get this session when it was shared (no Olm session possible)
    unreachable: frozenset[Device] = frozenset()
    # invited members whose devices get this session's first key when they join
    for_invited: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ShareDecision:
    """Whether to (re)share the room key before encrypting, and why."""

    share: bool
    rotate: bool
    reason: str
    rule_id: str = "e2ee.share"


@dataclass(frozen=True)
class Coverage:
    """Who a shared session reached, among the room's members (the bot excluded)."""

    no_devices: frozenset[str]
    unreached_users: frozenset[str]
    unreached_devices: frozenset[Device]
    # members with devices, none of them signed by their owner (only when signing counts)
    unsigned_users: frozenset[str] = frozenset()

    @property
    def complete(self) -> bool:
        """Every member can read the message (some extra devices of theirs may not)."""
        return not self.no_devices and not self.unreached_users and not self.unsigned_users


def required_devices(members: Mapping[str, frozenset[str]], own_user: str) -> frozenset[Device]:
    return frozenset((u, d) for u, devs in members.items() if u != own_user for d in devs)


def decide_share(
    members: Mapping[str, frozenset[str]], own_user: str, session: SessionView | None,
    invited: frozenset[str] = frozenset(),
) -> ShareDecision:
    """Decide whether the room key must be shared (and the current one replaced).

    ``members``: joined member -> ids of their active devices (from a fresh key query).
    A shared session is reused only while every member device has it (or could not get it
    when it was shared) and nobody outside the room holds it; otherwise it is replaced,
    because a shared Megolm session cannot be taken back from someone who left.
    ``invited``: invited members. Their devices get a session's first key when they join
    (so they read every message sent while they were invited); a session started before
    someone was invited is replaced, since its first key is no longer at hand.
    """
    if session is None or not session.shared:
        return ShareDecision(True, False, "no room key shared yet")
    if session.expired:
        return ShareDecision(True, True, "room key expired (age or message count)")
    stale = sorted({u for u, _ in session.shared_with if u not in members})
    if stale:
        return ShareDecision(True, True, f"room key held by non-members: {', '.join(stale)}")
    missing = required_devices(members, own_user) - session.shared_with - session.unreachable
    if missing:
        users = sorted({u for u, _ in missing})
        return ShareDecision(True, True, f"new devices or members: {', '.join(users)}")
    new_invitees = sorted(invited - session.for_invited)
    if new_invitees:
        return ShareDecision(True, True, f"new invited members: {', '.join(new_invitees)}")
    return ShareDecision(False, False, "room key already shared with every member device")


def assess_coverage(
    members: Mapping[str, frozenset[str]], own_user: str, shared_with: frozenset[Device],
    signed: Mapping[str, frozenset[str]] | None = None,
) -> Coverage:
    """Which members (other than the bot) lack a device, or got the key on none of them.

    ``signed``: member -> their devices signed by their own cross-signing key. When given
    (Element's rule), only those devices count: a member is reached when one of them got
    the key, and a member without any is ``unsigned_users``."""
    no_devices = frozenset(u for u, devs in members.items() if u != own_user and not devs)
    unreached_devices = required_devices(members, own_user) - shared_with

    def counted(u: str, devs: frozenset[str]) -> frozenset[str]:
        return devs if signed is None else devs & signed.get(u, frozenset())

    unsigned_users = frozenset(
        u for u, devs in members.items() if u != own_user and devs and not counted(u, devs))
    unreached_users = frozenset(
        u for u, devs in members.items()
        if u != own_user and counted(u, devs)
        and all((u, d) in unreached_devices for d in counted(u, devs))
    )
    return Coverage(no_devices, unreached_users, unreached_devices, unsigned_users)


def join_settle_wait(join_ts_ms: Iterable[int], now_ms: int, delay_ms: int) -> float:
    """Seconds to wait before sharing a room key so that every member has been joined for
    ``delay_ms`` (their clients fetch the bot's device meanwhile); 0 when all have."""
    latest = max(join_ts_ms, default=None)
    if latest is None:
        return 0.0
    return max(0, min(delay_ms, latest + delay_ms - now_ms)) / 1000

"""Completeness: which events the homeserver has that never reached the inbox (pure).

The completeness check (``bridge.matrix.completeness``) reads each room's timeline forward
from a cursor through the admin API and asks these functions, page by page, what to do:
recover the events the appservice push never delivered, wait a little longer for those the
push may still be delivering, and whether the cursor may move past the page. No I/O, no
clock reads: the caller passes ``now_ms``.

Rules (ids in ``RULE_*``):

* an event already in the inbox is done (the inbox deduplicates by event id, so a push
  that arrives after a recovery is dropped, and the other way round);
* an event not in the inbox is recovered once it is older than ``grace_ms`` (the push had
  its chance); a younger one waits, because the push is usually milliseconds away;
* the cursor moves past a page only when every event of it is in the inbox or recovered
  and the newest is older than ``grace_ms``: Synapse may still be persisting an event that
  sorts into the page (its stream position was taken, its row not yet written);
* an event's age is taken from the earlier of its ``origin_server_ts`` and when the check
  first saw it: a remote server's clock (or a forged timestamp in the future) cannot keep
  an event waiting for ever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RULE_RECOVER = "completeness.recover"
RULE_WAIT = "completeness.wait_for_push"

CAUSE_HOMESERVER_RESTART = "homeserver_restart"
CAUSE_ENCLAVE_DOWNTIME = "enclave_downtime"
CAUSE_NOT_PUSHED = "not_pushed"
CAUSES = (CAUSE_HOMESERVER_RESTART, CAUSE_ENCLAVE_DOWNTIME, CAUSE_NOT_PUSHED)


@dataclass(frozen=True)
class SeenEvent:
    """One event of a room's timeline as the admin API returned it."""

    event_id: str
    origin_server_ts: int | None


@dataclass(frozen=True)
class PageDecision:
    """What to do with one page of a room's timeline."""

    recover: tuple[str, ...]  # event ids to put into the inbox now, in timeline order
    waiting: tuple[str, ...]  # not in the inbox, too young: the push may still bring them
    advance: bool  # the room's cursor may move past this page
    oldest_waiting_ms: int | None  # age of the oldest waiting event, if any
    rule_id: str
    reason: str


@dataclass(frozen=True)
class Timing:
    """How the check runs for a bound: recover after ``grace_ms``, check every
    ``interval_ms``. Worst case from an event's creation to its recovery: grace + interval
    + the time one check takes, which ``timing_for_bound`` keeps to about half the bound
    so processing the recovered events fits in the other half."""

    grace_ms: int
    interval_ms: int


def timing_for_bound(bound_seconds: float) -> Timing:
    """The grace and interval for ``bound_seconds``: grace a sixth, interval a third.

    60 s gives a 10 s grace (the push usually takes well under a second; 10 s spares
    recovering what a briefly slow homeserver still delivers) and a check every 20 s.
    """
    bound_ms = int(bound_seconds * 1000)
    return Timing(grace_ms=max(500, bound_ms // 6), interval_ms=max(1000, bound_ms // 3))


def event_age_ms(ev: SeenEvent, now_ms: int, first_seen_ms: int | None) -> int:
    """How long the event has existed, as far as Enclave can tell (see module docstring)."""
    born = now_ms if ev.origin_server_ts is None else min(ev.origin_server_ts, now_ms)
    if first_seen_ms is not None:
        born = min(born, first_seen_ms)
    return max(0, now_ms - born)


def decide_page(events: Sequence[SeenEvent], known: set[str], now_ms: int, grace_ms: int,
                first_seen: Mapping[str, int]) -> PageDecision:
    """Decide one page: recover what the push missed, wait for what it may still bring,
    and whether the cursor may move past the page."""
    recover: list[str] = []
    waiting: list[str] = []
    oldest: int | None = None
    newest_age: int | None = None
    for ev in events:
        age = event_age_ms(ev, now_ms, first_seen.get(ev.event_id))
        newest_age = age if newest_age is None else min(newest_age, age)
        if ev.event_id in known:
            continue
        if age >= grace_ms:
            recover.append(ev.event_id)
        else:
            waiting.append(ev.event_id)
            oldest = age if oldest is None else max(oldest, age)
    advance = not waiting and (newest_age is None or newest_age >= grace_ms)
    if recover:
        rule, reason = RULE_RECOVER, (
            f"{len(recover)} event(s) on the homeserver older than {grace_ms} ms never "
            "reached the inbox")
    elif waiting:
        rule, reason = RULE_WAIT, (
            f"{len(waiting)} event(s) younger than {grace_ms} ms not in the inbox yet; "
            "the push may still deliver them")
    else:
        rule, reason = RULE_RECOVER, "every event of the page is in the inbox"
    return PageDecision(tuple(recover), tuple(waiting), advance, oldest, rule, reason)


def classify_cause(event_ts: int | None, *, process_started_ms: int,
                   homeserver_outages: Sequence[tuple[int, int | None]],
                   margin_ms: int) -> str:
    """Why the push missed an event, as far as Enclave can tell.

    ``homeserver_restart``: Enclave saw the homeserver unreachable within ``margin_ms`` of
    the event (Synapse drops the events it holds in memory for the appservice when it
    stops, element-hq/synapse#11637). ``enclave_downtime``: the event is older than this
    process (the homeserver did not redeliver it in time after Enclave's restart).
    ``not_pushed``: neither (e.g. stranded by Synapse's appservice recovery, or a
    homeserver restart too quick for Enclave to notice).
    """
    if event_ts is not None:
        for start, end in homeserver_outages:
            if start - margin_ms <= event_ts and (end is None or event_ts <= end + margin_ms):
                return CAUSE_HOMESERVER_RESTART
        if event_ts < process_started_ms:
            return CAUSE_ENCLAVE_DOWNTIME
    return CAUSE_NOT_PUSHED

"""Resending an action whose earlier attempt's outcome is unknown: send again, or not?

Synapse deduplicates a client transaction id only in memory (an appservice user without a
device), so after a homeserver restart the resend of an event whose first attempt was stored
but whose answer was lost would be stored a second time. Every event the executor sends
therefore carries its action key in ``content[ACTION_KEY]``; before a resend the executor
reads the room's recent timeline back and this pure function decides from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ACTION_KEY = "org.enclave.action"
"""Content key carrying the executor's idempotency key on every event it sends."""

RULE_FOUND = "resend.already_applied"
RULE_NOT_FOUND = "resend.not_found"


@dataclass(frozen=True)
class ResendDecision:
    """``resend`` False means the action is already applied as ``event_id``."""

    resend: bool
    event_id: str | None
    rule_id: str
    reason: str


def decide_resend(events: Iterable[dict[str, Any]], *, key: str, sender: str,
                  event_type: str) -> ResendDecision:
    """Decide a resend from events read back from the room (any order).

    An event counts as the earlier attempt only if it is of ``event_type``, was sent by
    ``sender`` (Enclave's actor for the action: nobody else can forge a send under that
    identity) and carries ``key`` under :data:`ACTION_KEY`. Anything else: send again (the
    transaction id still deduplicates a resend within the same Synapse process)."""
    for ev in events:
        content = ev.get("content")
        if (ev.get("type") == event_type and ev.get("sender") == sender
                and isinstance(content, dict) and content.get(ACTION_KEY) == key
                and isinstance(ev.get("event_id"), str)):
            return ResendDecision(False, ev["event_id"], RULE_FOUND,
                                  f"{event_type} with key {key} already in the room")
    return ResendDecision(True, None, RULE_NOT_FOUND,
                          f"no {event_type} with key {key} from {sender} read back")


def read_back_done(events: list[dict[str, Any]], *, since_ts: int | None,
                   skew_ms: int) -> bool:
    """True when a backward page reached events older than the first attempt (minus a
    clock-skew margin), so reading further back cannot find it."""
    if since_ts is None or not events:
        return False
    oldest = min((e.get("origin_server_ts") or 0) for e in events)
    return oldest < since_ts - skew_ms

"""Send an event at most once across homeserver restarts: read the room back before a resend.

Synapse deduplicates a client transaction id of an appservice user without a device only in
memory, so a resend after a restart of Synapse would store the event a second time. Every
event Enclave sends (the executor's actions, the bots' messages) therefore carries its key
under :data:`~bridge.policy.resend.ACTION_KEY`, and a send that may have reached the
homeserver before reads the room back first (:func:`~bridge.policy.resend.decide_resend`
decides from what is read). One place for the executor and the bots.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..metrics import Metrics
from ..policy.resend import decide_resend, read_back_done
from .client import MatrixClient, MatrixRequestError

log = logging.getLogger(__name__)

# How far back to look. Enclave's clock and the homeserver's may differ a little; the
# event count bounds the cost in a busy room.
READ_BACK_MAX_EVENTS = 500
READ_BACK_PAGE = 100
READ_BACK_SKEW_MS = 5 * 60 * 1000

# what a send takes: the hook the client runs before each of its own resends
Send = Callable[[Callable[[], Awaitable[Any]]], Awaitable[str]]


class ReadBack:
    """Reads rooms back through the admin API (any room, member or not) as ``admin_user_id``."""

    def __init__(self, client: MatrixClient, *, admin_user_id: str,
                 clock_ms: Callable[[], int], metrics: Metrics):
        self.client = client
        self.admin_user_id = admin_user_id
        self.clock_ms = clock_ms
        self.metrics = metrics

    async def find_sent(self, room: str, event_type: str, key: str, sender: str,
                        since_ts: int | None) -> str | None:
        """The id of an event an earlier attempt of ``key`` stored in ``room``, if any.

        Reads backwards from the room's end: back to ``since_ts`` (the first attempt; None
        when unknown) or at most READ_BACK_MAX_EVENTS events. Raises HomeserverUnavailable
        when the homeserver cannot answer: the caller must not send blind."""
        token: str | None = None
        seen = 0
        while seen < READ_BACK_MAX_EVENTS:
            try:
                events, token = await self.client.admin_room_messages(
                    room, admin=self.admin_user_id, from_token=token, dir="b",
                    limit=min(READ_BACK_PAGE, READ_BACK_MAX_EVENTS - seen))
            except MatrixRequestError as e:
                # the admin API refused (no admin rights, room unknown): sending again
                # risks a double, dropping the send would lose it; a double is the lesser
                log.warning("cannot read %s back before resending %s (%s %s): sending",
                            room, key, e.status, e.errcode)
                return None
            seen += len(events)
            decision = decide_resend(events, key=key, sender=sender, event_type=event_type)
            if not decision.resend:
                self.metrics.resends_avoided.inc()
                log.warning("not resending %s: %s (%s)", key, decision.reason, decision.rule_id)
                return decision.event_id
            if token is None or read_back_done(events, since_ts=since_ts,
                                               skew_ms=READ_BACK_SKEW_MS):
                break
        return None

    async def send_once(self, room: str, event_type: str, key: str, sender: str,
                        resend: bool, send: Send) -> str:
        """Send an event carrying ``key`` exactly once across homeserver restarts.

        ``resend``: an earlier attempt of ``key`` may have reached the homeserver (an earlier
        run failed without an answer, or was cut off by a crash before its outcome was
        recorded): the whole room end is read back first. The client's own retry after a
        connection error, timeout or 5xx reads back to the first attempt of this call. A
        4xx refusal is a known outcome and never comes here."""
        since = self.clock_ms()

        async def before_resend() -> dict[str, Any] | None:
            eid = await self.find_sent(room, event_type, key, sender, since)
            return {"event_id": eid} if eid else None

        if resend:
            eid = await self.find_sent(room, event_type, key, sender, None)
            if eid:
                return eid
        return await send(before_resend)

"""Due messages a legal hold keeps from the purge: Synapse purges everything before a
timestamp, so one held event stops the purge; the due, unheld messages after it are
redacted instead, by Enclave's own bot or admin only."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..matrix.executor import Executor
from ..policy.actions import Join, Redact
from ..policy.power import RoomPower
from ..policy.retention import Hold, PurgePlan
from ..policy.retention_rooms import EnclaveUsers
from ..store.base import AuditRecord
from ..store.domains import ArchiveIndexStore, AuditStore, KVStore
from .rooms import RoomRetention

log = logging.getLogger(__name__)

REDACTED_COMPONENT = "retention.redacted"


class DeferredRedactor:
    """Redacts the due messages a hold kept from the purge, each once."""

    def __init__(self, *, users: EnclaveUsers, room_retention: RoomRetention,
                 index: ArchiveIndexStore, kv: KVStore, audit: AuditStore, executor: Executor,
                 clock_ms: Callable[[], int]):
        self.users = users
        self.room_retention = room_retention
        self.index = index
        self.kv = kv
        self.audit = audit
        self.executor = executor
        self.clock_ms = clock_ms

    async def redact(self, room_id: str, plan: PurgePlan,
                     holds: Sequence[Hold]) -> tuple[int, int, str | None]:
        """Redact the due, unheld messages a hold keeps from the time-based purge.

        Synapse purges everything before a timestamp, so a held event stops the purge and
        the due events after it stay; redaction removes their content now (the archive has
        it), and the purge takes the rest once the hold is released. State events are left:
        redacting them would change the room. Each event is redacted once (a store marker
        plus a transaction id per event).

        Redactions are sent by Enclave's bot (or admin) only, so Synapse, the transcript and
        the EML name Enclave as the redactor. Where neither is in the room with the redact
        power (or the bot may join: invited, or a public room) the events are left and
        reported. Returns (redacted, left, why they were left)."""
        assert plan.held_from_ms is not None and plan.due_before_ms is not None
        rows = await self.index.archive_query(
            room_id=room_id, since_ms=plan.held_from_ms, until_ms=plan.due_before_ms - 1,
            include_purged=False)
        state: list[dict[str, Any]] | None = None
        actor: str | None = None
        done = left = 0
        why: str | None = None
        for r in rows:
            if r.state_key is not None or r.type == "m.room.redaction":
                continue
            if any(h.active() and h.matches(room_id, r.sender, r.ts) for h in holds):
                continue
            if await self.kv.component_get(REDACTED_COMPONENT, r.event_id) is not None:
                continue
            if state is None:
                state = await self.room_retention.room_state(room_id)
                actor, why = await self._actor(room_id, state, plan.rule_id)
            if actor is None:
                left += 1
                continue
            o = await self.executor.run_direct(
                Redact(rule_id=plan.rule_id, reason="retention period over (kept from the "
                       "purge by a legal hold on other events)", actor=actor, room=room_id,
                       event_id=r.event_id),
                f"retention-redact:{r.event_id}", source="retention",
                # a second redaction of a redacted event changes nothing; reading the room
                # back before each of many redactions would cost up to five pages each
                resend=False)
            if o.status != "applied":
                log.warning("retention: redaction of %s failed: %s", r.event_id, o.detail)
                left += 1
                why = why or o.detail
                continue
            await self.kv.component_put(REDACTED_COMPONENT, r.event_id, o.detail,
                                        self.clock_ms())
            done += 1
        if left:
            log.warning("retention: %d due messages in %s left unredacted: %s", left,
                        room_id, why)
            await self.audit.add_audit(AuditRecord(
                ts=self.clock_ms(), source="retention", kind="redact", outcome="failed",
                room_id=room_id, rule_id=plan.rule_id,
                reason="due messages kept by a legal hold could not be redacted by Enclave",
                detail=f"{left} messages left: {why}"))
        return done, left, why

    async def _actor(self, room_id: str, state: list[dict[str, Any]],
                     rule_id: str) -> tuple[str | None, str | None]:
        """Enclave's user that may redact others' events in the room, joining the bot first
        where it may (invited, or a public room); (None, why) if there is none."""
        needed = RoomPower.from_state(state).needed("redact")
        actor = self.users.actor(state, needed)
        if actor is not None:
            return actor, None
        if self.users.bot_membership(state) != "join" and self.users.bot_may_join(state):
            o = await self.executor.run_direct(
                Join(rule_id=rule_id, reason="Enclave redacts due messages kept by a hold",
                     actor=self.users.bot_user_id, room=room_id),
                f"retention-join:{room_id}", source="retention")
            if o.status == "applied":
                state[:] = await self.room_retention.room_state(room_id)
                actor = self.users.actor(state, needed)
                if actor is not None:
                    return actor, None
        return None, (f"neither {self.users.bot_user_id} nor {self.users.admin_user_id} is in "
                      f"the room with the power to redact ({needed})")


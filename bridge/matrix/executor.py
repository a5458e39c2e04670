"""Apply Actions to the homeserver, idempotently, with one audit record per action."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..metrics import Metrics
from ..policy.actions import (
    Action,
    Invite,
    Join,
    Kick,
    Leave,
    Redact,
    SendEvent,
    SetState,
    action_from_dict,
)
from ..store import AuditRecord, Store, StoredAction
from .client import HomeserverUnavailable, MatrixClient, MatrixRequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    status: str  # "applied" | "failed" (permanent; retrying cannot help)
    detail: str


def txn_id_for(key: str) -> str:
    """A stable client transaction id: a resend after a crash is deduplicated by Synapse."""
    return "enclave." + hashlib.sha256(key.encode()).hexdigest()[:32]


def _already_done(action: Action, e: MatrixRequestError) -> bool:
    """Membership changes whose target state already holds are answered with 403s."""
    if e.status != 403:
        return False
    msg = e.error.lower()
    if isinstance(action, Invite):
        return "already in the room" in msg or "already invited" in msg
    if isinstance(action, Kick):
        # only the TARGET being gone means done: Synapse also answers 403 "<sender> not in
        # room <id>." when the kicking actor itself is not joined, and that is a failure
        return "target user is not in the room" in msg
    if isinstance(action, Leave):
        return "not in the room" in msg or "not in room" in msg
    return False


class Executor:
    """Turns :class:`Action` objects into client/admin API calls."""

    def __init__(self, client: MatrixClient, store: Store, *, bot_user_id: str,
                 clock_ms: Callable[[], int], metrics: Metrics,
                 installation_id: Callable[[], str] = lambda: ""):
        self.client = client
        self.store = store
        self.bot_user_id = bot_user_id
        self.clock_ms = clock_ms
        self.metrics = metrics
        # Known once the store is open (the root reads it then). Part of every send's
        # transaction id: action ids restart in a new or restored database, and Synapse
        # would otherwise answer a new send with an old event ("deduplicated") and drop it.
        self._installation_id = installation_id
        # extensions (directory sync, ...): appliers for their own action kinds, and
        # resolvers for symbolic room references such as "managed:department/Sales"
        self._appliers: dict[str, Callable[[Any, str], Awaitable[Outcome]]] = {}
        self._room_resolvers: dict[str, Callable[[str], Awaitable[str]]] = {}

    @property
    def installation_id(self) -> str:
        """This database's installation id ("" before the store has been opened)."""
        return self._installation_id()

    def register(self, action_type: type[Action],
                 applier: Callable[[Any, str], Awaitable[Outcome]]) -> None:
        """Apply actions of ``action_type`` with ``applier(action, key)``."""
        self._appliers[action_type.kind] = applier

    def add_room_resolver(self, prefix: str, resolve: Callable[[str], Awaitable[str]]) -> None:
        """Rooms named ``prefix + ref`` are looked up with ``resolve(ref)`` when applied
        (a plan can name a room that an earlier action of the same run creates)."""
        self._room_resolvers[prefix] = resolve

    async def _resolve_room(self, action: Action) -> Action:
        room = getattr(action, "room", None)
        if not isinstance(room, str):
            return action
        for prefix, resolve in self._room_resolvers.items():
            if room.startswith(prefix):
                return dataclasses.replace(action, room=await resolve(room[len(prefix):]))
        return action

    def action_key(self, action_id: int) -> str:
        """The idempotency key of an outbox action, unique across databases."""
        prefix = f"{self.installation_id}/" if self.installation_id else ""
        return f"{prefix}action:{action_id}"

    async def apply(self, action: Action, key: str) -> Outcome:
        """Apply one action. Raises :class:`HomeserverUnavailable` when worth retrying later."""
        c = self.client
        try:
            action = await self._resolve_room(action)
            applier = self._appliers.get(action.kind)
            if applier is not None:
                return await applier(action, key)
            actor = action.actor or self.bot_user_id
            match action:
                case SendEvent():
                    eid = await c.send_event(action.room, action.event_type, action.content,
                                             txn_id_for(key), user_id=actor)
                    return Outcome("applied", eid)
                case SetState():
                    eid = await c.send_state(action.room, action.event_type, action.state_key,
                                             action.content, user_id=actor)
                    return Outcome("applied", eid)
                case Invite():
                    await c.invite(action.room, action.user, user_id=actor)
                case Join():
                    await c.join(action.room, user_id=actor)
                case Leave():
                    await c.leave(action.room, user_id=actor, reason=action.reason)
                case Kick():
                    await c.kick(action.room, action.user, user_id=actor, reason=action.reason)
                case Redact():
                    eid = await c.redact(action.room, action.event_id, txn_id_for(key),
                                         user_id=actor, reason=action.reason)
                    return Outcome("applied", eid)
                case _:
                    return Outcome("failed", f"no executor for action kind {action.kind!r}")
        except MatrixRequestError as e:
            if _already_done(action, e):
                # a resend after a crash, or drift fixed by someone else: the goal holds
                return Outcome("applied", f"already: {e.error}")
            return Outcome("failed", f"{e.status} {e.errcode}: {e.error}")
        return Outcome("applied", "ok")

    def _audit(self, action: Action, outcome: str, detail: str, source: str) -> AuditRecord:
        return AuditRecord(
            ts=self.clock_ms(), source=source, kind=action.kind, outcome=outcome,
            actor=action.actor or self.bot_user_id,
            user_id=getattr(action, "user", None) or action.actor,
            room_id=action.room_id, rule_id=action.rule_id, reason=action.reason,
            detail=detail,
        )

    async def run_stored(self, stored: StoredAction, *, max_attempts: int) -> bool:
        """Apply an action from the outbox and record the result with its audit record.

        Returns False when the homeserver was unavailable and the action stays pending
        (the caller backs off); True when it reached a final state.
        """
        try:
            action = action_from_dict(orjson.loads(stored.payload))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            await self.store.finish_action(
                stored.id, "failed", f"undecodable action: {e}", stored.attempts + 1,
                AuditRecord(ts=self.clock_ms(), source="inbox", kind="unknown",
                            outcome="failed", detail=f"undecodable action {stored.id}: {e}"),
                self.clock_ms(),
            )
            self.metrics.actions.labels(kind="unknown", outcome="failed").inc()
            return True
        attempts = stored.attempts + 1
        try:
            outcome = await self.apply(action, self.action_key(stored.id))
        except Exception as e:
            # HomeserverUnavailable, or anything unexpected (e.g. a 200 without the
            # event_id we read): retry later with the same key, park after max_attempts.
            # Letting it escape would crash the room worker with the action still pending,
            # and the room would be picked up again at once, in a tight loop.
            if isinstance(e, HomeserverUnavailable):
                error = str(e)
            else:
                error = f"{type(e).__name__}: {e}"
                log.exception("action %d (%s) failed unexpectedly", stored.id, action.kind)
            if attempts >= max_attempts:
                await self.store.finish_action(
                    stored.id, "parked", error, attempts,
                    self._audit(action, "parked", error, "inbox"), self.clock_ms(),
                )
                self.metrics.actions.labels(kind=action.kind, outcome="parked").inc()
                log.error("action %d (%s) parked after %d attempts: %s", stored.id,
                          action.kind, attempts, error)
                return True
            await self.store.finish_action(stored.id, "pending", error, attempts, None,
                                           self.clock_ms())
            return False
        await self.store.finish_action(
            stored.id, outcome.status, outcome.detail, attempts,
            self._audit(action, outcome.status, outcome.detail, "inbox"), self.clock_ms(),
        )
        self.metrics.actions.labels(kind=action.kind, outcome=outcome.status).inc()
        if outcome.status != "applied":
            log.warning("action %s failed: %s", action.describe(), outcome.detail)
        return True

    async def run_direct(self, action: Action, key: str, *, source: str) -> Outcome:
        """Apply an action decided outside the inbox (CLI, scheduled jobs) and audit it.

        A homeserver that stays unavailable, or a room reference no resolver knows, is a
        failed (audited) outcome: the caller's next run plans the action again."""
        try:
            outcome = await self.apply(action, key)
        except (HomeserverUnavailable, LookupError) as e:
            outcome = Outcome("failed", f"{type(e).__name__}: {e}")
        await self.store.add_audit(self._audit(action, outcome.status, outcome.detail, source))
        self.metrics.actions.labels(kind=action.kind, outcome=outcome.status).inc()
        return outcome

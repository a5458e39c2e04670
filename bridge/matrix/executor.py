"""Apply Actions to the homeserver, idempotently, with one audit record per action."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

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
from ..policy.resend import ACTION_KEY
from ..store import AuditRecord, StoredAction
from ..store.domains import AuditStore, OutboxStore
from .client import HomeserverUnavailable, MatrixClient, MatrixRequestError
from .readback import ReadBack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    status: str  # "applied" | "failed" (permanent; retrying cannot help)
    detail: str


def txn_id_for(key: str, prefix: str = "enclave.") -> str:
    """A stable client transaction id: a resend after a crash is deduplicated by Synapse.
    ``prefix`` tells the kinds apart (separation's notices: ``enclave-notice-``)."""
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:32]


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


class Applier(Protocol):
    """Applies an extension's action kind (see :meth:`Executor.register`)."""

    def __call__(self, action: Any, key: str, *, resend: bool) -> Awaitable[Outcome]: ...


class Executor:
    """Turns :class:`Action` objects into client/admin API calls."""

    def __init__(self, client: MatrixClient, outbox: OutboxStore, audit: AuditStore, *,
                 bot_user_id: str,
                 clock_ms: Callable[[], int], metrics: Metrics,
                 admin_user_id: str | None = None,
                 installation_id: Callable[[], str] = lambda: ""):
        self.client = client
        self.outbox = outbox
        self.audit = audit
        self.bot_user_id = bot_user_id
        # reads a room's timeline back before a resend (admin API: any room, member or not)
        self.admin_user_id = admin_user_id or bot_user_id
        self.clock_ms = clock_ms
        self.metrics = metrics
        self.read_back = ReadBack(client, admin_user_id=self.admin_user_id,
                                  clock_ms=clock_ms, metrics=metrics)
        # outbox actions whose apply began and whose outcome is not recorded yet (the store
        # failed after the send): run again, they are read back first
        self._unrecorded: set[int] = set()
        # Known once the store is open (the root reads it then). Part of every send's
        # transaction id: action ids restart in a new or restored database, and Synapse
        # would otherwise answer a new send with an old event ("deduplicated") and drop it.
        self._installation_id = installation_id
        # extensions (directory sync, ...): appliers for their own action kinds, and
        # resolvers for symbolic room references such as "managed:department/Sales"
        self._appliers: dict[str, Applier] = {}
        self._room_resolvers: dict[str, Callable[[str], Awaitable[str]]] = {}

    @property
    def installation_id(self) -> str:
        """This database's installation id ("" before the store has been opened)."""
        return self._installation_id()

    def register(self, action_type: type[Action], applier: Applier) -> None:
        """Apply actions of ``action_type`` with ``applier(action, key, resend=...)``;
        ``resend``: an earlier attempt of ``key`` may have reached the homeserver (an applier
        that sends an event reads the room back first, :class:`ReadBack`)."""
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

    async def apply(self, action: Action, key: str, *, resend: bool = False) -> Outcome:
        """Apply one action. Raises :class:`HomeserverUnavailable` when worth retrying later.

        ``resend``: an earlier attempt of this key may have reached the homeserver."""
        c = self.client
        try:
            action = await self._resolve_room(action)
            applier = self._appliers.get(action.kind)
            if applier is not None:
                return await applier(action, key, resend=resend)
            actor = action.actor or self.bot_user_id
            match action:
                case SendEvent():
                    ev = action
                    content = {**ev.content, ACTION_KEY: key}
                    eid = await self.read_back.send_once(
                        ev.room, ev.event_type, key, actor, resend,
                        lambda hook: c.send_event(ev.room, ev.event_type, content,
                                                  txn_id_for(key), user_id=actor,
                                                  before_resend=hook))
                    return Outcome("applied", eid)
                case SetState():
                    # no read-back: Synapse answers a state send identical to the current
                    # state (same sender, type, key, content) with the existing event
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
                    # a second redaction of the same event is stored as a second
                    # m.room.redaction event (harmless to the target, but doubled): same
                    # read-back as a send
                    rd = action
                    eid = await self.read_back.send_once(
                        rd.room, "m.room.redaction", key, actor, resend,
                        lambda hook: c.redact(rd.room, rd.event_id, txn_id_for(key),
                                              user_id=actor, reason=rd.reason,
                                              extra={ACTION_KEY: key}, before_resend=hook))
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

    async def run_stored(self, stored: StoredAction, *, max_attempts: int,
                         resumed: bool = False) -> bool:
        """Apply an action from the outbox and record the result with its audit record.

        ``resumed``: an earlier process may have begun this action and crashed before it
        recorded the attempt (the inbox knows: its lane's first pending action at start).
        Returns False when the homeserver was unavailable and the action stays pending
        (the caller backs off); True when it reached a final state.
        """
        try:
            action = action_from_dict(orjson.loads(stored.payload))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            await self.outbox.finish_action(
                stored.id, "failed", f"undecodable action: {e}", stored.attempts + 1,
                AuditRecord(ts=self.clock_ms(), source="inbox", kind="unknown",
                            outcome="failed", detail=f"undecodable action {stored.id}: {e}"),
                self.clock_ms(),
            )
            self.metrics.actions.labels(kind="unknown", outcome="failed").inc()
            return True
        attempts = stored.attempts + 1
        # it may have been applied already when an earlier run ended without a final answer
        # (attempts > 0: homeserver unavailable), a crash cut an earlier process off before
        # it counted the attempt (resumed), or this process could not record its outcome
        resend = stored.attempts > 0 or resumed or stored.id in self._unrecorded
        self._unrecorded.add(stored.id)
        try:
            outcome = await self.apply(action, self.action_key(stored.id), resend=resend)
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
                await self.outbox.finish_action(
                    stored.id, "parked", error, attempts,
                    self._audit(action, "parked", error, "inbox"), self.clock_ms(),
                )
                self._unrecorded.discard(stored.id)
                self.metrics.actions.labels(kind=action.kind, outcome="parked").inc()
                log.error("action %d (%s) parked after %d attempts: %s", stored.id,
                          action.kind, attempts, error)
                return True
            await self.outbox.finish_action(stored.id, "pending", error, attempts, None,
                                            self.clock_ms())
            self._unrecorded.discard(stored.id)
            return False
        await self.outbox.finish_action(
            stored.id, outcome.status, outcome.detail, attempts,
            self._audit(action, outcome.status, outcome.detail, "inbox"), self.clock_ms(),
        )
        self._unrecorded.discard(stored.id)
        self.metrics.actions.labels(kind=action.kind, outcome=outcome.status).inc()
        if outcome.status != "applied":
            log.warning("action %s failed: %s", action.describe(), outcome.detail)
        return True

    async def run_direct(self, action: Action, key: str, *, source: str,
                         resend: bool = True) -> Outcome:
        """Apply an action decided outside the inbox (CLI, scheduled jobs) and audit it.

        A homeserver that stays unavailable, or a room reference no resolver knows, is a
        failed (audited) outcome: the caller's next run plans the action again.

        ``resend`` (the default): nothing records whether an earlier run sent this key (a
        caller with a stable key plans it again after a crash), so an event it sends is
        read back first. False only where a second application changes nothing."""
        try:
            outcome = await self.apply(action, key, resend=resend)
        except (HomeserverUnavailable, LookupError) as e:
            outcome = Outcome("failed", f"{type(e).__name__}: {e}")
        await self.audit.add_audit(self._audit(action, outcome.status, outcome.detail, source))
        self.metrics.actions.labels(kind=action.kind, outcome=outcome.status).inc()
        return outcome

"""Separation at run time: the current policy, the gate's decider, the reactive handler,
reconciliation and the direct-chat notices. Decisions come from :mod:`bridge.policy.separation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..config.policy import PolicyConfig
from ..gate.protocol import GateAnswer, GateRequest, GateRoom, thaw
from ..matrix.client import MatrixClient, MatrixRequestError
from ..matrix.executor import Executor, Outcome, txn_id_for
from ..metrics import Metrics
from ..policy.actions import Action
from ..policy.resend import ACTION_KEY
from ..policy.separation import (
    CLASS_STATE_TYPE,
    DM_CLASS,
    Decision,
    Finding,
    NotDone,
    NotifyUser,
    RoomFacts,
    SeparationPlan,
    SeparationPolicy,
    apply_edits,
    room_facts_from_invite,
    room_facts_from_state,
)
from ..store import InboxEvent
from ..store.base import AuditRecord
from ..store.domains import AuditStore, DirectoryStore, KVStore, LeaseStore
from ..store.lease import held_lease, new_lease_owner

log = logging.getLogger(__name__)

NOTICE_COMPONENT = "separation-notice"
DM_COMPONENT = "separation-dm"
# Enclave's own record of each room's class (room id -> {"class", "rule_id", "source"}):
# the only thing that decides a class once a room has one. Never taken from room state.
CLASS_COMPONENT = "separation-room-class"
# One-time grants the gate put into a new room's class state (grant -> class, creator):
# the first room whose creator matches binds the grant into the record.
GRANT_COMPONENT = "separation-class-grant"
# Invitations of local users into remote rooms that policy approved ("room user" -> class):
# what lets a later join of a room this server has no state for through the gate.
INVITE_COMPONENT = "separation-approved-invite"
GRANT_TTL_MS = 86_400_000
LEASE_NAME = "separation-reconcile"
# the policy object is rebuilt at least this often, so guest expiry follows the clock
REBUILD_MS = 30_000


def gate_room_facts(room: GateRoom) -> RoomFacts:
    """:class:`RoomFacts` from what the gate module read inside Synapse."""
    creators = set(room.creators)
    if room.creator:
        creators.add(room.creator)
    return RoomFacts(
        room_id=room.room_id, room_version=room.room_version, creators=frozenset(creators),
        claimed_class=room.room_class, claimed_grant=room.class_grant,
        history_visibility=room.history, aliases=tuple(room.aliases), name=room.name,
        federate=room.federate, join_rule=room.join_rule, encrypted=room.encrypted,
        is_direct=room.is_direct, members=dict(room.members), power=thaw(room.power),
    )


def answer(d: Decision, edits: dict[str, Any] | None = None) -> GateAnswer:
    return GateAnswer(allow=d.allow, rule_id=d.rule_id, reason=d.reason, message=d.message,
                      edits=edits)


def decide_gate(p: SeparationPolicy, req: GateRequest, *, facts: RoomFacts | None = None,
                invite_approved: bool = False) -> GateAnswer:
    """One gate question answered by the policy (no I/O: the module sent the room's facts;
    the service passes them with Enclave's class record, and whether a join follows an
    invitation Enclave approved)."""
    if req.check == "create_room":
        c = p.decide_create_room(req.user, thaw(req.create) or {})
        return answer(c.decision, c.edits if c.decision.allow else None)
    if req.check == "user_search":
        assert req.target is not None
        return answer(p.decide_user_visible(req.user, req.target))
    assert req.room is not None
    facts = facts or gate_room_facts(req.room)
    if req.check == "invite":
        assert req.target is not None
        return answer(p.decide_invite(req.user, req.target, facts))
    if req.check == "join":
        return answer(p.decide_join(req.user, facts, invite_approved=invite_approved))
    ev = thaw(req.event) or {}
    return answer(p.decide_state_event(req.user, str(ev.get("type", "")),
                                       str(ev.get("state_key", "")),
                                       ev.get("content") or {}, facts))


@dataclass
class ReconcileResult:
    plan: SeparationPlan
    applied: int = 0
    failed: list[tuple[Action, str]] = field(default_factory=list)
    admin_calls: int = 0


class SeparationService:
    """Holds the running policy (swapped on reload) and serves every enforcement layer."""

    def __init__(self, config: PolicyConfig, *, audit: AuditStore, kv: KVStore,
                 directory_store: DirectoryStore, leases: LeaseStore, client: MatrixClient,
                 executor: Executor, metrics: Metrics, clock_ms: Callable[[], int],
                 server_name: str, bot_user_id: str, admin_user_id: str,
                 service_prefix: str,
                 creation_state: Callable[[str], list[dict[str, Any]]] | None = None,
                 lease_ttl_ms: int = 120_000):
        self.config = config
        self.audit = audit
        self.kv = kv
        self.directory_store = directory_store
        self.leases = leases
        self.client = client
        self.executor = executor
        self.metrics = metrics
        self.clock_ms = clock_ms
        self.server_name = server_name
        self.bot_user_id = bot_user_id
        self.admin_user_id = admin_user_id
        self.service_prefix = service_prefix
        self._policy: SeparationPolicy | None = None
        self._built_at = 0
        self._lock = asyncio.Lock()
        self._records: dict[str, str] = {}  # class records read so far (never change)
        self._enclave_dms: set[str] | None = None  # rooms the bot opened as its DMs
        # more initial state for a new room of a class (retention adds m.room.retention)
        self.creation_state = creation_state
        self.lease_owner = new_lease_owner()
        self.lease_ttl_ms = lease_ttl_ms  # the root passes the cluster's lease ttl
        executor.register(NotifyUser, self._apply_notice)
        executor.register(NotDone, self._apply_not_done)

    # -- the policy ------------------------------------------------------------------------
    async def policy(self, *, fresh: bool = False) -> SeparationPolicy:
        """The current policy object over the latest directory view."""
        now = self.clock_ms()
        if fresh or self._policy is None or now - self._built_at > REBUILD_MS:
            async with self._lock:
                if fresh or self._policy is None or now - self._built_at > REBUILD_MS:
                    staff = await self.directory_store.directory_view()
                    self._policy = self.build(self.config, staff, now)
                    self._built_at = now
        assert self._policy is not None
        return self._policy

    def build(self, config: PolicyConfig, staff: Sequence[Any], now: int) -> SeparationPolicy:
        return SeparationPolicy(config, staff, server_name=self.server_name,
                                service_users=[self.bot_user_id, self.admin_user_id],
                                service_prefix=self.service_prefix, now_ms=now)

    def replace_config(self, config: PolicyConfig) -> None:
        """Use a new (already validated) policy from now on."""
        self.config = config
        self._policy = None

    def invalidate(self) -> None:
        """The directory view changed: rebuild on next use."""
        self._policy = None

    # -- gate --------------------------------------------------------------------------------
    async def decide_gate(self, req: GateRequest) -> GateAnswer:
        """Answer one gate question with the same decisions the other layers use."""
        p = await self.policy()
        if req.check == "create_room":
            c = p.decide_create_room(req.user, thaw(req.create) or {})
            if not c.decision.allow:
                return answer(c.decision)
            edits = self._with_extra_state(c) if self.creation_state is not None else c.edits
            return answer(c.decision, await self._grant(edits, req.user, c.room_class.id,
                                                        c.room_class.rule_id))
        if req.room is None:
            return decide_gate(p, req)
        facts = gate_room_facts(req.room)
        if req.federated:  # a remote inviter's claims, not state this server holds
            facts = replace(facts, hosted=False)
        facts = await self.with_record(facts)
        approved = False
        if req.check == "join" and req.invited and not facts.known:
            approved = await self.invite_approved(facts.room_id, req.user)
        ans = decide_gate(p, req, facts=facts, invite_approved=approved)
        if req.check == "invite" and req.federated and ans.allow and req.target:
            await self._approve_invite(facts.room_id, req.target, p.classify_room(facts).id)
        return ans

    # -- Enclave's record of room classes ----------------------------------------------------
    async def class_record(self, room_id: str) -> str | None:
        """The class Enclave recorded for ``room_id``, or None."""
        if room_id in self._records:
            return self._records[room_id]
        raw = await self.kv.component_get(CLASS_COMPONENT, room_id)
        if raw is None:
            return None
        cls = str(json.loads(raw)["class"])
        self._records[room_id] = cls
        return cls

    async def record_class(self, room_id: str, room_class: str, rule_id: str,
                           source: str) -> str:
        """Record ``room_class`` for ``room_id`` unless a record exists; the class in force."""
        value = json.dumps({"class": room_class, "rule_id": rule_id, "source": source})
        if await self.kv.component_put_new(CLASS_COMPONENT, room_id, value,
                                              self.clock_ms()):
            log.info("separation: room %s recorded as class %s (%s, %s)", room_id,
                     room_class, rule_id, source)
            self._records[room_id] = room_class
            return room_class
        return await self.class_record(room_id) or room_class

    async def _grant(self, edits: dict[str, Any] | None, creator: str, room_class: str,
                     rule_id: str) -> dict[str, Any] | None:
        """Put a one-time grant into the class state of a new room's edits, and keep it:
        the room it shows up in (made by ``creator``) is then recorded as ``room_class``."""
        if not edits:
            return edits
        grant = secrets.token_urlsafe(18)
        out = dict(edits)
        out["initial_state"] = [
            {**e, "content": {**e["content"], "grant": grant}}
            if e.get("type") == CLASS_STATE_TYPE and e.get("state_key", "") == "" else e
            for e in edits.get("initial_state") or []]
        await self.kv.component_put(GRANT_COMPONENT, grant, json.dumps(
            {"class": room_class, "rule_id": rule_id, "creator": creator,
             "ts": self.clock_ms()}), self.clock_ms())
        return out

    async def with_record(self, facts: RoomFacts) -> RoomFacts:
        """``facts`` with Enclave's class record as ``class_state`` (a grant in the room's
        class state is bound first); the room's own class claim never counts."""
        rec = await self.class_record(facts.room_id)
        if rec is None and facts.claimed_grant and facts.known:
            raw = await self.kv.component_get(GRANT_COMPONENT, facts.claimed_grant)
            grant = json.loads(raw) if raw is not None else None
            if grant is not None and grant.get("creator") in facts.creators:
                rec = await self.record_class(facts.room_id, grant["class"],
                                              grant["rule_id"], "gate")
                await self.kv.component_delete(GRANT_COMPONENT, facts.claimed_grant)
        return replace(facts, class_state=rec) if rec is not None else facts

    async def inherited_class(self, facts: RoomFacts) -> str | None:
        """The class a room without a record takes from the room it upgrades (its
        predecessor's record; any policy): None when there is none."""
        if facts.class_state is not None or not facts.known or not facts.predecessor:
            return None
        return await self.class_record(facts.predecessor)

    async def as_applied(self, p: SeparationPolicy, facts: RoomFacts) -> RoomFacts:
        """``facts`` with the class an applying reconciliation would record for a room
        without a record (:meth:`record_first_sight`), nothing written: a plan, and
        ``enclave policy diff``, judge the room as the live service will."""
        inherited = await self.inherited_class(facts)
        return replace(facts, class_state=inherited) if inherited is not None \
            else p.with_class(facts)

    async def record_first_sight(self, p: SeparationPolicy, facts: RoomFacts,
                                 source: str) -> RoomFacts:
        """A room this server hosts or shares with no record yet: record the class Enclave
        gives it now (rules, DM signals, default), never the one its state claims."""
        if facts.class_state is not None or not facts.known:
            return facts
        inherited = await self.inherited_class(facts)
        if inherited is not None:
            # a room upgrade keeps the class of the room it replaces
            cls = await self.record_class(facts.room_id, inherited, "builtin.room_upgrade",
                                          source)
            return replace(facts, class_state=cls)
        rc = p.classify_room(facts)
        cls = await self.record_class(facts.room_id, rc.id, rc.rule_id, source)
        return replace(facts, class_state=cls)

    async def _prune_grants(self) -> None:
        """Grants of rooms never made (Synapse refused the request after the gate said
        yes) are dropped a day later; a room is seen within seconds of its creation."""
        cutoff = self.clock_ms() - GRANT_TTL_MS
        for grant, raw in (await self.kv.component_list(GRANT_COMPONENT)).items():
            if int(json.loads(raw).get("ts", 0)) < cutoff:
                await self.kv.component_delete(GRANT_COMPONENT, grant)

    async def invite_approved(self, room_id: str, user: str) -> bool:
        """Whether policy let an invitation of ``user`` into remote ``room_id`` stand."""
        return await self.kv.component_get(INVITE_COMPONENT,
                                              f"{room_id} {user}") is not None

    async def _approve_invite(self, room_id: str, user: str, room_class: str) -> None:
        await self.kv.component_put(INVITE_COMPONENT, f"{room_id} {user}", room_class,
                                       self.clock_ms())

    def _with_extra_state(self, c: Any) -> dict[str, Any] | None:
        assert self.creation_state is not None
        extra = self.creation_state(c.room_class.id)
        if not extra:
            return c.edits
        edits = dict(c.edits or {})
        edits["initial_state"] = [*(edits.get("initial_state") or []), *extra]
        return edits

    async def managed_room_edits(self, body: dict[str, Any]) -> dict[str, Any]:
        """A managed room's createRoom body with its class state (directory sync's hook)."""
        p = await self.policy()
        c = p.decide_create_room(self.bot_user_id, body)
        edits = self._with_extra_state(c) if self.creation_state else c.edits
        return apply_edits(body, await self._grant(edits, self.bot_user_id, c.room_class.id,
                                                   c.room_class.rule_id))

    # -- reactive ----------------------------------------------------------------------------
    async def room_facts(self, room_id: str, event: dict[str, Any] | None = None) -> RoomFacts:
        """The room as the homeserver has it now; an invite's stripped state for a remote
        room this server is not in."""
        state = await self.client.admin_room_state(room_id, admin=self.admin_user_id)
        if state is None or not any(e.get("type") == "m.room.create" for e in state):
            if event is not None:
                return await self.with_record(room_facts_from_invite(event))
            return await self.with_record(RoomFacts(room_id=room_id))
        facts = await self.with_record(room_facts_from_state(room_id, state))
        if facts.class_state is None and await self.is_enclave_dm(room_id):
            facts = replace(facts, class_state=await self.record_class(
                room_id, DM_CLASS, "builtin.enclave_dm", "enclave"))
        return facts

    async def is_enclave_dm(self, room_id: str) -> bool:
        """Whether the bot made ``room_id`` as its direct chat with someone (read once; the
        bot's new DMs are recorded as ``dm`` when made, which every replica reads)."""
        if self._enclave_dms is None:
            self._enclave_dms = set((await self.kv.component_list(DM_COMPONENT)).values())
        return room_id in self._enclave_dms

    async def handle_event(self, event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        """The inbox handler: membership changes policy does not allow are undone, and
        someone else's class or history state is put back."""
        etype = event.get("type")
        protected = etype in (CLASS_STATE_TYPE, "m.room.history_visibility")
        if etype != "m.room.member" and not protected:
            return []
        content = event.get("content") or {}
        membership = content.get("membership")
        if not protected and membership not in ("invite", "join"):
            return []
        p = await self.policy()
        if not p.config.enabled or not p.config.reactive:
            return []
        # Enclave's own users' events need no room read, but for an invitation of its bot
        # (it joins group rooms to act there as itself)
        if p.principal(event.get("state_key", "") if not protected
                       else event.get("sender", "")).kind == "service" and not (
                membership == "invite" and event.get("state_key") == self.bot_user_id):
            return []
        room_id = event.get("room_id") or meta.room_id or ""
        facts = await self.room_facts(room_id, event)
        target = event.get("state_key", "")
        if membership == "invite" and content.get("is_direct") is True and \
                facts.class_state is None:
            facts = replace(facts, is_direct=True)
        # the creator's own first join says nothing yet (a DM's invitation follows)
        if protected or membership == "invite" or target not in facts.creators:
            facts = await self.record_first_sight(p, facts, "reactive")
        actions = p.decide_event(event, facts)
        if (membership == "invite" and not actions and not facts.hosted
                and p.principal(target).local):
            # a remote room's invitation policy let stand: the join may follow
            await self._approve_invite(room_id, target, p.classify_room(facts).id)
        for a in actions:
            self.metrics.separation_enforced.labels(layer="reactive", kind=a.kind).inc()
        return actions

    # -- what Enclave could not do -------------------------------------------------------------
    async def _apply_not_done(self, a: NotDone, key: str, *, resend: bool) -> Outcome:
        """A finding of the reactive layer: told to operators (a warning in the log, the
        ``not_done`` metric) and, through the executor, a ``not_done`` audit record."""
        log.warning("separation finding [%s] %s %s: %s", a.rule_id, a.room,
                    a.user or "", a.message)
        return Outcome("not_done", a.message)

    async def _audit_findings(self, findings: Sequence[Finding]) -> None:
        """Reconciliation's findings, each an audit record of what was not done and why."""
        for f in findings:
            await self.audit.add_audit(AuditRecord(
                ts=self.clock_ms(), source="separation", kind="finding", outcome="not_done",
                actor=self.bot_user_id, user_id=f.subject if f.subject.startswith("@") else None,
                room_id=f.room_id, rule_id=f.rule_id, reason=f.message))
            self.metrics.separation_enforced.labels(layer="reconcile", kind="not_done").inc()

    # -- notices -----------------------------------------------------------------------------
    async def _dm_room(self, user: str) -> str:
        room = await self.kv.component_get(DM_COMPONENT, user)
        if room is not None:
            return room
        room = await self.client.create_room({
            "is_direct": True, "invite": [user], "preset": "trusted_private_chat",
            "name": "Enclave", "topic": "Notices from Enclave about company chat policy",
        }, user_id=self.bot_user_id)
        await self.kv.component_put(DM_COMPONENT, user, room, self.clock_ms())
        await self.record_class(room, DM_CLASS, "builtin.enclave_dm", "enclave")
        return room

    async def _encrypted(self, room_id: str) -> bool:
        state = await self.client.admin_room_state(room_id, admin=self.admin_user_id) or []
        return any(e.get("type") == "m.room.encryption" for e in state)

    async def _apply_notice(self, a: NotifyUser, key: str, *, resend: bool) -> Outcome:
        if await self.kv.component_get(NOTICE_COMPONENT, a.once_key) is not None:
            return Outcome("applied", "already told")
        try:
            room = await self._dm_room(a.user)
            if await self._encrypted(room):
                # the bot has no keys here: a clear-text notice in an encrypted room is
                # never sent, a fresh unencrypted DM is used instead
                await self.kv.component_delete(DM_COMPONENT, a.user)
                room = await self._dm_room(a.user)
            # the txn id follows the incident: a retry, a restart or another layer telling
            # the same thing is deduplicated by the homeserver. It is recorded as told only
            # after the send, and any action with this once-key may be the one that sent
            # it before a crash: the DM (small, the bot's own) is read back every time, so a
            # homeserver restart in between does not tell twice
            txn = txn_id_for(a.once_key, prefix="enclave-notice-")
            content = {"msgtype": "m.notice", "body": a.body, ACTION_KEY: txn}
            eid = await self.executor.read_back.send_once(
                room, "m.room.message", txn, self.bot_user_id, True,
                lambda hook: self.client.send_event(room, "m.room.message", content, txn,
                                                    user_id=self.bot_user_id,
                                                    before_resend=hook))
        except MatrixRequestError as e:
            return Outcome("failed", f"{e.status} {e.errcode}: {e.error}")
        await self.kv.component_put(NOTICE_COMPONENT, a.once_key, eid, self.clock_ms())
        return Outcome("applied", eid)

    # -- reconciliation ----------------------------------------------------------------------
    async def scan(self, *, concurrency: int | None = None,
                   rooms: Sequence[str] | None = None) -> tuple[list[RoomFacts], int]:
        """Read every room (or the given ones) through the admin API; (facts, admin calls)."""
        calls = 0
        ids: list[str] = []
        if rooms is None:
            start: int | None = 0
            while start is not None:
                page, start = await self.client.admin_list_rooms(admin=self.admin_user_id,
                                                                 start=start)
                calls += 1
                ids.extend(r["room_id"] for r in page if isinstance(r.get("room_id"), str))
        else:
            ids = list(rooms)
        sem = asyncio.Semaphore(concurrency or self.config.reconcile.max_concurrency)
        out: list[RoomFacts | None] = [None] * len(ids)

        async def one(i: int, room_id: str) -> None:
            nonlocal calls
            async with sem:
                state = await self.client.admin_room_state(room_id, admin=self.admin_user_id)
                calls += 1
            if state:
                out[i] = await self.with_record(room_facts_from_state(room_id, state))

        await asyncio.gather(*(one(i, r) for i, r in enumerate(ids)))
        return [f for f in out if f is not None], calls

    async def plan(self, *, rooms: Sequence[str] | None = None,
                   record: bool = False) -> ReconcileResult:
        facts, calls = await self.scan(rooms=rooms)
        p = await self.policy(fresh=True)
        actions: list[Action] = []
        findings: list[Finding] = []
        for f in facts:
            if f.class_state is None:
                # a room without Enclave's record (from before Enclave, or made while the
                # gate was off): the class Enclave gives it, recorded when applying
                if record:
                    f = await self.record_first_sight(p, f, "reconcile")
                else:
                    f = await self.as_applied(p, f)
            a, fs = p.diff_room(f)
            actions.extend(a)
            findings.extend(fs)
        return ReconcileResult(SeparationPlan(actions, findings, len(facts)), admin_calls=calls)

    def _lease(self) -> contextlib.AbstractAsyncContextManager[None]:
        return held_lease(self.leases, LEASE_NAME, self.lease_owner, self.clock_ms,
                          self.lease_ttl_ms,
                          lambda: RuntimeError("another Enclave process is reconciling "
                                               "separation right now"))

    async def reconcile(self, *, apply: bool = True,
                        rooms: Sequence[str] | None = None) -> ReconcileResult:
        """Scan, diff and (with ``apply``) fix: one run at a time across processes."""
        if not apply:
            return await self.plan(rooms=rooms)
        async with self._lease():
            result = await self.plan(rooms=rooms, record=True)
            run = f"separation:{self.clock_ms()}"
            lanes: dict[str, list[tuple[int, Action]]] = {}
            for i, a in enumerate(result.plan.actions):
                lanes.setdefault(a.room_id or "", []).append((i, a))
            sem = asyncio.Semaphore(self.config.reconcile.max_concurrency)

            async def lane(items: list[tuple[int, Action]]) -> None:
                for i, a in items:
                    async with sem:
                        o = await self.executor.run_direct(a, f"{run}:{i}", source="separation")
                    if o.status == "applied":
                        result.applied += 1
                        self.metrics.separation_enforced.labels(layer="reconcile",
                                                                kind=a.kind).inc()
                    else:
                        result.failed.append((a, o.detail))

            await asyncio.gather(*(lane(items) for items in lanes.values()))
            await self._prune_grants()
            for f in result.plan.findings:
                log.warning("separation finding [%s] %s %s: %s", f.rule_id, f.room_id,
                            f.subject, f.message)
            await self._audit_findings(result.plan.findings)
            # the job's one line (bridge.app) reports it in ``enclave run``
            log.debug("separation reconciled %d rooms: %d actions applied, %d failed, "
                     "%d findings", result.plan.rooms, result.applied, len(result.failed),
                     len(result.plan.findings))
            return result

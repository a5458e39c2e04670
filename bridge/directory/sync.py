"""Directory sync: read the source and the homeserver, diff, check safety, apply.

The decisions are the pure functions of :mod:`bridge.policy.directory`; this module only
gathers their inputs and applies their actions through the executor (one audit record per
action). A run either refuses as a whole (source error, safety limits) with nothing changed,
or applies its plan phase by phase; it is safe to repeat after a crash because every run
diffs against what the homeserver has now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config.directory import DirectoryConfig
from ..kernel.ids import localpart_of
from ..kernel.power import creators_of, power_context, user_level
from ..matrix.client import MatrixClient, MatrixRequestError
from ..matrix.executor import Executor, Outcome
from ..metrics import Metrics
from ..model.people import DirectoryError, DirectorySnapshot, StaffRecord
from ..policy.actions import Action
from ..policy.directory import (
    MANAGED_REF,
    PHASES,
    AccountState,
    CreateAccount,
    CreateManagedRoom,
    DeactivateAccount,
    EraseAccount,
    Finding,
    HandOverRoom,
    HomeserverView,
    PersonRecord,
    ReactivateAccount,
    RoomView,
    SyncPlan,
    UpdateAccount,
    check_safety,
    diff_directory,
    slug,
)
from ..policy.lookalike import skeleton
from ..policy.mapping import map_people
from ..policy.power import is_enclave_user
from ..store import DirectoryRecord
from ..store.domains import DirectoryStore, LeaseStore
from ..store.lease import held_lease, new_lease_owner
from .lookalike import confusables_table
from .source import DirectorySource

log = logging.getLogger(__name__)


LEASE_NAME = "directory-sync"
LEASE_TTL_MS = 60_000


class SyncRefused(Exception):
    """The run was refused as a whole; nothing was changed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class SyncResult:
    plan: SyncPlan
    snapshot: DirectorySnapshot
    applied: dict[str, int] = field(default_factory=dict)
    failed: list[tuple[Action, str]] = field(default_factory=list)
    refused_mappings: list[tuple[str, str]] = field(default_factory=list)
    # person id -> their Matrix user (mapped this run) and what Enclave remembered of them
    users: dict[str, Any] = field(default_factory=dict)
    known: dict[str, PersonRecord] = field(default_factory=dict)
    # user id -> manager's user id in the view before this run (deleted people keep theirs)
    remembered_managers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


ProgressFn = Callable[[int, int, Action | None], None]


class DirectorySync:
    """Plans and applies directory sync runs; one run at a time per process."""

    def __init__(self, config: DirectoryConfig, source: DirectorySource, *, client: MatrixClient,
                 executor: Executor, directory_store: DirectoryStore, leases: LeaseStore,
                 metrics: Metrics,
                 clock_ms: Callable[[], int], server_name: str, bot_user_id: str,
                 admin_user_id: str, namespace_prefix: str, admin_localpart: str,
                 bot_localpart: str, allow_initial_passwords: bool = False,
                 on_view_change: Callable[[], None] | None = None,
                 room_edits: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
                 lease_ttl_ms: int = LEASE_TTL_MS):
        self.config = config
        self.source = source
        self.client = client
        self.executor = executor
        self.directory_store = directory_store
        self.leases = leases
        self.metrics = metrics
        # every outcome exported from the start: an alert on increase() of "refused" sees
        # the first refusal (a series born at 1 has no increase)
        for outcome in ("ok", "partial", "refused"):
            metrics.directory_runs.labels(outcome=outcome)
        self.clock_ms = clock_ms
        # called when a run changed the directory view (separation rebuilds its policy)
        self.on_view_change = on_view_change
        # what separation adds to a managed room's createRoom body (its class state); the
        # gate does not ask about Enclave's own users, so it is applied here
        self.room_edits = room_edits
        self.server_name = server_name
        self.bot_user_id = bot_user_id
        self.admin_user_id = admin_user_id
        self.namespace_prefix = namespace_prefix
        self.reserved_localparts = {admin_localpart, bot_localpart}
        self.allow_initial_passwords = allow_initial_passwords
        self._lock = asyncio.Lock()
        self._managed: dict[str, str] | None = None
        self.lease_owner = new_lease_owner()
        self.lease_ttl_ms = lease_ttl_ms
        executor.register(CreateAccount, self._apply_create)
        executor.register(UpdateAccount, self._apply_update)
        executor.register(ReactivateAccount, self._apply_reactivate)
        executor.register(DeactivateAccount, self._apply_deactivate)
        executor.register(EraseAccount, self._apply_erase)
        executor.register(CreateManagedRoom, self._apply_create_room)
        executor.register(HandOverRoom, self._apply_hand_over)
        executor.add_room_resolver(MANAGED_REF, self._resolve_managed)

    # -- identity helpers -----------------------------------------------------------------
    def is_reserved(self, localpart: str) -> bool:
        return localpart in self.reserved_localparts or localpart.startswith(
            self.namespace_prefix)

    def is_enclave_user(self, user_id: str) -> bool:
        return is_enclave_user(user_id, server_name=self.server_name,
                               own_users=(self.bot_user_id, self.admin_user_id),
                               namespace_prefix=self.namespace_prefix)

    # -- planning -------------------------------------------------------------------------
    async def plan(self, *, force: bool = False) -> SyncResult:
        """Read everything and diff; raises :class:`SyncRefused` when the run must not go."""
        try:
            snapshot = await self.source.read()
        except DirectoryError as e:
            raise SyncRefused([f"directory source {self.source.name}: {e}"]) from e
        records = await self.directory_store.directory_people()
        known = {r.person_id: PersonRecord(r.person_id, r.user_id, r.status, r.email,
                                           r.displayname, r.deactivated_at) for r in records}
        view = await self.read_homeserver(known, snapshot)
        table = confusables_table()
        mapping = map_people(
            snapshot.people.values(), self.config.mapping, self.server_name,
            known={pid: r.user_id for pid, r in known.items()}, reserved=self.is_reserved,
            reserved_names=self.reserved_localparts,
            existing={u: a.displayname for u, a in view.accounts.items()},
            skeleton=lambda s: skeleton(s, table),
        )
        last_view = await self.directory_store.directory_view()
        managers = {r.user_id: r.manager_user_id for r in last_view if r.manager_user_id}
        plan = diff_directory(
            snapshot, mapping.users, known, view, self.config, now_ms=self.clock_ms(),
            bot_user_id=self.bot_user_id, is_enclave_user=self.is_enclave_user,
            allow_initial_passwords=self.allow_initial_passwords,
            remembered_managers=managers,
        )
        if mapping.notes:
            # silent changes of the mapping are reported like any other finding
            plan = replace(plan, findings=plan.findings + tuple(
                Finding("directory.mapping", mapping.users[pid].user_id
                        if pid in mapping.users else pid, f"person {pid}: {note}")
                for pid, note in mapping.notes))
        problems = check_safety(plan, snapshot, self.config, force=force)
        if problems:
            raise SyncRefused(problems)
        return SyncResult(plan=plan, snapshot=snapshot, refused_mappings=mapping.refused,
                          users=dict(mapping.users), known=known,
                          remembered_managers=managers)

    async def read_homeserver(self, known: dict[str, PersonRecord],
                              snapshot: DirectorySnapshot) -> HomeserverView:
        accounts: dict[str, AccountState] = {}
        start: int | None = 0
        while start is not None:
            page, start = await self.client.admin_list_users(admin=self.admin_user_id,
                                                             start=start)
            for u in page:
                accounts[u["name"]] = AccountState(
                    user_id=u["name"], displayname=u.get("displayname"),
                    deactivated=bool(u.get("deactivated")), erased=bool(u.get("erased")),
                    admin=bool(u.get("admin")))
        managed = await self.directory_store.managed_rooms()
        self._managed = dict(managed)
        rooms: dict[str, RoomView] = {}
        views = await asyncio.gather(*(self._room_view(rid) for rid in managed.values()))
        for (key, _rid), v in zip(managed.items(), views, strict=True):
            if v is not None:
                rooms[key] = v
        # people about to leave: their joined rooms, to hand over where they are the only
        # admin (active directory people are never leavers)
        active_ids = {pid for pid, p in snapshot.people.items() if not p.disabled}
        leaver_rooms: dict[str, list[RoomView]] = {}
        for pid, rec in known.items():
            if rec.status != "active" or pid in active_ids:
                continue
            acct = accounts.get(rec.user_id)
            if acct is None or acct.deactivated:
                continue
            rids = await self.client.admin_joined_rooms(rec.user_id, admin=self.admin_user_id)
            vs = await asyncio.gather(*(self._room_view(r) for r in rids))
            leaver_rooms[rec.user_id] = [v for v in vs if v is not None]
        # who has the emails this run would give someone (one look-up per new address):
        # the homeserver keeps one owner per address, and the diff must not take it away
        wanted: set[str] = set()
        for pid, p in snapshot.people.items():
            email = (p.email or "").strip().lower()
            rec = known.get(pid)
            if email and not p.disabled and (rec is None or (rec.email or "").lower() != email):
                wanted.add(email)
        limit = asyncio.Semaphore(16)

        async def owner(e: str) -> str | None:
            async with limit:
                return await self.client.admin_email_owner(e, admin=self.admin_user_id)

        owners = await asyncio.gather(*(owner(e) for e in sorted(wanted)))
        email_owners = {e: o for e, o in zip(sorted(wanted), owners, strict=True) if o}
        return HomeserverView(accounts=accounts, rooms=rooms, leaver_rooms=leaver_rooms,
                              email_owners=email_owners)

    async def _room_view(self, room_id: str) -> RoomView | None:
        state = await self.client.admin_room_state(room_id, admin=self.admin_user_id)
        if state is None:
            return None
        members: dict[str, str] = {}
        power: dict[str, Any] = {}
        creators: frozenset[str] = frozenset()
        version: str | None = None
        join_rules: dict[str, Any] = {}
        for ev in state:
            t, sk, content = ev.get("type"), ev.get("state_key"), ev.get("content") or {}
            if t == "m.room.member" and isinstance(sk, str):
                members[sk] = content.get("membership", "leave")
            elif t == "m.room.power_levels" and sk == "":
                power = content
            elif t == "m.room.join_rules" and sk == "":
                join_rules = content
            elif t == "m.room.create" and sk == "":
                creators = creators_of(ev)
                version = str(content.get("room_version", "1"))
        return RoomView(room_id=room_id, members=members, power_levels=power,
                        creators=creators, join_rules=join_rules, room_version=version)

    # -- applying -------------------------------------------------------------------------
    def _lease(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One applying run at a time across processes sharing the database (the CLI
        beside ``enclave run``); renewed while the run lasts, lost if its holder dies."""
        ttl = self.lease_ttl_ms
        return held_lease(self.leases, LEASE_NAME, self.lease_owner, self.clock_ms, ttl,
                          lambda: SyncRefused([
                              "another directory sync is running on this database; try "
                              f"again when it has finished (its lease lasts {ttl // 1000}s "
                              "past its last renewal)"]))

    async def run(self, *, apply: bool = True, force: bool = False,
                  progress: ProgressFn | None = None) -> SyncResult:
        """Plan and (unless ``apply`` is False) apply one run; one run at a time."""
        async with self._lock, (self._lease() if apply else contextlib.nullcontext()):
            started = self.clock_ms()
            try:
                result = await self.plan(force=force)
            except SyncRefused as e:
                self.metrics.directory_runs.labels(outcome="refused").inc()
                # the run's one line is the job's (bridge.app; SCIM: bridge.root), the CLI
                # prints the problems itself
                log.debug("directory sync refused, nothing changed: %s", e)
                raise
            for pid, why in result.refused_mappings:
                log.warning("directory person %s left out: %s", pid, why)
            for f in result.plan.findings:
                log.warning("directory sync finding [%s] %s: %s", f.rule_id, f.subject,
                            f.message)
            if apply:
                await self._apply(result, progress)
                self.metrics.directory_runs.labels(
                    outcome="ok" if result.ok else "partial").inc()
                # the job's one line (bridge.app) reports it in ``enclave run``
                log.debug("directory sync applied in %.1fs: %s%s",
                         (self.clock_ms() - started) / 1000, result.applied or "no changes",
                         f", {len(result.failed)} failed" if result.failed else "")
            return result

    async def _apply(self, result: SyncResult, progress: ProgressFn | None) -> None:
        plan = result.plan
        total = len(plan.actions)
        done = 0
        failed_people: set[str] = set()
        run_key = f"sync:{self.clock_ms()}"
        sem = asyncio.Semaphore(self.config.max_concurrency)
        if progress:
            progress(0, total, None)

        async def one(i: int, action: Action) -> None:
            nonlocal done
            async with sem:
                outcome = await self.executor.run_direct(action, f"{run_key}:{i}",
                                                         source="directory")
            pid = getattr(action, "person_id", None)
            if outcome.status == "applied":
                result.applied[action.kind] = result.applied.get(action.kind, 0) + 1
            else:
                result.failed.append((action, outcome.detail))
                log.warning("directory action failed: %s: %s", action.describe(),
                            outcome.detail)
                if pid:
                    failed_people.add(pid)
            done += 1
            if progress:
                progress(done, total, action)

        # phases run in order; within a phase, actions of one room/user lane run in order
        # and lanes run concurrently
        # the directory view first: who is staff follows the directory, not the accounts,
        # and separation must already know the people this run joins to rooms
        if await self.directory_store.replace_directory_view(
                staff_view(result.snapshot, result.users, result.known, self.clock_ms(),
                           result.remembered_managers)):
            if self.on_view_change is not None:
                self.on_view_change()
        by_phase: dict[int, list[tuple[int, Action]]] = {}
        for i, a in enumerate(plan.actions):
            by_phase.setdefault(PHASES.get(a.kind, 9), []).append((i, a))
        for phase in sorted(by_phase):
            lanes: dict[str, list[tuple[int, Action]]] = {}
            for i, a in by_phase[phase]:
                lanes.setdefault(_lane(a), []).append((i, a))

            async def run_lane(items: list[tuple[int, Action]]) -> None:
                for i, a in items:
                    await one(i, a)

            if phase == PHASES[CreateManagedRoom.kind]:
                for items in lanes.values():  # spaces before the rooms placed in them
                    await run_lane(items)
            else:
                await asyncio.gather(*(run_lane(items) for items in lanes.values()))
        # remember what was applied: a person's record only when all their actions applied
        now = self.clock_ms()
        records = [
            DirectoryRecord(r.person_id, r.user_id, r.status, r.email, r.displayname, now,
                            r.deactivated_at)
            for pid, r in plan.records.items() if pid not in failed_people
        ]
        await self.directory_store.save_directory_people(records)

    # -- appliers (registered with the executor) ------------------------------------------
    async def _apply_create(self, a: CreateAccount, key: str, *, resend: bool) -> Outcome:
        body: dict[str, Any] = {"displayname": a.displayname, "admin": False}
        if a.email:
            body["threepids"] = [{"medium": "email", "address": a.email}]
        if a.initial_password:
            body["password"] = a.initial_password
        await self.client.admin_put_user(a.user, body, admin=self.admin_user_id)
        return Outcome("applied", "created")

    async def _apply_update(self, a: UpdateAccount, key: str, *, resend: bool) -> Outcome:
        body: dict[str, Any] = {}
        if a.displayname is not None:
            body["displayname"] = a.displayname
        if a.emails is not None:
            body["threepids"] = [{"medium": "email", "address": e} for e in a.emails]
        await self.client.admin_put_user(a.user, body, admin=self.admin_user_id)
        return Outcome("applied", "updated " + ", ".join(sorted(body)))

    async def _apply_reactivate(self, a: ReactivateAccount, key: str, *, resend: bool) -> Outcome:
        # Synapse wants a password to reactivate when local password login is on; staff
        # log in through LDAP/SSO, so a random one nobody knows is set and forgotten
        body: dict[str, Any] = {"deactivated": False, "displayname": a.displayname,
                                "password": secrets.token_urlsafe(32)}
        if a.email:
            body["threepids"] = [{"medium": "email", "address": a.email}]
        await self.client.admin_put_user(a.user, body, admin=self.admin_user_id)
        return Outcome("applied", "reactivated")

    async def _apply_deactivate(self, a: DeactivateAccount, key: str, *, resend: bool) -> Outcome:
        await self.client.admin_deactivate(a.user, admin=self.admin_user_id, erase=False)
        return Outcome("applied", "deactivated; sessions revoked")

    async def _apply_erase(self, a: EraseAccount, key: str, *, resend: bool) -> Outcome:
        await self.client.admin_deactivate(a.user, admin=self.admin_user_id, erase=True)
        return Outcome("applied", "erased")

    async def _managed_rooms(self) -> dict[str, str]:
        if self._managed is None:
            self._managed = await self.directory_store.managed_rooms()
        return self._managed

    async def _resolve_managed(self, key: str) -> str:
        rooms = await self._managed_rooms()
        if key not in rooms:
            raise LookupError(f"managed room {key!r} has not been created (its creation "
                              "failed or is pending)")
        return rooms[key]

    async def _apply_create_room(self, a: CreateManagedRoom, key: str, *, resend: bool) -> Outcome:
        rooms = await self._managed_rooms()
        if a.key in rooms:
            return Outcome("applied", f"already: {rooms[a.key]}")
        alias_local = a.alias or f"enclave-{slug(a.key)}"
        alias = f"#{alias_local}:{self.server_name}"
        parent = rooms.get(a.parent_key) if a.parent_key else None
        if a.parent_key and parent is None:
            raise LookupError(f"parent space {a.parent_key!r} of {a.key!r} does not exist")
        # a crash after createRoom but before we remembered the room: its alias finds it
        existing = await self.client.resolve_alias(alias)
        if existing is not None:
            create = await self.client.get_state(existing, "m.room.create",
                                                 user_id=self.bot_user_id)
            if create is None:
                return Outcome("failed", f"alias {alias} belongs to a room Enclave's bot is "
                                         "not in; choose another alias")
            room_id = existing
        else:
            initial_state: list[dict[str, Any]] = [{
                "type": "m.room.history_visibility", "state_key": "",
                "content": {"history_visibility": "shared"}}]
            if parent:
                initial_state.append({
                    "type": "m.space.parent", "state_key": parent,
                    "content": {"via": [self.server_name], "canonical": True}})
            if parent and a.join_through_parent:
                # its members are the space's by rule: they join without an invite
                initial_state.append({
                    "type": "m.room.join_rules", "state_key": "",
                    "content": {"join_rule": "restricted", "allow": [
                        {"type": "m.room_membership", "room_id": parent}]}})
            creation: dict[str, Any] = {"m.federate": False}
            if a.is_space:
                creation["type"] = "m.space"
            body: dict[str, Any] = {
                "name": a.name, "preset": "private_chat", "visibility": "private",
                "room_alias_name": alias_local, "creation_content": creation,
                "initial_state": initial_state,
                "power_level_content_override": {"users": dict(a.power_users)},
            }
            if a.topic:
                body["topic"] = a.topic
            if self.room_edits is not None:
                body = await self.room_edits(body)
            room_id = await self.client.create_room(body, user_id=self.bot_user_id)
        await self.directory_store.save_managed_room(a.key, room_id, self.clock_ms())
        rooms[a.key] = room_id
        if parent:
            await self.client.send_state(parent, "m.space.child", room_id,
                                         {"via": [self.server_name], "suggested": True},
                                         user_id=self.bot_user_id)
        return Outcome("applied", room_id)

    async def _apply_hand_over(self, a: HandOverRoom, key: str, *, resend: bool) -> Outcome:
        c = self.client
        if not a.successor_joined:
            try:
                await c.invite(a.room, a.successor, user_id=a.user)
            except MatrixRequestError as e:
                if e.status != 403 or "already in the room" not in e.error.lower():
                    raise
            await c.join(a.room, user_id=a.successor)
        # the kernel's rule: a creator of a v12 room already outranks every level (and must
        # not be put in the users map); users_default counts
        power, version, creators = power_context(await c.room_state(a.room, user_id=a.user))
        if user_level(a.successor, power, room_version=version, creators=creators) >= 100:
            return Outcome("applied", "already admin")
        pl = dict(power or {})
        users = dict(pl.get("users") or {})
        users[a.successor] = 100
        await c.send_state(a.room, "m.room.power_levels", "", {**pl, "users": users},
                           user_id=a.user)
        return Outcome("applied", f"{a.successor} is now admin")


def staff_view(snapshot: DirectorySnapshot, users: dict[str, Any],
               known: dict[str, PersonRecord], now_ms: int,
               remembered_managers: dict[str, str] | None = None) -> list[StaffRecord]:
    """The directory view separation and bots read: every mapped person by user id.

    People the directory disables and remembered people it no longer lists are inactive
    (leavers): policy treats them as nobody's staff any more. A remembered person keeps
    the manager the view had for them (a later run still hands their rooms over).
    """
    out: dict[str, StaffRecord] = {}
    by_person = {pid: m.user_id for pid, m in users.items()}
    for pid, m in users.items():
        p = m.person
        out[m.user_id] = StaffRecord(
            user_id=m.user_id, person_id=pid, active=not p.disabled, username=p.username,
            display_name=m.displayname, email=p.email, title=p.title, department=p.department,
            location=p.location, manager_user_id=by_person.get(p.manager or ""),
            # group ids, as directory.managed_rooms and policy selectors name them
            groups=frozenset(p.groups),
            updated_at=now_ms)
    for pid, r in known.items():
        if pid not in users and r.user_id not in out:
            out[r.user_id] = StaffRecord(
                user_id=r.user_id, person_id=pid, active=False,
                username=localpart_of(r.user_id), display_name=r.displayname or "",
                email=r.email, updated_at=now_ms,
                manager_user_id=(remembered_managers or {}).get(r.user_id))
    return sorted(out.values(), key=lambda r: r.user_id)


def _lane(a: Action) -> str:
    """Actions of one lane run in order; lanes run concurrently.

    Room actions share one lane per room: Synapse serialises membership changes per room
    (and lets an appservice have only 10 in flight), so two lanes on one room would only
    hold each other's slots. One lane per room keeps every slot busy on a different room.
    """
    if isinstance(a, CreateManagedRoom):
        return "rooms"
    if isinstance(a, HandOverRoom):
        return f"leaver:{a.user}"
    room = getattr(a, "room", None)
    if room:
        return f"room:{room}"
    return f"user:{getattr(a, 'user', None) or a.actor or ''}"

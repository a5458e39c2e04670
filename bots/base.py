"""The bot framework every Enclave bot is built on.

A :class:`Bot` has its own Matrix user in the appservice's exclusive namespace (display
name, avatar), sees every event of the server through the durable inbox (it is registered
as an inbox handler) and answers with :class:`~bridge.policy.actions.Action` s, so its
replies go through the outbox: exactly once, with idempotent transaction ids, audited.

What the base gives a bot:

* ``!``-commands in rooms and DMs the bot is in: help text, argument errors, permission
  checks (directory groups, room power) with refusals that name the reason;
* replies rendered from Markdown to ``formatted_body``; reaction hooks;
* invites from staff accepted, others declined; DMs the bot opens itself, idempotent
  across crashes (a room alias per person is the once-only guard);
* per-bot storage (``component_kv`` under ``bot.<name>``) and typed config;
* scheduling: :class:`JobScheduler` keeps each job's last fired occurrence in the store
  and asks :func:`bots.scheduling.due_occurrences` what to do, so a restart neither
  repeats nor silently skips a job; APScheduler 3.x is only its wake-up timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bridge.config.bots import BotIdentityConfig, DmConfig
from bridge.kernel.power import user_level_in_state
from bridge.kernel.retry import RECONNECT
from bridge.matrix.client import (
    HomeserverUnavailable,
    MatrixClient,
    MatrixRequestError,
)
from bridge.matrix.executor import Applier, Executor, Outcome, txn_id_for
from bridge.metrics import Metrics
from bridge.model.people import StaffRecord
from bridge.policy.actions import Action, Join, Leave
from bridge.store import AuditRecord, InboxEvent
from bridge.store.domains import AuditStore, DirectoryStore, KVStore, LeaseStore

from .commands import (
    CommandError,
    ParsedCommand,
    Permission,
    decide_permission,
    format_help,
    parse_command,
)
from .markdown import message_content
from .scheduling import JobState, Schedule, due_occurrences, format_ms
from .sending import MessageSender, RoomEncryption, RoomSender, SendRefused
from .store import AnnouncementStore

log = logging.getLogger(__name__)


# -- actions --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class BotMessage(Action):
    """Send an ``m.room.message`` as the bot (``actor``), encrypted where the room is."""

    kind: ClassVar[str] = "bot_message"
    room: str
    content: dict[str, Any] = field(default_factory=dict)


def bot_message_applier(sender: MessageSender) -> Applier:
    """The executor's applier for :class:`BotMessage` (one for every bot)."""

    async def apply(action: BotMessage, key: str, *, resend: bool) -> Outcome:
        assert action.actor is not None
        try:
            eid = await sender.send(action.room, action.content, txn_id=txn_id_for(key),
                                    sender=action.actor, resend=resend)
        except SendRefused as e:
            return Outcome("failed", e.reason)
        return Outcome("applied", eid)

    return apply


# -- services -----------------------------------------------------------------------------
class StaffDirectory:
    """The directory view (what the last directory sync knew), cached for a few seconds:
    a command or a reaction must not read the whole table each time."""

    def __init__(self, store: DirectoryStore, ttl_seconds: float = 5.0):
        self.store = store
        self.ttl = ttl_seconds
        self._at = -1e9
        self._records: list[StaffRecord] = []
        self._by_id: dict[str, StaffRecord] = {}
        self._lock = asyncio.Lock()

    async def _load(self) -> None:
        async with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return
            self._records = await self.store.directory_view()
            self._by_id = {r.user_id: r for r in self._records}
            self._at = time.monotonic()

    def invalidate(self) -> None:
        self._at = -1e9

    async def all(self) -> list[StaffRecord]:
        await self._load()
        return self._records

    async def by_id(self) -> dict[str, StaffRecord]:
        await self._load()
        return self._by_id

    async def get(self, user_id: str) -> StaffRecord | None:
        await self._load()
        return self._by_id.get(user_id)


@dataclass
class BotServices:
    """What the bots share; built once in :func:`bots.wiring.build_bots`."""

    # the core stores the bots use (their own tables: ``announcements``)
    audit: AuditStore
    kv: KVStore
    leases: LeaseStore
    directory_store: DirectoryStore
    client: MatrixClient
    executor: Executor
    metrics: Metrics
    clock_ms: Callable[[], int]
    sender: MessageSender
    encryption: RoomEncryption
    directory: StaffDirectory
    server_name: str
    namespace_prefix: str
    main_bot_user_id: str
    # the bots' own tables (announcements), on the same database as the core stores
    announcements: AnnouncementStore
    encrypted_sender: RoomSender | None = None
    # (bot user id, room id, m.room.encrypted event) -> the cleartext event, or None: lets
    # bots read commands and reactions in encrypted rooms (the E2EE side provides it)
    decrypt: Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any] | None]] | None = None
    # (bot user id, room id, user id) when someone joins one of the bot's rooms: the E2EE
    # side sends them the keys of messages sent while they were invited
    member_joined: Callable[[str, str, str], Awaitable[None]] | None = None
    # every bot's user id, so no bot answers another
    bot_user_ids: set[str] = field(default_factory=set)

    def installation_key(self, key: str) -> str:
        """A send key unique to this database (see Executor.action_key)."""
        iid = self.executor.installation_id
        return f"{iid}/{key}" if iid else key


class BotStorage:
    """One bot's key/value space in the store, with JSON values."""

    def __init__(self, store: KVStore, component: str, clock_ms: Callable[[], int]):
        self.store = store
        self.component = component
        self.clock_ms = clock_ms

    async def get(self, key: str) -> Any:
        raw = await self.store.component_get(self.component, key)
        return None if raw is None else json.loads(raw)

    async def put(self, key: str, value: Any) -> None:
        await self.store.component_put(self.component, key, json.dumps(value),
                                       self.clock_ms())

    async def put_new(self, key: str, value: Any) -> bool:
        """Insert only if absent; True if this call did (once-only across processes)."""
        return await self.store.component_put_new(self.component, key, json.dumps(value),
                                                  self.clock_ms())

    async def list(self, prefix: str = "") -> dict[str, Any]:
        raw = await self.store.component_list(self.component, prefix)
        return {k: json.loads(v) for k, v in raw.items()}

    async def delete(self, key: str) -> bool:
        return await self.store.component_delete(self.component, key)


# -- commands -----------------------------------------------------------------------------
@dataclass
class CommandContext:
    bot: Bot
    event: dict[str, Any]
    room_id: str
    sender: str
    command: ParsedCommand
    staff: StaffRecord | None
    is_dm: bool
    now_ms: int

    def reply(self, markdown: str, *, reason: str, rule_id: str | None = None) -> BotMessage:
        return self.bot.reply(self.room_id, markdown, reply_to=self.event.get("event_id"),
                              rule_id=rule_id or f"bots.{self.bot.component}."
                                                 f"{self.command.name}",
                              reason=reason)


CommandHandler = Callable[[CommandContext], Awaitable[Sequence[Action]]]


@dataclass
class Command:
    name: str
    summary: str
    handler: CommandHandler
    usage: str = ""
    permission: Permission = field(default_factory=Permission)
    # None: anywhere the bot is; else a check (room, is_dm) returning why not (None: ok)
    where: Callable[[str, bool], Awaitable[str | None]] | None = None


# -- the bot ------------------------------------------------------------------------------
class Bot:
    """Base of every Enclave bot. Subclasses add commands and override the hooks."""

    component: ClassVar[str] = "bot"

    def __init__(self, svc: BotServices, identity: BotIdentityConfig, dm: DmConfig):
        self.svc = svc
        self.identity = identity
        self.dm = dm
        self.localpart = svc.namespace_prefix + identity.localpart
        self.user_id = f"@{self.localpart}:{svc.server_name}"
        svc.bot_user_ids.add(self.user_id)
        self.name = f"bots.{self.component}"  # the inbox handler name
        self.storage = BotStorage(svc.kv, f"bot.{self.component}", svc.clock_ms)
        self.commands: dict[str, Command] = {}
        self.rooms: set[str] = set()
        self.ready = asyncio.Event()
        self._dm_of_room: dict[str, str] = {}
        self._dm_locks: dict[str, asyncio.Lock] = {}
        self.add_command(Command("help", "this list", self._help))

    # -- set-up --------------------------------------------------------------------------
    def add_command(self, cmd: Command) -> None:
        self.commands[cmd.name] = cmd

    async def start(self) -> None:
        """Make the identity exist and learn the bot's rooms; retried until it works."""
        attempt = 0
        while True:
            try:
                await self.ensure_identity()
                await self.load_rooms()
                break
            except (HomeserverUnavailable, MatrixRequestError) as e:
                attempt += 1
                delay = RECONNECT.delay(attempt)
                log.warning("%s: start-up incomplete (%s); retry in %.0fs", self.user_id, e,
                            delay)
                await asyncio.sleep(delay)
        self.ready.set()
        log.info("%s ready (%d rooms)", self.user_id, len(self.rooms))

    async def ensure_identity(self) -> None:
        c = self.svc.client
        if await c.register_appservice_user(self.localpart):
            log.info("registered bot %s", self.user_id)
        if await c.get_displayname(self.user_id) != self.identity.displayname:
            await c.set_displayname(self.user_id, self.identity.displayname)
        if self.identity.avatar_url:
            try:
                current = await c.get_avatar_url(self.user_id)
            except MatrixRequestError:
                current = None
            if current != self.identity.avatar_url:
                await c.set_avatar_url(self.user_id, self.identity.avatar_url)

    async def load_rooms(self) -> None:
        self.rooms = set(await self.svc.client.joined_rooms(self.user_id))
        for key, user in (await self.storage.list("dmroom:")).items():
            self._dm_of_room[key.removeprefix("dmroom:")] = user

    async def run(self) -> None:
        """The bot's own background work (scheduling, polling); none by default."""

    async def close(self) -> None:
        """Stop background work."""

    # -- the inbox handler ---------------------------------------------------------------
    def is_ours(self, user_id: str) -> bool:
        """Enclave's own users (bots, the appservice bot): never answered."""
        return (user_id in self.svc.bot_user_ids or user_id == self.svc.main_bot_user_id
                or user_id.startswith(f"@{self.svc.namespace_prefix}"))

    async def __call__(self, event: dict[str, Any], meta: InboxEvent) -> Sequence[Action]:
        return await self.handle(event)

    async def handle(self, event: dict[str, Any]) -> list[Action]:
        """Decide what to do about one event of the server (most are none of ours)."""
        etype = event.get("type")
        room = event.get("room_id")
        sender = event.get("sender")
        if not isinstance(room, str) or not isinstance(sender, str):
            return []
        if etype == "m.room.encryption" and "state_key" in event:
            self.svc.encryption.mark(room, True)
            return []
        if etype == "m.room.member":
            return await self._membership(event, room, sender)
        if self.is_ours(sender):
            return []
        if etype == "m.room.message":
            content = event.get("content") or {}
            body = content.get("body")
            if content.get("msgtype") != "m.text" or not isinstance(body, str):
                return []
            parsed = parse_command(body)
            if parsed is None:
                return []
            await self._wait_ready()
            if room not in self.rooms:
                return []
            return await self.dispatch(event, parsed)
        if etype == "m.reaction":
            await self._wait_ready()
            if room not in self.rooms:
                return []
            return list(await self.on_reaction(event))
        if etype == "m.room.encrypted" and self.svc.decrypt is not None:
            await self._wait_ready()
            if room not in self.rooms:
                return []
            clear = await self.svc.decrypt(self.user_id, room, event)
            if clear is None or clear.get("type") not in ("m.room.message", "m.reaction"):
                return []
            # the envelope's sender, room and ids are what the homeserver vouches for
            return await self.handle({**clear, "room_id": room, "sender": sender,
                                      "event_id": event.get("event_id"),
                                      "origin_server_ts": event.get("origin_server_ts")})
        return []

    async def _wait_ready(self) -> None:
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), 30)
        except TimeoutError:
            # raising makes the inbox retry the event later: nothing is lost
            raise RuntimeError(f"{self.user_id} is not ready yet") from None

    async def _membership(self, event: dict[str, Any], room: str,
                          sender: str) -> list[Action]:
        target = event.get("state_key")
        membership = (event.get("content") or {}).get("membership")
        if target != self.user_id:
            if membership in ("leave", "ban") and self._dm_of_room.get(room) == target:
                await self.forget_dm(room, target)
            # no waiting for readiness here: joins all over the server pass by; one seen
            # before the bot (and its E2EE device) is up is covered by the device's sweep
            if membership == "join" and isinstance(target, str) and self.ready.is_set() \
                    and room in self.rooms and self.svc.member_joined is not None:
                await self.svc.member_joined(self.user_id, room, target)
            return []
        if membership == "join":
            self.rooms.add(room)
        elif membership in ("leave", "ban"):
            self.rooms.discard(room)
            user = self._dm_of_room.get(room)
            if user is not None:
                await self.forget_dm(room, user)
        elif membership == "invite" and room not in self.rooms:
            return await self.on_invite(event, room, sender)
        return []

    async def on_invite(self, event: dict[str, Any], room: str, sender: str) -> list[Action]:
        """Accept invites from active staff (and from Enclave itself); decline others."""
        staff = await self.svc.directory.get(sender)
        local = sender.endswith(f":{self.svc.server_name}")
        ours = self.is_ours(sender)
        if local and not ours and (staff is None or not staff.active):
            # a decline cannot be undone: judge it on the directory as it is now, not on a
            # view cached from before the sync that just provisioned the inviter
            self.svc.directory.invalidate()
            staff = await self.svc.directory.get(sender)
        if ours or (local and staff is not None and staff.active):
            if (event.get("content") or {}).get("is_direct") and not ours:
                self._dm_of_room[room] = sender
                await self.storage.put(f"dmroom:{room}", sender)
            return [Join(room=room, actor=self.user_id, rule_id="bots.invite.accept",
                         reason=f"invited by {sender}"
                                + (" (staff)" if staff is not None else ""))]
        why = "not in the staff directory" if staff is None else "not active staff"
        if not local:
            why = "not a user of this server"
        return [Leave(room=room, actor=self.user_id, rule_id="bots.invite.decline",
                      reason=f"invited by {sender}: {why}")]

    async def on_reaction(self, event: dict[str, Any]) -> Sequence[Action]:
        """A reaction in one of the bot's rooms (override)."""
        return []

    # -- commands ------------------------------------------------------------------------
    async def dispatch(self, event: dict[str, Any], parsed: ParsedCommand) -> list[Action]:
        room, sender = event["room_id"], event["sender"]
        is_dm = self.is_dm(room)
        cmd = self.commands.get(parsed.name)
        if cmd is None:
            if not is_dm:
                return []  # another bot in the room may know it
            return [self.reply(room, f"I do not know `!{parsed.name}`. Try `!help`.",
                               reply_to=event.get("event_id"),
                               rule_id=f"bots.{self.component}.unknown",
                               reason=f"unknown command from {sender}")]
        if cmd.where is not None:
            why = await cmd.where(room, is_dm)
            if why is not None:
                return [self.reply(room, f"Refused: `!{cmd.name}` {why}.",
                                   reply_to=event.get("event_id"),
                                   rule_id=f"bots.{self.component}.{cmd.name}.refused",
                                   reason=f"{sender}: {why}")]
        staff = await self.svc.directory.get(sender)
        power = None
        if cmd.permission.min_power is not None:
            power = await self.power_of(room, sender)
        decision = decide_permission(cmd.permission, sender, staff, power)
        if not decision.allowed:
            return [self.reply(room, f"Refused: `!{cmd.name}` {decision.reason}.",
                               reply_to=event.get("event_id"),
                               rule_id=f"bots.{self.component}.{cmd.name}.refused",
                               reason=f"{sender}: {decision.reason}")]
        ctx = CommandContext(self, event, room, sender, parsed, staff, is_dm,
                             self.svc.clock_ms())
        try:
            return list(await cmd.handler(ctx))
        except CommandError as e:
            usage = f"\n\nUsage: `!{cmd.name}{(' ' + cmd.usage) if cmd.usage else ''}`"
            return [ctx.reply(f"{e}{usage}", reason=f"argument error: {e}",
                              rule_id=f"bots.{self.component}.{cmd.name}.error")]

    async def _help(self, ctx: CommandContext) -> Sequence[Action]:
        rows = [(c.name, c.usage, c.summary) for c in self.commands.values()]
        return [ctx.reply(format_help(self.identity.displayname, rows), reason="help")]

    def reply(self, room_id: str, markdown: str, *, rule_id: str, reason: str,
              reply_to: str | None = None, notice: bool = True) -> BotMessage:
        """A Markdown message from the bot as an action (sent through the outbox)."""
        extra = {"m.relates_to": {"m.in_reply_to": {"event_id": reply_to}}} if reply_to else None
        return BotMessage(room=room_id, content=message_content(markdown, notice=notice,
                                                                extra=extra),
                          actor=self.user_id, rule_id=rule_id, reason=reason)

    async def power_of(self, room_id: str, user_id: str) -> int:
        """``user_id``'s power level in a room the bot is in (the kernel's one rule: room
        v12+ creators outrank every level)."""
        state = await self.svc.client.room_state(room_id, user_id=self.user_id)
        return user_level_in_state(state, user_id)

    # -- DMs -----------------------------------------------------------------------------
    def is_dm(self, room_id: str) -> bool:
        return room_id in self._dm_of_room

    def dm_alias_localpart(self, user_id: str, generation: int) -> str:
        digest = hashlib.sha256(f"{self.user_id}|{user_id}|{generation}".encode()).hexdigest()
        return f"_enclave_dm.{self.identity.localpart}.{digest[:24]}"

    async def forget_dm(self, room_id: str, user_id: str) -> None:
        """The person or the bot left a DM: the next message opens a new one."""
        self._dm_of_room.pop(room_id, None)
        if await self.storage.get(f"dm:{user_id}") == room_id:
            await self.storage.delete(f"dm:{user_id}")
            gen = int(await self.storage.get(f"dmgen:{user_id}") or 0)
            await self.storage.put(f"dmgen:{user_id}", gen + 1)
        await self.storage.delete(f"dmroom:{room_id}")

    async def ensure_dm(self, user_id: str) -> str:
        """The bot's DM room with ``user_id``, created (and the person joined or invited)
        if there is none. Safe to repeat after a crash at any point: the room alias is the
        once-only guard, and invite/join of someone already there are no-ops."""
        room = await self.storage.get(f"dm:{user_id}")
        if room is not None:
            return str(room)
        lock = self._dm_locks.setdefault(user_id, asyncio.Lock())
        async with lock:
            room = await self.storage.get(f"dm:{user_id}")
            if room is None:
                room = await self._open_dm(user_id)
                await self.storage.put(f"dmroom:{room}", user_id)
                await self.storage.put(f"dm:{user_id}", room)
                self._dm_of_room[room] = user_id
        return str(room)

    async def _open_dm(self, user_id: str) -> str:
        c = self.svc.client
        gen = int(await self.storage.get(f"dmgen:{user_id}") or 0)
        alias_local = self.dm_alias_localpart(user_id, gen)
        body: dict[str, Any] = {
            "preset": "private_chat", "is_direct": True,
            "name": self.dm.room_name or self.identity.displayname,
            "room_alias_name": alias_local,
            "creation_content": {"m.federate": False},
        }
        if self.dm.encrypted:
            body["initial_state"] = [{"type": "m.room.encryption", "state_key": "",
                                      "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]
        try:
            room = await c.create_room(body, user_id=self.user_id)
        except MatrixRequestError as e:
            if e.errcode != "M_ROOM_IN_USE":
                raise
            # created before a crash: the alias leads to it
            found = await c.resolve_alias(f"#{alias_local}:{self.svc.server_name}")
            if found is None:
                raise
            room = found
        self.rooms.add(room)
        self.svc.encryption.mark(room, self.dm.encrypted)
        try:
            await c.invite(room, user_id, user_id=self.user_id)
        except MatrixRequestError as e:
            if e.status != 403 or "already" not in e.error.lower():
                raise
        if self.dm.join == "auto":
            await c.join(room, user_id=user_id)
            await self._mark_direct(user_id, room)
        return room

    async def _mark_direct(self, user_id: str, room_id: str) -> None:
        """Put the room in the person's ``m.direct`` (clients list it under people):
        a client that accepts an invite does this itself; an automatic join does not."""
        c = self.svc.client
        try:
            current = await c.get_account_data(user_id, "m.direct") or {}
            rooms = list(current.get(self.user_id) or [])
            if room_id in rooms:
                return
            current[self.user_id] = [*rooms, room_id]
            await c.set_account_data(user_id, "m.direct", current)
        except MatrixRequestError as e:
            log.info("could not mark %s as a DM of %s: %s", room_id, user_id, e)

    # -- audit ---------------------------------------------------------------------------
    def audit(self, kind: str, outcome: str, *, user_id: str | None = None,
              room_id: str | None = None, rule_id: str | None = None,
              reason: str | None = None, detail: str | None = None) -> AuditRecord:
        return AuditRecord(ts=self.svc.clock_ms(), source=f"bots.{self.component}",
                           kind=kind, outcome=outcome, actor=self.user_id, user_id=user_id,
                           room_id=room_id, rule_id=rule_id, reason=reason, detail=detail)


# -- scheduling ---------------------------------------------------------------------------
@dataclass
class Job:
    """A scheduled job: ``fire(occurrence_ms)`` must be idempotent by occurrence."""

    id: str
    schedule: Schedule
    fire: Callable[[int], Awaitable[None]]
    timezone: str = "UTC"


class JobScheduler:
    """Runs jobs on their schedules with the state of each kept in the bot's storage.

    :meth:`tick` is the whole logic (drive it with an injected clock in tests); the
    APScheduler :class:`~apscheduler.schedulers.asyncio.AsyncIOScheduler` of
    :class:`Waker` only decides when the next tick happens."""

    def __init__(self, storage: BotStorage, clock_ms: Callable[[], int], *, grace_ms: int,
                 report: Callable[[AuditRecord], Awaitable[None]],
                 audit: Callable[..., AuditRecord]):
        self.storage = storage
        self.clock_ms = clock_ms
        self.grace_ms = grace_ms
        self.jobs: dict[str, Job] = {}
        self._report = report
        self._audit = audit

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job

    async def state(self, job_id: str) -> JobState | None:
        raw = await self.storage.get(f"job:{job_id}")
        return JobState(**raw) if raw else None

    async def tick(self) -> int | None:
        """Fire what is due, report what was missed; return the next due time."""
        now = self.clock_ms()
        next_due: int | None = None
        for job in list(self.jobs.values()):
            state = await self.state(job.id)
            d = due_occurrences(job.schedule, state, now, self.grace_ms)
            if d.missed:
                await self._report_missed(job, d.missed, d.missed_more)
            if d.coalesced:
                log.info("job %s: %d late occurrence(s) merged into %s", job.id,
                         len(d.coalesced), format_ms(d.fire or now, job.timezone))
            if d.fire is not None:
                log.info("job %s: firing the occurrence of %s", job.id,
                         format_ms(d.fire, job.timezone))
                await job.fire(d.fire)
            await self.storage.put(f"job:{job.id}", d.state.__dict__)
            if d.next_due_ms is not None:
                next_due = d.next_due_ms if next_due is None else min(next_due, d.next_due_ms)
        return next_due

    async def _report_missed(self, job: Job, missed: Sequence[int], more: int) -> None:
        when = ", ".join(format_ms(t, job.timezone) for t in missed[:5])
        extra = len(missed) - 5 + more
        if extra > 0:
            when += f" and {extra} more"
        log.warning("job %s: missed %d occurrence(s) older than the grace time (%s); "
                    "not sent late", job.id, len(missed) + more, when)
        await self._report(self._audit(
            "schedule_missed", "skipped", rule_id=f"schedule.{job.id}",
            reason="occurrence older than misfire_grace_seconds (Enclave was not running)",
            detail=when))


class Waker:
    """When a bot's loop runs next: at a given time, every ``poll`` seconds, or now.

    Uses APScheduler 3.x (``AsyncIOScheduler``) for the timers; the loop itself waits on
    an :class:`asyncio.Event`."""

    def __init__(self, clock_ms: Callable[[], int], poll_seconds: float, name: str):
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.clock_ms = clock_ms
        self.poll_seconds = poll_seconds
        self.name = name
        self.event = asyncio.Event()
        self._scheduler = AsyncIOScheduler()

    def start(self) -> None:
        self._scheduler.start()
        self._scheduler.add_job(self._timer, "interval", seconds=self.poll_seconds,
                                id=f"{self.name}-poll", coalesce=True, max_instances=1,
                                replace_existing=True)  # started again: a replica leads again

    def wake(self) -> None:
        self.event.set()

    async def _timer(self) -> None:
        # a coroutine: APScheduler runs it on the event loop (a plain function would run in
        # a worker thread, where setting an asyncio.Event is not safe)
        self.event.set()

    def at(self, when_ms: int | None) -> None:
        """Wake at ``when_ms`` (by the injected clock) unless an earlier wake comes."""
        if when_ms is None or not self._scheduler.running:
            return
        import datetime as dt

        delay = max(0.0, (when_ms - self.clock_ms()) / 1000)
        run = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        self._scheduler.add_job(self._timer, "date", run_date=run, id=f"{self.name}-at",
                                replace_existing=True, misfire_grace_time=None)

    async def wait(self) -> None:
        await self.event.wait()
        self.event.clear()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)


async def run_forever(name: str, step: Callable[[], Awaitable[None]], waker: Waker) -> None:
    """Call ``step`` whenever ``waker`` fires; log (do not die on) a failing step."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: a pass failed; trying again at the next wake-up", name)
        await waker.wait()


async def cancel_quietly(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t

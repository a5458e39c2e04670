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
* per-bot storage (``component_kv`` under ``bot.<name>``, :class:`~bots.services.BotStorage`)
  and typed config;
* scheduling (:mod:`bots.jobs`): :class:`~bots.jobs.JobScheduler` keeps each job's last
  fired occurrence in the store and asks :func:`bots.scheduling.due_occurrences` what to
  do, so a restart neither repeats nor silently skips a job; APScheduler 3.x is only its
  wake-up timer.

Its own action (:class:`~bots.actions.BotMessage`) and what the bots share
(:class:`~bots.services.BotServices`) live beside it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bridge.config.bots import BotIdentityConfig, DmConfig
from bridge.kernel.power import user_level_in_state
from bridge.kernel.relations import reply_relation
from bridge.kernel.retry import RECONNECT
from bridge.matrix.client import HomeserverUnavailable, MatrixRequestError
from bridge.model.people import StaffRecord
from bridge.policy.actions import Action, Join, Leave
from bridge.policy.power import is_enclave_user
from bridge.store import AuditRecord, InboxEvent

from .actions import BotMessage
from .commands import (
    CommandError,
    ParsedCommand,
    Permission,
    decide_permission,
    format_help,
    parse_command,
)
from .markdown import message_content
from .services import BotServices, BotStorage

log = logging.getLogger(__name__)


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
        """Enclave's own users (the appservice bot, the admin, every bot in the namespace):
        never answered, never a recipient (:func:`bridge.policy.power.is_enclave_user`)."""
        return is_enclave_user(user_id, server_name=self.svc.server_name,
                               own_users=(self.svc.main_bot_user_id, self.svc.admin_user_id),
                               namespace_prefix=self.svc.namespace_prefix)

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
        extra = {"m.relates_to": reply_relation(reply_to)} if reply_to else None
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
        room = await self.create_room_once(body)
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

    async def create_room_once(self, body: dict[str, Any]) -> str:
        """Create a room as the bot, its alias (``room_alias_name``, required) the once-only
        guard: a room created before a crash is found again through the alias."""
        c = self.svc.client
        try:
            return await c.create_room(body, user_id=self.user_id)
        except MatrixRequestError as e:
            if e.errcode != "M_ROOM_IN_USE":
                raise
            found = await c.resolve_alias(f"#{body['room_alias_name']}:{self.svc.server_name}")
            if found is None:
                raise
            return found

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

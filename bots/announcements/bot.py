"""The announcement bot: scheduled, manual, ad-hoc and webhook announcements to targeted
staff, with acknowledgements, reminders, escalation and summaries.

Its commands (``!announce``/``!confirm``/``!cancel``/``!report`` in the control room,
``!ack`` anywhere) and reactions are decided in the inbox and applied through the outbox
(:class:`RecordAck`, :class:`StartAnnouncement`, replies); fan-out and follow-ups run in
its own loop (:class:`~bots.announcements.delivery.FanOut`), woken by the scheduler.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from bridge.config.bots import AnnouncementConfig, AnnouncementsConfig
from bridge.kernel.durations import parse_duration_seconds
from bridge.kernel.relations import reply_to
from bridge.matrix.client import HomeserverUnavailable, MatrixRequestError
from bridge.matrix.executor import Outcome, txn_id_for
from bridge.policy.actions import Action

from ..bot import Bot, Command, CommandContext
from ..commands import CommandError, Permission, take_words
from ..jobs import Job, JobScheduler, Waker, run_forever
from ..markdown import message_content
from ..scheduling import occurrence_id, schedule_from_config
from ..sending import SendRefused
from ..services import BotServices
from ..store import AnnouncementMessage, AnnouncementOccurrence
from .acks import decide_ack
from .audience import Selection, count_by, parse_audience, select_audience
from .delivery import FanOut, date_text
from .service import make_occurrence, spec_for
from .spec import AnnouncementSpec, compose

log = logging.getLogger(__name__)

ACTIVE = ("pending", "delivering", "delivered")


# -- actions --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RecordAck(Action):
    """Record ``user``'s acknowledgement of an occurrence (first one wins)."""

    kind: ClassVar[str] = "announcement_ack"
    room: str
    user: str
    announcement_id: str
    occurrence_id: str
    method: str  # "reaction" | "command"
    at_ms: int
    event_id: str | None = None
    explicit_room: str | None = None


@dataclass(frozen=True, kw_only=True)
class StartAnnouncement(Action):
    """Make an occurrence of an ad-hoc announcement (confirmed in the control room)."""

    kind: ClassVar[str] = "announcement_start"
    room: str
    announcement_id: str
    occurrence_id: str
    spec: str
    created_by: str
    scheduled_at: int
    draft: str | None = None


def decide_confirm(draft: dict[str, Any] | None, now_ms: int, within_ms: int) -> str | None:
    """Why a ``!confirm`` cannot send (None: it can)."""
    if draft is None:
        return "there is nothing to confirm: send `!announce` first"
    if now_ms - int(draft["created_at"]) > within_ms:
        return (f"the preview is older than {within_ms // 60000} minute(s); "
                "send `!announce` again")
    return None


def split_title(text: str) -> tuple[str, str]:
    """An ad-hoc text's title: its first line when more lines follow, else a default."""
    first, _, rest = text.partition("\n")
    first = first.strip().lstrip("#").strip()
    if rest.strip() and 0 < len(first) <= 80:
        return first, rest.strip()
    return "Announcement", text.strip()


class AnnouncementBot(Bot):
    component: ClassVar[str] = "announcements"

    def __init__(self, svc: BotServices, cfg: AnnouncementsConfig):
        super().__init__(svc, cfg.bot, cfg.dm)
        self.cfg = cfg
        self.by_id: dict[str, AnnouncementConfig] = {a.id: a for a in cfg.announcements}
        self.fanout = FanOut(self)
        self.scheduler = JobScheduler(self.storage, svc.clock_ms,
                                      grace_ms=cfg.misfire_grace_seconds * 1000,
                                      report=svc.audit.add_audit, audit=self.audit)
        for a in cfg.announcements:
            if a.schedule is not None:
                self.scheduler.add(Job(a.id, schedule_from_config(a.schedule),
                                       partial(self._fire, a), a.schedule.timezone))
        self.waker = Waker(svc.clock_ms, cfg.poll_seconds, "announcements", svc.scheduler)
        self.control_room: str | None = None
        self._control_warned = False
        self._follow_due: dict[tuple[str, str], int] = {}
        self._step_lock = asyncio.Lock()
        self._acks = {r.replace("\ufe0f", "") for r in cfg.ack_reactions}
        self.add_command(Command("ack", "acknowledge an announcement (the latest here, the "
                                        "one you reply to, or ID)", self._cmd_ack,
                                 usage="[ID]"))
        control = cfg.control
        if control is not None:
            perm = Permission(groups=tuple(control.announce_groups),
                              min_power=control.announce_min_power)
            self.add_command(Command(
                "announce", "preview an announcement (then `!confirm`)", self._cmd_announce,
                usage="[--ack] [--remind 1d] [--escalate] [--dm|--room] [--title TITLE] "
                      "AUDIENCE TEXT",
                permission=perm, where=self._control_only))
            self.add_command(Command("confirm", "send the previewed announcement",
                                     self._cmd_confirm, permission=perm,
                                     where=self._control_only))
            self.add_command(Command("cancel", "drop the preview", self._cmd_cancel,
                                     permission=perm, where=self._control_only))
            self.add_command(Command("report", "counts of an announcement's latest send",
                                     self._cmd_report, usage="ID", permission=perm,
                                     where=self._control_only))

    def register_actions(self) -> None:
        ex = self.svc.executor
        ex.register(RecordAck, self._apply_ack)
        ex.register(StartAnnouncement, self._apply_start)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        await self.find_control_room()

    async def find_control_room(self) -> str | None:
        """The control room's id (an alias is resolved; the bot joins if it may). Tried at
        start and again until the room exists."""
        control = self.cfg.control
        if control is None or self.control_room is not None:
            return self.control_room
        room: str | None = control.room
        try:
            if room.startswith("#"):
                room = await self.svc.client.resolve_alias(room)
            if room is None:
                if not self._control_warned:
                    log.warning("control room %s does not exist (yet); !announce waits for "
                                "it", control.room)
                    self._control_warned = True
                return None
            if room not in self.rooms:
                try:
                    await self.svc.client.join(room, user_id=self.user_id)
                    self.rooms.add(room)
                except MatrixRequestError as e:
                    log.info("%s is not in the control room %s yet (%s): invite it",
                             self.user_id, control.room, e.error)
        except (HomeserverUnavailable, MatrixRequestError) as e:
            log.error("control room %s: %s", control.room, e)
            return None
        self.control_room = room
        return room

    async def _control_only(self, room: str, is_dm: bool) -> str | None:
        control_room = await self.find_control_room()
        if control_room is None:
            return "needs the control room, which does not exist yet"
        if room != control_room:
            return "works only in the announcements control room"
        return None

    async def run(self) -> None:
        self.waker.start()
        await run_forever(self.name, self.tick, self.waker)

    async def close(self) -> None:
        self.waker.stop()

    # -- the loop ------------------------------------------------------------------------
    async def tick(self) -> None:
        """One pass: fire due schedules, deliver, follow up. Safe to call any time."""
        await self.ready.wait()
        async with self._step_lock:
            if self.cfg.control is not None and self.control_room is None:
                await self.find_control_room()  # created after start-up
            next_due = await self.scheduler.tick()
            now = self.svc.clock_ms()
            for occ in await self.svc.announcements.announcement_occurrences(statuses=ACTIVE):
                key = (occ.announcement_id, occ.occurrence_id)
                if occ.status in ("pending", "delivering"):
                    await self.fanout.deliver(occ)
                    self._follow_due.pop(key, None)
                    continue
                due = self._follow_due.get(key, now)
                if due <= now:
                    nd = await self.fanout.follow_up(occ)
                    if nd is None:
                        self._follow_due.pop(key, None)
                        continue
                    self._follow_due[key] = due = nd
                next_due = due if next_due is None else min(next_due, due)
            self.waker.at(next_due)

    async def _fire(self, cfg: AnnouncementConfig, at_ms: int) -> None:
        await self.create_occurrence(cfg.id, occurrence_id(at_ms), "scheduled",
                                     spec_for(cfg, self.cfg.timezone), at_ms, "schedule")

    async def create_occurrence(self, announcement_id: str, occ_id: str, kind: str,
                                spec: AnnouncementSpec, scheduled_at: int,
                                created_by: str | None) -> tuple[bool, Selection]:
        """Store an occurrence for the audience as the directory has it now; wake up."""
        self.svc.directory.invalidate()
        staff = await self.svc.directory.all()
        created, sel = await make_occurrence(
            self.svc.announcements, staff, announcement_id=announcement_id, occurrence_id=occ_id,
            kind=kind, spec=spec, scheduled_at=scheduled_at, created_by=created_by,
            now_ms=self.svc.clock_ms(), actor=self.user_id)
        if created:
            log.info("announcement %s/%s: %d people, %d room(s)", announcement_id, occ_id,
                     len(sel.users), len(sel.rooms))
        self.waker.wake()
        return created, sel

    # -- the announcement room -------------------------------------------------------------
    async def ensure_announcement_room(self, spec: AnnouncementSpec) -> str:
        """The read-only room of an audience (created once; an alias guards creation)."""
        key = spec.room_identity
        room = await self.storage.get(f"room:{key}")
        if room is not None:
            return str(room)
        alias_local = f"_enclave_announce.{key}"
        name = spec.room_name or f"Announcements: {spec.audience.describe()}"[:100]
        body = {
            "preset": "private_chat", "name": name,
            "topic": spec.room_topic or "Announcements from Enclave (read-only). React "
                                        "with ✅ to acknowledge.",
            "room_alias_name": alias_local,
            "creation_content": {"m.federate": False},
            "initial_state": [{"type": "m.room.guest_access", "state_key": "",
                               "content": {"guest_access": "forbidden"}},
                              {"type": "m.room.history_visibility", "state_key": "",
                               "content": {"history_visibility": "shared"}}],
            # read-only: members may react (acknowledge) and redact their own reactions.
            # The bot creates the room: its power comes with that (room v12 creators may not
            # be listed in `users`; older versions give the creator 100 by default)
            "power_level_content_override": {
                "users_default": 0, "events_default": 50,
                "state_default": 100, "invite": 100, "kick": 100, "ban": 100, "redact": 50,
                "events": {"m.reaction": 0, "m.room.redaction": 0}},
        }
        room = await self.create_room_once(body)
        self.rooms.add(room)
        self.svc.encryption.mark(room, False)
        await self.storage.put(f"room:{key}", room)
        return str(room)

    # -- summaries -------------------------------------------------------------------------
    async def post_summary(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                           stage: str) -> None:
        """Counts to the control room (if one is set up and summaries are on)."""
        control = self.cfg.control
        if control is None or not control.post_summaries or self.control_room is None:
            return
        rows = await self.svc.announcements.announcement_deliveries(occ.announcement_id,
                                                            occ.occurrence_id)
        md = self.fanout.summary_markdown(occ, spec, rows, stage)
        key = self.svc.installation_key(
            f"summary/{occ.announcement_id}/{occ.occurrence_id}/{stage.split(' ')[0]}")
        try:
            eid = await self.svc.sender.send(self.control_room,
                                              message_content(md, notice=True),
                                              txn_id=txn_id_for(key), sender=self.user_id)
        except (MatrixRequestError, HomeserverUnavailable, SendRefused) as e:
            log.warning("summary of %s/%s not posted: %s", occ.announcement_id,
                        occ.occurrence_id, e)
            await self.svc.audit.add_audit(self.audit(
                "announcement_summary", "failed", room_id=self.control_room,
                rule_id=f"announcements.{occ.announcement_id}", reason=stage, detail=str(e)))
            return
        await self.svc.announcements.announcement_save_message(AnnouncementMessage(
            eid, self.control_room, occ.announcement_id, occ.occurrence_id, "summary", None,
            self.svc.clock_ms()))
        await self.svc.audit.add_audit(self.audit(
            "announcement_summary", "applied", room_id=self.control_room,
            rule_id=f"announcements.{occ.announcement_id}", reason=stage, detail=eid))

    # -- acknowledgements ------------------------------------------------------------------
    async def on_reaction(self, event: dict[str, Any]) -> Sequence[Action]:
        rel = (event.get("content") or {}).get("m.relates_to") or {}
        key = rel.get("key")
        target = rel.get("event_id")
        if rel.get("rel_type") != "m.annotation" or not isinstance(key, str) \
                or not isinstance(target, str):
            return []
        if key.replace("\ufe0f", "") not in self._acks:
            return []
        msg = await self.svc.announcements.announcement_message(target)
        if msg is None:
            return []
        sender, room = event["sender"], event["room_id"]
        d = decide_ack(msg.kind, msg.announcement_id, msg.occurrence_id, msg.target, sender,
                       room_id=room)
        if d is None:
            return []
        return [RecordAck(
            room=room, user=sender, announcement_id=d.announcement_id,
            occurrence_id=d.occurrence_id, method="reaction",
            at_ms=int(event.get("origin_server_ts") or self.svc.clock_ms()),
            event_id=event.get("event_id"), explicit_room=d.room_id,
            rule_id="announcements.ack.reaction", reason=f"{key} on {target}")]

    async def _apply_ack(self, action: RecordAck, key: str, *, resend: bool) -> Outcome:
        recorded = await self.svc.announcements.announcement_record_ack(
            action.announcement_id, action.occurrence_id, action.user, at_ms=action.at_ms,
            method=action.method, event_id=action.event_id, room_id=action.explicit_room)
        return Outcome("applied", "recorded" if recorded
                       else "not recorded: already acknowledged, or not a recipient")

    async def _find_ack_target(self, ctx: CommandContext) -> tuple[str, str, str | None] | None:
        """(announcement, occurrence, explicit room) that ``!ack`` means, or None."""
        store = self.svc.announcements
        args = ctx.command.args()
        if args:
            ann = args[0]
            for occ in reversed(await store.announcement_occurrences(announcement_id=ann)):
                rows = await store.announcement_deliveries(ann, occ.occurrence_id)
                if any(r.target == ctx.sender for r in rows):
                    return ann, occ.occurrence_id, None
            raise CommandError(f"you have received no announcement `{ann}`")
        parent = reply_to(ctx.event)
        candidates: list[AnnouncementMessage] = []
        if parent is not None:
            msg = await store.announcement_message(parent)
            if msg is not None:
                candidates = [msg]
        if not candidates:
            candidates = await store.announcement_messages_in_room(ctx.room_id)
        for msg in candidates:
            d = decide_ack(msg.kind, msg.announcement_id, msg.occurrence_id, msg.target,
                           ctx.sender, room_id=ctx.room_id)
            if d is not None:
                return d.announcement_id, d.occurrence_id, d.room_id
        return None

    async def _cmd_ack(self, ctx: CommandContext) -> Sequence[Action]:
        found = await self._find_ack_target(ctx)
        if found is None:
            return [ctx.reply("There is no announcement here for you to acknowledge. "
                              "Give its ID: `!ack ID`.", reason="nothing to acknowledge")]
        ann, occ_id, explicit = found
        occ = await self.svc.announcements.announcement_occurrence(ann, occ_id)
        title = AnnouncementSpec.from_json(occ.spec).title if occ else ann
        rows = await self.svc.announcements.announcement_deliveries(ann, occ_id)
        mine = next((r for r in rows if r.target == ctx.sender), None)
        if mine is not None and mine.acked_at is not None:
            return [ctx.reply(f"You already acknowledged **{title}**.",
                              reason="already acknowledged")]
        return [
            RecordAck(room=ctx.room_id, user=ctx.sender, announcement_id=ann,
                      occurrence_id=occ_id, method="command",
                      at_ms=int(ctx.event.get("origin_server_ts") or ctx.now_ms),
                      event_id=ctx.event.get("event_id"), explicit_room=explicit,
                      rule_id="announcements.ack.command", reason="!ack"),
            ctx.reply(f"✅ Acknowledged: **{title}**. Thank you!", reason="acknowledged"),
        ]

    # -- the control room ------------------------------------------------------------------
    async def _cmd_announce(self, ctx: CommandContext) -> Sequence[Action]:
        control = self.cfg.control
        assert control is not None
        rest = ctx.command.rest
        mode = control.default_delivery
        title: str | None = None
        require_ack, remind_after, escalate = False, None, False
        audience_word: str | None = None
        while rest:
            words, rest = take_words(rest, 1)
            if not words:
                break
            w = words[0]
            if w == "--ack":
                require_ack = True
            elif w in ("--dm", "--room"):
                mode = w[2:]
            elif w == "--escalate":
                require_ack = escalate = True
            elif w in ("--title", "--remind"):
                value, rest = take_words(rest, 1)
                if not value:
                    raise CommandError(f"{w} needs a value")
                if w == "--title":
                    title = value[0]
                else:
                    try:
                        remind_after = int(parse_duration_seconds(value[0]))
                    except ValueError as e:
                        raise CommandError(str(e)) from None
                    require_ack = True
            elif w.startswith("--"):
                raise CommandError(f"unknown option {w}")
            else:
                audience_word = w
                break
        if audience_word is None:
            raise CommandError("give the audience and the text")
        if not rest.strip():
            raise CommandError("give the text of the announcement after the audience")
        audience = parse_audience(audience_word)
        if title is None:
            title, body = split_title(rest)
        else:
            body = rest.strip()
        staff = await self.svc.directory.all()
        sel = select_audience(audience, staff)
        if not sel.targets:
            return [ctx.reply(f"Nobody matches **{audience.describe()}**: nothing to send.",
                              reason="empty audience")]
        spec = AnnouncementSpec(
            title=title, body=body, audience=audience, mode=mode, require_ack=require_ack,
            reminder_after_ms=remind_after * 1000 if remind_after else
            (24 * 3600 * 1000 if escalate else None),
            reminder_count=1 if remind_after else 0, escalate=escalate,
            timezone=self.cfg.timezone)
        draft_id = "adhoc-" + hashlib.sha256(
            str(ctx.event.get("event_id")).encode()).hexdigest()[:8]
        await self.storage.put(self._draft_key(ctx), {
            "id": draft_id, "spec": spec.to_json(), "created_at": ctx.now_ms})
        per = count_by(sel, staff)
        breakdown = ", ".join(f"{k} {v}" for k, v in per.items())
        how = "a DM to each person" if mode == "dm" else "the audience's announcement room"
        ack = "acknowledgement required" if require_ack else "no acknowledgement"
        if remind_after:
            ack += f", a reminder after {remind_after // 60} min"
        if escalate:
            ack += ", then the manager"
        rooms = f" and {len(sel.rooms)} room(s)" if sel.rooms else ""
        preview = compose(spec, date=date_text(ctx.now_ms, self.cfg.timezone))
        quoted = "\n".join("> " + line for line in preview.split("\n"))
        minutes = control.confirm_within // 60 or 1
        md = (f"**Preview** (not sent yet) — `{draft_id}`\n\n"
              f"To **{len(sel.users)} people**{rooms} ({audience.describe()}"
              f"{': ' + breakdown if breakdown else ''}) · {how} · {ack}\n\n{quoted}\n\n"
              f"Reply `!confirm` within {minutes} minute(s) to send it, or `!cancel`.")
        return [ctx.reply(md, reason=f"preview for {len(sel.users)} people")]

    def _draft_key(self, ctx: CommandContext) -> str:
        return f"draft:{ctx.room_id}:{ctx.sender}"

    async def _cmd_confirm(self, ctx: CommandContext) -> Sequence[Action]:
        control = self.cfg.control
        assert control is not None
        draft = await self.storage.get(self._draft_key(ctx))
        why = decide_confirm(draft, ctx.now_ms, control.confirm_within * 1000)
        if why is not None:
            return [ctx.reply(f"Not sent: {why}.", reason=why)]
        assert draft is not None
        spec = AnnouncementSpec.from_json(draft["spec"])
        staff = await self.svc.directory.all()
        n = len(select_audience(spec.audience, staff).users)
        return [
            StartAnnouncement(room=ctx.room_id, announcement_id=draft["id"],
                              occurrence_id="1", spec=draft["spec"], created_by=ctx.sender,
                              scheduled_at=ctx.now_ms, draft=self._draft_key(ctx),
                              actor=self.user_id, rule_id="announcements.adhoc",
                              reason=f"confirmed by {ctx.sender}"),
            ctx.reply(f"📣 Sending **{spec.title}** to {n} people (`{draft['id']}`). "
                      "I will post a summary here.", reason="confirmed"),
        ]

    async def _apply_start(self, action: StartAnnouncement, key: str, *, resend: bool) -> Outcome:
        spec = AnnouncementSpec.from_json(action.spec)
        created, sel = await self.create_occurrence(
            action.announcement_id, action.occurrence_id, "adhoc", spec, action.scheduled_at,
            action.created_by)
        if action.draft is not None:
            await self.storage.delete(action.draft)
        return Outcome("applied", f"{len(sel.targets)} target(s)" if created
                       else "already created")

    async def _cmd_cancel(self, ctx: CommandContext) -> Sequence[Action]:
        existed = await self.storage.delete(self._draft_key(ctx))
        return [ctx.reply("Preview dropped." if existed else "There was no preview.",
                          reason="cancel")]

    async def _cmd_report(self, ctx: CommandContext) -> Sequence[Action]:
        args = ctx.command.args()
        if len(args) != 1:
            raise CommandError("give one announcement ID")
        occs = await self.svc.announcements.announcement_occurrences(announcement_id=args[0])
        if not occs:
            raise CommandError(f"no announcement `{args[0]}` has been sent")
        occ = occs[-1]
        rows = await self.svc.announcements.announcement_deliveries(occ.announcement_id,
                                                            occ.occurrence_id)
        spec = AnnouncementSpec.from_json(occ.spec)
        md = self.fanout.summary_markdown(occ, spec, rows, f"status: {occ.status}")
        return [ctx.reply(md, reason="report")]


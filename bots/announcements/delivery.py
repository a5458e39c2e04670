"""Fan-out and follow-ups: the I/O side of announcements.

Delivery of one occurrence works off its pending targets (the store says who is left),
with bounded concurrency, and records each target as sent in the same commit as its audit
record. Every send carries a transaction id derived from (announcement, occurrence, room),
so a send repeated after a crash (sent, but not yet recorded) is deduplicated by the
homeserver while it runs on; across a restart of the homeserver too: a pass that resumes an
occurrence an earlier pass began (its status is no longer ``pending``) reads each target's
room back before sending (``resend``) and records the event it finds as the delivery's.
Follow-ups (reminders, escalations) have no such mark and are always read back. DM rooms
and announcement rooms are created with an alias as the once-only guard. One process
delivers an occurrence at a time (a store lease), so ``enclave run`` on two hosts, or a
restart while the old process still runs, never send twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from bridge.config.bots import AnnouncementsConfig
from bridge.kernel.membership import memberships
from bridge.kernel.relations import reply_relation
from bridge.kernel.timestamps import local_datetime
from bridge.matrix.client import HomeserverUnavailable, MatrixRequestError
from bridge.matrix.executor import txn_id_for
from bridge.model.people import StaffRecord
from bridge.store import AuditRecord
from bridge.store.lease import LeaseLost, held_lease, new_lease_owner

from ..markdown import message_content
from ..scheduling import format_ms
from ..sending import SendRefused
from ..services import BotServices
from ..store import AnnouncementMessage, AnnouncementOccurrence
from .acks import Escalate, Remind, decide_reminders, summarise
from .spec import MARKER, AnnouncementSpec, compose


class FanOutBot(Protocol):
    """What a fan-out uses of its bot (``AnnouncementBot``; not imported: the bot imports
    this module)."""

    svc: BotServices
    cfg: AnnouncementsConfig
    user_id: str
    rooms: set[str]

    def audit(self, kind: str, outcome: str, *, user_id: str | None = None,
              room_id: str | None = None, rule_id: str | None = None,
              reason: str | None = None, detail: str | None = None) -> AuditRecord: ...

    def is_ours(self, user_id: str) -> bool: ...

    async def ensure_dm(self, user_id: str) -> str: ...

    async def ensure_announcement_room(self, spec: AnnouncementSpec) -> str: ...

    async def post_summary(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                           stage: str) -> None: ...

log = logging.getLogger(__name__)

LEASE_TTL_MS = 60_000
# a target whose sends keep failing for a transient reason is given up after this many
MAX_ATTEMPTS = 5
# 4xx answers that retrying will not fix
PERMANENT = (400, 403, 404)


class Unavailable(Exception):
    """The homeserver is away: stop this pass, the next one resumes."""


class _LeaseBusy(Exception):
    """Another process holds the occurrence's lease."""


def _reminders_text(row: Any) -> str:
    """The reminders the person got, as the homeserver accepted them."""
    text = f"{row.reminders} reminder(s)"
    if row.reminder_failures:
        text += f", {row.reminder_failures} more could not be sent"
    return text


def date_text(ms: int, timezone: str) -> str:
    """{date} in messages: 'Tuesday 1 December 2026'."""
    t = local_datetime(ms, timezone)
    return f"{t:%A} {t.day} {t:%B %Y}"


class FanOut:
    """Delivers occurrences and follows them up (reminders, escalation, closing)."""

    def __init__(self, bot: FanOutBot):
        self.bot = bot
        self.svc = bot.svc
        self.owner = new_lease_owner()

    # -- delivery ------------------------------------------------------------------------
    async def deliver(self, occ: AnnouncementOccurrence) -> bool:
        """One pass over the occurrence's pending targets; True when none is left.

        The pass holds the occurrence's lease (the shared helper renews it); if another
        process takes it meanwhile, this pass is stopped and leaves the rest to that one."""
        leases, now = self.svc.leases, self.svc.clock_ms
        lease = f"announcement:{occ.announcement_id}/{occ.occurrence_id}"
        try:
            async with held_lease(leases, lease, self.owner, now, LEASE_TTL_MS, _LeaseBusy):
                return await self._deliver_held(occ, lease)
        except _LeaseBusy:
            log.info("%s: another process is delivering it", lease)
            return False
        except LeaseLost as e:
            log.error("%s: %s; this pass stopped", lease, e)
            return False

    async def _deliver_held(self, occ: AnnouncementOccurrence, lease: str) -> bool:
        store, now = self.svc.announcements, self.svc.clock_ms
        # read under the lease: a process that held it before may have begun meanwhile
        occ = await store.announcement_occurrence(occ.announcement_id,
                                                  occ.occurrence_id) or occ
        # set before the first send: a later pass knows an earlier one may have sent to any
        # target it has not recorded (a crash between the send and its record)
        resumed = occ.status != "pending"
        if not resumed:
            await store.announcement_set_status(occ.announcement_id, occ.occurrence_id,
                                                "delivering", now())
        spec = AnnouncementSpec.from_json(occ.spec)
        try:
            await self._pass(occ, spec, resumed)
        except Unavailable as e:
            log.warning("%s: homeserver unavailable (%s); resuming later", lease, e)
            return False
        left = await store.announcement_deliveries(
            occ.announcement_id, occ.occurrence_id, status="pending")
        if left:
            return False
        await store.announcement_set_status(occ.announcement_id, occ.occurrence_id,
                                            "delivered", now())
        done = await store.announcement_occurrence(occ.announcement_id, occ.occurrence_id)
        await self.bot.post_summary(done or occ, spec, "delivered")
        return True

    async def _pass(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                    resumed: bool) -> None:
        store = self.svc.announcements
        rows = await store.announcement_deliveries(occ.announcement_id, occ.occurrence_id)
        pending = [r for r in rows if r.status == "pending"]
        if not pending:
            return
        staff = await self.svc.directory.by_id()
        date = date_text(occ.scheduled_at, spec.timezone)
        people = [r.target for r in pending if r.target.startswith("@")]
        rooms = [r.target for r in pending if not r.target.startswith("@")]
        attempts = {r.target: r.attempts for r in pending}
        # may an earlier attempt have reached the homeserver? (read back before sending)
        resend = {r.target: resumed or r.attempts > 0 for r in pending}
        sem = asyncio.Semaphore(self.bot.cfg.max_concurrency)
        if people and spec.mode == "room":
            everyone = [r.target for r in rows if r.target.startswith("@")
                        and r.status != "failed"]
            await self._room_mode(occ, spec, people, everyone, attempts, date, sem,
                                  resend=any(resend[p] for p in people))
        elif people:
            results = await asyncio.gather(*[
                self._dm_one(occ, spec, p, staff.get(p), attempts[p], date, sem,
                             resend=resend[p])
                for p in people], return_exceptions=True)
            self._raise_first(results)
        if rooms:
            async def room_target(room: str) -> None:
                async with sem:
                    await self._room_target(occ, spec, room, attempts[room], date,
                                            resend=resend[room])

            # explicit rooms are independent targets: as many in flight as DMs
            self._raise_first(await asyncio.gather(
                *[room_target(room) for room in rooms], return_exceptions=True))

    @staticmethod
    def _raise_first(results: Sequence[Any]) -> None:
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _content(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                 markdown: str) -> dict[str, Any]:
        return message_content(markdown, extra={MARKER: {
            "id": occ.announcement_id, "occurrence": occ.occurrence_id,
            "require_ack": spec.require_ack}})

    def _txn(self, *parts: str) -> str:
        return txn_id_for(self.svc.installation_key("/".join(parts)))

    async def _failed(self, occ: AnnouncementOccurrence, targets: Sequence[str],
                      attempts: int, error: Exception, room: str | None) -> None:
        """Record a failed send; a permanent one (or too many) is final and audited."""
        if isinstance(error, SendRefused):
            detail, final = error.reason, True
        elif isinstance(error, MatrixRequestError):
            detail = f"{error.status} {error.errcode}: {error.error}"
            final = error.status in PERMANENT or attempts + 1 >= MAX_ATTEMPTS
        else:
            # unexpected: retried at the next pass, given up after MAX_ATTEMPTS
            log.error("announcement %s/%s: unexpected %r", occ.announcement_id,
                      occ.occurrence_id, error)
            detail, final = f"{type(error).__name__}: {error}", attempts + 1 >= MAX_ATTEMPTS
        audit = [self.bot.audit(
            "announcement_send", "failed" if final else "retry", user_id=t, room_id=room,
            rule_id=f"announcements.{occ.announcement_id}",
            reason=f"occurrence {occ.occurrence_id}", detail=detail) for t in targets]
        await self.svc.announcements.announcement_mark_failed(
            occ.announcement_id, occ.occurrence_id, targets, detail=detail, final=final,
            audit=audit if final else ())
        self.svc.metrics.actions.labels(kind="announcement_send",
                                        outcome="failed" if final else "retry").inc(
            len(targets))
        log.warning("announcement %s/%s to %s: %s (%s)", occ.announcement_id,
                    occ.occurrence_id, ", ".join(targets[:3]), detail,
                    "given up" if final else "will retry")

    async def _dm_one(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec, user: str,
                      staff: StaffRecord | None, attempts: int, date: str,
                      sem: asyncio.Semaphore, *, resend: bool) -> None:
        bot, store = self.bot, self.svc.announcements
        async with sem:
            room: str | None = None
            try:
                room = await bot.ensure_dm(user)
                content = self._content(occ, spec, compose(spec, date=date, staff=staff,
                                                           user_id=user))
                eid = await self.svc.sender.send(
                    room, content, txn_id=self._txn("announcement", occ.announcement_id,
                                                    occ.occurrence_id, room),
                    sender=bot.user_id, resend=resend)
            except HomeserverUnavailable as e:
                await self._failed(occ, [user], attempts, e, room)
                raise Unavailable(str(e)) from e
            except Exception as e:  # a 4xx, a refusal (encryption), anything unexpected
                await self._failed(occ, [user], attempts, e, room)
                return
            now = self.svc.clock_ms()
            await store.announcement_mark_sent(
                occ.announcement_id, occ.occurrence_id, [user], room_id=room, event_id=eid,
                now_ms=now,
                message=AnnouncementMessage(eid, room, occ.announcement_id, occ.occurrence_id,
                                            "announcement", user, now),
                audit=[bot.audit("announcement_send", "applied", user_id=user, room_id=room,
                                 rule_id=f"announcements.{occ.announcement_id}",
                                 reason=f"occurrence {occ.occurrence_id} (dm)",
                                 detail=eid)])
            self.svc.metrics.actions.labels(kind="announcement_send", outcome="applied").inc()

    async def _room_mode(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                         pending: Sequence[str], everyone: Sequence[str],
                         attempts: dict[str, int], date: str,
                         sem: asyncio.Semaphore, *, resend: bool) -> None:
        """Bring the audience room's members in step with the audience, then post once."""
        bot, c = self.bot, self.svc.client
        try:
            room = await bot.ensure_announcement_room(spec)
            members = await self._members(room)
        except HomeserverUnavailable as e:
            raise Unavailable(str(e)) from e
        except MatrixRequestError as e:
            for p in pending:
                await self._failed(occ, [p], attempts[p], e, None)
            return
        desired = set(everyone)
        present = {u for u, m in members.items() if m in ("join", "invite")}
        unable: set[str] = set()

        async def add(user: str) -> None:
            async with sem:
                try:
                    if members.get(user) != "invite":
                        try:
                            await c.invite(room, user, user_id=bot.user_id)
                        except MatrixRequestError as e:
                            if e.status != 403 or "already" not in e.error.lower():
                                raise
                    await c.join(room, user_id=user)
                except MatrixRequestError as e:
                    unable.add(user)
                    if user in pending:
                        await self._failed(occ, [user], attempts[user], e, room)

        async def remove(user: str) -> None:
            async with sem:
                try:
                    await c.kick(room, user, user_id=bot.user_id,
                                 reason="not in this announcement's audience any more")
                except MatrixRequestError as e:
                    log.warning("could not remove %s from %s: %s", user, room, e)

        joined = {u for u, m in members.items() if m == "join"}
        try:
            results = await asyncio.gather(
                *[add(u) for u in sorted(desired - joined)],
                *[remove(u) for u in sorted(present - desired - {bot.user_id})
                  if not bot.is_ours(u)],
                return_exceptions=True)
            self._raise_first(results)
        except HomeserverUnavailable as e:
            raise Unavailable(str(e)) from e
        reach = [p for p in pending if p not in unable]
        if not reach:
            return
        try:
            content = self._content(occ, spec, compose(spec, date=date))
            eid = await self.svc.sender.send(
                room, content, txn_id=self._txn("announcement", occ.announcement_id,
                                                occ.occurrence_id, room),
                sender=bot.user_id, resend=resend)
        except HomeserverUnavailable as e:
            raise Unavailable(str(e)) from e
        except Exception as e:
            for p in reach:
                await self._failed(occ, [p], attempts[p], e, room)
            return
        now = self.svc.clock_ms()
        await self.svc.announcements.announcement_mark_sent(
            occ.announcement_id, occ.occurrence_id, reach, room_id=room, event_id=eid,
            now_ms=now,
            message=AnnouncementMessage(eid, room, occ.announcement_id, occ.occurrence_id,
                                        "announcement", None, now),
            audit=[bot.audit("announcement_send", "applied", room_id=room,
                             rule_id=f"announcements.{occ.announcement_id}",
                             reason=f"occurrence {occ.occurrence_id} (announcement room, "
                                    f"{len(reach)} recipient(s))", detail=eid)])
        self.svc.metrics.actions.labels(kind="announcement_send", outcome="applied").inc()

    async def _members(self, room: str) -> dict[str, str]:
        return memberships(await self.svc.client.room_members(room, user_id=self.bot.user_id))

    async def _room_target(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                           target: str, attempts: int, date: str, *, resend: bool) -> None:
        """An explicit room of the audience: post there; its members can acknowledge."""
        bot, c, store = self.bot, self.svc.client, self.svc.announcements
        room: str | None = None
        try:
            room = target
            if target.startswith("#"):
                found = await c.resolve_alias(target)
                if found is None:
                    raise MatrixRequestError(404, "M_NOT_FOUND", f"no room has alias {target}")
                room = found
            if room not in bot.rooms:
                await c.join(room, user_id=bot.user_id)
                bot.rooms.add(room)
            content = self._content(occ, spec, compose(spec, date=date))
            eid = await self.svc.sender.send(
                room, content, txn_id=self._txn("announcement", occ.announcement_id,
                                                occ.occurrence_id, room),
                sender=bot.user_id, resend=resend)
            members = await self._members(room)
        except HomeserverUnavailable as e:
            raise Unavailable(str(e)) from e
        except Exception as e:
            await self._failed(occ, [target], attempts, e, room)
            return
        now = self.svc.clock_ms()
        local = [u for u, m in members.items() if m == "join" and not bot.is_ours(u)
                 and u.endswith(f":{self.svc.server_name}")]
        await store.announcement_mark_sent(
            occ.announcement_id, occ.occurrence_id, [target], room_id=room, event_id=eid,
            now_ms=now,
            message=AnnouncementMessage(eid, room, occ.announcement_id, occ.occurrence_id,
                                        "announcement", target, now),
            audit=[bot.audit("announcement_send", "applied", room_id=room,
                             rule_id=f"announcements.{occ.announcement_id}",
                             reason=f"occurrence {occ.occurrence_id} (room {target}, "
                                    f"{len(local)} member(s))", detail=eid)])
        await store.announcement_add_targets(
            occ.announcement_id, occ.occurrence_id, local, status="sent", room_id=room,
            event_id=eid, now_ms=now)

    # -- follow-ups ----------------------------------------------------------------------
    async def follow_up(self, occ: AnnouncementOccurrence, *, again: bool = True) -> int | None:
        """Send due reminders and escalations, close when finished; next due time."""
        store, now = self.svc.announcements, self.svc.clock_ms()
        spec = AnnouncementSpec.from_json(occ.spec)
        rows = await store.announcement_deliveries(occ.announcement_id, occ.occurrence_id)
        staff = await self.svc.directory.by_id()
        fu = decide_reminders(spec, rows, now, delivered_at=occ.delivered_at, staff=staff)
        by_target = {r.target: r for r in rows}
        sem = asyncio.Semaphore(self.bot.cfg.max_concurrency)

        async def one(step: Remind | Escalate) -> None:
            async with sem:
                if isinstance(step, Remind):
                    await self._remind(occ, spec, step, by_target[step.user_id])
                else:
                    await self._escalate(occ, spec, step, by_target[step.user_id], staff)

        results = await asyncio.gather(*[one(s) for s in (*fu.reminders, *fu.escalations)],
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, HomeserverUnavailable):
                log.warning("follow-ups of %s/%s: homeserver unavailable; later",
                            occ.announcement_id, occ.occurrence_id)
                return now + 30_000
            if isinstance(r, BaseException):
                log.error("follow-up of %s/%s failed: %r", occ.announcement_id,
                          occ.occurrence_id, r)
        if again and (fu.reminders or fu.escalations):
            # decide once more on what is recorded now: the last escalation closes it
            return await self.follow_up(occ, again=False)
        if fu.close:
            await store.announcement_set_status(occ.announcement_id, occ.occurrence_id,
                                                "closed", now)
            log.info("announcement %s/%s closed: %s", occ.announcement_id, occ.occurrence_id,
                     fu.close_reason)
            if spec.follows_up or spec.expires_after_ms:
                # the acknowledgements after the reminders (or at expiry)
                await self.bot.post_summary(occ, spec, f"closed ({fu.close_reason})")
            return None
        return fu.next_due_ms

    async def _send_personal(self, user: str, markdown: str, key: tuple[str, ...],
                             reply_to: tuple[str | None, str | None] = (None, None),
                             ) -> tuple[str, str]:
        """A message in the person's DM; ``reply_to`` (room, event): a reply to that event
        if it is in the same room."""
        room = await self.bot.ensure_dm(user)
        extra: dict[str, Any] = {}
        if reply_to[1] is not None and reply_to[0] == room:
            extra["m.relates_to"] = reply_relation(reply_to[1])
        # recorded only after the send, with nothing marking it begun: always read back
        # (a DM, the bot's own: one short read)
        eid = await self.svc.sender.send(room, message_content(markdown, extra=extra),
                                         txn_id=self._txn(*key, room), sender=self.bot.user_id,
                                         resend=True)
        return room, eid

    async def _remind(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                      step: Remind, row: Any) -> None:
        when = format_ms(row.sent_at, spec.timezone) if row.sent_at else "earlier"
        md = (f"⏰ Reminder {step.number} of {spec.reminder_count}: please acknowledge "
              f"**{spec.title}** (sent {when}). React with ✅ here or reply `!ack`.")
        try:
            room, eid = await self._send_personal(
                step.user_id, md, ("reminder", occ.announcement_id, occ.occurrence_id,
                                   step.user_id, str(step.number)), (row.room_id, row.event_id))
        except (MatrixRequestError, SendRefused) as e:
            detail = e.reason if isinstance(e, SendRefused) else str(e)
            # not counted as sent: the report shows it failed, and why
            await self.svc.announcements.announcement_mark_reminded(
                occ.announcement_id, occ.occurrence_id, step.user_id, count=step.number,
                now_ms=self.svc.clock_ms(), message=None, error=detail,
                audit=self.bot.audit("announcement_reminder", "failed", user_id=step.user_id,
                                     rule_id=step.rule_id, reason=step.reason, detail=detail))
            return
        now = self.svc.clock_ms()
        await self.svc.announcements.announcement_mark_reminded(
            occ.announcement_id, occ.occurrence_id, step.user_id, count=step.number,
            now_ms=now,
            message=AnnouncementMessage(eid, room, occ.announcement_id, occ.occurrence_id,
                                        "reminder", step.user_id, now),
            audit=self.bot.audit("announcement_reminder", "applied", user_id=step.user_id,
                                 room_id=room, rule_id=step.rule_id,
                                 reason=f"{step.reason} (reminder {step.number})", detail=eid))

    async def _escalate(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                        step: Escalate, row: Any, staff: dict[str, StaffRecord]) -> None:
        store, bot = self.svc.announcements, self.bot
        if step.manager is None:
            await store.announcement_mark_escalated(
                occ.announcement_id, occ.occurrence_id, step.user_id, manager=None,
                now_ms=self.svc.clock_ms(), message=None,
                audit=bot.audit("announcement_escalation", "skipped", user_id=step.user_id,
                                rule_id=step.rule_id, reason=step.reason,
                                detail="no active manager in the directory"))
            return
        rec = staff.get(step.user_id)
        who = f"{rec.display_name} ({step.user_id})" if rec else step.user_id
        when = format_ms(row.sent_at, spec.timezone) if row.sent_at else "earlier"
        md = (f"👀 {who} has not acknowledged **{spec.title}** (sent {when}, "
              f"{_reminders_text(row)}). Could you follow up with them?")
        try:
            room, eid = await self._send_personal(
                step.manager, md, ("escalation", occ.announcement_id, occ.occurrence_id,
                                   step.user_id))
        except (MatrixRequestError, SendRefused) as e:
            detail = e.reason if isinstance(e, SendRefused) else str(e)
            await store.announcement_mark_escalated(
                occ.announcement_id, occ.occurrence_id, step.user_id, manager=step.manager,
                now_ms=self.svc.clock_ms(), message=None, error=detail,
                audit=bot.audit("announcement_escalation", "failed", user_id=step.user_id,
                                rule_id=step.rule_id, reason=step.reason, detail=detail))
            return
        now = self.svc.clock_ms()
        await store.announcement_mark_escalated(
            occ.announcement_id, occ.occurrence_id, step.user_id, manager=step.manager,
            now_ms=now,
            message=AnnouncementMessage(eid, room, occ.announcement_id, occ.occurrence_id,
                                        "escalation", step.manager, now),
            audit=bot.audit("announcement_escalation", "applied", user_id=step.user_id,
                            room_id=room, rule_id=step.rule_id,
                            reason=f"{step.reason}; told {step.manager}", detail=eid))

    def summary_markdown(self, occ: AnnouncementOccurrence, spec: AnnouncementSpec,
                         rows: Sequence[Any], stage: str) -> str:
        s = summarise(rows)
        failed = [r for r in rows if r.status == "failed"]
        lines = [f"📊 **{spec.title}** — {stage}",
                 f"`{occ.announcement_id}` / `{occ.occurrence_id}`: {s.line(spec.require_ack)}"]
        for r in failed[:5]:
            lines.append(f"- failed: {r.target}: {r.detail}")
        if len(failed) > 5:
            lines.append(f"- … {len(failed) - 5} more failed")
        lines.append(f"Full report: `enclave announcements report {occ.announcement_id} "
                     f"--occurrence {occ.occurrence_id}` or `!report {occ.announcement_id}`")
        return "\n".join(lines)

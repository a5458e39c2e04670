"""The archive bot (:class:`ArchiveBot`): Enclave's archive device as a member of every
room whose class says ``capture: required``.

* **Membership.** When such a room appears (its encryption, class, power levels or
  Enclave's bot joining), the periodic sweep finds one, or someone removes the archive user,
  :func:`~.decisions.decide_capture_membership` says how it gets back in: invited by
  Enclave's own bot (never by a member on Enclave's behalf) and joined. A removal is
  audited (the rejoin names who removed it); a ban, or a room where Enclave has no power
  to invite, is a ``not_done`` record with the fix.
* **Notice.** Once joined, the room shows it is archived
  (:func:`~.decisions.decide_capture_notice`: one notice, or a topic line). The notice is
  marked shown only after it is in the room, and sent with a fixed key that is read back
  first (:meth:`ArchiveBot.send_notice`): a crash neither loses nor doubles it.
* **Capture.** Every ``m.room.encrypted`` event of a room it is in is decrypted by its
  E2EE device (:class:`~.device.ArchiveDevice`) and the plaintext archived beside the
  ciphertext through retention's public seam (``RetentionService.capture_plaintext``). A
  message it cannot decrypt within ``key_wait_seconds`` is a capture gap
  (:class:`~.store.CaptureGapStore`, with the reason): never skipped in silence. It asks
  for the key, and tries again whenever a key arrives and on every sweep; a recovered gap
  has its plaintext archived then (marked ``recovered``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

from bridge.config.bots import ArchiveCaptureConfig, DmConfig
from bridge.matrix.client import HomeserverUnavailable, MatrixRequestError
from bridge.policy.actions import Action
from bridge.policy.separation.outcomes import NotDone
from bridge.policy.separation.rules import CLASS_STATE_TYPE
from bridge.store import AuditRecord

from ..bot import Bot
from ..services import BotServices
from .decisions import (
    RULE_JOIN,
    RULE_REJOIN,
    TOPIC_TYPE,
    capture_required,
    decide_capture_membership,
    decide_capture_notice,
    gap_reason,
)
from .device import ArchiveDevice
from .store import CaptureGap, CaptureGapStore

log = logging.getLogger(__name__)

CapturePlaintext = Callable[..., Awaitable[bool]]
# events after which a room may newly need (or be able to get) the archive user
_TRIGGERS = frozenset({"m.room.encryption", CLASS_STATE_TYPE, "m.room.power_levels",
                       "m.room.create"})


class ArchiveBot(Bot):
    """The archive user and its device; an inbox handler like every bot."""

    component: ClassVar[str] = "archive"

    def __init__(self, svc: BotServices, cfg: ArchiveCaptureConfig, *, device: ArchiveDevice,
                 gaps: CaptureGapStore, capture_plaintext: CapturePlaintext,
                 separation: Any, room_classes: Mapping[str, Any],
                 list_rooms: Callable[[], Awaitable[list[str]]],
                 archiving: Callable[[], bool] = lambda: True):
        super().__init__(svc, cfg.bot, DmConfig())
        self.cfg = cfg
        self.device = device
        self.gaps = gaps
        self.capture_plaintext = capture_plaintext
        # retention.enabled: false archives nothing, plaintext included: a gap then stays
        # open (its plaintext is not archived), never "recovered"
        self.archiving = archiving
        self.separation = separation
        self.room_classes = dict(room_classes)
        self.list_rooms = list_rooms
        self._wake = asyncio.Event()
        self._required: dict[str, bool] = {}  # room -> its class requires capture
        self.sweeps = 0
        self.captured = 0
        self.recovered = 0

    @property
    def enclave_users(self) -> tuple[str, ...]:
        return (self.svc.main_bot_user_id, self.svc.admin_user_id)

    # -- the inbox handler ---------------------------------------------------------------------
    async def handle(self, event: dict[str, Any]) -> list[Action]:
        etype = event.get("type")
        room = event.get("room_id")
        sender = event.get("sender")
        if not isinstance(room, str) or not isinstance(sender, str):
            return []
        if etype == "m.room.encrypted":
            await self._wait_ready()
            if room in self.rooms:
                await self.capture(room, event)
            elif sender != self.user_id and await self.requires_capture(room):
                # the archive user is not (yet, or no longer) in a room that requires it:
                # the message is a gap with that reason, and its key is asked for
                await self._gap(room, event, ready=self.device.ready, absent=True)
            return []
        if etype == CLASS_STATE_TYPE:
            self._required.pop(room, None)
        if etype == TOPIC_TYPE and event.get("state_key") == "" and room in self.rooms \
                and sender not in self.enclave_users:
            # a topic change that dropped the archive line: it is put back (topic mode)
            return await self.notice_actions(room)
        if etype == "m.room.member" and event.get("state_key") == self.user_id:
            return await self._own_membership(event, room, sender)
        if etype == "m.room.member" and event.get("state_key") == self.svc.main_bot_user_id \
                and (event.get("content") or {}).get("membership") == "join":
            # Enclave's bot is in: it can now invite the archive user
            await self._wait_ready()
            if room not in self.rooms:
                return await self.membership_actions(room, report=False)
            return []
        if etype in _TRIGGERS and "state_key" in event:
            await self._wait_ready()
            if room not in self.rooms:
                # a room being set up: what cannot be done yet is reported by the sweep
                return await self.membership_actions(room, report=False)
            return []
        return await super().handle(event)

    async def _own_membership(self, event: dict[str, Any], room: str,
                              sender: str) -> list[Action]:
        membership = (event.get("content") or {}).get("membership")
        await self._wait_ready()
        if membership == "join":
            self.rooms.add(room)
            await self.storage.delete(f"notdone:{room}")
            ts = event.get("origin_server_ts")
            if isinstance(ts, int) and await self.storage.get(f"joined:{room}") is None:
                await self.storage.put(f"joined:{room}", ts)
            return await self.notice_actions(room)
        if membership in ("leave", "ban"):
            self.rooms.discard(room)
            removed_by = sender if sender != self.user_id else None
            if removed_by is not None:
                await self.svc.audit.add_audit(self.audit(
                    "capture_removed", "observed", room_id=room, user_id=removed_by,
                    rule_id=RULE_REJOIN,
                    reason=f"the archive user was {'banned' if membership == 'ban' else 'removed'}"
                           f" by {removed_by}"))
            return await self.membership_actions(room, removed_by=removed_by,
                                                 membership=membership)
        if membership == "invite" and room not in self.rooms:
            return await self.on_invite(event, room, sender)
        return []

    async def room_class(self, room: str) -> tuple[Any, Any]:
        """(the room's facts, its class config or None)."""
        facts = await self.separation.room_facts(room)
        policy = await self.separation.policy()
        rc = policy.classify_room(facts)
        cls = self.room_classes.get(rc.id)
        self._required[room] = capture_required(cls)
        return facts, cls

    async def requires_capture(self, room: str) -> bool:
        """Whether the room's class requires capture (remembered per room; a class change
        forgets it)."""
        known = self._required.get(room)
        if known is None:
            _, cls = await self.room_class(room)
            known = capture_required(cls)
        return known

    async def membership_actions(self, room: str, *, removed_by: str | None = None,
                                 membership: str | None = None,
                                 report: bool = True) -> list[Action]:
        """What keeps the archive user in ``room`` (nothing unless its class requires
        capture); ``report``: include the ``not_done`` record where it cannot."""
        facts, rc = await self.room_class(room)
        if not facts.known:
            return []
        members = dict(facts.members)
        if membership is not None:
            members[self.user_id] = membership
        d = decide_capture_membership(
            room, required=capture_required(rc), archive_user=self.user_id, members=members,
            power=facts.power_view, enclave_users=self.enclave_users, removed_by=removed_by)
        if d.problem:
            if not report:
                return []
            log.warning("capture: %s", d.problem)
        return list(d.actions)

    async def notice_actions(self, room: str) -> list[Action]:
        """The room shows it is archived (once)."""
        facts, rc = await self.room_class(room)
        if not capture_required(rc):
            return []
        mode = getattr(rc, "capture_notice", "notice")
        topic: str | None = None
        if mode == "topic":
            state = await self.svc.client.room_state(room, user_id=self.user_id)
            topic = next((str((e.get("content") or {}).get("topic") or "") for e in state
                          if e.get("type") == "m.room.topic" and e.get("state_key") == ""),
                         None)
        members = {**dict(facts.members), self.user_id: "join"}
        shown = await self.storage.get(f"notice:{room}") is not None
        d = decide_capture_notice(
            room, mode=mode, already_shown=shown, topic=topic, topic_line=self.cfg.topic_line,
            notice=self.cfg.notice, archive_user=self.user_id, members=members,
            power=facts.power_view, enclave_users=self.enclave_users)
        if d.notice is not None:
            await self.send_notice(room, d.notice, rule_id=d.rule_id, reason=d.reason)
        return list(d.actions)

    async def send_notice(self, room: str, text: str, *, rule_id: str, reason: str) -> None:
        """Send the room's one notice now and mark it shown only once it is in the room.

        The notice has a key of its own (``capture-notice:<room>``, the same in every run)
        and is read back before it is sent (:class:`~bridge.matrix.readback.ReadBack`): a
        crash after the send and before the mark finds the notice already there instead of
        sending a second one, and a crash before the send leaves no mark, so it is sent when
        the event is handled again. Not sent (the homeserver away, a refusal): raises, so the
        inbox retries the event (and parks it, audited, if it keeps failing)."""
        msg = self.reply(room, text, rule_id=rule_id, reason=reason)
        outcome = await self.svc.executor.run_direct(msg, notice_key(room),
                                                     source="bots.archive")
        if outcome.status != "applied":
            raise NoticeNotSent(f"the archive notice of {room} was not sent: {outcome.detail}")
        await self.storage.put(f"notice:{room}", self.svc.clock_ms())

    # -- capture -------------------------------------------------------------------------------
    async def capture(self, room: str, event: dict[str, Any]) -> None:
        """Archive the plaintext of an encrypted event, or record a capture gap."""
        if not await self.device.wait_ready(self.cfg.key_wait_seconds or 0.1):
            await self._gap(room, event, ready=False)
            return
        clear = await self.device.try_decrypt(room, event, within=self.cfg.key_wait_seconds)
        if clear is None:
            await self._gap(room, event, ready=True)
            return
        sid, _ = self.device.session_of(event)
        if await self.capture_plaintext(room, event, clear, by=self.user_id,
                                        device=self.device.device_id, session_id=sid):
            self.captured += 1

    async def _gap(self, room: str, event: dict[str, Any], *, ready: bool,
                   absent: bool = False) -> None:
        sid, sender_key = self.device.session_of(event)
        joined = await self.storage.get(f"joined:{room}")
        ts = event.get("origin_server_ts")
        reason = gap_reason(withheld=self.device.withheld.get(sid or ""),
                            joined_at_ms=int(joined) if joined is not None else None,
                            sent_at_ms=ts if isinstance(ts, int) else None,
                            device_ready=ready, absent=absent)
        event_id = str(event.get("event_id"))
        now = self.svc.clock_ms()
        gap = CaptureGap(event_id=event_id, room_id=room, sender=event.get("sender"),
                         session_id=sid, sender_key=sender_key, reason=reason,
                         event_json=json.dumps({**event, "room_id": room}), first_seen=now)
        opened = await self.gaps.open_gap(gap, audit=self.audit(
            "capture_gap", "failed", room_id=room, user_id=event.get("sender"),
            rule_id="capture.gap", reason=reason,
            detail=f"{event_id} (session {sid}) not decrypted by {self.device.device_id}"))
        if opened:
            log.warning("capture gap in %s: %s from %s (%s)", room, event_id,
                        event.get("sender"), reason)
        await self._request(room, event, event_id, now)

    async def _request(self, room: str, event: dict[str, Any], event_id: str,
                       now: int) -> None:
        try:
            requested = await self.device.request_key(room, event)
        except (HomeserverUnavailable, MatrixRequestError, OSError) as e:
            log.info("capture: key request for %s not sent: %s", event_id, e)
            requested = False
        await self.gaps.attempted(event_id, now, key_requested=requested)

    async def retry_gaps(self, *, request: bool) -> int:
        """Try the open gaps again (those whose key is here; every one with ``request``,
        which also asks for the keys again); returns the gaps recovered."""
        if not self.device.ready or not self.archiving():
            return 0
        recovered = 0
        for gap in await self.gaps.gaps():
            ev = gap.event
            withheld = self.device.withheld.get(gap.session_id or "")
            if withheld and gap.reason != f"withheld: {withheld}":
                # the sender's device said why it keeps the key back: the gap says so
                await self.gaps.set_reason(gap.event_id, f"withheld: {withheld}")
            if not request and not self.device.has_session(gap.room_id, ev):
                continue
            clear = await self.device.try_decrypt(gap.room_id, ev)
            now = self.svc.clock_ms()
            if clear is None:
                if request:
                    await self._request(gap.room_id, ev, gap.event_id, now)
                continue
            # archived now, or already (a crash after the write, before the mark); an
            # archive failure raises and the gap stays open
            await self.capture_plaintext(gap.room_id, ev, clear, by=self.user_id,
                                         device=self.device.device_id,
                                         session_id=gap.session_id, recovered=True)
            if await self.gaps.recovered(gap.event_id, now, audit=self.audit(
                    "capture_gap", "recovered", room_id=gap.room_id, user_id=gap.sender,
                    rule_id="capture.gap",
                    reason=f"key arrived; plaintext archived (was: {gap.reason})",
                    detail=gap.event_id)):
                recovered += 1
                self.recovered += 1
                log.info("capture gap recovered: %s in %s", gap.event_id, gap.room_id)
        return recovered

    # -- the leader's loop -------------------------------------------------------------------
    async def run(self) -> None:
        """Retry gaps when keys arrive; sweep rooms and gaps every ``sweep_minutes``."""
        self.device.on_key = self._wake.set
        period = self.cfg.sweep_minutes * 60
        await self.device.wait_ready(None)
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("capture sweep failed: %s", e)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + period
            while (left := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
                self._wake.clear()
                try:
                    await self.retry_gaps(request=False)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("capture retry failed: %s", e)

    async def sweep(self) -> None:
        """Every room of a capture class has the archive user; open gaps tried again."""
        self.sweeps += 1
        if not any(capture_required(c) for c in self.room_classes.values()):
            return  # no class requires capture: no room to check
        for room in await self.list_rooms():
            if room in self.rooms:
                continue
            try:
                actions = await self.membership_actions(room)
            except (HomeserverUnavailable, MatrixRequestError) as e:
                log.info("capture: room %s not checked: %s", room, e)
                continue
            problems = [a.message for a in actions if isinstance(a, NotDone)]
            if problems:
                # reported once until it changes: a sweep every few minutes would otherwise
                # fill the audit log with the same record
                if await self.storage.get(f"notdone:{room}") == problems[0]:
                    continue
                await self.storage.put(f"notdone:{room}", problems[0])
            for i, action in enumerate(actions):
                await self.svc.executor.run_direct(
                    action, f"capture:{room}:{self.sweeps}:{i}", source="bots.archive")
        await self.retry_gaps(request=True)

    def audit(self, kind: str, outcome: str, *, user_id: str | None = None,
              room_id: str | None = None, rule_id: str | None = None,
              reason: str | None = None, detail: str | None = None) -> AuditRecord:
        return super().audit(kind, outcome, user_id=user_id, room_id=room_id,
                             rule_id=rule_id or RULE_JOIN, reason=reason, detail=detail)


class NoticeNotSent(RuntimeError):
    """The room's archive notice could not be sent (the handler is retried)."""


def notice_key(room: str) -> str:
    """The send key of a room's one archive notice: the same in every run and process, so
    a resend is found by reading the room back (and deduplicated by the homeserver)."""
    return f"capture-notice:{room}"


def open_gap_lines(gaps: Sequence[CaptureGap]) -> list[list[str]]:
    """Rows of ``enclave archive gaps``."""
    return [[g.room_id, g.event_id, g.sender or "", g.session_id or "", g.reason,
             str(g.attempts), "recovered" if g.recovered_at else "open"] for g in gaps]

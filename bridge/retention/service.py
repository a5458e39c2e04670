"""Retention as a running service: the live archive feed, archive-before-purge runs, legal
holds and the period's visibility in rooms.

Decisions (periods, cutoffs, windows, holds, adjustments) come from the pure
:class:`~bridge.policy.retention.RetentionPolicy`; this module reads the homeserver and the
archive, and carries the decisions out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config.retention import RetentionConfig
from ..kernel.durations import parse_duration_ms
from ..kernel.membership import membership_of, memberships
from ..matrix.client import HomeserverUnavailable, MatrixClient, MatrixRequestError, parse_mxc
from ..matrix.executor import Executor
from ..metrics import Metrics
from ..policy.actions import Action, Join, Redact, SendEvent, SetState
from ..policy.power import RoomPower, enclave_actor
from ..policy.retention import Hold, Period, PurgePlan, RetentionPolicy, validate_hold
from ..store.base import AuditRecord, HoldRecord, RetentionRoom
from ..store.domains import (
    ArchiveIndexStore,
    AuditStore,
    DirectoryStore,
    HoldStore,
    KVStore,
    LeaseStore,
    RetentionRoomStore,
)
from ..store.lease import held_lease, new_lease_owner
from .archive import ArchiveWriter

log = logging.getLogger(__name__)

LEASE_NAME = "retention-purge"
RETENTION_STATE = "m.room.retention"
TOPIC_COMPONENT = "retention.topic"
REDACTED_COMPONENT = "retention.redacted"
_COMMAND_RE = re.compile(r"^!retention(?:\s+(\S+))?\s*$")
_ADMIN_PAGE = 1000
_BOUNDARY_TRIES = 50  # archived events tried as a purge boundary before using the time


def hold_from_record(r: HoldRecord) -> Hold:
    return Hold(id=r.id, case_id=r.case_id, reason=r.reason, placed_by=r.placed_by,
                users=frozenset(r.users), rooms=frozenset(r.rooms), since_ms=r.since_ms,
                until_ms=r.until_ms, created_at=r.created_at, released_at=r.released_at,
                released_by=r.released_by)


class HoldCheckFailed(RuntimeError):
    """The users and rooms a hold names could not be checked (the homeserver cannot be
    asked): no hold is placed."""


class UnknownHoldSubjects(ValueError):
    """A hold names users or rooms nobody knows: no hold is placed."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def _hold_audit(rec: HoldRecord, now: int, kind: str, by: str, reason: str,
                source: str) -> AuditRecord:
    return AuditRecord(
        ts=now, source=source, kind=kind, outcome="applied", actor=by,
        rule_id="builtin.legal_hold", reason=reason,
        detail=(f"hold {rec.id} case {rec.case_id}: users={list(rec.users)} "
                f"rooms={list(rec.rooms)} since={rec.since_ms} until={rec.until_ms}"))


def media_refs(event: Mapping[str, Any]) -> list[str]:
    """mxc:// URIs an event's content points at (file, thumbnail; plain or encrypted)."""
    content = event.get("content")
    if not isinstance(content, Mapping):
        return []
    out: list[str] = []

    def take(v: Any) -> None:
        if isinstance(v, str) and v.startswith("mxc://") and v not in out:
            out.append(v)
        elif isinstance(v, Mapping):
            take(v.get("url"))

    take(content.get("url"))
    take(content.get("file"))
    info = content.get("info")
    if isinstance(info, Mapping):
        take(info.get("thumbnail_url"))
        take(info.get("thumbnail_file"))
    return out


@dataclass
class PurgeStep:
    up_to_ts: int
    seconds: float
    status: str


@dataclass
class RoomRun:
    """What a retention run did (or would do) in one room."""

    room_id: str
    plan: PurgePlan | None = None
    read: int = 0  # events read back through the admin API
    archived: int = 0  # of those, missing from the archive and written now
    media_archived: int = 0
    steps: list[PurgeStep] = field(default_factory=list)
    purged: int = 0
    redacted: int = 0  # due events a hold kept from the purge, whose content was redacted
    not_redacted: int = 0  # of those, left: Enclave could not redact them under its name
    not_redacted_reason: str | None = None
    media_deleted: int = 0
    error: str | None = None


@dataclass
class RetentionRun:
    rooms: list[RoomRun] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    visibility: int = 0
    archive_pruned: int = 0  # archive segments deleted by the archive's own retention

    @property
    def failed(self) -> list[RoomRun]:
        return [r for r in self.rooms if r.error is not None]


class RetentionService:
    """Archives every event it is given, purges what is due, and keeps holds."""

    def __init__(self, config: RetentionConfig, *, audit: AuditStore, index: ArchiveIndexStore,
                 holds: HoldStore, retention_rooms: RetentionRoomStore, kv: KVStore,
                 directory_store: DirectoryStore, leases: LeaseStore, client: MatrixClient,
                 executor: Executor, archive: ArchiveWriter, metrics: Metrics,
                 clock_ms: Callable[[], int], server_name: str, bot_user_id: str,
                 admin_user_id: str, service_prefix: str,
                 classify: Callable[[str], Awaitable[str | None]] | None = None,
                 lease_ttl_ms: int = 120_000,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.config = config
        self.policy = RetentionPolicy(config)
        self.audit = audit
        self.index = index
        self.holds = holds
        self.retention_rooms = retention_rooms
        self.kv = kv
        self.directory_store = directory_store
        self.leases = leases
        self.client = client
        self.executor = executor
        self.archive = archive
        self.metrics = metrics
        self.clock_ms = clock_ms
        self.server_name = server_name
        self.bot_user_id = bot_user_id
        self.admin_user_id = admin_user_id
        self.service_prefix = service_prefix
        self.classify = classify
        self._sleep = sleep
        self.lease_owner = new_lease_owner()
        self.lease_ttl_ms = lease_ttl_ms  # the root passes the cluster's lease ttl

    def replace_config(self, config: RetentionConfig) -> None:
        self.config = config
        self.policy = RetentionPolicy(config)

    def is_service(self, user: str | None) -> bool:
        if not user:
            return False
        local = user[1:].partition(":")[0]
        return user.endswith(":" + self.server_name) and (
            user in (self.bot_user_id, self.admin_user_id)
            or local.startswith(self.service_prefix))

    def creation_state(self, room_class: str) -> list[dict[str, Any]]:
        """Initial state a new room of ``room_class`` gets: its ``m.room.retention``."""
        if not self.config.enabled or not self.config.visibility.set_state:
            return []
        period = self.policy.period_for(room_class)
        return [{"type": RETENTION_STATE, "state_key": "",
                 "content": dict(self.policy.retention_state(period))}]

    # -- periods and holds -------------------------------------------------------------
    async def room_class(self, room_id: str) -> str | None:
        if self.classify is None:
            return None
        return await self.classify(room_id)

    async def period(self, room_id: str, room_class: str | None = None) -> Period:
        if room_class is None:
            room_class = await self.room_class(room_id)
        row = await self.retention_rooms.retention_room_get(room_id)
        override = row.override_ms if row is not None else None
        return self.policy.period_for(room_class, override_ms=override)

    async def active_holds(self) -> list[Hold]:
        return [hold_from_record(r) for r in await self.holds.holds()]

    async def unknown_hold_subjects(self, users: Sequence[str],
                                    rooms: Sequence[str]) -> list[str]:
        """What a hold names that nobody knows: a user neither the homeserver (deactivated
        accounts included), the directory nor the archive (a remote sender) knows, a room
        neither the homeserver nor the archive has. A typo must not place a hold that
        leaves the real custodian unheld."""
        problems: list[str] = []
        if users:
            known = {p.user_id for p in await self.directory_store.directory_people()}
            known |= {r.user_id for r in await self.directory_store.directory_view()}
            for u in users:
                if u in known:
                    continue
                if u.endswith(":" + self.server_name):
                    try:
                        if await self.client.admin_get_user(u, admin=self.admin_user_id):
                            continue
                    except MatrixRequestError as e:
                        if e.status != 400:  # 400: not a valid local user id
                            raise
                elif await self.index.archive_query(senders=[u], limit=1):
                    continue
                problems.append(f"unknown user {u!r}: not on the homeserver, in the "
                                "directory or in the archive")
        if rooms:
            archived = await self.index.archive_rooms()
            for r in rooms:
                if r in archived:
                    continue
                state = None
                try:
                    state = await self.client.admin_room_state(r, admin=self.admin_user_id)
                except MatrixRequestError as e:
                    if e.status not in (400, 404):
                        raise
                if not state:
                    problems.append(f"unknown room {r!r}: not on the homeserver or in the "
                                    "archive")
        return problems

    async def add_hold(self, record: HoldRecord, *, source: str = "cli") -> bool:
        """Place a legal hold; the audit record is written in the same commit. False when a
        hold with its id exists.

        Raises :class:`HoldCheckFailed` when who and what it names cannot be checked (no
        hold on a guess), :class:`UnknownHoldSubjects` when it names a user or room nobody
        knows, ``ValueError`` when the hold itself is invalid."""
        try:
            problems = await self.unknown_hold_subjects(record.users, record.rooms)
        except Exception as e:  # the homeserver cannot be asked
            raise HoldCheckFailed(str(e)) from e
        if problems:
            raise UnknownHoldSubjects(problems)
        validate_hold(hold_from_record(record))
        audit = _hold_audit(record, self.clock_ms(), "hold_add", record.placed_by,
                            record.reason, source)
        return await self.holds.hold_add(record, audit)

    async def release_hold(self, hold_id: str, *, by: str, reason: str,
                           source: str = "cli") -> bool:
        """Release an active hold (audited); False when there is no active hold by that id.
        Its events follow the retention policy again."""
        record = await self.holds.hold_get(hold_id)
        if record is None or record.released_at is not None:
            return False
        now = self.clock_ms()
        audit = _hold_audit(record, now, "hold_release", by, reason, source)
        return await self.holds.hold_release(hold_id, by, now, audit)

    # -- the live feed -----------------------------------------------------------------
    async def handle_event(self, event: dict[str, Any], meta: Any) -> Sequence[Action]:
        """The inbox handler: archive the event (and its media) before anything else.

        An archive failure raises, so the inbox retries the event later: nothing is lost and
        the archive's index keeps a retry from writing it twice."""
        if not self.config.enabled:
            return []
        room_id = event.get("room_id") or getattr(meta, "room_id", "") or ""
        if not room_id or not isinstance(event.get("event_id"), str):
            return []
        if getattr(meta, "kind", "pdu") != "pdu":
            return []
        res = await self.archive.append(room_id, [event])
        self.metrics.archived_events.labels(path="live").inc(res.written)
        await self.copy_media(room_id, [event])
        actions: list[Action] = []
        etype = event.get("type")
        if etype == RETENTION_STATE and event.get("state_key") == "":
            actions += await self.on_retention_state(room_id, event)
        elif etype == "m.room.message":
            body = (event.get("content") or {}).get("body")
            if isinstance(body, str) and body.startswith("!retention"):
                actions += await self.on_command(room_id, event, body)
        return actions

    async def copy_media(self, room_id: str, events: Sequence[Mapping[str, Any]]) -> int:
        """Copy media the events refer to into the archive; returns files copied.

        A homeserver outage raises (the caller retries); media the homeserver refuses or no
        longer has is logged and audited, and does not block the room."""
        acfg = self.config.archive
        if not acfg.media:
            return 0
        copied = 0
        for ev in events:
            for mxc in media_refs(ev):
                if await self.archive.has_media(mxc):
                    continue
                try:
                    parse_mxc(mxc)
                    data, ctype = await self.client.download_media(
                        mxc, max_bytes=acfg.max_media_bytes)
                except (ValueError, MatrixRequestError) as e:
                    self.metrics.archived_media.labels(outcome="unavailable").inc()
                    log.warning("media %s of %s not archived: %s", mxc, ev.get("event_id"), e)
                    await self.audit.add_audit(AuditRecord(
                        ts=self.clock_ms(), source="retention", kind="archive_media",
                        outcome="failed", room_id=room_id, rule_id="builtin.archive",
                        reason="media could not be copied", detail=f"{mxc}: {e}"))
                    continue
                await self.archive.put_media(room_id, str(ev.get("event_id")), mxc, data,
                                             ctype, int(ev.get("origin_server_ts") or 0))
                self.metrics.archived_media.labels(outcome="copied").inc()
                copied += 1
        return copied

    # -- who can act in a room ---------------------------------------------------------
    async def _room_state(self, room_id: str) -> list[dict[str, Any]]:
        return await self.client.admin_room_state(room_id, admin=self.admin_user_id) or []

    def _service_actor(self, state: Sequence[Mapping[str, Any]], needed: int) -> str | None:
        """Enclave's own joined user (its bot, else its admin) with at least ``needed``
        power; None if neither is (:func:`bridge.policy.power.enclave_actor`, the rule
        separation follows too). What it cannot do that way is reported."""
        return enclave_actor(memberships(state), RoomPower.from_state(state),
                             (self.bot_user_id, self.admin_user_id), needed)

    def _state_sender(self, state: Sequence[Mapping[str, Any]], event_type: str) -> str | None:
        """Enclave's bot (or admin) if joined with the power to send ``event_type`` state;
        None otherwise."""
        return self._service_actor(state, RoomPower.from_state(state).needed_state(event_type))

    @property
    def _not_in_room(self) -> str:
        return (f"neither {self.bot_user_id} nor {self.admin_user_id} is in the room with "
                "the power to do it")

    def _bot_membership(self, state: Sequence[Mapping[str, Any]]) -> str | None:
        return membership_of(state, self.bot_user_id)

    def _bot_may_join(self, state: Sequence[Mapping[str, Any]]) -> bool:
        """The bot may join on its own: someone invited it, or the room is public."""
        if self._bot_membership(state) == "invite":
            return True
        rule = next(((e.get("content") or {}).get("join_rule") for e in state
                     if e.get("type") == "m.room.join_rules"), None)
        return rule == "public"

    # -- m.room.retention and adjustments ------------------------------------------------
    async def on_retention_state(self, room_id: str, event: Mapping[str, Any]) -> list[Action]:
        """Someone other than Enclave changed the retention state: put it back."""
        sender = event.get("sender")
        period = await self.period(room_id)
        expected = self.policy.retention_state(period)
        d = self.policy.decide_retention_event(
            sender_is_service=self.is_service(sender), content=event.get("content") or {},
            expected=expected)
        if d.allow:
            return []
        actor = self._state_sender(await self._room_state(room_id), RETENTION_STATE)
        if actor is None:
            log.warning("retention state in %s changed by %s and Enclave cannot put it "
                        "back", room_id, sender)
            await self.audit.add_audit(AuditRecord(
                ts=self.clock_ms(), source="retention", kind="set_state", outcome="failed",
                room_id=room_id, user_id=sender, rule_id=d.rule_id, reason=d.reason,
                detail=f"not reverted: {self._not_in_room}"))
            return []
        return [SetState(rule_id=d.rule_id, reason=f"{d.reason} (changed by {sender})",
                         actor=actor, room=room_id, event_type=RETENTION_STATE,
                         content=dict(expected))]

    async def on_command(self, room_id: str, event: Mapping[str, Any],
                         body: str) -> list[Action]:
        """``!retention`` shows the period; ``!retention 30d`` asks to change it."""
        sender = str(event.get("sender", ""))
        if self.is_service(sender):
            return []
        m = _COMMAND_RE.match(body.strip())
        state = await self._room_state(room_id)
        bot_joined = membership_of(state, self.bot_user_id) == "join"
        room_class = await self.room_class(room_id)
        period = await self.period(room_id, room_class)
        reply: str
        actions: list[Action] = []
        if m is None or m.group(1) is None:
            reply = self.policy.notice_text(period)
        else:
            try:
                requested = parse_duration_ms(m.group(1))
            except ValueError as e:
                requested, reply = None, f"Cannot read {m.group(1)!r}: {e}"
            else:
                power = RoomPower.from_state(state).of(sender)
                d = self.policy.decide_adjustment(room_class, power, requested)
                if d.allow:
                    now = self.clock_ms()
                    old = await self.retention_rooms.retention_room_get(room_id)
                    await self.retention_rooms.retention_room_put(_room_row(
                        old, room_id, room_class, now, override_ms=requested,
                        override_by=sender))
                    await self.audit.add_audit(AuditRecord(
                        ts=now, source="retention", kind="retention_adjust",
                        outcome="applied", actor=sender, room_id=room_id, rule_id=d.rule_id,
                        reason=d.reason, detail=f"period set to {m.group(1)}"))
                    new_period = self.policy.period_for(room_class, override_ms=requested)
                    actor = self._state_sender(state, RETENTION_STATE)
                    reply = (f"{self.policy.notice_text(new_period)} (changed by {sender})")
                    if actor is not None and self.config.visibility.set_state:
                        actions.append(SetState(
                            rule_id=d.rule_id, reason=f"adjusted by {sender}", actor=actor,
                            room=room_id, event_type=RETENTION_STATE,
                            content=self.policy.retention_state(new_period)))
                    elif self.config.visibility.set_state:
                        reply += f"; {RETENTION_STATE} not updated: {self._not_in_room}"
                else:
                    reply = d.message or d.reason
        if bot_joined:
            actions.append(SendEvent(
                rule_id="builtin.retention_command", reason="answer to !retention",
                room=room_id, event_type="m.room.message",
                content={"msgtype": "m.notice", "body": reply}))
        return actions

    # -- visibility ----------------------------------------------------------------------
    async def ensure_visibility(self, room_id: str, period: Period,
                                state: Sequence[Mapping[str, Any]], *,
                                apply: bool, unable: list[str] | None = None) -> list[Action]:
        """The actions that make the room show its period (state, notice or topic), all as
        Enclave's bot or admin. What they cannot do in the room is appended to ``unable``
        (a report), never done as one of the room's members."""
        vis = self.config.visibility
        unable = unable if unable is not None else []
        actions: list[Action] = []
        if not state:
            return actions
        if self._bot_membership(state) == "invite":
            # someone invited Enclave's bot: it accepts, and acts with the power it was given
            actions.append(Join(rule_id=period.rule_id, reason="invited; shows the period",
                                actor=self.bot_user_id, room=room_id))
            state = [e for e in state if not (e.get("type") == "m.room.member"
                                              and e.get("state_key") == self.bot_user_id)]
            state.append({"type": "m.room.member", "state_key": self.bot_user_id,
                          "content": {"membership": "join"}})
        current = next((e.get("content") or {} for e in state
                        if e.get("type") == RETENTION_STATE and e.get("state_key") == ""), None)
        expected = self.policy.retention_state(period)
        if vis.set_state and (current or {}) != expected:
            actor = self._state_sender(state, RETENTION_STATE)
            if actor is not None:
                actions.append(SetState(rule_id=period.rule_id, reason="show the period",
                                        actor=actor, room=room_id, event_type=RETENTION_STATE,
                                        content=dict(expected)))
            else:
                unable.append(f"{RETENTION_STATE} not set: {self._not_in_room}")
        text = self.policy.notice_text(period)
        # a direct chat gets the state only: a bot joining it would make it a group chat
        # (DMs are recognised by separation's is_direct_chat, through the room's class);
        # and nothing is ever posted in clear into an encrypted room
        encrypted = any(e.get("type") == "m.room.encryption" for e in state)
        notice = "none" if period.source == "dm" or (encrypted and vis.notice == "message") \
            else vis.notice
        if notice == "topic":
            topic = next(((e.get("content") or {}).get("topic") for e in state
                          if e.get("type") == "m.room.topic"), None) or ""
            last = await self.kv.component_get(TOPIC_COMPONENT, room_id)
            lines = [ln for ln in topic.split("\n") if ln and ln != last and ln != text]
            new_topic = "\n".join([*lines, text])
            if new_topic != topic:
                actor = self._state_sender(state, "m.room.topic")
                if actor is None:
                    unable.append(f"period not put in the topic: {self._not_in_room}")
                else:
                    actions.append(SetState(rule_id=period.rule_id, reason="period in topic",
                                            actor=actor, room=room_id,
                                            event_type="m.room.topic",
                                            content={"topic": new_topic}))
                    if apply:
                        await self.kv.component_put(TOPIC_COMPONENT, room_id, text,
                                                       self.clock_ms())
        elif notice == "message":
            row = await self.retention_rooms.retention_room_get(room_id)
            said = await self.kv.component_get("retention.notice", room_id)
            if said != text:
                if membership_of(state, self.bot_user_id) != "join":
                    # the bot joins only where it was invited or the room is open: Enclave
                    # does not invite itself as a member (it would read "<member> invited
                    # Enclave"); elsewhere the missing notice is reported by the caller
                    if not self._bot_may_join(state):
                        unable.append("retention notice not posted: Enclave's bot is not "
                                      "in the room and not invited")
                        return actions
                    actions.append(Join(rule_id=period.rule_id,
                                        reason="Enclave posts the retention notice",
                                        actor=self.bot_user_id, room=room_id))
                content: dict[str, Any] = {"msgtype": "m.notice", "body": text}
                if row is not None and row.notice_event_id:
                    content = {"msgtype": "m.notice", "body": "* " + text,
                               "m.new_content": {"msgtype": "m.notice", "body": text},
                               "m.relates_to": {"rel_type": "m.replace",
                                                "event_id": row.notice_event_id}}
                actions.append(SendEvent(rule_id=period.rule_id, reason="retention notice",
                                         room=room_id, event_type="m.room.message",
                                         content=content))
        return actions

    async def _run_visibility(self, room_id: str, actions: Sequence[Action], run: str) -> int:
        done = 0
        text_sent: str | None = None
        for a in actions:
            # the key follows the room and the text, so a rerun is deduplicated by Synapse
            key = f"retention-vis:{room_id}:{a.kind}:{_digest(str(a.to_dict()))}"
            o = await self.executor.run_direct(a, key, source="retention")
            if o.status != "applied":
                log.warning("retention visibility in %s: %s failed: %s", room_id, a.kind,
                            o.detail)
                return done
            done += 1
            if isinstance(a, SendEvent):
                body = a.content.get("m.new_content", a.content).get("body")
                text_sent = body
                if "m.relates_to" not in a.content and o.detail.startswith("$"):
                    old = await self.retention_rooms.retention_room_get(room_id)
                    await self.retention_rooms.retention_room_put(_room_row(
                        old, room_id, old.room_class if old else None, self.clock_ms(),
                        notice_event_id=o.detail))
        if text_sent is not None:
            await self.kv.component_put("retention.notice", room_id, text_sent,
                                           self.clock_ms())
        return done

    # -- archive before purge ------------------------------------------------------------
    async def backfill(self, room_id: str, up_to_ts: int, *,
                       write: bool) -> tuple[int, list[tuple[int, str | None, bool]]]:
        """Read the room's history from its beginning through the admin API until past
        ``up_to_ts``; archive what the archive lacks (``write``). Returns (read, missing).

        Reading stops after the first page whose events are all at or after ``up_to_ts``,
        so events a little out of timestamp order around the cutoff are archived too. Returns
        (events read, (ts, sender, is_state) of those the archive lacked)."""
        token: str | None = None
        read = 0
        lacked: list[tuple[int, str | None, bool]] = []
        while True:
            chunk, token = await self.client.admin_room_messages(
                room_id, admin=self.admin_user_id, from_token=token, limit=_ADMIN_PAGE)
            events = [e for e in chunk if isinstance(e.get("event_id"), str)]
            read += len(events)
            known = await self.index.archive_known([e["event_id"] for e in events])
            lacking = [e for e in events if e["event_id"] not in known]
            lacked += [(int(e.get("origin_server_ts") or 0), e.get("sender"), "state_key" in e)
                       for e in lacking]
            if write and lacking:
                for e in lacking:
                    e.setdefault("room_id", room_id)
                res = await self.archive.append(room_id, lacking)
                self.metrics.archived_events.labels(path="backfill").inc(res.written)
                await self.copy_media(room_id, lacking)
                again = await self.index.archive_known([e["event_id"] for e in lacking])
                if len(again) != len(lacking):
                    raise RuntimeError(f"archive of {room_id} is missing "
                                       f"{len(lacking) - len(again)} events after writing")
            if token is None or not events or all(
                    int(e.get("origin_server_ts") or 0) >= up_to_ts for e in events):
                return read, lacked
            if self.config.purge.pause_seconds > 0:
                # reading back a big room is heavy for the homeserver too (bench/)
                await self._sleep(self.config.purge.pause_seconds)

    async def plan_room(self, room_id: str, now: int, holds: Sequence[Hold], period: Period,
                        extra: Sequence[tuple[int, str | None, bool]] = ()) -> PurgePlan:
        """The room's purge plan from the archive index (plus ``extra`` (ts, sender,
        is_state) events a dry run read but did not archive) and the holds.

        Only messages count: the homeserver keeps state events through a purge (they make
        up the room), so they are never due, and a held user's join does not hold the
        room."""
        messages = [*await self.index.archive_timestamps(room_id, messages_only=True),
                    *((ts, sender) for ts, sender, is_state in extra if not is_state)]
        stamps = sorted(ts for ts, _ in messages)
        relevant = [h for h in holds if h.active()]
        held: list[int] = []
        hold_ids: set[str] = set()
        for ts, sender in messages:
            matched = [h.id for h in relevant if h.matches(room_id, sender, ts)]
            if matched:
                held.append(ts)
                hold_ids.update(matched)
        return self.policy.plan_purge(room_id, period, now, stamps, sorted(held),
                                      sorted(hold_ids), self.config.purge.window_events)

    async def rooms(self) -> list[str]:
        """Every room the homeserver knows, and every room in the archive."""
        out: set[str] = set(await self.index.archive_rooms())
        start: int | None = 0
        while start is not None:
            page, start = await self.client.admin_list_rooms(admin=self.admin_user_id,
                                                             start=start)
            out.update(r["room_id"] for r in page if isinstance(r.get("room_id"), str))
        return sorted(out)

    async def _start_purge(self, room_id: str, up_to_ts: int) -> str:
        """Start Synapse's purge of the room's events before ``up_to_ts``; its purge id.

        The boundary is the archive's first unpurged event at or after the time. The
        homeserver may no longer have it (an earlier purge took it: events of one
        millisecond, or concurrent sends, are not ordered the same in the archive and in
        the room's DAG; or an operator purged by hand): Synapse answers 404, the event is
        marked gone in the archive index and the next one is tried. With no usable event
        the time itself is used (Synapse keeps the room's last event in any case)."""
        gone: list[str] = []
        try:
            after: tuple[int, str, int] | None = None
            for _ in range(_BOUNDARY_TRIES):
                rows = await self.index.archive_query(
                    room_id=room_id, since_ms=up_to_ts, include_purged=False, after=after,
                    limit=1)
                if not rows:
                    break
                row = rows[0]
                after = (row.ts, row.segment, row.line)
                try:
                    return await self.client.admin_purge_history(
                        room_id, admin=self.admin_user_id, up_to_event_id=row.event_id)
                except MatrixRequestError as e:
                    if e.status != 404:
                        raise
                    log.info("retention: purge boundary %s of %s is gone from the "
                             "homeserver (%s); trying the next event", row.event_id,
                             room_id, e.error)
                    if row.state_key is None:
                        gone.append(row.event_id)
            return await self.client.admin_purge_history(
                room_id, admin=self.admin_user_id, up_to_ts=up_to_ts)
        finally:
            if gone:
                await self.index.archive_mark_gone(room_id, gone, self.clock_ms())

    async def _purge_step(self, room_id: str, up_to_ts: int) -> PurgeStep:
        """Purge the room's events with ts < ``up_to_ts``.

        Synapse's ``purge_up_to_ts`` stops at the room's last event before the first event
        of *any* room after that time (and measures received time), so it can keep a due
        event; the step names the room's first event to keep instead, and Synapse purges
        everything before it. With no later event in the archive the time is used (Synapse
        keeps a room's last event in any case)."""
        pcfg = self.config.purge
        started = time.monotonic()
        purge_id = await self._start_purge(room_id, up_to_ts)
        while True:
            status, error = await self.client.admin_purge_status(purge_id,
                                                                 admin=self.admin_user_id)
            if status in ("complete", "failed"):
                break
            if time.monotonic() - started > pcfg.step_timeout_seconds:
                raise TimeoutError(f"purge {purge_id} of {room_id} still {status} after "
                                   f"{pcfg.step_timeout_seconds:.0f}s")
            await self._sleep(pcfg.poll_seconds)
        seconds = time.monotonic() - started
        self.metrics.purge_step_seconds.observe(seconds)
        if status == "failed":
            raise RuntimeError(f"purge {purge_id} of {room_id} failed: {error}")
        return PurgeStep(up_to_ts, seconds, status)

    async def run_room(self, room_id: str, *, apply: bool, now: int, holds: Sequence[Hold],
                       progress: Callable[[str], None] | None = None) -> RoomRun:
        """Plan (and with ``apply`` carry out) retention for one room: archive whatever is
        missing, then purge in bounded steps up to the cutoff, then expired media."""
        rr = RoomRun(room_id)
        room_class = await self.room_class(room_id)
        period = await self.period(room_id, room_class)
        try:
            due_before = None if period.keep_ms is None else now - period.keep_ms
            lacked: list[tuple[int, str | None, bool]] = []
            if due_before is not None:
                rr.read, lacked = await self.backfill(room_id, due_before, write=apply)
            if apply:
                rr.archived = len(lacked)
                rr.plan = await self.plan_room(room_id, now, holds, period)
            else:
                rr.plan = await self.plan_room(room_id, now, holds, period, lacked)
                if lacked:
                    rr.plan = _with_unarchived(rr.plan, len(lacked))
                return rr
            for w in rr.plan.windows:
                step = await self._purge_step(room_id, w)
                rr.steps.append(step)
                n = await self.index.archive_mark_purged(room_id, w, self.clock_ms())
                rr.purged += n
                self.metrics.purged_events.inc(n)
                if progress is not None:
                    progress(f"{room_id}: purged up to {w} ({rr.purged} events, "
                             f"step {step.seconds:.2f}s)")
                if self.config.purge.pause_seconds > 0:
                    await self._sleep(self.config.purge.pause_seconds)
            if rr.plan.held_from_ms is not None and rr.plan.deferred_events:
                rr.redacted, rr.not_redacted, rr.not_redacted_reason = (
                    await self.redact_deferred(room_id, rr.plan, holds))
            rr.media_deleted = await self.purge_media(room_id, period, now, holds)
            if rr.steps or rr.media_deleted or rr.redacted:
                old = await self.retention_rooms.retention_room_get(room_id)
                await self.retention_rooms.retention_room_put(_room_row(
                    old, room_id, room_class, self.clock_ms(),
                    purged_up_to=rr.plan.cutoff_ms, last_purge_at=self.clock_ms()))
                await self.audit.add_audit(AuditRecord(
                    ts=self.clock_ms(), source="retention", kind="purge", outcome="applied",
                    room_id=room_id, rule_id=period.rule_id, reason=rr.plan.reason,
                    detail=(f"purged {rr.purged} events up to {rr.plan.cutoff_ms} in "
                            f"{len(rr.steps)} steps; {rr.plan.held_events} held, "
                            f"{rr.plan.deferred_events} deferred by holds "
                            f"{list(rr.plan.hold_ids)} ({rr.redacted} of them redacted now"
                            + (f", {rr.not_redacted} not: {rr.not_redacted_reason}"
                               if rr.not_redacted else "") + "); "
                            f"media deleted {rr.media_deleted}")))
        except (HomeserverUnavailable, MatrixRequestError, OSError, RuntimeError,
                TimeoutError) as e:
            # the archive write failed or the homeserver did: nothing more is purged here
            rr.error = f"{type(e).__name__}: {e}"
            log.error("retention of %s stopped: %s", room_id, rr.error)
            await self.audit.add_audit(AuditRecord(
                ts=self.clock_ms(), source="retention", kind="purge", outcome="failed",
                room_id=room_id, rule_id=period.rule_id, reason="retention run stopped",
                detail=rr.error))
        return rr

    async def redact_deferred(self, room_id: str, plan: PurgePlan,
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
                state = await self._room_state(room_id)
                actor, why = await self._redactor(room_id, state, plan.rule_id)
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

    async def _redactor(self, room_id: str, state: list[dict[str, Any]],
                        rule_id: str) -> tuple[str | None, str | None]:
        """Enclave's user that may redact others' events in the room, joining the bot first
        where it may (invited, or a public room); (None, why) if there is none."""
        needed = RoomPower.from_state(state).needed("redact")
        actor = self._service_actor(state, needed)
        if actor is not None:
            return actor, None
        if self._bot_membership(state) != "join" and self._bot_may_join(state):
            o = await self.executor.run_direct(
                Join(rule_id=rule_id, reason="Enclave redacts due messages kept by a hold",
                     actor=self.bot_user_id, room=room_id),
                f"retention-join:{room_id}", source="retention")
            if o.status == "applied":
                state[:] = await self._room_state(room_id)
                actor = self._service_actor(state, needed)
                if actor is not None:
                    return actor, None
        return None, (f"neither {self.bot_user_id} nor {self.admin_user_id} is in the room "
                      f"with the power to redact ({needed})")

    async def purge_media(self, room_id: str, period: Period, now: int,
                          holds: Sequence[Hold]) -> int:
        """Delete the room's local media whose period is over and that no hold covers;
        only media that is safely in the archive."""
        deleted = []
        for m in await self.index.archive_media_list(room_id=room_id):
            if m.deleted_at is not None or not m.mxc.startswith(f"mxc://{self.server_name}/"):
                continue
            if not self.policy.media_due(period, m.ts, now):
                continue
            if any(h.active() and h.matches(room_id, None, m.ts) and not h.users
                   for h in holds):
                continue
            sender = await self._media_sender(m.event_id)
            if any(h.active() and h.matches(room_id, sender, m.ts) for h in holds):
                continue
            await self.client.admin_delete_media(m.mxc, admin=self.admin_user_id)
            deleted.append(m.mxc)
        if deleted:
            await self.index.archive_media_mark_deleted(deleted, self.clock_ms())
        return len(deleted)

    async def prune_archive(self, now: int, holds: Sequence[Hold],
                            rooms: Sequence[str] | None = None) -> int:
        """The archive's own retention: delete sealed segments whose events are past
        ``archive.keep`` (or the class's ``archive_keep``) and can no longer be on the
        homeserver. A segment is kept whole while any active hold could cover part of it
        (its room and time range; a hold on users keeps the segments of their time too).
        Returns segments pruned."""
        pruned = 0
        for room_id in rooms if rooms is not None else list(await self.index.archive_rooms()):
            room_class = await self.room_class(room_id)
            for seg in await self.archive.segments(room_id):
                if not seg.sealed or seg.last_ts is None or seg.first_ts is None:
                    continue
                held = any(h.active() and (not h.rooms or room_id in h.rooms)
                           and (h.since_ms is None or h.since_ms <= seg.last_ts)
                           and (h.until_ms is None or h.until_ms >= seg.first_ts)
                           for h in holds)
                if not self.policy.decide_archive_prune(newest_ts=seg.last_ts,
                                                        room_class=room_class, held=held,
                                                        now_ms=now):
                    continue
                await self.archive.prune_segment(room_id, seg.name, "archive retention")
                await self.audit.add_audit(AuditRecord(
                    ts=self.clock_ms(), source="retention", kind="archive_prune",
                    outcome="applied", room_id=room_id, rule_id="retention.archive",
                    reason="archive retention period over",
                    detail=f"{seg.name}: {seg.events} events {seg.first_ts}..{seg.last_ts}"))
                pruned += 1
        return pruned

    async def _media_sender(self, event_id: str | None) -> str | None:
        if not event_id:
            return None
        rows = await self.index.archive_events_by_id([event_id])
        return rows[0].sender if rows else None

    def _lease(self) -> contextlib.AbstractAsyncContextManager[None]:
        return held_lease(self.leases, LEASE_NAME, self.lease_owner, self.clock_ms,
                          self.lease_ttl_ms,
                          lambda: RuntimeError("another Enclave process is running retention"))

    async def run(self, *, apply: bool, rooms: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None,
                  visibility: bool = True) -> RetentionRun:
        """A retention pass over every room (or ``rooms``): plan, or archive and purge."""
        result = RetentionRun()
        if not self.config.enabled:
            result.findings.append("retention is disabled (retention.enabled: false)")
            return result
        ctx = self._lease() if apply else contextlib.nullcontext()
        async with ctx:
            holds = await self.active_holds()
            now = self.clock_ms()
            for room_id in rooms if rooms is not None else await self.rooms():
                rr = await self.run_room(room_id, apply=apply, now=now, holds=holds,
                                         progress=progress)
                result.rooms.append(rr)
                if visibility and rr.error is None:
                    try:
                        period = await self.period(room_id)
                        state = await self._room_state(room_id)
                        unable: list[str] = []
                        acts = await self.ensure_visibility(room_id, period, state,
                                                            apply=apply, unable=unable)
                        result.findings += [f"{room_id}: {u}" for u in unable]
                        if apply and acts:
                            result.visibility += await self._run_visibility(
                                room_id, acts, "run") > 0
                        elif acts:
                            result.findings.append(
                                f"{room_id}: would show the period "
                                f"({', '.join(a.kind for a in acts)})")
                    except (HomeserverUnavailable, MatrixRequestError) as e:
                        result.findings.append(f"{room_id}: period not shown: {e}")
            if apply:
                try:
                    result.archive_pruned = await self.prune_archive(now, holds, rooms)
                except (OSError, RuntimeError, ValueError) as e:
                    result.findings.append(f"archive retention stopped: {e}")
                    log.error("archive retention stopped: %s", e)
        if apply and not result.failed:
            self.metrics.retention_last_success.set(self.clock_ms() / 1000)
        return result


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _room_row(old: RetentionRoom | None, room_id: str, room_class: str | None, now: int,
              **changes: Any) -> RetentionRoom:
    base = dict(room_id=room_id, room_class=room_class, override_ms=None, override_by=None,
                purged_up_to=None, last_purge_at=None, notice_event_id=None,
                state_set_at=None, updated_at=now)
    if old is not None:
        base.update({k: getattr(old, k) for k in base if k not in ("updated_at",)})
        if room_class is not None:
            base["room_class"] = room_class
    base.update(changes)
    return RetentionRoom(**base)


def _with_unarchived(plan: PurgePlan, missing: int) -> PurgePlan:
    from dataclasses import replace

    return replace(plan, reason=f"{plan.reason}; {missing} events will be archived first")

"""Sending encrypted (:class:`EncryptedSender`): the room's members and their devices
read afresh, the Megolm session shared where :func:`~.decisions.decide_share` says, the
event sent with the appservice token as the bot's device; decryption of what the bot
receives; the first keys kept for invited members until they join; and the bots' senders
together (:class:`EncryptedSenders`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable
from typing import Any

import aiohttp

from bots.cross_signing import (
    owner_signed_devices,
)
from bots.sending import SendRefused
from bridge.kernel.retry import RECONNECT
from bridge.matrix.client import (
    HomeserverUnavailable,
    MatrixRequestError,
)
from bridge.policy.resend import ACTION_KEY

from .decisions import (
    SessionView,
    assess_coverage,
    decide_share,
    join_settle_wait,
)
from .device import EncryptedDevice
from .identity import scrub

log = logging.getLogger(__name__)


# first keys of room sessions, for invited members when they join (secret, 0600)
FIRST_KEYS_FILE = "invitee_keys.json"
MEGOLM = "m.megolm.v1.aes-sha2"
MESSAGE_TYPE = "m.room.message"


class CannotEncrypt(SendRefused):
    """The bot cannot send an encrypted message to this room; nothing was sent.

    A :class:`~bots.sending.SendRefused`, so fan-out records the target as failed with the
    reason. ``users``: the members the reason is about (e.g. those without any device), for
    the audit record. ``transient``: the cause may pass by itself (the bot's device is not
    ready yet), unlike a member without any device, which needs that person to sign in.
    """

    def __init__(self, room_id: str, reason: str, *, users: Iterable[str] = (),
                 transient: bool = False):
        super().__init__(room_id, f"cannot encrypt: {reason}")
        self.reason = reason
        self.users = tuple(sorted(users))
        self.transient = transient


class EncryptedSender(EncryptedDevice):
    """Sends Megolm-encrypted messages as one bot user from its own persistent device
    (:class:`~.device.EncryptedDevice`: see there for the arguments)."""

    def _became_ready(self) -> None:
        self._resume_first_keys()

    # -- sending ----------------------------------------------------------------------------
    async def send(self, room_id: str, content: dict, *, txn_id: str, sender: str) -> str:
        """Encrypt ``content`` (``m.room.message``) for every member device and send it.

        Idempotent per ``txn_id`` (the homeserver keeps it for the bot's device). Raises
        :class:`CannotEncrypt` when the room cannot be encrypted for (nothing sent),
        :class:`HomeserverUnavailable` when worth retrying later, and
        :class:`MatrixRequestError` when the homeserver refuses the event.
        """
        if sender != self.user_id:
            raise CannotEncrypt(room_id, f"no E2EE device for sender {sender} "
                                         f"(this one is {self.user_id}'s)")
        if self.identity_problem is not None:
            raise CannotEncrypt(room_id, "the bot's cross-signing identity cannot be used: "
                                + self.identity_problem)
        if not self._ready.is_set() and (self._gave_up_waiting or not await self.wait_ready()):
            self._gave_up_waiting = True
            raise CannotEncrypt(room_id, "the bot's E2EE device is not ready (sync has not "
                                         f"caught up: {self._last_error})", transient=True)
        lock = self._room_locks.setdefault(room_id, asyncio.Lock())
        async with lock:
            try:
                await self._prepare(room_id)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise HomeserverUnavailable(f"preparing {room_id} for E2EE: "
                                            f"{type(e).__name__}: {scrub(e)}") from e
            try:
                event_type, payload = self._nio.encrypt(room_id, MESSAGE_TYPE, dict(content))
            except Exception as e:  # nio: GroupEncryptionError, MembersSyncError, ...
                raise CannotEncrypt(room_id, f"encryption failed: {type(e).__name__}: "
                                             f"{scrub(e)}") from e
        if ACTION_KEY in content:
            # on the envelope too: the read-back before a resend matches it undecrypted
            payload = {**payload, ACTION_KEY: content[ACTION_KEY]}
        return await self._client.send_event(room_id, event_type, payload, txn_id,
                                             user_id=self.user_id,
                                             device_id=self.device_id or "")

    async def decrypt(self, room_id: str, event: dict[str, Any], *,
                      within: float = 10.0) -> dict[str, Any] | None:
        """The cleartext of an ``m.room.encrypted`` event the appservice received (e.g. an
        ``!ack`` in an encrypted DM): ``{type, content, sender, event_id, ...}``.

        The sender's client shares its room key with the bot's device by to-device message,
        which the sync loop receives, possibly after the appservice transaction: wait up to
        ``within`` seconds for it. None when the event is not Megolm, the key never came, or
        the device is not ready. The envelope's ``sender`` (checked by the homeserver) is
        the one to trust for who wrote it.
        """
        if event.get("type") != "m.room.encrypted" or not await self.wait_ready(within):
            return None
        plain = await decrypt_megolm(self._nio, room_id, event, within=within)
        if plain is None:
            log.info("no room key for event %s in %s from %s", event.get("event_id"),
                     room_id, event.get("sender"))
        return plain

    async def _prepare(self, room_id: str) -> None:
        """Members known, their device keys fresh, the room key shared with all of them."""
        import nio  # heavy (~0.3 s): paid only when a bot encrypts

        c = self._nio
        room = c.rooms.get(room_id)
        created = room is None
        if room is None:
            # the bot's sync may not have seen this room (yet, or since a restart): a room
            # object of our own is enough, joined_members fills its members
            room = nio.MatrixRoom(room_id, self.user_id, encrypted=True)
            c.rooms[room_id] = room
        room.encrypted = True
        c.encrypted_rooms.add(room_id)
        try:
            membership, joined_at = await self._members(room_id)
        except MatrixRequestError as e:
            if created:
                c.rooms.pop(room_id, None)
            if e.status in (403, 404):
                raise CannotEncrypt(room_id, f"the bot is not joined to the room ({e.errcode})"
                                    ) from e
            raise HomeserverUnavailable(f"members of {room_id}: {e}") from e
        if membership.get(self.user_id) != "join":
            raise CannotEncrypt(room_id, "the bot is not joined to the room")
        if self.appservice_sender is not None:
            # Enclave's own bot (e.g. in a room whose archive user posts): no device to reach
            membership.pop(self.appservice_sender, None)
            joined_at.pop(self.appservice_sender, None)
        # The key goes to joined members now; invited members get the session's first key
        # when they join (share_on_join). Sent to an invitee up front, Element's client would
        # try the message the moment it joins, before it has fetched the bot's device, fail
        # with "sender device not known" and never try again; arriving after the join, the
        # key makes it retry.
        joined = {u for u, state in membership.items() if state == "join"}
        invited = frozenset(u for u, state in membership.items() if state == "invite")
        for user in tuple(room.users):
            if user not in joined:
                room.remove_member(user)
        for user in joined:
            room.add_member(user, None, None)
        room.members_synced = True
        # Ask for the members' devices on every send instead of trusting the sync loop to
        # have seen each device-list change already: a device added a second ago still
        # gets the key. One small query per message; announcements are worth it.
        c.olm.users_for_key_query.update(membership)
        await self._query_keys()
        everyone = {u: frozenset(d.id for d in c.device_store.active_user_devices(u))
                    for u in membership}
        signed = (await self._signed_devices([u for u in everyone if u != self.user_id])
                  if self.require_signed_devices else None)
        # invited members too: each needs a (signed) device to get the key when they join
        before = assess_coverage(everyone, self.user_id, frozenset(), signed)
        if before.no_devices:
            raise CannotEncrypt(room_id, "members without any E2EE device (they never signed "
                                         "in with an encrypting client): "
                                + ", ".join(sorted(before.no_devices)), users=before.no_devices)
        if before.unsigned_users:
            raise CannotEncrypt(room_id, "members with no device signed by its owner "
                                         "(cross-signing), so Element would not show the "
                                         "message on any of them: "
                                + ", ".join(sorted(before.unsigned_users))
                                + " (they need to sign in with Element, or verify a session)",
                                users=before.unsigned_users)
        members = {u: devs for u, devs in everyone.items() if u in joined}
        decision = decide_share(members, self.user_id, self._session_view(room_id), invited)
        if not decision.share:
            return
        log.info("sharing room key for %s: %s", room_id, decision.reason)
        wait = join_settle_wait((ts for u, ts in joined_at.items() if u != self.user_id),
                                int(time.time() * 1000), int(self.join_key_delay * 1000))
        if wait:
            # someone joined just now (a new DM): let their client fetch the bot's device
            await asyncio.sleep(wait)
        if decision.rotate:
            c.invalidate_outbound_session(room_id)
        async with self._claim_lock:
            missing = c.get_missing_sessions(room_id)
            if missing:
                await c.keys_claim(missing)
        await c.share_group_session(room_id, ignore_unverified_devices=True)
        session = c.olm.outbound_group_sessions.get(room_id)
        shared_with = frozenset(session.users_shared_with) if session else frozenset()
        cover = assess_coverage(members, self.user_id, shared_with, signed)
        if session is not None:
            self._unreachable[room_id] = (session.id, cover.unreached_devices)
            if invited and session.message_index == 0:
                await self._keep_first_key(room_id, session.id, session.session_key, invited)
        if cover.unreached_users:
            what = "signed device" if signed is not None else "device"
            raise CannotEncrypt(room_id, f"could not share the room key with any {what} of: "
                                + ", ".join(sorted(cover.unreached_users))
                                + " (no one-time key to claim, or the to-device send failed)",
                                users=cover.unreached_users)
        if cover.unreached_devices:
            log.warning("room %s: room key not shared with devices %s (members have other "
                        "devices that got it)", room_id, sorted(cover.unreached_devices))

    async def _members(self, room_id: str) -> tuple[dict[str, str], dict[str, int]]:
        """(user id -> ``join`` or ``invite``, joined user id -> when their membership
        event was sent), read from the homeserver as the bot."""
        chunk = await self._client.room_members(room_id, user_id=self.user_id,
                                                not_membership="leave")
        out: dict[str, str] = {}
        joined_at: dict[str, int] = {}
        for ev in chunk:
            state = (ev.get("content") or {}).get("membership")
            user = ev.get("state_key")
            if isinstance(user, str) and state in ("join", "invite"):
                out[user] = state
                if state == "join" and isinstance(ev.get("origin_server_ts"), int):
                    joined_at[user] = ev["origin_server_ts"]
        return out, joined_at

    async def _signed_devices(self, users: list[str]) -> dict[str, frozenset[str]]:
        """user -> their devices signed by their own cross-signing key (verified here)."""
        if not users:
            return {}
        body = await self._client.query_keys({u: [] for u in users}, user_id=self.user_id)
        return {u: owner_signed_devices(body, u) for u in users}

    def _session_view(self, room_id: str) -> SessionView | None:
        session = self._nio.olm.outbound_group_sessions.get(room_id)
        if session is None:
            return None
        sid, unreachable = self._unreachable.get(room_id, ("", frozenset()))
        kept = self._first_keys.get(room_id, {}).get(session.id, {})
        return SessionView(
            session_id=session.id, shared=bool(session.shared), expired=bool(session.expired),
            shared_with=frozenset(session.users_shared_with),
            unreachable=unreachable if sid == session.id else frozenset(),
            for_invited=frozenset(kept.get("invited", ())))

    # -- invitees --------------------------------------------------------------------------
    def _load_first_keys(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            raw = json.loads((self.store_dir / FIRST_KEYS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s (%s): invitees of earlier messages will not "
                        "get their keys", FIRST_KEYS_FILE, type(e).__name__)
            return {}
        return raw if isinstance(raw, dict) else {}

    def _save_first_keys(self) -> None:
        path = self.store_dir / FIRST_KEYS_FILE
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self._first_keys, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    async def _keep_first_key(self, room_id: str, session_id: str, key: str,
                              invited: frozenset[str]) -> None:
        """Keep a new session's first key for the room's invitees (written before the
        message goes out: a restart in between still lets them read it)."""
        self._first_keys.setdefault(room_id, {})[session_id] = {"key": key,
                                                                "invited": sorted(invited)}
        await asyncio.to_thread(self._save_first_keys)

    def member_joined(self, room_id: str, user_id: str) -> None:
        """Someone joined one of the bot's rooms: if they were invited to read messages,
        send them the keys a little later (:data:`JOIN_KEY_DELAY_S`), in the background.
        A restart before that is covered by the sweep at the next start."""
        kept = self._first_keys.get(room_id, {})
        if any(user_id in e.get("invited", ()) for e in kept.values()):
            task = asyncio.create_task(self._share_later(room_id, user_id),
                                       name=f"e2ee-join-keys {room_id} {user_id}")
            self._join_tasks.add(task)
            task.add_done_callback(self._join_tasks.discard)

    async def _share_later(self, room_id: str, user_id: str) -> None:
        await asyncio.sleep(self.join_key_delay)
        for attempt in range(5):
            try:
                await self.share_on_join(room_id, user_id)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("room %s: keys for %s not sent yet (%s); attempt %d of 5",
                            room_id, user_id, scrub(e), attempt + 1)
                await asyncio.sleep(RECONNECT.delay(attempt + 1))

    def _resume_first_keys(self) -> None:
        """At start: invitees who joined while the bot was away get their keys; the kept
        keys of rooms they left are dropped (in the background)."""
        if self._first_keys:
            task = asyncio.create_task(self._sweep_first_keys(), name="e2ee-join-keys sweep")
            self._join_tasks.add(task)
            task.add_done_callback(self._join_tasks.discard)

    async def _sweep_first_keys(self) -> None:
        changed = False
        for room_id in list(self._first_keys):
            try:
                membership, _ = await self._members(room_id)
            except (MatrixRequestError, HomeserverUnavailable) as e:
                log.info("room %s: members not read for the invitee keys (%s)", room_id, e)
                continue
            for entry in self._first_keys.get(room_id, {}).values():
                gone = [u for u in entry["invited"] if u not in membership]
                if gone:
                    entry["invited"] = [u for u in entry["invited"] if u not in gone]
                    changed = True
            kept = self._first_keys.get(room_id, {})
            for sid in [sid for sid, e in kept.items() if not e["invited"]]:
                del kept[sid]
            if not kept:
                self._first_keys.pop(room_id, None)
            for user, state in membership.items():
                if state == "join":
                    self.member_joined(room_id, user)
        if changed:
            await asyncio.to_thread(self._save_first_keys)

    async def share_on_join(self, room_id: str, user_id: str) -> int:
        """``user_id`` joined ``room_id``: send the first key of every session they were
        invited to read to their devices (Olm, to-device). Returns the devices reached.

        Raises (the inbox retries the join event later) when the device is not ready or
        the homeserver is unavailable."""
        kept = self._first_keys.get(room_id, {})
        wanted = [(sid, e["key"]) for sid, e in kept.items() if user_id in e.get("invited", ())]
        if not wanted:
            return 0
        if not self._ready.is_set() and not await self.wait_ready():
            raise HomeserverUnavailable(f"E2EE device of {self.user_id} not ready: "
                                        f"{self._last_error}")
        c = self._nio
        lock = self._room_locks.setdefault(room_id, asyncio.Lock())
        async with lock:
            c.olm.users_for_key_query.add(user_id)
            await self._query_keys()
            devices = [d for d in c.device_store.active_user_devices(user_id)
                       if d.id != self.device_id]
            missing = [d.id for d in devices if c.olm.session_store.get(d.curve25519) is None]
            if missing:
                async with self._claim_lock:
                    await c.keys_claim({user_id: missing})
            reached = 0
            for sid, key in wanted:
                content = {"algorithm": MEGOLM, "room_id": room_id, "session_id": sid,
                           "session_key": key}
                messages: dict[str, Any] = {}
                for d in devices:
                    olm_session = c.olm.session_store.get(d.curve25519)
                    if olm_session is not None:
                        messages[d.id] = c.olm._olm_encrypt(olm_session, d, "m.room_key",
                                                            content)
                if not messages:
                    log.warning("room %s: no device of %s could get the key of session %s "
                                "(no one-time key)", room_id, user_id, sid)
                    continue
                await self._client.send_to_device(
                    "m.room.encrypted", f"enclave-join-{secrets.token_hex(8)}",
                    {user_id: messages}, user_id=self.user_id,
                    device_id=self.device_id or "")
                reached += len(messages)
            for sid, _ in wanted:
                entry = kept[sid]
                entry["invited"] = [u for u in entry["invited"] if u != user_id]
                if not entry["invited"]:
                    del kept[sid]
            if not kept:
                self._first_keys.pop(room_id, None)
            await asyncio.to_thread(self._save_first_keys)
        log.info("room %s: %s joined; first keys of %d session(s) sent to %d device(s)",
                 room_id, user_id, len(wanted), reached)
        return reached


class EncryptedSenders:
    """The E2EE senders of several bots (each bot user has its own device), as one
    :class:`~bots.sending.MessageSender`: the message goes out from the sender's device;
    a sender without one is refused with :class:`CannotEncrypt`."""

    def __init__(self, senders: Iterable[EncryptedSender]):
        self._by_user = {s.user_id: s for s in senders}

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._by_user

    async def send(self, room_id: str, content: dict, *, txn_id: str, sender: str) -> str:
        """Send from ``sender``'s device; see :meth:`EncryptedSender.send`."""
        found = self._by_user.get(sender)
        if found is None:
            raise CannotEncrypt(room_id, f"no E2EE device configured for {sender}")
        return await found.send(room_id, content, txn_id=txn_id, sender=sender)

    async def start(self) -> None:
        """Start every device (each in the background)."""
        for s in self._by_user.values():
            await s.start()

    async def close(self) -> None:
        """Stop every device."""
        for s in self._by_user.values():
            await s.close()


async def decrypt_megolm(client: Any, room_id: str, event: dict[str, Any], *,
                         within: float) -> dict[str, Any] | None:
    """The cleartext (``{type, content, ...}``, with ``room_id``) of an ``m.room.encrypted``
    Megolm ``event`` decrypted by the nio ``client``, polling up to ``within`` seconds for
    its room key (the to-device message may come after the event); None when it is not
    Megolm or the key did not come. Every bot device that reads encrypted events uses it."""
    import nio  # heavy (~0.3 s): paid only when a bot encrypts

    try:
        parsed = nio.Event.parse_encrypted_event({**event, "room_id": room_id})
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(parsed, nio.MegolmEvent):
        return None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            plain = client.decrypt_event(parsed)
        except nio.EncryptionError:
            plain = None
        if plain is not None and not isinstance(plain, nio.BadEvent | nio.UnknownBadEvent):
            return {**plain.source, "room_id": room_id}
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(0.25)

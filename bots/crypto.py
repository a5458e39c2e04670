"""End-to-end encrypted sending for Enclave's bots (Megolm through matrix-nio + vodozemac).

Element encrypts private rooms and DMs by default, so a bot that posts there must encrypt
for every device of every member, or staff see "unable to decrypt". One bot identity (an
appservice user) gets one real device:

* **Device and token.** The first start logs the bot in with the appservice login
  (``m.login.application_service``, AS token as bearer): Synapse creates a device and an
  access token. Both, and the key that encrypts the Olm account in nio's SQLite store, are
  kept in ``<store_dir>/session.json`` (mode 0600; the token is a secret and never logged).
  A restart reuses them (checked with ``whoami``); an invalid token is replaced by logging
  in again *with the same device id*, so the device and its published keys survive.
* **Keys.** nio's ``SqliteStore`` in ``store_dir`` keeps the Olm account, Olm sessions and
  device lists. A background sync loop (device token, no room data) keeps one-time keys
  topped up and receives to-device messages (room keys for :meth:`EncryptedSender.decrypt`).
* **Sending.** Before each message the room's members are read from the homeserver
  (``joined_members``), their device keys queried afresh, Olm sessions claimed and the room's
  Megolm session (re)shared when a member device lacks it or someone who has it left. The
  pure :func:`decide_share` / :func:`assess_coverage` make those decisions. The encrypted
  event is then sent with the **appservice token** masquerading as the bot *and its device*
  (``?user_id=…&device_id=…``): appservice requests are exempt from rate limits
  (``rate_limited: false``), and with a device id Synapse keeps the transaction id in its
  database, so a resend with the same ``txn_id`` (after a crash of either side) returns the
  first event instead of creating a second one.
* **Refusal, not silence.** A room the bot cannot encrypt for (not joined, a member with
  no device, a member none of whose devices got the key, device not ready in time) raises
  :class:`CannotEncrypt` with the reason; nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bots.sending import SendRefused
from bridge.matrix.client import (
    HomeserverUnavailable,
    MatrixClient,
    MatrixRequestError,
    q,
)

log = logging.getLogger(__name__)

__all__ = [
    "CannotEncrypt",
    "Coverage",
    "EncryptedSender",
    "EncryptedSenders",
    "SessionView",
    "ShareDecision",
    "assess_coverage",
    "decide_share",
]

SESSION_FILE = "session.json"
MESSAGE_TYPE = "m.room.message"
# What the bot's own sync needs: to-device messages (room keys from staff devices, Olm
# session set-up), one-time-key counts and device-list changes, none of which a room filter
# removes. No room at all: messages reach the bot through the appservice, and every send
# reads the room's members and their devices afresh, so a bot in thousands of rooms does
# not download and parse their traffic (or a huge first sync) for nothing.
SYNC_FILTER: dict[str, Any] = {
    "presence": {"types": []},
    "account_data": {"types": []},
    "room": {"rooms": []},
}

_TOKEN_IN_URL = re.compile(r"(access_token=)[^&\s'\"]+")


def _scrub(text: object) -> str:
    """nio puts the access token in request URLs; never let one reach a log or an error."""
    return _TOKEN_IN_URL.sub(r"\1<redacted>", str(text))


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


# -- pure decisions ------------------------------------------------------------------------------
Device = tuple[str, str]  # (user id, device id)


@dataclass(frozen=True)
class SessionView:
    """What matters about a room's current outbound Megolm session."""

    session_id: str
    shared: bool
    expired: bool
    shared_with: frozenset[Device]
    # devices that could not get this session when it was shared (no Olm session possible)
    unreachable: frozenset[Device] = frozenset()


@dataclass(frozen=True)
class ShareDecision:
    """Whether to (re)share the room key before encrypting, and why."""

    share: bool
    rotate: bool
    reason: str
    rule_id: str = "e2ee.share"


@dataclass(frozen=True)
class Coverage:
    """Who a shared session reached, among the room's joined members (the bot excluded)."""

    no_devices: frozenset[str]
    unreached_users: frozenset[str]
    unreached_devices: frozenset[Device]

    @property
    def complete(self) -> bool:
        """Every member can read the message (some extra devices of theirs may not)."""
        return not self.no_devices and not self.unreached_users


def _required(members: Mapping[str, frozenset[str]], own_user: str) -> frozenset[Device]:
    return frozenset((u, d) for u, devs in members.items() if u != own_user for d in devs)


def decide_share(
    members: Mapping[str, frozenset[str]], own_user: str, session: SessionView | None
) -> ShareDecision:
    """Decide whether the room key must be shared (and the current one replaced).

    ``members``: joined member -> ids of their active devices (from a fresh key query).
    A shared session is reused only while every member device has it (or could not get it
    when it was shared) and nobody outside the room holds it; otherwise it is replaced,
    because a shared Megolm session cannot be taken back from someone who left.
    """
    if session is None or not session.shared:
        return ShareDecision(True, False, "no room key shared yet")
    if session.expired:
        return ShareDecision(True, True, "room key expired (age or message count)")
    stale = sorted({u for u, _ in session.shared_with if u not in members})
    if stale:
        return ShareDecision(True, True, f"room key held by non-members: {', '.join(stale)}")
    missing = _required(members, own_user) - session.shared_with - session.unreachable
    if missing:
        users = sorted({u for u, _ in missing})
        return ShareDecision(True, True, f"new devices or members: {', '.join(users)}")
    return ShareDecision(False, False, "room key already shared with every member device")


def assess_coverage(
    members: Mapping[str, frozenset[str]], own_user: str, shared_with: frozenset[Device]
) -> Coverage:
    """Which members (other than the bot) lack a device, or got the key on none of them."""
    no_devices = frozenset(u for u, devs in members.items() if u != own_user and not devs)
    unreached_devices = _required(members, own_user) - shared_with
    unreached_users = frozenset(
        u for u, devs in members.items()
        if u != own_user and devs and all((u, d) in unreached_devices for d in devs)
    )
    return Coverage(no_devices, unreached_users, unreached_devices)


# -- the device's identity on disk ---------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSession:
    """The bot's device: persisted in ``session.json`` (0600)."""

    user_id: str
    device_id: str
    access_token: str = field(repr=False)
    pickle_key: str = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> DeviceSession | None:
        """The stored session, or None when there is none (or it is unreadable)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(user_id=raw["user_id"], device_id=raw["device_id"],
                       access_token=raw["access_token"], pickle_key=raw["pickle_key"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable E2EE session file %s (%s)", path,
                        type(e).__name__)
            return None

    def save(self, path: Path) -> None:
        """Write atomically, readable by the owner only (it holds an access token)."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"user_id": self.user_id, "device_id": self.device_id,
                       "access_token": self.access_token, "pickle_key": self.pickle_key}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


class _TokenInvalid(Exception):
    pass


# -- the sender --------------------------------------------------------------------------------
class EncryptedSender:
    """Sends Megolm-encrypted messages as one bot user from its own persistent device.

    ``client``: Enclave's appservice client (login, state reads and the sends themselves);
    ``homeserver_url``: for nio's own connection (sync, keys, to-device); ``store_dir``:
    this bot's crypto directory, e.g. ``<data_dir>/crypto/<localpart>/``.
    Call :meth:`start` once and :meth:`close` at shutdown.

    The user must be a namespace user, not the appservice's ``sender_localpart``: Synapse
    refuses ``/sync`` to an appservice's sender (it answers HTTP 500), so
    that identity cannot follow device lists or receive keys. Pass ``appservice_sender`` to
    have that mistake refused here rather than as a device that never becomes ready.
    """

    def __init__(
        self,
        client: MatrixClient,
        *,
        homeserver_url: str,
        user_id: str,
        store_dir: Path,
        device_name: str = "Enclave bot",
        ready_timeout: float = 30.0,
        sync_timeout_ms: int = 30_000,
        appservice_sender: str | None = None,
    ):
        if appservice_sender is not None and user_id == appservice_sender:
            raise ValueError(f"{user_id} is the appservice's sender, which Synapse does not "
                             "let sync: give the bot a namespace user of its own for E2EE")
        self._client = client
        self._homeserver_url = homeserver_url.rstrip("/")
        self.user_id = user_id
        self.store_dir = Path(store_dir)
        self.device_name = device_name
        self.ready_timeout = ready_timeout
        self.sync_timeout_ms = sync_timeout_ms
        self.logins = 0  # logins this instance made (a restart that reuses its device: 0)
        self.syncs = 0
        self._session: DeviceSession | None = None
        self._nio: Any = None  # nio.AsyncClient, imported lazily
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._last_error = "not started"
        self._room_locks: dict[str, asyncio.Lock] = {}
        self._keys_lock = asyncio.Lock()
        self._claim_lock = asyncio.Lock()
        self._unreachable: dict[str, tuple[str, frozenset[Device]]] = {}
        # set when a send gave up waiting for readiness: later sends fail at once instead of
        # each waiting ready_timeout again (a fan-out would otherwise take hours to fail)
        self._gave_up_waiting = False

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def device_id(self) -> str | None:
        """The bot's device id, once known."""
        return self._session.device_id if self._session else None

    @property
    def ready(self) -> bool:
        """True once the device is logged in, its keys uploaded and a first sync done."""
        return self._ready.is_set()

    async def start(self) -> None:
        """Start the device in the background (login or reuse, keys, sync loop).

        Returns at once; a homeserver that is down delays readiness, it does not fail the
        caller's start-up. :meth:`wait_ready` waits for it.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"e2ee-sync {self.user_id}")

    async def wait_ready(self, within: float | None = None) -> bool:
        """Wait until :attr:`ready`; False if ``within`` seconds (default ``ready_timeout``)
        passed first."""
        try:
            await asyncio.wait_for(self._ready.wait(), within or self.ready_timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the sync loop and close nio's connection and store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._nio is not None:
            with contextlib.suppress(Exception):
                await self._nio.close()
            store = getattr(self._nio, "store", None)
            database = getattr(store, "database", None)
            if database is not None:
                with contextlib.suppress(Exception):
                    database.close()
            self._nio = None
        self._ready.clear()

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                if self._nio is None:
                    await self._open_device()
                await self._sync_once(0 if not self._ready.is_set() else self.sync_timeout_ms)
                if not self._ready.is_set():
                    log.info("E2EE device %s of %s ready", self.device_id, self.user_id)
                self._ready.set()
                self._gave_up_waiting = False
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except _TokenInvalid:
                log.warning("E2EE device token of %s no longer valid: logging in again "
                            "on device %s", self.user_id, self.device_id)
                try:
                    await self._relogin()
                except Exception as e:
                    self._last_error = _scrub(e)
                    log.warning("E2EE re-login of %s failed: %s", self.user_id,
                                self._last_error)
                    await asyncio.sleep(delay)
                    delay = min(60.0, delay * 2)
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {_scrub(e)}"
                log.warning("E2EE sync of %s failed (%s); retrying in %.0fs", self.user_id,
                            self._last_error, delay)
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)

    async def _open_device(self) -> None:
        import nio

        self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            os.chmod(self.store_dir, 0o700)
        path = self.store_dir / SESSION_FILE
        session = DeviceSession.load(path)
        if session is not None and session.user_id != self.user_id:
            log.warning("E2EE session file %s belongs to %s, not %s: starting a new device",
                        path, session.user_id, self.user_id)
            session = None
        if session is not None and not self._store_file(session).exists():
            # the device's keys are gone: its published identity cannot be used any more
            log.warning("E2EE store of %s device %s is missing: starting a new device "
                        "(the old one stays listed on the account)", self.user_id,
                        session.device_id)
            session = None
        if session is None:
            session = await self._login(None, secrets.token_urlsafe(32))
        else:
            session = await self._check_token(session)
        session.save(path)
        self._session = session

        config = nio.AsyncClientConfig(
            encryption_enabled=True, store_sync_tokens=True, pickle_key=session.pickle_key,
            store=nio.store.SqliteStore, request_timeout=max(60, self.sync_timeout_ms / 1000 + 30),
            # nio retries connection errors and 429s forever by default; a send must fail
            # (and be retried by its caller) when the homeserver is away
            max_timeouts=3, max_limit_exceeded=10,
        )
        client = nio.AsyncClient(self._homeserver_url, self.user_id, device_id=session.device_id,
                                 store_path=str(self.store_dir), config=config)
        client.restore_login(self.user_id, session.device_id, session.access_token)
        self._nio = client
        await self._check_published_keys()

    def _store_file(self, session: DeviceSession) -> Path:
        # nio's SqliteStore names its database after the user and device
        return self.store_dir / f"{session.user_id}_{session.device_id}.db"

    async def _login(self, device_id: str | None, pickle_key: str) -> DeviceSession:
        body: dict[str, Any] = {
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": self.user_id},
            "initial_device_display_name": self.device_name,
        }
        if device_id:
            body["device_id"] = device_id
        resp = await self._client.request("POST", "/_matrix/client/v3/login", json=body)
        self.logins += 1
        log.info("E2EE login of %s: device %s", self.user_id, resp["device_id"])
        return DeviceSession(self.user_id, resp["device_id"], resp["access_token"], pickle_key)

    async def _check_token(self, session: DeviceSession) -> DeviceSession:
        try:
            who = await self._client.request("GET", "/_matrix/client/v3/account/whoami",
                                             access_token=session.access_token)
        except MatrixRequestError as e:
            if e.status != 401:
                raise
            return await self._login(session.device_id, session.pickle_key)
        if who.get("user_id") != self.user_id or who.get("device_id") != session.device_id:
            return await self._login(session.device_id, session.pickle_key)
        return session

    async def _relogin(self) -> None:
        assert self._session is not None and self._nio is not None
        session = await self._login(self._session.device_id, self._session.pickle_key)
        session.save(self.store_dir / SESSION_FILE)
        self._session = session
        self._nio.access_token = session.access_token
        await self._check_published_keys()

    async def _check_published_keys(self) -> None:
        """If the homeserver lost our device keys (device deleted and re-created by a
        re-login), publish the same identity again; nio would otherwise think them there."""
        nio_client = self._nio
        if not nio_client.olm.account.shared:
            return
        body = await self._client.request(
            "POST", "/_matrix/client/v3/keys/query",
            json={"device_keys": {self.user_id: [self.device_id]}},
            access_token=self._session.access_token if self._session else None)
        published = body.get("device_keys", {}).get(self.user_id, {}).get(self.device_id)
        ours = nio_client.olm.account.identity_keys["ed25519"]
        theirs = (published or {}).get("keys", {}).get(f"ed25519:{self.device_id}")
        if theirs == ours:
            return
        if theirs is not None:
            raise RuntimeError(f"device {self.device_id} of {self.user_id} has other keys on "
                               "the homeserver than in the local store")
        log.warning("homeserver has no keys for E2EE device %s of %s: uploading them again",
                    self.device_id, self.user_id)
        nio_client.olm.account.shared = False

    async def _sync_once(self, timeout_ms: int) -> None:
        import nio

        c = self._nio
        resp = await c.sync(timeout=timeout_ms, sync_filter=SYNC_FILTER)
        if isinstance(resp, nio.SyncError):
            if resp.status_code == "M_UNKNOWN_TOKEN":
                raise _TokenInvalid()
            raise RuntimeError(f"sync: {_scrub(resp)}")
        await c.send_to_device_messages()
        if c.should_upload_keys:
            up = await c.keys_upload()
            if isinstance(up, nio.KeysUploadError):
                raise RuntimeError(f"keys upload: {_scrub(up)}")
        await self._query_keys()
        if c.should_claim_keys:
            async with self._claim_lock:
                await c.keys_claim(c.get_users_for_key_claiming())
        self.syncs += 1

    async def _query_keys(self) -> None:
        import nio

        async with self._keys_lock:
            if not self._nio.should_query_keys:
                return
            resp = await self._nio.keys_query()
        if isinstance(resp, nio.KeysQueryError):
            raise HomeserverUnavailable(f"device keys query failed: {_scrub(resp)}")

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
                                            f"{type(e).__name__}: {_scrub(e)}") from e
            try:
                event_type, payload = self._nio.encrypt(room_id, MESSAGE_TYPE, dict(content))
            except Exception as e:  # nio: GroupEncryptionError, MembersSyncError, ...
                raise CannotEncrypt(room_id, f"encryption failed: {type(e).__name__}: "
                                             f"{_scrub(e)}") from e
        body = await self._client.request(
            "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/send/{q(event_type)}/{q(txn_id)}",
            json=payload, user_id=self.user_id, query={"device_id": self.device_id or ""})
        return body["event_id"]

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
        import nio

        if event.get("type") != "m.room.encrypted" or not await self.wait_ready(within):
            return None
        try:
            parsed = nio.Event.parse_encrypted_event({**event, "room_id": room_id})
        except (KeyError, TypeError, ValueError):
            return None
        if not isinstance(parsed, nio.MegolmEvent):
            return None
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                plain = self._nio.decrypt_event(parsed)
            except nio.EncryptionError:
                plain = None
            if plain is not None and not isinstance(plain, nio.BadEvent | nio.UnknownBadEvent):
                return {**plain.source, "room_id": room_id}
            if asyncio.get_running_loop().time() >= deadline:
                log.info("no room key for event %s in %s from %s", event.get("event_id"),
                         room_id, event.get("sender"))
                return None
            await asyncio.sleep(0.25)

    async def _prepare(self, room_id: str) -> None:
        """Members known, their device keys fresh, the room key shared with all of them."""
        import nio

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
        resp = await c.joined_members(room_id)
        if isinstance(resp, nio.JoinedMembersError):
            if created:
                c.rooms.pop(room_id, None)
            status = getattr(getattr(resp, "transport_response", None), "status", 0) or 0
            if status in (403, 404) or resp.status_code in ("M_FORBIDDEN", "M_NOT_FOUND"):
                raise CannotEncrypt(room_id, "the bot is not joined to the room "
                                             f"({resp.status_code})")
            raise HomeserverUnavailable(f"joined members of {room_id}: {_scrub(resp)}")
        joined = {m.user_id for m in resp.members}
        if self.user_id not in joined:
            raise CannotEncrypt(room_id, "the bot is not joined to the room")
        # Ask for the members' devices on every send instead of trusting the sync loop to
        # have seen each device-list change already: a device added a second ago still
        # gets the key. One small query per message; announcements are worth it.
        c.olm.users_for_key_query.update(joined)
        await self._query_keys()
        members = {u: frozenset(d.id for d in c.device_store.active_user_devices(u))
                   for u in joined}
        no_devices = assess_coverage(members, self.user_id, frozenset()).no_devices
        if no_devices:
            raise CannotEncrypt(room_id, "members without any E2EE device (they never signed "
                                         "in with an encrypting client): "
                                + ", ".join(sorted(no_devices)), users=no_devices)
        decision = decide_share(members, self.user_id, self._session_view(room_id))
        if not decision.share:
            return
        log.info("sharing room key for %s: %s", room_id, decision.reason)
        if decision.rotate:
            c.invalidate_outbound_session(room_id)
        async with self._claim_lock:
            missing = c.get_missing_sessions(room_id)
            if missing:
                await c.keys_claim(missing)
        await c.share_group_session(room_id, ignore_unverified_devices=True)
        session = c.olm.outbound_group_sessions.get(room_id)
        shared_with = frozenset(session.users_shared_with) if session else frozenset()
        cover = assess_coverage(members, self.user_id, shared_with)
        if session is not None:
            self._unreachable[room_id] = (session.id, cover.unreached_devices)
        if cover.unreached_users:
            raise CannotEncrypt(room_id, "could not share the room key with any device of: "
                                + ", ".join(sorted(cover.unreached_users))
                                + " (no one-time key to claim, or the to-device send failed)",
                                users=cover.unreached_users)
        if cover.unreached_devices:
            log.warning("room %s: room key not shared with devices %s (members have other "
                        "devices that got it)", room_id, sorted(cover.unreached_devices))

    def _session_view(self, room_id: str) -> SessionView | None:
        session = self._nio.olm.outbound_group_sessions.get(room_id)
        if session is None:
            return None
        sid, unreachable = self._unreachable.get(room_id, ("", frozenset()))
        return SessionView(
            session_id=session.id, shared=bool(session.shared), expired=bool(session.expired),
            shared_with=frozenset(session.users_shared_with),
            unreachable=unreachable if sid == session.id else frozenset())


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

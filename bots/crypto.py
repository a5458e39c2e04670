"""End-to-end encrypted sending for Enclave's bots (Megolm through matrix-nio + vodozemac).

Element encrypts private rooms and DMs by default, so a bot that posts there must encrypt
for every device of every member, or staff see "unable to decrypt". One bot identity (an
appservice user) gets one real device:

* **Device.** The first start creates the bot's device as the appservice (MSC4190:
  ``PUT /devices/{deviceId}`` with the AS token) and from then on acts as that device with
  the AS token and ``?user_id=…&device_id=…`` (no access token of its own: the path that
  keeps working when the homeserver delegates auth, next-gen auth / MAS). Where the
  homeserver does not support that, it falls back to the appservice login
  (``m.login.application_service``), which yields a device and an access token. The device
  id, how it authenticates, any token and the key that encrypts the Olm account in nio's
  SQLite store are kept in ``<store_dir>/session.json`` (mode 0600; never logged). A restart
  reuses them; an invalid token is replaced by logging in again *with the same device id*
  (or, where the login is refused, by adopting that device through MSC4190), so the device
  and its published keys survive.
* **Cross-signing.** Once the device's keys are published, the bot user's cross-signing
  identity (``bots/cross_signing.py``) is created or reused and the device signed with it:
  Element neither shares room keys with nor shows messages from a device its owner has not
  signed. A lost or conflicting identity keeps the device from becoming ready, and sends
  are refused with the reason and the fix.
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
* **Who gets the key.** Joined members at once. Invited members (a DM's invitee) get the
  first key of each session started while they were invited a few seconds after they join
  (:meth:`EncryptedSender.member_joined`; kept in ``invitee_keys.json``, 0600, until then):
  Element tries a message at the join and gives up for good if the key is there but it has
  not fetched the bot's device yet. With ``require_signed_devices`` (Element's rule, the
  default) a member counts as reached only through a device signed by its owner's
  cross-signing key, checked cryptographically from the homeserver's key query.
* **Refusal, not silence.** A room the bot cannot encrypt for (not joined, a member with
  no device, a member with no device signed by its owner, a member none of whose (signed)
  devices got the key, device not ready in time) raises :class:`CannotEncrypt` with the
  reason; nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import string
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import aiohttp

from bots.cross_signing import (
    KEYS_FILE,
    RESET_FILE,
    CrossSigningKeys,
    IdentityDecision,
    KeysUnreadable,
    decide_identity,
    device_signed_by,
    owner_signed_devices,
)
from bots.sending import SendRefused
from bridge.kernel.retry import RECONNECT
from bridge.matrix.client import (
    HomeserverUnavailable,
    MatrixClient,
    MatrixRequestError,
    q,
)
from bridge.policy.resend import ACTION_KEY

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
# first keys of room sessions, for invited members when they join (secret, 0600)
FIRST_KEYS_FILE = "invitee_keys.json"
MEGOLM = "m.megolm.v1.aes-sha2"
# Give clients this long after they join (or after the bot's device keys or signatures
# changed) before sending them a room key: Element's client fetches the bot's device keys
# only once it shares a room with it (or hears of a change), and a key that arrives before
# that is tried at once, fails with "sender device not known" and is never tried again
# (measured with matrix-js-sdk 43: the key came ≈0.2 s after the join, the key query after).
JOIN_KEY_DELAY_S = 3.0
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
    # invited members whose devices get this session's first key when they join
    for_invited: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ShareDecision:
    """Whether to (re)share the room key before encrypting, and why."""

    share: bool
    rotate: bool
    reason: str
    rule_id: str = "e2ee.share"


@dataclass(frozen=True)
class Coverage:
    """Who a shared session reached, among the room's members (the bot excluded)."""

    no_devices: frozenset[str]
    unreached_users: frozenset[str]
    unreached_devices: frozenset[Device]
    # members with devices, none of them signed by their owner (only when signing counts)
    unsigned_users: frozenset[str] = frozenset()

    @property
    def complete(self) -> bool:
        """Every member can read the message (some extra devices of theirs may not)."""
        return not self.no_devices and not self.unreached_users and not self.unsigned_users


def _required(members: Mapping[str, frozenset[str]], own_user: str) -> frozenset[Device]:
    return frozenset((u, d) for u, devs in members.items() if u != own_user for d in devs)


def decide_share(
    members: Mapping[str, frozenset[str]], own_user: str, session: SessionView | None,
    invited: frozenset[str] = frozenset(),
) -> ShareDecision:
    """Decide whether the room key must be shared (and the current one replaced).

    ``members``: joined member -> ids of their active devices (from a fresh key query).
    A shared session is reused only while every member device has it (or could not get it
    when it was shared) and nobody outside the room holds it; otherwise it is replaced,
    because a shared Megolm session cannot be taken back from someone who left.
    ``invited``: invited members. Their devices get a session's first key when they join
    (so they read every message sent while they were invited); a session started before
    someone was invited is replaced, since its first key is no longer at hand.
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
    new_invitees = sorted(invited - session.for_invited)
    if new_invitees:
        return ShareDecision(True, True, f"new invited members: {', '.join(new_invitees)}")
    return ShareDecision(False, False, "room key already shared with every member device")


def assess_coverage(
    members: Mapping[str, frozenset[str]], own_user: str, shared_with: frozenset[Device],
    signed: Mapping[str, frozenset[str]] | None = None,
) -> Coverage:
    """Which members (other than the bot) lack a device, or got the key on none of them.

    ``signed``: member -> their devices signed by their own cross-signing key. When given
    (Element's rule), only those devices count: a member is reached when one of them got
    the key, and a member without any is ``unsigned_users``."""
    no_devices = frozenset(u for u, devs in members.items() if u != own_user and not devs)
    unreached_devices = _required(members, own_user) - shared_with

    def counted(u: str, devs: frozenset[str]) -> frozenset[str]:
        return devs if signed is None else devs & signed.get(u, frozenset())

    unsigned_users = frozenset(
        u for u, devs in members.items() if u != own_user and devs and not counted(u, devs))
    unreached_users = frozenset(
        u for u, devs in members.items()
        if u != own_user and counted(u, devs)
        and all((u, d) in unreached_devices for d in counted(u, devs))
    )
    return Coverage(no_devices, unreached_users, unreached_devices, unsigned_users)


def join_settle_wait(join_ts_ms: Iterable[int], now_ms: int, delay_ms: int) -> float:
    """Seconds to wait before sharing a room key so that every member has been joined for
    ``delay_ms`` (their clients fetch the bot's device meanwhile); 0 when all have."""
    latest = max(join_ts_ms, default=None)
    if latest is None:
        return 0.0
    return max(0, min(delay_ms, latest + delay_ms - now_ms)) / 1000


# -- the device's identity on disk ---------------------------------------------------------------
APPSERVICE = "appservice"  # the device is used through the AS token (MSC4190)
TOKEN = "token"  # the device has an access token of its own (appservice login)


@dataclass(frozen=True)
class DeviceSession:
    """The bot's device: persisted in ``session.json`` (0600). ``auth``: ``appservice``
    (no token of its own: AS token + ``user_id``/``device_id``) or ``token``."""

    user_id: str
    device_id: str
    access_token: str = field(repr=False)
    pickle_key: str = field(repr=False)
    auth: str = TOKEN

    @classmethod
    def load(cls, path: Path) -> DeviceSession | None:
        """The stored session, or None when there is none (or it is unreadable)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            auth = raw.get("auth", TOKEN)
            if auth not in (APPSERVICE, TOKEN):
                raise ValueError(auth)
            return cls(user_id=raw["user_id"], device_id=raw["device_id"],
                       access_token=raw["access_token"], pickle_key=raw["pickle_key"],
                       auth=auth)
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
                       "access_token": self.access_token, "pickle_key": self.pickle_key,
                       "auth": self.auth}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


class _TokenInvalid(Exception):
    pass


class _IdentityUnusable(Exception):
    """The bot's cross-signing identity is lost or replaced elsewhere (reason: the fix)."""


def _new_device_id() -> str:
    return "ENCLAVE" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(8))


def _appservice_device_client(nio: Any) -> Any:
    """nio's client acting as the bot's device through the appservice token: every request
    carries ``user_id`` and ``device_id`` (appservice device masquerading, MSC4190)."""

    class AppserviceDeviceClient(nio.AsyncClient):  # type: ignore[misc,name-defined]
        async def _send(self, response_class: type, method: str, path: str,
                        *args: Any, **kwargs: Any) -> Any:
            url = list(urlparse(path))
            query = parse_qs(url[4])
            query["user_id"] = [self.user_id]
            query["device_id"] = [self.device_id]
            url[4] = urlencode(query, doseq=True)
            return await super()._send(response_class, method, urlunparse(url), *args,
                                       **kwargs)

    return AppserviceDeviceClient


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
        require_signed_devices: bool = True,
        appservice_devices: bool = True,
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
        # Element's rule: a member counts as reached only through a device signed by them
        self.require_signed_devices = require_signed_devices
        # create the device as the appservice (MSC4190) before trying the appservice login
        self.appservice_devices = appservice_devices
        self.identity: IdentityDecision | None = None  # the last cross-signing decision
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
        # room -> session id -> {"key": first session key, "invited": [users]}
        self._first_keys: dict[str, dict[str, dict[str, Any]]] = {}
        self.join_key_delay = JOIN_KEY_DELAY_S
        self._join_tasks: set[asyncio.Task[None]] = set()
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
        """True once the device exists, its keys are uploaded and signed by the bot's
        cross-signing key, and a first sync is done."""
        return self._ready.is_set()

    @property
    def auth(self) -> str | None:
        """How the device authenticates: ``appservice`` (MSC4190) or ``token``."""
        return self._session.auth if self._session else None

    @property
    def identity_problem(self) -> str | None:
        """Why the bot's cross-signing identity cannot be used (None: it can)."""
        d = self.identity
        return None if d is None or d.usable else d.reason

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
        for task in (self._task, *self._join_tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = None
        self._join_tasks.clear()
        await self.close_device()
        self._ready.clear()

    async def close_device(self) -> None:
        """Close nio's connection and store (the loop, if running, opens them again)."""
        if self._nio is not None:
            with contextlib.suppress(Exception):
                await self._nio.close()
            store = getattr(self._nio, "store", None)
            database = getattr(store, "database", None)
            if database is not None:
                with contextlib.suppress(Exception):
                    database.close()
            self._nio = None

    async def _run(self) -> None:
        failures = 0  # consecutive: the delay doubles from 1 s to 60 s (RECONNECT)
        while True:
            try:
                if self._nio is None:
                    await self._open_device()
                await self._sync_once(0 if not self._ready.is_set() else self.sync_timeout_ms)
                if not self._ready.is_set():
                    await self._ensure_cross_signing()
                    self._resume_first_keys()
                    log.info("E2EE device %s of %s ready", self.device_id, self.user_id)
                self._ready.set()
                self._gave_up_waiting = False
                failures = 0
            except asyncio.CancelledError:
                raise
            except _IdentityUnusable as e:
                self._last_error = str(e)
                log.error("E2EE device of %s not used: %s", self.user_id, e)
                failures = 64  # from now on the longest delay
                await asyncio.sleep(RECONNECT.maximum)
            except _TokenInvalid:
                log.warning("E2EE device token of %s no longer valid: logging in again "
                            "on device %s", self.user_id, self.device_id)
                try:
                    await self._relogin()
                except Exception as e:
                    self._last_error = _scrub(e)
                    log.warning("E2EE re-login of %s failed: %s", self.user_id,
                                self._last_error)
                    failures += 1
                    await asyncio.sleep(RECONNECT.delay(failures))
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {_scrub(e)}"
                failures += 1
                delay = RECONNECT.delay(failures)
                log.warning("E2EE sync of %s failed (%s); retrying in %.0fs", self.user_id,
                            self._last_error, delay)
                await asyncio.sleep(delay)

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
            session = await self._new_device(secrets.token_urlsafe(32))
        elif session.auth == APPSERVICE:
            session = await self._check_appservice_device(session)
        else:
            session = await self._check_token(session)
        session.save(path)
        self._session = session
        self._first_keys = await asyncio.to_thread(self._load_first_keys)

        config = nio.AsyncClientConfig(
            encryption_enabled=True, store_sync_tokens=True, pickle_key=session.pickle_key,
            store=nio.store.SqliteStore, request_timeout=max(60, self.sync_timeout_ms / 1000 + 30),
            # nio retries connection errors and 429s forever by default; a send must fail
            # (and be retried by its caller) when the homeserver is away
            max_timeouts=3, max_limit_exceeded=10,
        )
        if session.auth == APPSERVICE:
            cls, token = _appservice_device_client(nio), self._client.appservice_token
        else:
            cls, token = nio.AsyncClient, session.access_token
        client = cls(self._homeserver_url, self.user_id, device_id=session.device_id,
                     store_path=str(self.store_dir), config=config)
        client.restore_login(self.user_id, session.device_id, token)
        self._nio = client
        await self._check_published_keys()

    def _store_file(self, session: DeviceSession) -> Path:
        # nio's SqliteStore names its database after the user and device
        return self.store_dir / f"{session.user_id}_{session.device_id}.db"

    async def _new_device(self, pickle_key: str) -> DeviceSession:
        """A new device: created as the appservice (MSC4190) where the homeserver lets it,
        else through the appservice login."""
        if self.appservice_devices:
            device_id = _new_device_id()
            try:
                await self._put_device(device_id)
            except MatrixRequestError as e:
                log.info("homeserver did not create a device for %s as the appservice "
                         "(%s %s): falling back to the appservice login", self.user_id,
                         e.status, e.errcode)
            else:
                log.info("E2EE device %s of %s created as the appservice (MSC4190)",
                         device_id, self.user_id)
                return DeviceSession(self.user_id, device_id, "", pickle_key, APPSERVICE)
        return await self._login(None, pickle_key)

    async def _put_device(self, device_id: str) -> None:
        """Create (or keep) ``device_id`` as the appservice and check the homeserver lets
        the appservice act as it; MatrixRequestError when it does not."""
        await self._client.request("PUT", f"/_matrix/client/v3/devices/{q(device_id)}",
                                   json={"display_name": self.device_name},
                                   user_id=self.user_id)
        who = await self._client.whoami(self.user_id, device_id=device_id)
        if who.get("device_id") != device_id:
            raise MatrixRequestError(501, "M_UNRECOGNIZED",
                                     "appservice device masquerading not supported")

    async def _check_appservice_device(self, session: DeviceSession) -> DeviceSession:
        try:
            await self._client.get_device(session.device_id, user_id=self.user_id)
        except MatrixRequestError as e:
            if e.status != 404:
                raise
            log.warning("E2EE device %s of %s is gone from the homeserver: creating it "
                        "again (same keys)", session.device_id, self.user_id)
            await self._put_device(session.device_id)
        return session

    async def _login_or_adopt(self, session: DeviceSession) -> DeviceSession:
        """The token is no longer valid: log in again on the same device, or, where the
        homeserver refuses appservice logins (MSC4190 enabled), act as that device through
        the appservice from now on."""
        try:
            return await self._login(session.device_id, session.pickle_key)
        except MatrixRequestError as e:
            if e.errcode != "M_APPSERVICE_LOGIN_UNSUPPORTED" or not self.appservice_devices:
                raise
        await self._put_device(session.device_id)
        log.info("E2EE device %s of %s now used through the appservice (MSC4190)",
                 session.device_id, self.user_id)
        return DeviceSession(self.user_id, session.device_id, "", session.pickle_key,
                             APPSERVICE)

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
            who = await self._client.whoami(access_token=session.access_token)
        except MatrixRequestError as e:
            if e.status != 401:
                raise
            return await self._login_or_adopt(session)
        if who.get("user_id") != self.user_id or who.get("device_id") != session.device_id:
            return await self._login_or_adopt(session)
        return session

    async def _relogin(self) -> None:
        assert self._session is not None and self._nio is not None
        session = await self._login_or_adopt(self._session)
        session.save(self.store_dir / SESSION_FILE)
        self._session = session
        if session.auth == APPSERVICE:
            # another kind of client: the loop opens the device again with it
            await self.close_device()
            return
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
            json={"device_keys": {self.user_id: [self.device_id]}}, user_id=self.user_id)
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

    async def _ensure_cross_signing(self) -> None:
        """Create or reuse the bot user's cross-signing identity and sign this device with
        it (see ``bots/cross_signing.py``); :class:`_IdentityUnusable` when lost or replaced.

        Requests go through the appservice as the bot: a first upload needs no interactive
        auth (MSC3967), a replacement (reset) is allowed to an appservice (MSC4190)."""
        path = self.store_dir / KEYS_FILE
        marker = self.store_dir / RESET_FILE
        problem = None
        try:
            keys = await asyncio.to_thread(CrossSigningKeys.load, path)
        except KeysUnreadable as e:
            keys, problem = None, str(e)
        published = await self._client.request(
            "POST", "/_matrix/client/v3/keys/query",
            json={"device_keys": {self.user_id: [self.device_id]}}, user_id=self.user_id)
        master = ((published.get("master_keys") or {}).get(self.user_id) or {}).get("keys")
        server_master = next(iter(master.values()), None) if master else None
        decision = decide_identity(
            local_master=keys.public("master") if keys else None, local_problem=problem,
            server_master=server_master, reset_requested=marker.exists(),
            store_dir=str(self.store_dir), bot=self.user_id)
        self.identity = decision
        if not decision.usable:
            raise _IdentityUnusable(decision.reason)
        if decision.action in ("create", "replace"):
            if keys is not None or path.exists():
                # never deleted: a reset keeps the old keys beside the new ones
                aside = path.with_name(f"{KEYS_FILE}.replaced-{int(time.time())}")
                await asyncio.to_thread(os.replace, path, aside)
            keys = CrossSigningKeys.generate()
            # stored before publishing: a crash in between finds them and publishes them
            await asyncio.to_thread(keys.save, path)
        assert keys is not None
        if decision.action != "reuse":
            await self._client.request("POST", "/_matrix/client/v3/keys/device_signing/upload",
                                       json=keys.upload_body(self.user_id),
                                       user_id=self.user_id)
            log.info("cross-signing identity of %s: %s (%s)", self.user_id, decision.action,
                     decision.reason)
        if marker.exists():
            await asyncio.to_thread(marker.unlink)
        device = ((published.get("device_keys") or {}).get(self.user_id) or {}).get(
            self.device_id)
        if device is None:
            raise RuntimeError(f"the homeserver has no keys for device {self.device_id} yet")
        if decision.action == "reuse" and device_signed_by(device, self.user_id,
                                                           keys.public("self_signing")):
            return
        body = await self._client.request(
            "POST", "/_matrix/client/v3/keys/signatures/upload",
            json={self.user_id: {self.device_id: keys.device_signature(device, self.user_id)}},
            user_id=self.user_id)
        if body.get("failures"):
            raise RuntimeError(f"signing device {self.device_id}: {body['failures']}")
        log.info("E2EE device %s of %s signed by its cross-signing key", self.device_id,
                 self.user_id)
        # staff clients refetch the bot's keys when told of the change: a room key sent
        # before they did would come from a device they cannot place yet
        await asyncio.sleep(self.join_key_delay)

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
                                            f"{type(e).__name__}: {_scrub(e)}") from e
            try:
                event_type, payload = self._nio.encrypt(room_id, MESSAGE_TYPE, dict(content))
            except Exception as e:  # nio: GroupEncryptionError, MembersSyncError, ...
                raise CannotEncrypt(room_id, f"encryption failed: {type(e).__name__}: "
                                             f"{_scrub(e)}") from e
        if ACTION_KEY in content:
            # on the envelope too: the read-back before a resend matches it undecrypted
            payload = {**payload, ACTION_KEY: content[ACTION_KEY]}
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
        body = await self._client.request(
            "POST", "/_matrix/client/v3/keys/query",
            json={"device_keys": {u: [] for u in users}}, user_id=self.user_id)
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
                            room_id, user_id, _scrub(e), attempt + 1)
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
                await self._client.request(
                    "PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/"
                           + q(f"enclave-join-{secrets.token_hex(8)}"),
                    json={"messages": {user_id: messages}}, user_id=self.user_id,
                    query={"device_id": self.device_id or ""})
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

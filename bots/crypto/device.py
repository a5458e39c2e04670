"""The bot's E2EE device and its lifetime (:class:`EncryptedDevice`): created as the
appservice (MSC4190) or through the appservice login, reused across restarts, its keys
published and signed by the bot's cross-signing identity (those steps:
:mod:`.provisioning`), kept current by a background sync loop.
:class:`~.sender.EncryptedSender` sends through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from bots.cross_signing import IdentityDecision
from bridge.kernel.retry import RECONNECT
from bridge.matrix.client import HomeserverUnavailable, MatrixClient

from .decisions import Device
from .identity import (
    APPSERVICE,
    SESSION_FILE,
    DeviceSession,
    IdentityUnusable,
    TokenInvalid,
    appservice_device_client,
    scrub,
)
from .provisioning import DeviceProvisioner

log = logging.getLogger(__name__)


# Give clients this long after they join (or after the bot's device keys or signatures
# changed) before sending them a room key: Element's client fetches the bot's device keys
# only once it shares a room with it (or hears of a change), and a key that arrives before
# that is tried at once, fails with "sender device not known" and is never tried again
# (measured with matrix-js-sdk 43: the key came ≈0.2 s after the join, the key query after).
JOIN_KEY_DELAY_S = 3.0
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


class EncryptedDevice:
    """One bot user's own persistent E2EE device (what :class:`~.sender.EncryptedSender`
    sends Megolm-encrypted messages from).

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
        # the appservice's sender cannot sync (so has no device, and never reads a room):
        # a room it is in is encrypted for everyone else
        self.appservice_sender = appservice_sender
        self._homeserver_url = homeserver_url.rstrip("/")
        self.user_id = user_id
        self.store_dir = Path(store_dir)
        self.ready_timeout = ready_timeout
        self.sync_timeout_ms = sync_timeout_ms
        # Element's rule: a member counts as reached only through a device signed by them
        self.require_signed_devices = require_signed_devices
        # creating, adopting and signing the device (appservice_devices: create it as the
        # appservice, MSC4190, before trying the appservice login)
        self._provision = DeviceProvisioner(client, user_id=user_id, store_dir=self.store_dir,
                                            device_name=device_name,
                                            appservice_devices=appservice_devices)
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

    def _became_ready(self) -> None:
        """Called when the device becomes ready, before :attr:`ready` is set (a hook for
        the sender: it resumes what waited for the device)."""

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
    def identity(self) -> IdentityDecision | None:
        """The last decision about the bot's cross-signing identity (None: not made yet)."""
        return self._provision.identity

    @property
    def logins(self) -> int:
        """Logins this instance made (a restart that reuses its device: 0)."""
        return self._provision.logins

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
                    assert self.device_id is not None
                    if await self._provision.ensure_cross_signing(self.device_id):
                        # staff clients refetch the bot's keys when told of the change: a
                        # room key sent before they did would come from a device they
                        # cannot place yet
                        await asyncio.sleep(self.join_key_delay)
                    self._became_ready()
                    log.info("E2EE device %s of %s ready", self.device_id, self.user_id)
                self._ready.set()
                self._gave_up_waiting = False
                failures = 0
            except asyncio.CancelledError:
                raise
            except IdentityUnusable as e:
                self._last_error = str(e)
                log.error("E2EE device of %s not used: %s", self.user_id, e)
                failures = 64  # from now on the longest delay
                await asyncio.sleep(RECONNECT.maximum)
            except TokenInvalid:
                log.warning("E2EE device token of %s no longer valid: logging in again "
                            "on device %s", self.user_id, self.device_id)
                try:
                    await self._relogin()
                except Exception as e:
                    self._last_error = scrub(e)
                    log.warning("E2EE re-login of %s failed: %s", self.user_id,
                                self._last_error)
                    failures += 1
                    await asyncio.sleep(RECONNECT.delay(failures))
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {scrub(e)}"
                failures += 1
                delay = RECONNECT.delay(failures)
                log.warning("E2EE sync of %s failed (%s); retrying in %.0fs", self.user_id,
                            self._last_error, delay)
                await asyncio.sleep(delay)

    async def _open_device(self) -> None:
        import nio  # heavy (~0.3 s): paid only when a bot encrypts

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
            session = await self._provision.new_device(secrets.token_urlsafe(32))
        elif session.auth == APPSERVICE:
            session = await self._provision.check_appservice_device(session)
        else:
            session = await self._provision.check_token(session)
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
            cls, token = appservice_device_client(nio), self._client.appservice_token
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

    async def _relogin(self) -> None:
        assert self._session is not None and self._nio is not None
        session = await self._provision.login_or_adopt(self._session)
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
        body = await self._client.query_keys({self.user_id: [self.device_id]},
                                             user_id=self.user_id)
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
        import nio  # heavy (~0.3 s): paid only when a bot encrypts

        c = self._nio
        resp = await c.sync(timeout=timeout_ms, sync_filter=SYNC_FILTER)
        if isinstance(resp, nio.SyncError):
            if resp.status_code == "M_UNKNOWN_TOKEN":
                raise TokenInvalid()
            raise RuntimeError(f"sync: {scrub(resp)}")
        await c.send_to_device_messages()
        if c.should_upload_keys:
            up = await c.keys_upload()
            if isinstance(up, nio.KeysUploadError):
                raise RuntimeError(f"keys upload: {scrub(up)}")
        await self._query_keys()
        if c.should_claim_keys:
            async with self._claim_lock:
                await c.keys_claim(c.get_users_for_key_claiming())
        self.syncs += 1

    async def _query_keys(self) -> None:
        import nio  # heavy (~0.3 s): paid only when a bot encrypts

        async with self._keys_lock:
            if not self._nio.should_query_keys:
                return
            resp = await self._nio.keys_query()
        if isinstance(resp, nio.KeysQueryError):
            raise HomeserverUnavailable(f"device keys query failed: {scrub(resp)}")

"""How a bot's E2EE device comes to exist and be trusted (:class:`DeviceProvisioner`):
created as the appservice (MSC4190) or through the appservice login, checked on reuse,
logged in again or adopted through the appservice when its token is no longer valid, and
signed by the bot user's cross-signing identity. :class:`~.device.EncryptedDevice` runs
these steps; nio's connection, the keys and the sync loop stay there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from bots.cross_signing import (
    KEYS_FILE,
    RESET_FILE,
    CrossSigningKeys,
    IdentityDecision,
    KeysUnreadable,
    decide_identity,
    device_signed_by,
)
from bridge.matrix.client import MatrixClient, MatrixRequestError

from .identity import APPSERVICE, DeviceSession, IdentityUnusable, new_device_id

log = logging.getLogger(__name__)


class DeviceProvisioner:
    """The provisioning steps of ``user_id``'s device, as the appservice (``client``).

    ``store_dir`` holds the bot's cross-signing keys; ``appservice_devices``: create the
    device as the appservice (MSC4190) before trying the appservice login. Keeps count of
    the logins it made and the last cross-signing decision."""

    def __init__(self, client: MatrixClient, *, user_id: str, store_dir: Path,
                 device_name: str, appservice_devices: bool):
        self._client = client
        self.user_id = user_id
        self.store_dir = store_dir
        self.device_name = device_name
        self.appservice_devices = appservice_devices
        self.identity: IdentityDecision | None = None  # the last cross-signing decision
        self.logins = 0  # logins made (a restart that reuses its device: 0)

    async def new_device(self, pickle_key: str) -> DeviceSession:
        """A new device: created as the appservice (MSC4190) where the homeserver lets it,
        else through the appservice login."""
        if self.appservice_devices:
            device_id = new_device_id()
            try:
                await self.put_device(device_id)
            except MatrixRequestError as e:
                log.info("homeserver did not create a device for %s as the appservice "
                         "(%s %s): falling back to the appservice login", self.user_id,
                         e.status, e.errcode)
            else:
                log.info("E2EE device %s of %s created as the appservice (MSC4190)",
                         device_id, self.user_id)
                return DeviceSession(self.user_id, device_id, "", pickle_key, APPSERVICE)
        return await self.login(None, pickle_key)

    async def put_device(self, device_id: str) -> None:
        """Create (or keep) ``device_id`` as the appservice and check the homeserver lets
        the appservice act as it; MatrixRequestError when it does not."""
        await self._client.put_device(device_id, display_name=self.device_name,
                                      user_id=self.user_id)
        who = await self._client.whoami(self.user_id, device_id=device_id)
        if who.get("device_id") != device_id:
            raise MatrixRequestError(501, "M_UNRECOGNIZED",
                                     "appservice device masquerading not supported")

    async def check_appservice_device(self, session: DeviceSession) -> DeviceSession:
        try:
            await self._client.get_device(session.device_id, user_id=self.user_id)
        except MatrixRequestError as e:
            if e.status != 404:
                raise
            log.warning("E2EE device %s of %s is gone from the homeserver: creating it "
                        "again (same keys)", session.device_id, self.user_id)
            await self.put_device(session.device_id)
        return session

    async def login_or_adopt(self, session: DeviceSession) -> DeviceSession:
        """The token is no longer valid: log in again on the same device, or, where the
        homeserver refuses appservice logins (MSC4190 enabled), act as that device through
        the appservice from now on."""
        try:
            return await self.login(session.device_id, session.pickle_key)
        except MatrixRequestError as e:
            if e.errcode != "M_APPSERVICE_LOGIN_UNSUPPORTED" or not self.appservice_devices:
                raise
        await self.put_device(session.device_id)
        log.info("E2EE device %s of %s now used through the appservice (MSC4190)",
                 session.device_id, self.user_id)
        return DeviceSession(self.user_id, session.device_id, "", session.pickle_key,
                             APPSERVICE)

    async def login(self, device_id: str | None, pickle_key: str) -> DeviceSession:
        resp = await self._client.login_appservice(self.user_id, device_name=self.device_name,
                                                   device_id=device_id)
        self.logins += 1
        log.info("E2EE login of %s: device %s", self.user_id, resp["device_id"])
        return DeviceSession(self.user_id, resp["device_id"], resp["access_token"], pickle_key)

    async def check_token(self, session: DeviceSession) -> DeviceSession:
        try:
            who = await self._client.whoami(access_token=session.access_token)
        except MatrixRequestError as e:
            if e.status != 401:
                raise
            return await self.login_or_adopt(session)
        if who.get("user_id") != self.user_id or who.get("device_id") != session.device_id:
            return await self.login_or_adopt(session)
        return session

    async def ensure_cross_signing(self, device_id: str) -> bool:
        """Create or reuse the bot user's cross-signing identity and sign this device with
        it (see ``bots/cross_signing.py``); :class:`IdentityUnusable` when lost or replaced.
        True when it signed the device just now (False: it was signed already).

        Requests go through the appservice as the bot: a first upload needs no interactive
        auth (MSC3967), a replacement (reset) is allowed to an appservice (MSC4190)."""
        path = self.store_dir / KEYS_FILE
        marker = self.store_dir / RESET_FILE
        problem = None
        try:
            keys = await asyncio.to_thread(CrossSigningKeys.load, path)
        except KeysUnreadable as e:
            keys, problem = None, str(e)
        published = await self._client.query_keys({self.user_id: [device_id]},
                                                  user_id=self.user_id)
        master = ((published.get("master_keys") or {}).get(self.user_id) or {}).get("keys")
        server_master = next(iter(master.values()), None) if master else None
        decision = decide_identity(
            local_master=keys.public("master") if keys else None, local_problem=problem,
            server_master=server_master, reset_requested=marker.exists(),
            store_dir=str(self.store_dir), bot=self.user_id)
        self.identity = decision
        if not decision.usable:
            raise IdentityUnusable(decision.reason)
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
            await self._client.upload_cross_signing_keys(keys.upload_body(self.user_id),
                                                         user_id=self.user_id)
            log.info("cross-signing identity of %s: %s (%s)", self.user_id, decision.action,
                     decision.reason)
        if marker.exists():
            await asyncio.to_thread(marker.unlink)
        device = ((published.get("device_keys") or {}).get(self.user_id) or {}).get(
            device_id)
        if device is None:
            raise RuntimeError(f"the homeserver has no keys for device {device_id} yet")
        if decision.action == "reuse" and device_signed_by(device, self.user_id,
                                                           keys.public("self_signing")):
            return False
        body = await self._client.upload_signatures(
            {self.user_id: {device_id: keys.device_signature(device, self.user_id)}},
            user_id=self.user_id)
        if body.get("failures"):
            raise RuntimeError(f"signing device {device_id}: {body['failures']}")
        log.info("E2EE device %s of %s signed by its cross-signing key", device_id,
                 self.user_id)
        return True


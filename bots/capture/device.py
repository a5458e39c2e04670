"""The archive device (:class:`ArchiveDevice`): the bots' E2EE device (identity, MSC4190
device, cross-signing, persistent nio store under ``bots.encryption.store_dir``) for the
archive user, which also reads what it receives.

What it adds to :class:`~bots.crypto.EncryptedSender`:

* :meth:`try_decrypt`: the plaintext of a Megolm event, waiting a little for its key;
* key requests (``m.room_key_request``) sent to the message sender's devices (the archive
  user has no other device of its own to ask);
* forwarded keys (``m.forwarded_room_key``) accepted for a session it asked for, only from
  a device of the user who sent the undecryptable message (nio alone accepts forwards from
  the device's own user only);
* ``m.room_key.withheld`` notices remembered per session, so a gap says why;
* a hook called whenever a to-device message arrives (a key may have come): the capture
  bot retries its open gaps then.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from ..crypto import EncryptedSender
from ..crypto.sender import decrypt_megolm

log = logging.getLogger(__name__)

MEGOLM = "m.megolm.v1.aes-sha2"
WITHHELD = "m.room_key.withheld"


class ArchiveDevice(EncryptedSender):
    """The archive user's E2EE device (see :class:`~bots.crypto.EncryptedDevice` for the
    arguments)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # session id -> why its key was withheld ("m.unverified: ...")
        self.withheld: dict[str, str] = {}
        # session id -> users whose devices may forward its key to us
        self._wanted: dict[str, set[str]] = {}
        self.on_key: Callable[[], None] | None = None  # a key (or any to-device) arrived
        self.keys_received = 0

    async def _open_device(self) -> None:
        await super()._open_device()
        import nio  # heavy (~0.3 s): paid only when a bot encrypts

        client = self._nio
        client.add_to_device_callback(self._to_device, (nio.ToDeviceEvent,))
        olm = client.olm
        original = olm._should_accept_forward

        def accept(sender: str, sender_key: str, event: Any) -> bool:
            """A forward for a session we asked for, from a device of the user who sent the
            message (the Olm channel proves the device; the device list its user)."""
            allowed = self._wanted.get(getattr(event, "session_id", ""), set())
            if not allowed:
                return bool(original(sender, sender_key, event))
            if event.algorithm != MEGOLM or event.session_id not in olm.outgoing_key_requests:
                return False
            device = olm.device_store.device_from_sender_key(event.sender, sender_key)
            if device is None or device.user_id not in allowed:
                log.warning("archive device: forwarded key for %s from %s (%s) refused: not "
                            "a device of the message's sender", event.session_id,
                            event.sender, sender_key)
                return False
            return True

        olm._should_accept_forward = accept

    async def _to_device(self, event: Any) -> None:
        etype = getattr(event, "type", None) or (getattr(event, "source", {}) or {}).get("type")
        if etype == WITHHELD:
            content = (getattr(event, "source", {}) or {}).get("content") or {}
            sid = content.get("session_id")
            if isinstance(sid, str):
                code = str(content.get("code") or "unknown")
                text = content.get("reason")
                self.withheld[sid] = f"{code}" + (f" ({text})" if text else "")
        self.keys_received += 1

    async def _sync_once(self, timeout_ms: int) -> None:
        seen = self.keys_received
        await super()._sync_once(timeout_ms)
        if self.keys_received != seen and self.on_key is not None:
            self.on_key()

    # -- reading ---------------------------------------------------------------------------
    def session_of(self, event: dict[str, Any]) -> tuple[str | None, str | None]:
        """(session id, sender key) of a Megolm event, as its content states them."""
        content = event.get("content") or {}
        sid, key = content.get("session_id"), content.get("sender_key")
        return (sid if isinstance(sid, str) else None, key if isinstance(key, str) else None)

    def has_session(self, room_id: str, event: dict[str, Any]) -> bool:
        """Whether the key of ``event``'s session is here (a retry may decrypt it)."""
        sid, key = self.session_of(event)
        if self._nio is None or sid is None:
            return False
        store = self._nio.olm.inbound_group_store
        if key is not None and store.get(room_id, key, sid) is not None:
            return True
        # newer senders leave out the (deprecated) sender key: look the session up by id
        return any(sid in sessions for sessions in store[room_id].values())

    async def try_decrypt(self, room_id: str, event: dict[str, Any], *,
                          within: float = 0.0) -> dict[str, Any] | None:
        """The plaintext (``{type, content, ...}``) of an ``m.room.encrypted`` Megolm event,
        waiting up to ``within`` seconds for its key; None when it is not here."""
        if not self.ready or event.get("type") != "m.room.encrypted":
            return None
        return await decrypt_megolm(self._nio, room_id, event, within=within)

    async def request_key(self, room_id: str, event: dict[str, Any]) -> bool:
        """Ask the devices of the message's sender for the key of ``event``'s session
        (``m.room_key_request``); True when sent."""
        from nio.crypto.key_request import OutgoingKeyRequest

        sid, sender_key = self.session_of(event)
        sender = event.get("sender")
        if not self.ready or sid is None or not isinstance(sender, str):
            return False
        self._wanted.setdefault(sid, set()).add(sender)
        olm = self._nio.olm
        request_id = olm.outgoing_key_requests[sid].request_id \
            if sid in olm.outgoing_key_requests else f"enclave-{secrets.token_hex(8)}"
        # nio pops (and cancels) the request when the forwarded key arrives
        olm.outgoing_key_requests[sid] = OutgoingKeyRequest(request_id, sid, room_id, MEGOLM)
        body: dict[str, Any] = {"algorithm": MEGOLM, "room_id": room_id, "session_id": sid}
        if sender_key is not None:
            body["sender_key"] = sender_key
        content = {"action": "request", "body": body, "request_id": request_id,
                   "requesting_device_id": self.device_id}
        # the sender's devices: the archive user has no other device that could answer
        messages = {sender: {"*": content}}
        await self._client.send_to_device("m.room_key_request",
                                          f"enclave-keyreq-{secrets.token_hex(8)}", messages,
                                          user_id=self.user_id, device_id=self.device_id or "")
        log.info("archive device: asked %s for the key of session %s in %s", sender, sid,
                 room_id)
        return True

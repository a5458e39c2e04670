"""How bots send messages: plain through the appservice, or encrypted where a room needs it.

:class:`MessageSender` is the one interface fan-out, replies and reminders use. The plain
sender acts as the bot user through the appservice token (``?user_id=``) with a caller-chosen
transaction id, so a resend after a crash is deduplicated by the homeserver. The E2EE sender
(``bots/crypto/``) implements the same protocol; :class:`RoutingSender` picks it for rooms
with ``m.room.encryption`` and refuses (:class:`EncryptionUnavailable`) when there is none,
so an encrypted room is reported, never silently sent plaintext or skipped.

Exactly once across homeserver restarts: every message carries its transaction id under
:data:`~bridge.policy.resend.ACTION_KEY` (the executor's rule), and a send whose earlier
attempt may have reached the homeserver (``resend``: the caller's stored state says it may
have begun) reads the room back first (:class:`bridge.matrix.readback.ReadBack`) and returns
the event found instead of sending again. In an encrypted room the key is inside the
encrypted content and also on the ``m.room.encrypted`` envelope (the E2EE sender copies it):
the read-back matches the envelope and needs no decryption. The key is an opaque hash (the
transaction id, which the homeserver sees anyway), so the envelope tells nobody anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bridge.matrix.client import HomeserverUnavailable, MatrixClient, MatrixRequestError
from bridge.matrix.readback import ReadBack, Send
from bridge.policy.resend import ACTION_KEY

log = logging.getLogger(__name__)

NO_E2EE_REASON = "encrypted room, no E2EE sender"
ENCRYPTED_TYPE = "m.room.encrypted"


class MessageSender(Protocol):
    """Sends one ``m.room.message`` as ``sender``; returns the event id.

    ``resend``: an earlier attempt with ``txn_id`` may have reached the homeserver (read
    back first; the event found is the answer)."""

    async def send(self, room_id: str, content: dict[str, Any], *, txn_id: str,
                   sender: str, resend: bool = False) -> str: ...


class RoomSender(Protocol):
    """One way into a room (plain or encrypted) that :class:`RoutingSender` picks."""

    async def send(self, room_id: str, content: dict[str, Any], *, txn_id: str,
                   sender: str) -> str: ...


class SendRefused(Exception):
    """A sender will not send to this room (retrying will not help); ``reason`` says why.

    Fan-out records the target as failed with the reason (audit, report)."""

    def __init__(self, room_id: str, reason: str):
        self.room_id = room_id
        self.reason = reason
        super().__init__(f"{reason} ({room_id})")


class EncryptionUnavailable(SendRefused):
    """The room is encrypted and no encrypting sender is configured."""

    def __init__(self, room_id: str):
        super().__init__(room_id, NO_E2EE_REASON)


class PlainSender:
    """Unencrypted sends through the appservice (``PUT …/send/m.room.message/{txn_id}``)."""

    def __init__(self, client: MatrixClient):
        self.client = client

    async def send(self, room_id: str, content: dict[str, Any], *, txn_id: str,
                   sender: str, before_resend: Callable[[], Awaitable[Any]] | None = None
                   ) -> str:
        return await self.client.send_event(room_id, "m.room.message", content, txn_id,
                                            user_id=sender, before_resend=before_resend)


class RoomEncryption:
    """Whether rooms are encrypted: asked once per room, then kept up to date by the
    ``m.room.encryption`` events the inbox sees (encryption cannot be switched off)."""

    def __init__(self, client: MatrixClient):
        self.client = client
        self._known: dict[str, bool] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def mark(self, room_id: str, encrypted: bool) -> None:
        """Record what is known (a room the bot created, or an encryption event)."""
        if self._known.get(room_id) is True:
            return  # once encrypted, always encrypted
        self._known[room_id] = encrypted

    def known(self, room_id: str) -> bool | None:
        return self._known.get(room_id)

    async def is_encrypted(self, room_id: str, *, as_user: str) -> bool:
        """Ask the homeserver (as ``as_user``, a member) unless already known."""
        if room_id in self._known:
            return self._known[room_id]
        lock = self._locks.setdefault(room_id, asyncio.Lock())
        async with lock:
            if room_id not in self._known:
                state = await self.client.get_state(room_id, "m.room.encryption",
                                                    user_id=as_user)
                self.mark(room_id, bool(state and state.get("algorithm")))
        self._locks.pop(room_id, None)
        return self._known[room_id]


class RoutingSender:
    """Plain for plain rooms, the E2EE sender for encrypted ones, an error when there is
    no E2EE sender for an encrypted room; every message carries its key and a resend is
    read back first (``read_back``; None only in tests that need no homeserver)."""

    def __init__(self, plain: PlainSender, encryption: RoomEncryption,
                 encrypted: RoomSender | None = None, *, read_back: ReadBack | None = None):
        self.plain = plain
        self.encryption = encryption
        self.encrypted = encrypted
        self.read_back = read_back

    async def send(self, room_id: str, content: dict[str, Any], *, txn_id: str,
                   sender: str, resend: bool = False) -> str:
        content = {**content, ACTION_KEY: txn_id}
        if await self.encryption.is_encrypted(room_id, as_user=sender):
            encrypted = self.encrypted
            if encrypted is None:
                raise EncryptionUnavailable(room_id)

            async def send_encrypted(_: Callable[[], Awaitable[Any]]) -> str:
                # no read-back on the client's own retry: the E2EE sender sends with its
                # device, for which Synapse keeps the transaction id in its database
                try:
                    return await encrypted.send(room_id, content, txn_id=txn_id,
                                                sender=sender)
                except (HomeserverUnavailable, MatrixRequestError, SendRefused):
                    raise
                except Exception as e:
                    # the E2EE sender's own refusal (it cannot encrypt for this room):
                    # reported as a failed send with its reason, never sent in plaintext
                    raise SendRefused(room_id, f"cannot encrypt: {getattr(e, 'reason', e)}"
                                      ) from e

            return await self._once(room_id, ENCRYPTED_TYPE, txn_id, sender, resend,
                                    send_encrypted)
        plain = self.plain
        return await self._once(
            room_id, "m.room.message", txn_id, sender, resend,
            lambda hook: plain.send(room_id, content, txn_id=txn_id, sender=sender,
                                    before_resend=hook))

    async def _once(self, room_id: str, event_type: str, key: str, sender: str,
                    resend: bool, send: Send) -> str:
        if self.read_back is None:
            return await send(_nothing_found)
        return await self.read_back.send_once(room_id, event_type, key, sender, resend, send)


async def _nothing_found() -> None:
    return None

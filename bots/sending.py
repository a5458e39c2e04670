"""How bots send messages: plain through the appservice, or encrypted where a room needs it.

:class:`MessageSender` is the one interface fan-out, replies and reminders use. The plain
sender acts as the bot user through the appservice token (``?user_id=``) with a caller-chosen
transaction id, so a resend after a crash is deduplicated by the homeserver. The E2EE sender
(``bots/crypto/``) implements the same protocol; :class:`RoutingSender` picks it for rooms
with ``m.room.encryption`` and refuses (:class:`EncryptionUnavailable`) when there is none,
so an encrypted room is reported, never silently sent plaintext or skipped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from bridge.matrix.client import HomeserverUnavailable, MatrixClient, MatrixRequestError

log = logging.getLogger(__name__)

NO_E2EE_REASON = "encrypted room, no E2EE sender"


class MessageSender(Protocol):
    """Sends one ``m.room.message`` as ``sender``; returns the event id."""

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
                   sender: str) -> str:
        return await self.client.send_event(room_id, "m.room.message", content, txn_id,
                                            user_id=sender)


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
    no E2EE sender for an encrypted room."""

    def __init__(self, plain: MessageSender, encryption: RoomEncryption,
                 encrypted: MessageSender | None = None):
        self.plain = plain
        self.encryption = encryption
        self.encrypted = encrypted

    async def send(self, room_id: str, content: dict[str, Any], *, txn_id: str,
                   sender: str) -> str:
        if await self.encryption.is_encrypted(room_id, as_user=sender):
            if self.encrypted is None:
                raise EncryptionUnavailable(room_id)
            try:
                return await self.encrypted.send(room_id, content, txn_id=txn_id,
                                                 sender=sender)
            except (HomeserverUnavailable, MatrixRequestError, SendRefused):
                raise
            except Exception as e:
                # the E2EE sender's own refusal (it cannot encrypt for this room): reported
                # as a failed send with its reason, never sent in plaintext instead
                raise SendRefused(room_id, f"cannot encrypt: {getattr(e, 'reason', e)}"
                                  ) from e
        return await self.plain.send(room_id, content, txn_id=txn_id, sender=sender)

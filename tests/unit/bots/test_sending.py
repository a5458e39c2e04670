"""Which sender a message goes through, and that an encrypted room is refused with a reason
(never sent in plaintext). The real path (an encrypted room, no E2EE sender, against
Synapse) is in tests/integration/test_bots_announcements.py."""

from __future__ import annotations

from typing import Any

import pytest

from bots.sending import (
    NO_E2EE_REASON,
    EncryptionUnavailable,
    RoomEncryption,
    RoutingSender,
    SendRefused,
)
from bridge.matrix.client import HomeserverUnavailable


class Recorder:
    def __init__(self, name: str, error: Exception | None = None):
        self.name, self.error, self.sent = name, error, []

    async def send(self, room_id: str, content: dict[str, Any], *, txn_id: str,
                   sender: str) -> str:
        if self.error is not None:
            raise self.error
        self.sent.append((room_id, txn_id, sender))
        return f"${self.name}"


class NoClient:
    async def get_state(self, *a: Any, **kw: Any) -> Any:
        raise AssertionError("the encryption state was known")


class CannotEncryptLike(Exception):
    reason = "a member has no device"


def routing(encrypted: Recorder | None) -> tuple[RoutingSender, Recorder]:
    enc = RoomEncryption(NoClient())  # type: ignore[arg-type]
    enc.mark("!plain", False)
    enc.mark("!secret", True)
    enc.mark("!secret", False)  # encryption cannot be switched off: stays encrypted
    plain = Recorder("plain")
    return RoutingSender(plain, enc, encrypted), plain


async def test_plain_rooms_go_plain_and_encrypted_ones_need_the_e2ee_sender() -> None:
    sender, plain = routing(None)
    assert await sender.send("!plain", {}, txn_id="t1", sender="@bot:x") == "$plain"
    assert plain.sent == [("!plain", "t1", "@bot:x")]
    with pytest.raises(EncryptionUnavailable) as e:
        await sender.send("!secret", {}, txn_id="t2", sender="@bot:x")
    assert e.value.reason == NO_E2EE_REASON and plain.sent == [("!plain", "t1", "@bot:x")]


async def test_the_e2ee_senders_refusal_is_a_reported_failure() -> None:
    e2ee = Recorder("e2ee")
    sender, plain = routing(e2ee)
    assert await sender.send("!secret", {}, txn_id="t", sender="@bot:x") == "$e2ee"
    e2ee.error = CannotEncryptLike("nope")
    with pytest.raises(SendRefused, match="cannot encrypt: a member has no device"):
        await sender.send("!secret", {}, txn_id="t", sender="@bot:x")
    e2ee.error = HomeserverUnavailable("down")  # transient: not a refusal
    with pytest.raises(HomeserverUnavailable):
        await sender.send("!secret", {}, txn_id="t", sender="@bot:x")
    assert plain.sent == []

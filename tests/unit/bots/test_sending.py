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
from bridge.matrix.readback import ReadBack
from bridge.metrics import Metrics
from bridge.policy.resend import ACTION_KEY


class Recorder:
    def __init__(self, name: str, error: Exception | None = None):
        self.name, self.error, self.sent = name, error, []
        self.contents: list[dict[str, Any]] = []

    async def send(self, room_id: str, content: dict[str, Any], *, txn_id: str,
                   sender: str, before_resend: Any = None) -> str:
        if self.error is not None:
            raise self.error
        self.sent.append((room_id, txn_id, sender))
        self.contents.append(content)
        return f"${self.name}"


class NoClient:
    async def get_state(self, *a: Any, **kw: Any) -> Any:
        raise AssertionError("the encryption state was known")


class CannotEncryptLike(Exception):
    reason = "a member has no device"


def routing(encrypted: Recorder | None, read_back: ReadBack | None = None
            ) -> tuple[RoutingSender, Recorder]:
    enc = RoomEncryption(NoClient())  # type: ignore[arg-type]
    enc.mark("!plain", False)
    enc.mark("!secret", True)
    enc.mark("!secret", False)  # encryption cannot be switched off: stays encrypted
    plain = Recorder("plain")
    return RoutingSender(plain, enc, encrypted, read_back=read_back), plain  # type: ignore[arg-type]


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


# -- exactly once: the key on every message, a resend read back first ------------------------
class Timeline:
    """The admin API's backward page of a room: what the read-back sees."""

    def __init__(self, events: list[dict[str, Any]]):
        self.events, self.reads = events, []

    async def admin_room_messages(self, room: str, **kw: Any) -> tuple[list[Any], None]:
        self.reads.append(room)
        return [e for e in self.events if e["room_id"] == room], None


def read_back(timeline: Timeline) -> ReadBack:
    return ReadBack(timeline, admin_user_id="@admin:x", clock_ms=lambda: 0,  # type: ignore[arg-type]
                    metrics=Metrics())


@pytest.mark.parametrize(("room", "event_type"), [("!plain", "m.room.message"),
                                                  ("!secret", "m.room.encrypted")])
async def test_a_resend_finds_the_earlier_message_and_does_not_send_again(
        room: str, event_type: str) -> None:
    earlier = {"room_id": room, "type": event_type, "sender": "@bot:x", "event_id": "$first",
               "content": {ACTION_KEY: "t1"}}
    timeline = Timeline([earlier])
    e2ee = Recorder("e2ee")
    sender, plain = routing(e2ee, read_back(timeline))
    assert await sender.send(room, {"body": "hi"}, txn_id="t1", sender="@bot:x",
                             resend=True) == "$first"
    assert plain.sent == e2ee.sent == [] and timeline.reads == [room]
    # another delivery (another key), or the same key from someone else: sent
    assert await sender.send(room, {"body": "hi"}, txn_id="t2", sender="@bot:x",
                             resend=True) != "$first"
    timeline.events = [{**earlier, "sender": "@mallory:x"}]
    assert await sender.send(room, {"body": "hi"}, txn_id="t1", sender="@bot:x",
                             resend=True) != "$first"
    assert len(plain.sent) + len(e2ee.sent) == 2


async def test_every_message_carries_its_key_and_a_first_send_is_not_read_back() -> None:
    timeline = Timeline([])
    e2ee = Recorder("e2ee")
    sender, plain = routing(e2ee, read_back(timeline))
    await sender.send("!plain", {"body": "a"}, txn_id="t1", sender="@bot:x")
    await sender.send("!secret", {"body": "b"}, txn_id="t2", sender="@bot:x")
    assert plain.contents == [{"body": "a", ACTION_KEY: "t1"}]
    assert e2ee.contents == [{"body": "b", ACTION_KEY: "t2"}]  # inside the encrypted content
    assert timeline.reads == []

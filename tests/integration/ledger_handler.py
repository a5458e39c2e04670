"""A handler plugin that makes "processed exactly once" observable from outside Enclave.

Loaded by a real ``enclave run`` through the config key
``inbox.handlers: ["tests.integration.ledger_handler:factory"]`` (the repo root must be on
the subprocess's PYTHONPATH). For every ``m.room.message`` in a watched room it returns ONE
:class:`SendEvent` that posts the source event id into a *ledger room* as Enclave's bot. The
executor derives the client transaction id from the outbox action id, so a resend after a
crash is deduplicated by Synapse: the ledger must end up holding every source event id
exactly once, and the tests read it back through Synapse's admin API.

The ledger room id comes from the environment variable ``ENCLAVE_LEDGER_ROOM`` or, if that
is unset, from the file named by ``ENCLAVE_LEDGER_FILE``. Without either, the handler does
nothing. Watched rooms: every room except the ledger room; messages sent by Enclave's bot
are ignored (they are the ledger entries themselves, echoed back by the homeserver).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.policy.actions import Action, SendEvent

LEDGER_ROOM_ENV = "ENCLAVE_LEDGER_ROOM"
LEDGER_FILE_ENV = "ENCLAVE_LEDGER_FILE"
RULE_ID = "test.ledger"
# keys of the ledger entry's content that the tests read back
SOURCE_EVENT = "source_event"
SOURCE_ROOM = "source_room"


def ledger_room_from_env() -> str | None:
    room = os.environ.get(LEDGER_ROOM_ENV)
    if room:
        return room.strip()
    path = os.environ.get(LEDGER_FILE_ENV)
    if path:
        return Path(path).read_text(encoding="utf-8").strip() or None
    return None


class LedgerHandler:
    """Pure: the same event always yields the same action, so a re-run after a crash is safe."""

    name = "test-ledger"

    def __init__(self, ledger_room: str | None, bot_user_id: str):
        self.ledger_room = ledger_room
        self.bot_user_id = bot_user_id

    async def __call__(self, event: dict[str, Any], meta: Any) -> Sequence[Action]:
        if self.ledger_room is None or meta.kind != "pdu":
            return []
        if event.get("type") != "m.room.message" or "state_key" in event:
            return []
        room_id = event.get("room_id")
        if room_id == self.ledger_room or event.get("sender") == self.bot_user_id:
            return []
        event_id = event["event_id"]
        return [SendEvent(
            room=self.ledger_room,
            event_type="m.room.message",
            content={
                "msgtype": "m.notice",
                "body": f"processed {event_id}",
                SOURCE_EVENT: event_id,
                SOURCE_ROOM: room_id,
            },
            rule_id=RULE_ID,
            reason="record that the event was processed",
        )]


def factory(services: Any) -> LedgerHandler:
    return LedgerHandler(ledger_room_from_env(), services.config.bot_user_id)

"""Who retention acts as in a room: Enclave's bot or admin with the power, never a member.
Table-driven over room state (no homeserver)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.policy.retention_rooms import EnclaveUsers

HS = "corp.example.com"
BOT, ADMIN = f"@enclave:{HS}", f"@enclave-admin:{HS}"
ALICE, BOB = f"@alice:{HS}", f"@bob:{HS}"


def users() -> EnclaveUsers:
    return EnclaveUsers(server_name=HS, bot_user_id=BOT, admin_user_id=ADMIN,
                        service_prefix="enclave_")


def state(members: dict[str, str], users: dict[str, int] | None, *, creator: str = ALICE,
          version: str = "11", join_rule: str = "invite",
          events: dict[str, int] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"type": "m.room.create", "state_key": "", "sender": creator,
         "content": {"room_version": version}},
        {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": join_rule}}]
    if users is not None:
        out.append({"type": "m.room.power_levels", "state_key": "",
                    "content": {"users": users, "events": events or {}, "redact": 50,
                                "state_default": 50}})
    out += [{"type": "m.room.member", "state_key": u, "content": {"membership": m}}
            for u, m in members.items()]
    return out


@pytest.mark.parametrize(("room", "state_actor", "may_join"), [
    # alice (creator, 100) could do it; retention never acts as her
    pytest.param(state({ALICE: "join", BOB: "join"}, {ALICE: 100}), None, False,
                 id="members-only"),
    pytest.param(state({ALICE: "join", BOT: "join"}, {ALICE: 100, BOT: 50}), BOT, False,
                 id="bot-with-power"),
    pytest.param(state({ALICE: "join", BOT: "join"}, {ALICE: 100, BOT: 0}), None, False,
                 id="bot-without-power"),
    pytest.param(state({ALICE: "join", ADMIN: "join"}, {ALICE: 100, ADMIN: 100}), ADMIN,
                 False, id="admin-with-power"),
    pytest.param(state({ALICE: "join", BOT: "invite"}, {ALICE: 100, BOT: 100}), None, True,
                 id="bot-invited-may-join"),
    pytest.param(state({ALICE: "join"}, {ALICE: 100}, join_rule="public"), None, True,
                 id="public-room-may-join"),
    pytest.param(state({BOT: "join"}, None, creator=BOT), BOT, False,
                 id="no-power-levels-bot-creator"),
    pytest.param(state({BOT: "join", ALICE: "join"}, {ALICE: 100}, creator=BOT, version="12"),
                 BOT, False, id="v12-bot-creator"),
    pytest.param(state({ALICE: "join", BOT: "join"}, {ALICE: 100, BOT: 50},
                       events={"m.room.retention": 100}), None, False,
                 id="bot-below-the-event-level"),
])
def test_who_retention_acts_as(room: list[dict[str, Any]], state_actor: str | None,
                               may_join: bool) -> None:
    s = users()
    assert s.state_sender(room, "m.room.retention") == state_actor
    assert s.bot_may_join(room) is may_join
    # never a member of the room: only Enclave's own users, whatever the power
    assert s.actor(room, 0) in (None, BOT, ADMIN)

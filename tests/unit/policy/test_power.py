"""Who acts for Enclave in a room (bridge.policy.power): table tests, no I/O. Retention and
separation both call this one rule."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.kernel.membership import memberships
from bridge.policy.power import CREATOR_POWER, RoomPower, enclave_actor, is_enclave_user

HS = "corp.test"
BOT, ADMIN = f"@enclave:{HS}", f"@enclave-admin:{HS}"
ALICE, BOB, EVE = f"@alice:{HS}", f"@bob:{HS}", "@eve:personal.example"
ENCLAVE = (BOT, ADMIN)


def pw(users: dict[str, int] | None, *, version: str = "10", creators: tuple[str, ...] = (ALICE,),
       **levels: Any) -> RoomPower:
    content = None if users is None else {"users": users, **levels}
    return RoomPower(content, version, frozenset(creators))


J = "join"


@pytest.mark.parametrize(("members", "power", "needed", "target", "actor"), [
    # the bot first, then the admin; never a member, whatever their power
    pytest.param({ALICE: J, BOT: J, ADMIN: J}, pw({ALICE: 100, BOT: 100, ADMIN: 100}), 50,
                 None, BOT, id="bot-first"),
    pytest.param({ALICE: J, BOT: J, ADMIN: J}, pw({ALICE: 100, BOT: 0, ADMIN: 100}), 50,
                 None, ADMIN, id="admin-when-bot-weak"),
    pytest.param({ALICE: J, BOB: J}, pw({ALICE: 100, BOB: 100}), 0, None, None,
                 id="members-only"),
    pytest.param({ALICE: J, BOT: "invite"}, pw({ALICE: 100, BOT: 100}), 50, None, None,
                 id="bot-invited-not-joined"),
    pytest.param({ALICE: J, BOT: "leave"}, pw({ALICE: 100, BOT: 100}), 50, None, None,
                 id="bot-left"),
    pytest.param({ALICE: J, BOT: J}, pw({ALICE: 100}, users_default=50), 50, None, BOT,
                 id="users-default"),
    pytest.param({ALICE: J, BOT: J}, pw({ALICE: 100, BOT: "60"}), 50, None, BOT,  # type: ignore[dict-item]
                 id="string-level"),
    # no power levels: only the creator has power (100)
    pytest.param({BOT: J}, pw(None, creators=(BOT,)), 50, None, BOT, id="no-levels-creator"),
    pytest.param({ALICE: J, BOT: J}, pw(None), 50, None, None, id="no-levels-not-creator"),
    # kicks: more power than the target, and v12 creators cannot be kicked
    pytest.param({ALICE: J, BOT: J, EVE: J}, pw({BOT: 100, EVE: 100}), 50, EVE, None,
                 id="target-as-strong"),
    pytest.param({ALICE: J, BOT: J, EVE: J}, pw({BOT: 100, EVE: 50}), 50, EVE, BOT,
                 id="target-weaker"),
    pytest.param({ALICE: J, BOT: J, EVE: J}, pw({BOT: 100}, version="12", creators=(EVE,)),
                 50, EVE, None, id="v12-creator-target"),
    pytest.param({ALICE: J, BOT: J, EVE: J}, pw({}, version="12", creators=(BOT,)),
                 150, EVE, BOT, id="v12-bot-creator"),
    pytest.param({ALICE: J, BOT: J, EVE: J}, pw({BOT: 100}, version="12", creators=(ALICE,)),
                 50, EVE, BOT, id="v12-bot-with-power"),
    pytest.param({ALICE: J, EVE: J}, pw({}, version="12", creators=(ALICE,)), 50, EVE, None,
                 id="v12-only-the-creator-could"),
])
def test_enclave_actor(members: dict[str, str], power: RoomPower, needed: int,
                       target: str | None, actor: str | None) -> None:
    assert enclave_actor(members, power, ENCLAVE, needed, target=target) == actor


@pytest.mark.parametrize(("power", "user", "level"), [
    (pw({ALICE: 100}, version="12", creators=(ALICE, BOB)), BOB, CREATOR_POWER),
    (pw({ALICE: 100}, version="11", creators=(ALICE, BOB)), BOB, 0),
    (pw(None, creators=(ALICE,)), ALICE, 100),
    (pw(None, creators=(ALICE,)), BOB, 0),
    (pw({BOB: True}), BOB, 0),  # a boolean is no level # type: ignore[dict-item]
])
def test_power_of(power: RoomPower, user: str, level: int) -> None:
    assert power.of(user) == level


@pytest.mark.parametrize(("power", "action", "event_type", "needed"), [
    (pw({}), "kick", "m.room.history_visibility", 50),
    (pw({}, kick=75, events={"m.room.history_visibility": 100}), "kick",
     "m.room.history_visibility", 75),
    (pw(None), "redact", "m.room.retention", 50),
    (pw({}, state_default=20), "invite", "org.enclave.room_class", 0),
])
def test_levels_needed(power: RoomPower, action: str, event_type: str, needed: int) -> None:
    assert power.needed(action) == needed
    expected_state = 0 if power.levels is None else (
        (power.levels.get("events") or {}).get(event_type, power.levels.get("state_default",
                                                                            50)))
    assert power.needed_state(event_type) == expected_state


def test_from_state_reads_creators_levels_and_members() -> None:
    state: list[dict[str, Any]] = [
        {"type": "m.room.create", "sender": ALICE, "state_key": "",
         "content": {"room_version": "12", "additional_creators": [BOB]}},
        {"type": "m.room.power_levels", "state_key": "", "content": {"users": {BOT: 100}}},
        {"type": "m.room.member", "state_key": BOT, "content": {"membership": "join"}},
        {"type": "m.room.member", "state_key": EVE, "content": {"membership": "invite"}},
    ]
    p = RoomPower.from_state(state)
    assert p.creators == {ALICE, BOB} and p.creator_power and p.of(BOT) == 100
    assert memberships(state) == {BOT: "join", EVE: "invite"}
    assert enclave_actor(memberships(state), p, ENCLAVE, 50, target=BOB) is None


# -- Enclave's own users -------------------------------------------------------------------
@pytest.mark.parametrize(("user", "prefix", "own"), [
    ("@enclave:corp.test", "enclave_", True),           # the bot
    ("@enclave-admin:corp.test", "enclave_", True),     # the admin
    ("@enclave_announce:corp.test", "enclave_", True),  # the appservice's namespace
    ("@enclave_announce:other.test", "enclave_", False),  # same localpart, another server
    ("@enclave:corp.test:8448", "enclave_", False),     # another server (a port is part of it)
    ("@alice:corp.test", "enclave_", False),
    ("@enclavex:corp.test", "enclave_", False),         # extends the bot's name, not the prefix
    ("@alice:corp.test", "", False),                    # an empty prefix claims no namespace
    (None, "enclave_", False),
    ("", "enclave_", False),
])
def test_is_enclave_user(user: str | None, prefix: str, own: bool) -> None:
    assert is_enclave_user(user, server_name="corp.test",
                           own_users=("@enclave:corp.test", "@enclave-admin:corp.test"),
                           namespace_prefix=prefix) is own

"""Who retention acts as in a room: Enclave's bot or admin with the power, never a member;
and the other pure decisions of one room (visibility, ``!retention``, what holds keep).
Table-driven over room state (no homeserver)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.policy.retention import Hold, Period
from bridge.policy.retention_rooms import (
    EnclaveUsers,
    decide_visibility,
    held_messages,
    notice_kind,
    parse_retention_command,
    segment_held,
)

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


# -- the pure decisions the retention service calls --------------------------------------------

PERIOD = Period(30 * 86_400_000, "retention.default", "retention.default", "default")
TEXT = "Messages here are kept for 30 days."


@pytest.mark.parametrize(("body", "arg", "requested", "error"), [
    ("!retention", None, None, False),
    ("!retention   ", None, None, False),
    ("!retention 30d", "30d", 30 * 86_400_000, False),
    ("!retention soon", "soon", None, True),
    ("!retention 30d please", None, None, False),  # not a command with an argument
])
def test_retention_command(body: str, arg: str | None, requested: int | None,
                           error: bool) -> None:
    cmd = parse_retention_command(body)
    assert (cmd.arg, cmd.requested_ms, cmd.error is not None) == (arg, requested, error)


def test_notice_kind_never_in_dms_nor_in_clear_into_encrypted_rooms() -> None:
    dm = Period(None, "retention.dms", "retention.dms", "dm")
    enc = [{"type": "m.room.encryption", "state_key": "", "content": {}}]
    assert notice_kind(dm, [], "topic") == "none"
    assert notice_kind(PERIOD, enc, "message") == "none"
    assert notice_kind(PERIOD, enc, "topic") == "topic"
    assert notice_kind(PERIOD, [], "message") == "message"


def test_visibility_as_the_bot_with_power() -> None:
    room = state({ALICE: "join", BOT: "join"}, {ALICE: 100, BOT: 100})
    room.append({"type": "m.room.topic", "state_key": "", "content": {"topic": "old\nline"}})
    plan = decide_visibility("!r", PERIOD, room, users(),
                             expected={"max_lifetime": PERIOD.keep_ms}, text=TEXT,
                             set_state=True, notice="topic", last_topic_line="line")
    assert [(a.kind, a.actor) for a in plan.actions] == [("set_state", BOT), ("set_state", BOT)]
    assert plan.actions[1].content == {"topic": f"old\n{TEXT}"}  # type: ignore[attr-defined]
    assert plan.unable == () and plan.topic_line == TEXT


def test_visibility_reports_what_members_only_rooms_do_not_allow() -> None:
    room = state({ALICE: "join", BOB: "join"}, {ALICE: 100})
    plan = decide_visibility("!r", PERIOD, room, users(),
                             expected={"max_lifetime": PERIOD.keep_ms}, text=TEXT,
                             set_state=True, notice="message")
    assert plan.actions == ()
    assert len(plan.unable) == 2 and plan.topic_line is None


def test_visibility_edits_the_notice_once_posted() -> None:
    room = state({ALICE: "join", BOT: "invite"}, {ALICE: 100, BOT: 100})
    plan = decide_visibility("!r", PERIOD, room, users(), expected={}, text=TEXT,
                             set_state=False, notice="message", said="before",
                             notice_event_id="$n")
    assert [a.kind for a in plan.actions] == ["join", "send_event"]
    assert plan.actions[1].content["m.relates_to"]["event_id"] == "$n"  # type: ignore[attr-defined]
    again = decide_visibility("!r", PERIOD, room, users(), expected={}, text=TEXT,
                              set_state=False, notice="message", said=TEXT)
    assert [a.kind for a in again.actions] == ["join"]


def _hold(hid: str, **kw: Any) -> Hold:
    return Hold(id=hid, case_id="c", reason="r", placed_by=ALICE,
                users=frozenset(kw.get("users", ())), rooms=frozenset(kw.get("rooms", ())),
                since_ms=kw.get("since"), until_ms=kw.get("until"), created_at=0,
                released_at=kw.get("released"))


def test_what_holds_keep() -> None:
    holds = [_hold("h2", users=(BOB,)), _hold("h1", rooms=("!r",), since=10, until=20),
             _hold("gone", rooms=("!r",), released=5)]
    got = held_messages("!r", [(30, BOB), (5, ALICE), (15, ALICE), (12, BOB)], holds)
    assert got.timestamps == (12, 15, 30) and got.hold_ids == ("h1", "h2")
    assert segment_held("!r", 21, 30, holds[1:]) is False  # after h1, "gone" released
    assert segment_held("!r", 0, 10, holds[1:]) is True
    assert segment_held("!x", 0, 10, holds) is True  # a hold on users: any room

"""Command parsing and permission decisions."""

from __future__ import annotations

import pytest

from bots.commands import (
    CommandError,
    ParsedCommand,
    Permission,
    decide_permission,
    parse_command,
    split_args,
    take_words,
)
from bridge.model.people import StaffRecord


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        ("!help", ParsedCommand("help", "")),
        ("!ACK policy", ParsedCommand("ack", "policy")),
        ("  !announce all\nLine 1\nLine 2 ", ParsedCommand("announce", "all\nLine 1\nLine 2")),
        # a reply's quoted fallback comes first
        ("> <@bot:x> 📣 Policy\n> more\n\n!ack", ParsedCommand("ack", "")),
        ("hello !ack", None),
        ("!", None),
        ("! ack", None),
        ("!!ack", None),
    ],
)
def test_parse_command(body: str, parsed: ParsedCommand | None) -> None:
    assert parse_command(body) == parsed


def test_arguments_keep_quotes_and_the_raw_rest() -> None:
    assert split_args('a "b c" d') == ["a", "b c", "d"]
    with pytest.raises(CommandError, match="cannot read"):
        split_args('"unbalanced')
    words, rest = take_words('--title "Big news" department:Sales **Hi**\n\n- one', 3)
    assert words == ["--title", "Big news", "department:Sales"]
    assert rest == "**Hi**\n\n- one"
    assert take_words("all", 1) == (["all"], "")


def rec(groups: tuple[str, ...] = (), active: bool = True) -> StaffRecord:
    return StaffRecord("@u:x", "u", active, "u", "U", groups=frozenset(groups))


COMMS = Permission(groups=("comms", "it-admins"))
POWER = Permission(min_power=50)
EITHER = Permission(groups=("comms",), min_power=50)


@pytest.mark.parametrize(
    ("perm", "staff", "power", "allowed", "reason"),
    [
        (Permission(), None, None, True, "open to everyone"),
        (COMMS, rec(("comms",)), None, True, "member of comms"),
        (COMMS, rec(("sales",)), None, False, "needs membership of comms or it-admins"),
        (COMMS, None, None, False, "@u:x is not in the staff directory"),
        (COMMS, rec(("comms",), active=False), None, False, "not an active staff member"),
        (POWER, None, 50, True, "power level 50 >= 50"),
        (POWER, None, 10, False, "needs power level 50 in this room (you have 10)"),
        (POWER, None, 2**53, True, "power level unlimited (a room creator) >= 50"),
        (EITHER, rec(("sales",)), 100, True, "power level 100 >= 50"),
        (EITHER, rec(("sales",)), 0, False,
         "needs membership of comms, or power level 50 in this room (you have 0)"),
        (Permission(staff_only=True), None, None, False, "not in the staff directory"),
    ],
)
def test_decide_permission(perm: Permission, staff: StaffRecord | None, power: int | None,
                           allowed: bool, reason: str) -> None:
    d = decide_permission(perm, "@u:x", staff, power)
    assert d.allowed is allowed
    assert reason in d.reason

"""Audience selection from the directory view, and !announce's audience word."""

from __future__ import annotations

import pytest

from bots.announcements.audience import Audience, count_by, parse_audience, select_audience
from bots.commands import CommandError
from bridge.config.bots import AudienceConfig
from bridge.model.people import StaffRecord


def staff(local: str, dept: str | None, *, groups: tuple[str, ...] = (), loc: str | None = None,
          title: str | None = None, active: bool = True) -> StaffRecord:
    return StaffRecord(user_id=f"@{local}:corp", person_id=local, active=active,
                       username=local, display_name=local.title(), department=dept,
                       location=loc, title=title, groups=frozenset(groups))


VIEW = [
    staff("hanna", "Sales", loc="Berlin", title="Head of Sales", groups=("managers",)),
    staff("sam", "Sales", loc="Berlin"),
    staff("sue", "Sales", loc="Paris"),
    staff("otto", "Ops", loc="Berlin", groups=("it-admins", "managers")),
    staff("olga", "Ops", loc="Paris"),
    staff("lea", "Sales", loc="Berlin", active=False),  # a leaver
]


@pytest.mark.parametrize(
    ("audience", "users"),
    [
        (Audience(all_staff=True), ["hanna", "olga", "otto", "sam", "sue"]),
        (Audience(department=("Sales",)), ["hanna", "sam", "sue"]),
        (Audience(department=("Sales", "Ops")), ["hanna", "olga", "otto", "sam", "sue"]),
        # criteria combine with AND; values within one with OR
        (Audience(department=("Sales",), location=("Berlin",)), ["hanna", "sam"]),
        (Audience(groups=("managers",)), ["hanna", "otto"]),
        (Audience(groups=("managers",), department=("Ops",)), ["otto"]),
        (Audience(title=("Head of Sales",)), ["hanna"]),
        # all_staff with a criterion is just the criterion
        (Audience(all_staff=True, location=("Paris",)), ["olga", "sue"]),
        # explicit users are added; a leaver named explicitly is still left out
        (Audience(department=("Ops",), users=("@sam:corp", "@lea:corp", "@guest:corp")),
         ["guest", "olga", "otto", "sam"]),
        (Audience(department=("Nobody",)), []),
        (Audience(rooms=("!r:corp",)), []),
    ],
)
def test_select_audience(audience: Audience, users: list[str]) -> None:
    sel = select_audience(audience, VIEW)
    assert sel.users == tuple(sorted(f"@{u}:corp" for u in users))
    assert "@lea:corp" not in sel.users


def test_leavers_named_explicitly_are_reported_and_rooms_kept() -> None:
    sel = select_audience(Audience(users=("@lea:corp",), rooms=("!a:corp", "#b:corp",
                                                                "!a:corp")), VIEW)
    assert sel.users == ()
    assert sel.skipped == (("@lea:corp", "a leaver (inactive in the directory)"),)
    assert sel.rooms == ("!a:corp", "#b:corp")
    assert sel.targets == ("!a:corp", "#b:corp")


@pytest.mark.parametrize(
    ("word", "audience"),
    [
        ("all", Audience(all_staff=True)),
        ("department:Sales", Audience(department=("Sales",))),
        ("dept:Sales,department:Ops", Audience(department=("Sales", "Ops"))),
        ("group:it-admins,location:Berlin", Audience(groups=("it-admins",),
                                                     location=("Berlin",))),
        ("department:Research & Development", Audience(department=("Research & Development",))),
        ("@sam:corp,!room:corp,#general:corp", Audience(users=("@sam:corp",),
                                                        rooms=("!room:corp",
                                                               "#general:corp"))),
        ("title:CEO", Audience(title=("CEO",))),
    ],
)
def test_parse_audience(word: str, audience: Audience) -> None:
    assert parse_audience(word) == audience


@pytest.mark.parametrize("word", ["", "sales", "colour:red", "department:", "@nobody"])
def test_parse_audience_errors_name_the_problem(word: str) -> None:
    with pytest.raises(CommandError):
        parse_audience(word)


def test_audience_from_config_key_and_description() -> None:
    a = Audience.from_config(AudienceConfig(department=["Sales"], groups=["managers"]))
    assert a == Audience(department=("Sales",), groups=("managers",))
    assert a.describe() == "group managers, and department Sales"
    assert Audience(all_staff=True).describe() == "all staff"
    # the room key does not depend on the order values are given in
    assert Audience(department=("A", "B")).key() == Audience(department=("B", "A")).key()
    assert Audience(department=("A",)).key() != Audience(department=("B",)).key()
    assert Audience.from_dict(a.to_dict()) == a


def test_count_by_department() -> None:
    sel = select_audience(Audience(location=("Berlin",)), VIEW)
    assert count_by(sel, VIEW) == {"Ops": 1, "Sales": 2}

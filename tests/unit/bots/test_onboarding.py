"""Onboarding decisions: who is new, their department's rooms, the welcome text."""

from __future__ import annotations

from bots.onboarding import DepartmentRoom, decide_greetings, department_rooms, welcome_markdown
from bridge.config.bots import OnboardingConfig
from bridge.config.directory import DirectoryConfig
from bridge.model.people import StaffRecord

A = StaffRecord("@a:x", "1", True, "a", "Ann Able", department="Sales")
B = StaffRecord("@b:x", "2", True, "b", "Bob")
C = StaffRecord("@c:x", "3", False, "c", "Cy")  # leaver


def test_decide_greetings() -> None:
    everyone = {"@a:x", "@b:x", "@c:x"}
    assert decide_greetings([A, B, C], set(), None, everyone) == ["@a:x", "@b:x"]
    assert decide_greetings([A, B, C], {"@a:x"}, None, everyone) == ["@b:x"]
    assert decide_greetings([A, B, C], set(), {"@a:x", "@b:x"}, everyone) == []
    # in the directory view, but the account is not there yet: later
    assert decide_greetings([A, B, C], set(), None, {"@b:x"}) == ["@b:x"]


DIRECTORY = DirectoryConfig.model_validate({
    "source": {"type": "file", "path": "d.yaml"},
    "managed_rooms": [
        {"id": "dept", "kind": "space", "for_each": "department", "name": "{value}"},
        {"id": "dept-general", "for_each": "department", "parent": "dept",
         "name": "{value} general"},
        {"id": "all", "members": "all", "name": "All staff"},
    ]})


def test_department_rooms_are_the_managed_ones_of_the_department() -> None:
    managed = {"dept/Sales": "!s", "dept-general/Sales": "!sg", "dept/Ops": "!o", "all": "!a"}
    assert department_rooms(DIRECTORY, managed, "Sales") == [
        DepartmentRoom("Sales", "!s", True), DepartmentRoom("Sales general", "!sg", False)]
    assert department_rooms(DIRECTORY, managed, None) == []
    assert department_rooms(None, managed, "Sales") == []


def test_welcome_markdown() -> None:
    cfg = OnboardingConfig.model_validate({
        "message": "Welcome {first_name} to {department}!",
        "links": [{"title": "Handbook", "url": "https://wiki.example.com/handbook"}]})
    md = welcome_markdown(cfg, A, "@a:x", [DepartmentRoom("Sales", "!s", True)], "today",
                          "corp.test")
    assert md.startswith("Welcome Ann to Sales!")
    assert "[Sales](https://matrix.to/#/!s?via=corp.test) (space)" in md
    assert "- [Handbook](https://wiki.example.com/handbook)" in md

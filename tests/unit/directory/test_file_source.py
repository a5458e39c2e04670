"""The file source: YAML and CSV to one snapshot, strict checks naming file and place."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.directory.file_source import FileSource
from bridge.model.people import DirectoryError, DirectorySnapshot, Group, Person

REPO = Path(__file__).resolve().parents[3]

YAML = """\
people:
  - id: "1000"
    username: carol
    display_name: Carol Chen
    email: carol@corp.example.com
    title: CTO
    department: Engineering
    location: Berlin
    initial_password: pw-carol
  - id: "1001"
    username: alice
    display_name: Alice Adams
    email: alice@corp.example.com
    title: Engineer
    department: Engineering
    location: Berlin
    manager: "1000"
    disabled: false
    groups: [it-admins]
    initial_password: pw-alice
  - id: "1002"
    username: bob
    display_name: Bob Brown
    manager: carol
    disabled: true
    groups: [sales, it-admins]
  - username: dave
    display_name: Dave Diaz
groups:
  - id: it-admins
    name: IT administrators
    members: [dave]
    owners: [carol]
"""

CSV = """\
id,username,display_name,email,title,department,location,manager,disabled,groups,initial_password
1000,carol,Carol Chen,carol@corp.example.com,CTO,Engineering,Berlin,,,,pw-carol
1001,alice,Alice Adams,alice@corp.example.com,Engineer,Engineering,Berlin,1000,no,it-admins,pw-alice
1002, bob ,Bob Brown,,,,,carol,yes,sales; it-admins,

dave,dave,Dave Diaz,,,,,,0,it-admins,
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def read(path: Path, **kw: object) -> DirectorySnapshot:
    return FileSource(path, **kw).read_sync()  # type: ignore[arg-type]


def fails(tmp_path: Path, name: str, text: str, **kw: object) -> str:
    path = write(tmp_path, name, text)
    with pytest.raises(DirectoryError) as exc:
        read(path, **kw)
    msg = str(exc.value)
    assert str(path) in msg  # every error names the file
    return msg


# -- parsing -----------------------------------------------------------------------------------

def test_yaml_snapshot(tmp_path: Path) -> None:
    snap = read(write(tmp_path, "people.yaml", YAML))
    assert snap.source == "file:people.yaml"
    assert sorted(snap.people) == ["1000", "1001", "1002", "dave"]  # id defaults to username
    assert snap.people["1001"] == Person(
        id="1001", username="alice", display_name="Alice Adams",
        email="alice@corp.example.com", title="Engineer", department="Engineering",
        location="Berlin", manager="1000", groups=frozenset({"it-admins"}))
    assert snap.people["1002"].manager == "1000"  # given by username, resolved to the id
    assert snap.people["1002"].disabled is True
    assert snap.people["dave"].email is None


def test_groups_from_group_entries_and_person_lists(tmp_path: Path) -> None:
    snap = read(write(tmp_path, "people.yaml", YAML))
    assert snap.groups["it-admins"] == Group(
        id="it-admins", name="IT administrators",
        members=frozenset({"1001", "1002", "dave"}), owners=frozenset({"1000"}))
    # named only on a person: the group exists, named by its id
    assert snap.groups["sales"] == Group(id="sales", name="sales",
                                         members=frozenset({"1002"}))
    assert snap.people["dave"].groups == frozenset({"it-admins"})
    assert snap.people["1002"].groups == frozenset({"sales", "it-admins"})


def test_yaml_and_csv_give_the_same_snapshot(tmp_path: Path) -> None:
    y = read(write(tmp_path, "people.yaml", YAML), allow_initial_passwords=True)
    c = read(write(tmp_path, "people.csv", CSV), allow_initial_passwords=True)
    assert dict(c.people) == dict(y.people)
    # CSV has no group entries: same memberships, but names and owners only from YAML
    assert {g: grp.members for g, grp in c.groups.items()} == \
        {g: grp.members for g, grp in y.groups.items()}
    for p in y.people.values():
        assert c.people[p.id].initial_password == p.initial_password


@pytest.mark.parametrize("suffix", [".yml", ".YAML", ".txt"])
def test_format_from_suffix_or_setting(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path, "people" + suffix, YAML)
    if suffix == ".txt":
        with pytest.raises(DirectoryError, match="format"):
            read(path)
        assert len(read(path, format="yaml").people) == 4
    else:
        assert len(read(path).people) == 4


def test_csv_with_explicit_format_and_few_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "people.txt", "display_name,username\nAlice Adams,alice\n")
    snap = read(path, format="csv")
    assert snap.people["alice"] == Person(id="alice", username="alice",
                                          display_name="Alice Adams")


def test_csv_excel_bom_and_quoted_fields(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_bytes('username,display_name,title\r\nalice,"Adams, Alice","Head of ""X"""\r\n'
                     .encode("utf-8-sig"))
    p = read(path).people["alice"]
    assert (p.display_name, p.title) == ("Adams, Alice", 'Head of "X"')


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("TRUE", True), ("yes", True), ("Yes", True), ("1", True),
    ("false", False), ("no", False), ("0", False), ("", False),
])
def test_csv_disabled_values(tmp_path: Path, value: str, expected: bool) -> None:
    path = write(tmp_path, "p.csv", f"username,display_name,disabled\na,A,{value}\n")
    assert read(path).people["a"].disabled is expected


async def test_read_is_async(tmp_path: Path) -> None:
    source = FileSource(write(tmp_path, "people.yaml", YAML))
    assert source.name == "file"
    snap = await source.read()
    assert len(snap.people) == 4


def test_empty_people_list_is_read(tmp_path: Path) -> None:
    # an empty answer is the sync's safety check to refuse, not a parse error
    assert read(write(tmp_path, "p.yaml", "people: []\n")).people == {}


def test_unknown_format_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        FileSource(tmp_path / "p.yaml", format="json")


# -- initial passwords -------------------------------------------------------------------------

def test_initial_passwords_only_when_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "people.yaml", YAML)
    off = FileSource(path)
    snap = off.read_sync()
    assert all(p.initial_password is None for p in snap.people.values())
    assert len(off.warnings) == 1
    assert "initial_password" in off.warnings[0] and "2 person(s)" in off.warnings[0]

    on = FileSource(path, allow_initial_passwords=True)
    snap = on.read_sync()
    assert snap.people["1001"].initial_password == "pw-alice"
    assert snap.people["dave"].initial_password is None
    assert on.warnings == []


def test_no_warning_without_passwords(tmp_path: Path) -> None:
    source = FileSource(write(tmp_path, "p.yaml", "people:\n- {username: a, display_name: A}\n"))
    source.read_sync()
    assert source.warnings == []


def test_warnings_reset_on_each_read(tmp_path: Path) -> None:
    source = FileSource(write(tmp_path, "people.yaml", YAML))
    source.read_sync()
    source.read_sync()
    assert len(source.warnings) == 1


def test_csv_passwords_keep_their_spaces(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "username,display_name,initial_password\na,A, pw \n")
    assert read(path, allow_initial_passwords=True).people["a"].initial_password == " pw "


# -- errors ------------------------------------------------------------------------------------

PERSON = "  - username: {u}\n    display_name: {u}\n"
ONE = "people:\n" + PERSON.format(u="a")  # a file with one person, a


@pytest.mark.parametrize(("text", "where", "problem"), [
    pytest.param("people:\n  - username: a\n    display_name: A\n    emial: a@x\n",
                 "people[0].emial", "unknown key", id="unknown-key"),
    pytest.param("people: []\nusers: []\n", "users", "unknown key", id="unknown-top-key"),
    pytest.param("peeple: []\n", "people", "required", id="no-people"),
    pytest.param("people:\n  - display_name: A\n", "people[0].username", "required",
                 id="missing-username"),
    pytest.param(ONE + "  - username: b\n", "people[1].display_name",
                 "required", id="missing-display-name"),
    pytest.param("people:\n  - id: 1001\n    username: a\n    display_name: A\n",
                 "people[0].id", "quote it", id="number-id"),
    pytest.param(ONE + PERSON.format(u="b") + "    email: 42\n",
                 "people[1].email", "must be a string", id="number-email"),
    pytest.param(ONE + PERSON.format(u="b") + "    email: b.corp\n",
                 "people[1].email", "name@domain", id="bad-email"),
    pytest.param(ONE + "    disabled: maybe\n", "people[0].disabled",
                 "true or false", id="bad-bool"),
    pytest.param(ONE + "    groups: it-admins\n", "people[0].groups",
                 "must be a list", id="groups-not-list"),
    pytest.param(ONE + '    username: ""\n', "line 4", "given twice",
                 id="yaml-duplicate-key"),
    pytest.param("people:\n  - username: ''\n    display_name: A\n", "people[0].username",
                 "must not be empty", id="empty-username"),
    pytest.param("people:\n  - alice\n", "people[0]", "mapping", id="row-not-mapping"),
    pytest.param("people:\n  - id: '1'\n" + "    username: a\n    display_name: A\n"
                 + "  - id: '1'\n    username: b\n    display_name: B\n",
                 "people[1].id", "duplicate id '1' (also at people[0])", id="duplicate-id"),
    pytest.param("people:\n  - id: a\n    username: x\n    display_name: X\n"
                 + PERSON.format(u="a"),
                 "people[1].id", "duplicate id 'a'", id="duplicate-defaulted-id"),
    pytest.param("people:\n  - id: '1'\n    username: a\n    display_name: A\n"
                 + "  - id: '2'\n    username: a\n    display_name: B\n",
                 "people[1].username", "duplicate username 'a' (also at people[0])",
                 id="duplicate-username"),
    pytest.param(ONE + "    manager: zed\n", "people[0].manager",
                 "'zed' is neither the id nor the username", id="manager-nowhere"),
    pytest.param(ONE + "    manager: a\n", "people[0].manager",
                 "own manager", id="own-manager"),
    pytest.param("people:\n  - id: b\n    username: x\n    display_name: X\n"
                 + "  - id: y\n    username: b\n    display_name: B\n"
                 + PERSON.format(u="c") + "    manager: b\n",
                 "people[2].manager", "ambiguous", id="manager-ambiguous"),
    pytest.param(ONE + "groups:\n  - id: g\n    members: [a, zed]\n",
                 "groups[0].members[1]", "'zed' is neither", id="member-nowhere"),
    pytest.param(ONE + "groups:\n  - id: g\n    owners: [zed]\n",
                 "groups[0].owners[0]", "'zed' is neither", id="owner-nowhere"),
    pytest.param(ONE + "groups:\n  - id: g\n  - id: g\n",
                 "groups[1].id", "duplicate group id 'g'", id="duplicate-group"),
    pytest.param(ONE + "groups:\n  - id: g\n    colour: red\n",
                 "groups[0].colour", "unknown key; allowed: id, name, members, owners",
                 id="group-unknown-key"),
    pytest.param("people: [\n", "line 2", "YAML syntax error", id="yaml-syntax"),
    pytest.param("people:\n  - username: a\n   display_name: A\n", "line 3",
                 "YAML syntax error", id="yaml-indent"),
    pytest.param("", "", "empty", id="empty-file"),
    pytest.param("- a\n- b\n", "", "top level", id="top-level-list"),
])
def test_yaml_errors(tmp_path: Path, text: str, where: str, problem: str) -> None:
    msg = fails(tmp_path, "people.yaml", text)
    assert where in msg
    assert problem in msg


HEADER = "id,username,display_name,manager,disabled,groups\n"


@pytest.mark.parametrize(("text", "where", "problem"), [
    pytest.param(HEADER + "1,a,A,,maybe,\n", "line 2, column disabled", "'maybe' is not one of",
                 id="bad-bool"),
    pytest.param(HEADER + "1,a,A,,,\n2,a,B,,,\n", "line 3, column username",
                 "duplicate username 'a' (also at line 2)", id="duplicate-username"),
    pytest.param(HEADER + "1,a,A,,,\n\n1,b,B,,,\n", "line 4, column id",
                 "duplicate id '1' (also at line 2)", id="duplicate-id-after-blank"),
    pytest.param(HEADER + "1,a,A,zed,,\n", "line 2, column manager", "'zed' is neither",
                 id="manager-nowhere"),
    pytest.param(HEADER + "1,a,A,,\n", "line 2", "5 fields, the header has 6",
                 id="short-row"),
    pytest.param(HEADER + "1,,A,,,\n", "line 2, column username", "required",
                 id="empty-username"),
    pytest.param("username,display_name,mail\n", "line 1", "unknown column(s) 'mail'",
                 id="unknown-column"),
    pytest.param("username,name\n", "line 1", "missing column(s) display_name",
                 id="missing-column"),
    pytest.param("username,username,display_name\n", "line 1", "username given twice",
                 id="duplicate-column"),
    pytest.param("username,display_name,email\na,A,not-an-email\n", "line 2, column email",
                 "name@domain", id="bad-email"),
    pytest.param('username,display_name\na,"A\n', "line 2", "CSV syntax error",
                 id="csv-syntax"),
    pytest.param("", "", "empty", id="empty-file"),
])
def test_csv_errors(tmp_path: Path, text: str, where: str, problem: str) -> None:
    msg = fails(tmp_path, "people.csv", text)
    assert where in msg
    assert problem in msg


def test_csv_line_numbers_count_multiline_fields(tmp_path: Path) -> None:
    text = 'username,display_name,title\na,A,"two\nlines"\nb,B,x\nb,C,y\n'
    msg = fails(tmp_path, "p.csv", text)
    assert "line 5, column username: duplicate username 'b' (also at line 4)" in msg


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = ONE + "    manager: x\n" + PERSON.format(u="b") + "    manager: y\n"
    msg = fails(tmp_path, "p.yaml", text)
    assert "people[0].manager" in msg and "people[1].manager" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.yaml"
    with pytest.raises(DirectoryError, match=r"gone\.yaml: no such file"):
        read(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"username,display_name\na,\xff\n")
    with pytest.raises(DirectoryError, match="UTF-8"):
        read(path)


# -- the local stack's demo file ---------------------------------------------------------------

def test_local_stack_directory_parses() -> None:
    path = REPO / "deploy" / "local" / "directory.yaml"
    source = FileSource(path, allow_initial_passwords=True)
    snap = source.read_sync()
    assert sorted(p.username for p in snap.people.values()) == ["alice", "bob", "carol", "dave"]
    assert snap.people["1002"].manager == "1001"
    assert all(p.initial_password for p in snap.people.values())
    assert source.warnings == []

"""Person -> Matrix user: normalisation, templates, known ids, collisions, display names."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import pytest

from bridge.config.directory import MappingConfig
from bridge.model.people import Person
from bridge.policy.mapping import (
    MAX_LOCALPART,
    MappedUser,
    MappingResult,
    map_people,
    normalise_localpart,
    render_displayname,
    render_template,
)

SERVER = "corp.example.com"


def person(pid: str, username: str, display_name: str = "", **kw: object) -> Person:
    return Person(id=pid, username=username, display_name=display_name or username.title(),
                  **kw)  # type: ignore[arg-type]


def run(people: list[Person], *, known: Mapping[str, str] | None = None,
        reserved: Callable[[str], bool] = lambda lp: False, **cfg: str) -> MappingResult:
    return map_people(people, MappingConfig(**cfg), SERVER, known=known or {},
                      reserved=reserved)


def ids(result: MappingResult) -> dict[str, str]:
    return {pid: u.user_id for pid, u in result.users.items()}


# -- normalisation -----------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("alice", "alice"),
    ("ALICE", "alice"),
    ("  Alice  ", "alice"),
    ("Alice Adams", "alice.adams"),
    ("alice   adams", "alice.adams"),
    ("José.Müller", "jose.muller"),
    ("Zoë Ångström", "zoe.angstrom"),
    ("Straße", "strasse"),
    ("STRASSE", "strasse"),
    ("ẞ", "ss"),
    ("Søren Ørsted", "soren.orsted"),
    ("Łukasz Żółw", "lukasz.zolw"),
    ("Đorđe", "dorde"),
    ("Æsa", "aesa"),
    ("Œuvre", "oeuvre"),
    ("Þór Ðan", "thor.dan"),
    ("İstanbul", "istanbul"),
    ("ı", "i"),
    ("ﬁle", "file"),  # ligature, NFKD
    ("Ｆｕｌｌ", "full"),  # full-width, NFKD
    ("o'brien", "o.brien"),
    ("a+b@c,d", "a.b.c.d"),
    ("a!!!b", "a.b"),
    ("a..b", "a.b"),
    ("a. .b", "a.b"),
    ("keep_=-/.", "keep_="),
    ("x/y=z_w-v", "x/y=z_w-v"),
    ("__a__", "a"),
    ("-/-a-/-", "a"),
    ("...a...", "a"),
    ("alice😀", "alice"),
    ("😀 bob 😀", "bob"),
    ("😀", ""),
    ("李小龍", ""),
    ("", ""),
    ("   ", ""),
    ("._-/", ""),
    ("a" * 100, "a" * MAX_LOCALPART),
    ("a" * 63 + ".b", "a" * 63),  # the cut leaves a trailing dot, stripped again
])
def test_normalise_localpart(raw: str, expected: str) -> None:
    assert normalise_localpart(raw) == expected


def test_normalised_localparts_are_valid_matrix_localparts() -> None:
    for raw in ["Ünïcödé ñame", "x" * 300, "a!b#c$d%e^f&g*h(i)j", "tab\tnew\nline"]:
        lp = normalise_localpart(raw)
        assert re.fullmatch(r"[a-z0-9._=\-/]{1,64}", lp)
        assert ".." not in lp and lp[0] not in "._-/" and lp[-1] not in "._-/"


# -- templates ---------------------------------------------------------------------------------

ADA = person("7", "alovelace", "Ada King Lovelace", email="ada.lovelace@corp.example.com",
             department="Engineering", title="Analyst", location="London")


@pytest.mark.parametrize(("template", "expected"), [
    ("{username}", "alovelace"),
    ("{email_localpart}", "ada.lovelace"),
    ("{given_name}.{surname}", "Ada.Lovelace"),
    ("{display_name}", "Ada King Lovelace"),
    ("{department}/{title}/{location}", "Engineering/Analyst/London"),
    ("{email}", "ada.lovelace@corp.example.com"),
    ("{id}-{username}", "7-alovelace"),
])
def test_render_template(template: str, expected: str) -> None:
    assert render_template(template, ADA) == expected


def test_missing_fields_render_empty() -> None:
    bare = person("1", "cher", "Cher")
    assert render_template("[{email}|{email_localpart}|{department}|{title}|{location}]",
                           bare) == "[||||]"
    # a one-word name is a given name without a surname
    assert render_template("{given_name}|{surname}", bare) == "Cher|"


def test_unknown_template_field_raises() -> None:
    with pytest.raises(ValueError, match="nope"):
        render_template("{nope}", ADA)


@pytest.mark.parametrize(("template", "expected"), [
    ("{username}", "@alovelace:corp.example.com"),
    ("{email_localpart}", "@ada.lovelace:corp.example.com"),
    ("{given_name}.{surname}", "@ada.lovelace:corp.example.com"),
    ("{display_name}", "@ada.king.lovelace:corp.example.com"),
])
def test_localpart_templates(template: str, expected: str) -> None:
    result = run([ADA], localpart_template=template)
    assert result.users["7"].user_id == expected
    assert result.users["7"].localpart == expected[1:].split(":")[0]
    assert result.refused == []


@pytest.mark.parametrize(("p", "template"), [
    (person("1", "x", "😀"), "{display_name}"),
    (person("1", "x"), "{email_localpart}"),  # no email
    (person("1", "x", "Cher"), "{surname}"),
])
def test_empty_localpart_is_refused(p: Person, template: str) -> None:
    result = run([p], localpart_template=template)
    assert result.users == {}
    assert result.refused == [("1", "localpart template gives an empty localpart")]


def test_all_numeric_localpart_is_refused() -> None:
    # Synapse reserves numeric user ids for guests
    result = run([person("1001", "x")], localpart_template="{id}")
    assert result.users == {}
    assert [pid for pid, _ in result.refused] == ["1001"]
    assert "numeric" in result.refused[0][1]


# -- known users keep their ids ----------------------------------------------------------------

def test_known_user_keeps_id_after_rename() -> None:
    renamed = person("1", "alice.smith", "Alice Smith")
    result = run([renamed], known={"1": "@alice:corp.example.com"})
    u = result.users["1"]
    assert (u.user_id, u.localpart) == ("@alice:corp.example.com", "alice")
    assert u.displayname == "Alice Smith"  # display names follow the directory
    assert u.person is renamed


def test_known_user_keeps_id_after_template_change() -> None:
    result = run([ADA], known={"7": "@alovelace:corp.example.com"},
                 localpart_template="{email_localpart}")
    assert ids(result) == {"7": "@alovelace:corp.example.com"}


def test_known_user_keeps_id_even_when_reserved_or_colliding() -> None:
    result = run([person("1", "bot"), person("2", "bot")],
                 known={"2": "@bot:corp.example.com"}, reserved=lambda lp: lp == "bot")
    assert ids(result) == {"1": "@bot-2:corp.example.com", "2": "@bot:corp.example.com"}


def test_ids_of_people_gone_from_the_directory_stay_taken() -> None:
    # Matrix ids cannot be reused: a new Alice does not get the leaver's account
    result = run([person("9", "alice")], known={"1": "@alice:corp.example.com"})
    assert ids(result) == {"9": "@alice-2:corp.example.com"}


def test_known_ids_compare_case_insensitively() -> None:
    result = run([person("9", "alice")], known={"1": "@Alice:corp.example.com"})
    assert ids(result) == {"9": "@alice-2:corp.example.com"}


def test_disabled_people_are_mapped() -> None:
    result = run([person("1", "alice", disabled=True)])
    assert ids(result) == {"1": "@alice:corp.example.com"}


# -- collisions: suffix ------------------------------------------------------------------------

@pytest.mark.parametrize(("people", "known", "reserved", "expected"), [
    pytest.param(
        [person("3", "alice"), person("1", "Alice"), person("2", "ALICE")], {}, set(),
        {"1": "alice", "2": "alice-2", "3": "alice-3"}, id="by-id-order"),
    pytest.param(
        [person("b", "José"), person("a", "jose")], {}, set(),
        {"a": "jose", "b": "jose-2"}, id="after-normalisation"),
    pytest.param(
        [person("5", "alice")], {"1": "@alice:s", "2": "@alice-2:s"}, set(),
        {"5": "alice-3"}, id="skips-known"),
    pytest.param(
        [person("1", "alice"), person("2", "alice")], {}, {"alice-2"},
        {"1": "alice", "2": "alice-3"}, id="skips-reserved"),
    pytest.param(
        [person("1", "admin")], {}, {"admin"}, {"1": "admin-2"}, id="reserved-plain"),
    pytest.param(
        # the person whose own localpart is alice-2 keeps it; the later alice skips it
        [person("1", "alice"), person("2", "alice"), person("3", "alice-2")], {}, set(),
        {"1": "alice", "2": "alice-3", "3": "alice-2"}, id="plain-first"),
    pytest.param(
        [person("10", "bob"), person("9", "bob")], {}, set(),
        {"10": "bob", "9": "bob-2"}, id="string-id-order"),
])
def test_collision_suffix(people: list[Person], known: dict[str, str], reserved: set[str],
                          expected: dict[str, str]) -> None:
    result = run(people, known=known, reserved=reserved.__contains__, collision="suffix")
    assert {pid: u.localpart for pid, u in result.users.items()} == expected
    assert result.refused == []
    for u in result.users.values():
        if u.person.id not in known:
            assert u.user_id == f"@{u.localpart}:{SERVER}"


def test_suffix_is_stable_whatever_the_input_order() -> None:
    people = [person(str(i), "sam") for i in range(1, 6)]
    a = run(people)
    b = run(list(reversed(people)))
    assert ids(a) == ids(b)
    assert a.users["1"].localpart == "sam" and a.users["5"].localpart == "sam-5"


def test_suffix_keeps_the_length_cap() -> None:
    long = "a" * 80
    result = run([person("1", long), person("2", long)])
    assert result.users["2"].localpart == "a" * (MAX_LOCALPART - 2) + "-2"
    assert all(len(u.localpart) <= MAX_LOCALPART for u in result.users.values())


def test_suffix_gives_up_on_a_fully_reserved_namespace() -> None:
    result = run([person("1", "enclave-x")], reserved=lambda lp: lp.startswith("enclave-"))
    assert result.users == {}
    assert result.refused[0][0] == "1" and "no free localpart" in result.refused[0][1]


# -- collisions: refuse ------------------------------------------------------------------------

def test_refuse_every_new_person_sharing_a_localpart() -> None:
    result = run([person("1", "alice"), person("2", "Alice"), person("3", "bob")],
                 collision="refuse")
    assert ids(result) == {"3": "@bob:corp.example.com"}
    assert result.refused == [
        ("1", "localpart 'alice' is also what person(s) 2 map to"),
        ("2", "localpart 'alice' is also what person(s) 1 map to"),
    ]


def test_refuse_names_the_known_user() -> None:
    result = run([person("1", "alice"), person("2", "alice")],
                 known={"1": "@alice:corp.example.com"}, collision="refuse")
    assert ids(result) == {"1": "@alice:corp.example.com"}
    assert result.refused == [
        ("2", "localpart 'alice' is already @alice:corp.example.com (person 1)")]


def test_refuse_a_known_id_of_someone_gone() -> None:
    result = run([person("2", "alice")], known={"1": "@alice:corp.example.com"},
                 collision="refuse")
    assert result.users == {}
    assert result.refused == [
        ("2", "localpart 'alice' is already @alice:corp.example.com (person 1)")]


def test_refuse_reserved() -> None:
    result = run([person("1", "enclave"), person("2", "bob")],
                 reserved={"enclave"}.__contains__, collision="refuse")
    assert ids(result) == {"2": "@bob:corp.example.com"}
    assert result.refused == [("1", "localpart 'enclave' is reserved")]


def test_reserved_is_asked_about_the_normalised_localpart() -> None:
    asked: list[str] = []

    def reserved(lp: str) -> bool:
        asked.append(lp)
        return False

    run([person("1", "Ädmin")], reserved=reserved)
    assert asked == ["admin"]


def test_duplicate_person_ids_are_a_bug() -> None:
    with pytest.raises(ValueError, match="given twice"):
        run([person("1", "a"), person("1", "b")])


# -- display names -----------------------------------------------------------------------------

@pytest.mark.parametrize(("p", "template", "expected"), [
    (ADA, "{display_name}", "Ada King Lovelace"),
    (ADA, "{display_name} ({department})", "Ada King Lovelace (Engineering)"),
    (ADA, "{surname}, {given_name}", "Lovelace, Ada"),
    (person("1", "bob", "  Bob \t  Brown  "), "{display_name}", "Bob Brown"),
    (person("1", "bob", "Bob"), "  {display_name}  {title} ", "Bob"),
    (person("1", "bob", "   "), "{display_name}", "bob"),  # fallback
    (person("1", "bob", "Bob"), "{title}", "bob"),  # no title: fallback
    (person("1", "bob", "B" * 300), "{display_name}", "B" * 256),
])
def test_render_displayname(p: Person, template: str, expected: str) -> None:
    assert render_displayname(p, template) == expected


def test_displayname_template_is_used_by_map_people() -> None:
    result = run([ADA], displayname_template="{display_name} – {title}")
    assert result.users["7"] == MappedUser(ADA, "@alovelace:corp.example.com", "alovelace",
                                           "Ada King Lovelace – Analyst")


# -- look-alikes (issue 15) --------------------------------------------------------------------
def _skeleton(s: str) -> str:
    from bridge.directory.lookalike import confusables_table
    from bridge.policy.lookalike import skeleton

    return skeleton(s, confusables_table())


ENCLAVE = ("enclave", "enclave-admin")
EXISTING = {f"@admin:{SERVER}": "Admin", f"@alice:{SERVER}": "Alice Smith",
            f"@enclave:{SERVER}": "Enclave", f"@enclave-admin:{SERVER}": None}


def lookalike_run(people: list[Person], collision: str = "suffix") -> MappingResult:
    return map_people(people, MappingConfig(collision=collision), SERVER,
                      known={"id-alice": f"@alice:{SERVER}"},
                      reserved=lambda lp: lp in ENCLAVE, reserved_names=ENCLAVE,
                      existing=EXISTING, skeleton=_skeleton)


@pytest.mark.parametrize("collision", ["suffix", "refuse"])
@pytest.mark.parametrize(("username", "display", "reason"), [
    ("enclave", "Enclave", "imitates Enclave's own user @enclave:"),  # would be enclave-2
    ("enclave-2", "Support", "reserved prefix 'enclave'"),
    ("enclave-admin-2", "Admin Two", "reserved prefix 'enclave-admin'"),
    ("enclave.bot", "Bot", "reserved prefix 'enclave'"),
    ("adrnin", "Adrnin", "looks like @admin:"),  # rn / m
    ("a1ice", "Ally", "looks like @alice:"),  # 1 / l
    ("alicia", "Аlice Smith", "looks like 'Alice Smith'"),  # Cyrillic А in the display name
])
def test_lookalikes_are_refused_with_a_reason(collision: str, username: str, display: str,
                                              reason: str) -> None:
    r = lookalike_run([person("id-alice", "alice", "Alice Smith"),
                       person("id-x", username, display)], collision)
    assert "id-x" not in r.users
    [(pid, why)] = r.refused
    assert pid == "id-x" and reason in why, why


def test_lookalike_check_leaves_ordinary_names_alone() -> None:
    r = lookalike_run([person("id-alice", "alice", "Alice Smith"),
                       person("id-b", "bob", "Bob Jones"), person("id-e", "enclaveteam",
                                                                  "Enclave Team"),
                       person("id-c", "alice.smith", "Alice Smithers")])
    assert set(r.users) == {"id-alice", "id-b", "id-e", "id-c"} and r.refused == []


def test_silent_changes_are_reported() -> None:
    long = "x" * 70
    r = lookalike_run([person("id-alice", "alice", "Alice Smith"),
                       person("id-l", long, "Long Name"),
                       person("id-d1", "dan", "Dan One"), person("id-d2", "dan", "Dan Two")])
    notes = dict(r.notes)
    assert notes["id-l"] == f"localpart cut to {MAX_LOCALPART} characters: {'x' * 64!r}"
    assert "'dan' is already person id-d1; given 'dan-2'" in notes["id-d2"]
    assert "id-d1" not in notes

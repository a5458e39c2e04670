"""LDAP dialects without a server: recorded entries (as ldap3 returns ``raw_attributes``)
through the pure mapping functions, and the whole AD read path against a fake ldap3
connection (paging, ranged ``member`` values, nested groups, uSNChanged incremental)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from bridge.config.directory import LdapAttributeMap, LdapSourceConfig
from bridge.directory.ldap_source import (
    AttrNames,
    EntryError,
    GroupRecord,
    LdapSource,
    PersonRecord,
    and_filter,
    assemble,
    decode_guid,
    entry_to_group,
    entry_to_person,
    flag_disabled,
    later_mark,
    mark_filter,
    normalize_dn,
    parse_range,
    ranged_values,
    resolve_groups,
    uac_disabled,
)
from bridge.model.people import DirectoryError, Person

AD = AttrNames.of("ad", LdapAttributeMap())
OL = AttrNames.of("openldap", LdapAttributeMap(disabled="pwdAccountLockedTime",
                                               display_name="displayName"))

# -- recorded Active Directory entries (ldap3 raw_attributes) ------------------------------
STAFF = "OU=Staff,DC=corp,DC=example,DC=com"
GROUPS = "OU=Groups,DC=corp,DC=example,DC=com"
# objectGUID as AD stores it (first three fields little-endian) and its canonical text
GUID_BYTES = bytes.fromhex("e004253f894fd3119a0c0305e82c3301")
GUID_TEXT = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"


def ad_user(n: int, sam: str, name: str, *, uac: int = 512, manager: str | None = None,
            usn: int = 1000, dept: str = "Engineering") -> tuple[str, dict[str, list[Any]]]:
    dn = f"CN={name},{STAFF}"
    attrs: dict[str, list[Any]] = {
        "objectGUID": [uuid.UUID(int=n).bytes_le],
        "sAMAccountName": [sam.encode()],
        "displayName": [name.encode()],
        "mail": [f"{sam}@corp.example.com".encode()],
        "title": [b"Engineer"],
        "department": [dept.encode()],
        "l": [b"Berlin"],
        "userAccountControl": [str(uac).encode()],
        "uSNChanged": [str(usn).encode()],
    }
    if manager:
        attrs["manager"] = [manager.encode()]
    return dn, attrs


ALICE_DN, ALICE = ad_user(1, "alice", "Alice Smith", manager=f"CN=Bob Jones,{STAFF}")
BOB_DN, BOB = ad_user(2, "bob", "Bob Jones")
CAROL_DN, CAROL = ad_user(3, "carol", "Carol Old", uac=514)  # disabled
DAVE_DN, DAVE = ad_user(4, "dave", "Dave Never", uac=66050)  # disabled, pwd never expires


def gid(n: int) -> str:
    return str(uuid.UUID(int=n))


# -- pure functions ------------------------------------------------------------------------
def test_decode_guid_known_vector() -> None:
    assert decode_guid(GUID_BYTES) == GUID_TEXT
    assert decode_guid("{3F2504E0-4F89-11D3-9A0C-0305E82C3301}") == GUID_TEXT
    assert decode_guid(GUID_TEXT) == GUID_TEXT
    with pytest.raises(EntryError):
        decode_guid(b"\x01\x02")
    with pytest.raises(EntryError):
        decode_guid("not-a-guid")


@pytest.mark.parametrize(("uac", "disabled"), [
    (512, False),     # NORMAL_ACCOUNT
    (514, True),      # NORMAL_ACCOUNT | ACCOUNTDISABLE
    (66048, False),   # | DONT_EXPIRE_PASSWORD
    (66050, True),    # | DONT_EXPIRE_PASSWORD | ACCOUNTDISABLE
    (544, False),     # | PASSWD_NOTREQD
    (546, True),
    (b"514", True),   # raw bytes as ldap3 returns them
    ("512", False),
])
def test_uac_disabled(uac: Any, disabled: bool) -> None:
    assert uac_disabled(uac) is disabled


def test_uac_garbage_is_an_entry_error() -> None:
    with pytest.raises(EntryError):
        uac_disabled(b"lots")


@pytest.mark.parametrize(("values", "disabled"), [
    ([], False),
    ([b"000001010000Z"], True),      # pwdAccountLockedTime: locked for good
    ([b"20240101120000Z"], True),
    ([b"TRUE"], True),
    ([b"FALSE"], False),
    (["false"], False),
    ([b"0"], False),
    ([b""], False),
])
def test_flag_disabled(values: list[Any], disabled: bool) -> None:
    assert flag_disabled(values) is disabled


@pytest.mark.parametrize(("name", "expected"), [
    ("member", None),
    ("member;range=0-1499", ("member", 0, 1499)),
    ("member;range=1500-*", ("member", 1500, None)),
    ("Member;Range=3000-4499", ("Member", 3000, 4499)),
    ("member;range=0-*", ("member", 0, None)),
    ("member;binary;range=0-9", ("member;binary", 0, 9)),
    ("memberOf", None),
])
def test_parse_range(name: str, expected: Any) -> None:
    assert parse_range(name) == expected


def test_ranged_values() -> None:
    assert ranged_values({"member": [b"a", b"b"]}, "member") == ([b"a", b"b"], None)
    assert ranged_values({"member;range=0-1": [b"a", b"b"]}, "member") == ([b"a", b"b"], 2)
    assert ranged_values({"MEMBER;range=2-*": [b"c"]}, "member") == ([b"c"], None)
    assert ranged_values({"cn": [b"x"]}, "member") == ([], None)
    with pytest.raises(EntryError):
        ranged_values({"member;range=5-1": [b"a"]}, "member")


@pytest.mark.parametrize(("a", "b", "equal"), [
    ("CN=Bob Jones,OU=Staff,DC=corp", "cn=bob jones, ou=staff, dc=corp", True),
    ("uid=a,ou=people,dc=x", "UID=A,OU=People,DC=X", True),
    ("CN=Smith\\, John,OU=Staff", "cn=smith\\, john,ou=staff", True),
    ("CN=Smith\\, John,OU=Staff", "cn=smith,cn=john,ou=staff", False),
    ("uid=a,ou=people,dc=x", "uid=b,ou=people,dc=x", False),
])
def test_normalize_dn(a: str, b: str, equal: bool) -> None:
    assert (normalize_dn(a) == normalize_dn(b)) is equal


def test_normalize_dn_escaped_comma_is_one_rdn() -> None:
    assert normalize_dn("CN=Smith\\, John,OU=Staff") == "cn=smith\\, john,ou=staff"


def test_ad_defaults_apply_only_to_unset_fields() -> None:
    assert (AD.id, AD.username, AD.display_name, AD.group_owner) == (
        "objectGUID", "sAMAccountName", "displayName", "managedBy")
    assert AD.disabled == "userAccountControl"
    custom = AttrNames.of("ad", LdapAttributeMap(username="userPrincipalName"))
    assert custom.username == "userPrincipalName" and custom.id == "objectGUID"
    assert OL.id == "entryUUID" and OL.username == "uid"


# -- AD entries -> people ------------------------------------------------------------------
def test_ad_entry_to_person() -> None:
    rec = entry_to_person(ALICE_DN, ALICE, AD, "uSNChanged")
    assert rec.person == Person(
        id=gid(1), username="alice", display_name="Alice Smith",
        email="alice@corp.example.com", title="Engineer", department="Engineering",
        location="Berlin", disabled=False)
    assert rec.manager_dn == f"CN=Bob Jones,{STAFF}"
    assert rec.mark == "1000"


@pytest.mark.parametrize(("entry", "disabled"), [(ALICE, False), (CAROL, True), (DAVE, True)])
def test_ad_disabled(entry: dict[str, list[Any]], disabled: bool) -> None:
    assert entry_to_person("CN=x", entry, AD).person.disabled is disabled


@pytest.mark.parametrize("missing", ["objectGUID", "sAMAccountName"])
def test_entry_without_id_or_username_is_skipped(missing: str) -> None:
    entry = {k: v for k, v in ALICE.items() if k != missing}
    with pytest.raises(EntryError, match=missing):
        entry_to_person(ALICE_DN, entry, AD)


def test_missing_display_name_falls_back_to_username_and_first_value_wins() -> None:
    entry = {k: v for k, v in ALICE.items() if k != "displayName"}
    entry["department"] = [b"Sales", b"Marketing"]
    p = entry_to_person(ALICE_DN, entry, AD).person
    assert p.display_name == "alice" and p.department == "Sales"


# -- OpenLDAP entries --------------------------------------------------------------------
OL_ALICE = {
    "entryUUID": [b"0b6bd2a4-7f05-1041-9a4e-5f0f3d8e2a11"],
    "uid": [b"alice"], "cn": [b"Alice Smith 1"], "displayName": [b"Alice Sm\xc3\xadth"],
    "mail": [b"alice@corp.example.com"], "title": [b"Engineer"],
    "departmentNumber": [b"Department 01"], "l": [b"Paris"],
    "manager": [b"uid=bob,ou=people,dc=corp,dc=test"],
    "modifyTimestamp": [b"20240102030405Z"],
}


def test_openldap_entry_to_person() -> None:
    rec = entry_to_person("uid=alice,ou=people,dc=corp,dc=test", OL_ALICE, OL, "modifyTimestamp")
    assert rec.person.id == "0b6bd2a4-7f05-1041-9a4e-5f0f3d8e2a11"
    assert rec.person.display_name == "Alice Smíth"
    assert rec.person.department == "Department 01" and not rec.person.disabled
    assert rec.mark == "20240102030405Z"
    locked = {**OL_ALICE, "pwdAccountLockedTime": [b"000001010000Z"]}
    assert entry_to_person("uid=alice", locked, OL).person.disabled


def test_person_record_json_round_trip() -> None:
    rec = entry_to_person("uid=alice,ou=people,dc=corp,dc=test", OL_ALICE, OL)
    assert PersonRecord.from_json(rec.to_json()) == replace_mark(rec)


def replace_mark(rec: PersonRecord) -> PersonRecord:
    return PersonRecord(dn=rec.dn, person=rec.person, manager_dn=rec.manager_dn)


# -- groups, nesting, managers -----------------------------------------------------------
def P(n: int) -> str:
    return f"uid=u{n},ou=people,dc=x"


def G(name: str) -> str:
    return f"cn={name},ou=groups,dc=x"


PEOPLE_IDS = {normalize_dn(P(n)): f"id{n}" for n in range(1, 7)}


def grp(name: str, *members: str, owners: tuple[str, ...] = ()) -> GroupRecord:
    return GroupRecord(dn=G(name), id=name, name=name.title(), member_dns=members,
                       owner_dns=owners)


def test_resolve_groups_nested_transitively_with_cycle() -> None:
    groups = [
        grp("a", P(1), G("b")),
        grp("b", P(2), G("c"), "cn=foreign,dc=elsewhere"),
        grp("c", P(3), G("a")),  # cycle back to a
        grp("d", P(4).upper(), owners=(P(5), G("c"))),
    ]
    out = {g.id: g for g in resolve_groups(groups, PEOPLE_IDS)}
    assert out["a"].members == {"id1", "id2", "id3"}
    assert out["b"].members == {"id1", "id2", "id3"}
    assert out["c"].members == {"id1", "id2", "id3"}
    assert out["d"].members == {"id4"}
    assert out["d"].owners == {"id5", "id1", "id2", "id3"}
    flat = {g.id: g for g in resolve_groups(groups, PEOPLE_IDS, nested=False)}
    assert flat["a"].members == {"id1"}


def test_duplicate_group_ids_are_an_error() -> None:
    dup = GroupRecord(dn="cn=a,ou=other,dc=x", id="a", name="A")
    with pytest.raises(DirectoryError, match="share the id 'a'"):
        resolve_groups([grp("a", P(1)), dup], PEOPLE_IDS)


def test_assemble_resolves_managers_and_memberships() -> None:
    def rec(n: int, manager: str | None) -> PersonRecord:
        return PersonRecord(dn=P(n), person=Person(id=f"id{n}", username=f"u{n}",
                                                   display_name=f"U {n}"), manager_dn=manager)

    snap = assemble([rec(1, None), rec(2, P(1).upper()), rec(3, "uid=gone,dc=x"),
                     rec(4, G("a"))],
                    [grp("a", P(1), G("b")), grp("b", P(2))])
    assert snap.people["id1"].manager is None
    assert snap.people["id2"].manager == "id1"
    assert snap.people["id3"].manager is None  # unknown DN
    assert snap.people["id4"].manager is None  # a group is no manager
    assert snap.people["id2"].groups == {"a", "b"}
    assert snap.groups["a"].members == {"id1", "id2"}


# -- AD groups, including a recorded ranged answer ----------------------------------------
def test_ad_group_entry() -> None:
    entry = {"cn": [b"Engineering"], "description": [b"All engineers"],
             "member": [ALICE_DN.encode(), BOB_DN.encode()],
             "managedBy": [BOB_DN.encode()]}
    g = entry_to_group(f"CN=Engineering,{GROUPS}", entry, AD)
    assert (g.id, g.name, g.member_dns, g.owner_dns) == (
        "Engineering", "All engineers", (ALICE_DN, BOB_DN), (BOB_DN,))


def test_ad_group_with_unread_range_is_refused() -> None:
    entry = {"cn": [b"Big"], "member;range=0-1499": [b"CN=x"] * 1500}
    with pytest.raises(EntryError, match="ranged"):
        entry_to_group(f"CN=Big,{GROUPS}", entry, AD)


# -- marks -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "mark", "overlap", "expected"), [
    ("modify_timestamp", "20240102030405Z", 60, "(modifyTimestamp>=20240102030305Z)"),
    ("modify_timestamp", "20240101000010.0Z", 20, "(modifyTimestamp>=20231231235950Z)"),
    ("entry_csn", "20240102030405.123456Z#000000#000#000000", 5,
     "(entryCSN>=20240102030400.000000Z#000000#000#000000)"),
    ("usn", "41234", 60, "(uSNChanged>=41235)"),
])
def test_mark_filter(mode: str, mark: str, overlap: int, expected: str) -> None:
    assert mark_filter(mode, mark, overlap) == expected


def test_later_mark_and_filter() -> None:
    assert later_mark("usn", "999", "1000") == "1000"  # numeric, not string order
    assert later_mark("modify_timestamp", None, "20240101000000Z") == "20240101000000Z"
    assert later_mark("entry_csn", "20240101000000.000001Z#000000#000#000000",
                      None) == "20240101000000.000001Z#000000#000#000000"
    assert and_filter("objectClass=user", "(x=1)") == "(&(objectClass=user)(x=1))"
    assert and_filter("(objectClass=user)", "(x=1)") == "(&(objectClass=user)(x=1))"


# -- the whole AD read path against a fake ldap3 connection ----------------------------------
class FakeAD:
    """Serves recorded AD answers the way ldap3's sync strategy exposes them."""

    range_size = 1500

    def __init__(self) -> None:
        self.users: dict[str, dict[str, list[Any]]] = {}
        self.groups: dict[str, dict[str, list[Any]]] = {}
        self.usn = 5000
        self.response: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}
        self.searches: list[tuple[str, str, list[str]]] = []

    # what LdapSession uses
    def search(self, base: str, filt: str, search_scope: Any = None,
               attributes: list[str] | None = None, paged_size: int | None = None,
               paged_cookie: bytes | None = None) -> bool:
        attributes = attributes or []
        self.searches.append((base, filt, attributes))
        if base == "":
            self._answer([("", {"highestCommittedUSN": [str(self.usn).encode()]})])
            return True
        if base in self.groups and search_scope == "BASE":
            self._answer([(base, self._project(self.groups[base], attributes))])
            return True
        source = self.users if base == STAFF else self.groups
        rows = sorted(source.items())
        m = re.search(r"uSNChanged>=(\d+)", filt)
        if m:
            rows = [(dn, a) for dn, a in rows if int(a["uSNChanged"][0]) >= int(m.group(1))]
        start = int(paged_cookie or b"0")
        page = rows[start:start + (paged_size or len(rows))]
        nxt = start + len(page)
        self._answer([(dn, self._project(a, attributes)) for dn, a in page],
                     cookie=str(nxt).encode() if nxt < len(rows) else b"")
        return True

    def _project(self, attrs: dict[str, list[Any]], wanted: list[str]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for w in wanted:
            rng = parse_range(w)
            name = rng[0] if rng else w
            vals = next((v for k, v in attrs.items() if k.lower() == name.lower()), None)
            if vals is None:
                continue
            lo = rng[1] if rng else 0
            if len(vals) - lo > self.range_size or lo:
                chunk = vals[lo:lo + self.range_size]
                hi = lo + len(chunk) - 1
                end = "*" if lo + len(chunk) >= len(vals) else str(hi)
                out[f"{name};range={lo}-{end}"] = chunk
            else:
                out[name] = vals
        return out

    def _answer(self, rows: list[tuple[str, dict[str, list[Any]]]],
                cookie: bytes | None = None) -> None:
        self.response = [{"type": "searchResEntry", "dn": dn, "raw_attributes": a}
                         for dn, a in rows]
        # AD also answers continuation references; they must be ignored
        self.response.append({"type": "searchResRef", "uri": ["ldap://DomainDnsZones/"]})
        self.result = {"result": 0, "controls": {
            "1.2.840.113556.1.4.319": {"value": {"size": 0, "cookie": cookie}}}}

    def unbind(self) -> None:
        pass


class MemoryKV:
    def __init__(self) -> None:
        self.kv: dict[str, str] = {}

    async def get_kv(self, key: str) -> str | None:
        return self.kv.get(key)

    async def set_kv(self, key: str, value: str) -> None:
        self.kv[key] = value


@pytest.fixture
def fake_ad(monkeypatch: pytest.MonkeyPatch) -> FakeAD:
    import ldap3

    ad = FakeAD()
    usn = iter(range(1000, 100000))

    def user(n: int, **kw: Any) -> None:
        dn, attrs = ad_user(n, f"user{n}", f"User {n}", usn=next(usn), **kw)
        ad.users[dn] = attrs

    user(1)  # the boss
    for n in range(2, 3302):
        user(n, manager=f"CN=User 1,{STAFF}", uac=514 if n % 100 == 0 else 512)
    ad.groups[f"CN=Big,{GROUPS}"] = {  # 3,300 members: three ranged answers
        "cn": [b"Big"], "description": [b"Everybody"],
        "member": [dn.encode() for dn in sorted(ad.users)],
        "managedBy": [f"CN=User 1,{STAFF}".encode()]}
    ad.groups[f"CN=Small,{GROUPS}"] = {"cn": [b"Small"], "member": [
        f"CN=User 2,{STAFF}".encode(), f"CN=Nested,{GROUPS}".encode()]}
    ad.groups[f"CN=Nested,{GROUPS}"] = {"cn": [b"Nested"], "member": [
        f"CN=User 3,{STAFF}".encode()]}
    monkeypatch.setattr(ldap3, "Connection", lambda *a, **k: ad)
    return ad


def ad_config(**kw: Any) -> LdapSourceConfig:
    return LdapSourceConfig.model_validate({
        "type": "ldap", "dialect": "ad", "url": "ldaps://dc1.corp.example.com",
        "bind_dn": "CN=svc-enclave,OU=Service,DC=corp,DC=example,DC=com",
        "bind_password": {"env": "LDAP_PW"}, "page_size": 1000,
        "users": {"base_dn": STAFF, "filter": "(&(objectCategory=person)(objectClass=user))"},
        "groups": {"base_dn": GROUPS, "filter": "(objectClass=group)"}, **kw})


async def test_ad_full_read_with_ranges_paging_and_nesting(fake_ad: FakeAD) -> None:
    src = LdapSource(ad_config(), bind_password="pw")
    snap = await src.read()
    assert len(snap.people) == 3301
    boss = snap.people[gid(1)]
    assert boss.manager is None and boss.username == "user1"
    assert snap.people[gid(2)].manager == gid(1)
    assert snap.people[gid(100)].disabled and not snap.people[gid(101)].disabled
    assert len(snap.groups["Big"].members) == 3301
    assert snap.groups["Big"].owners == {gid(1)}
    assert snap.groups["Small"].members == {gid(2), gid(3)}  # Nested resolved locally
    assert snap.people[gid(3)].groups == {"Big", "Small", "Nested"}
    ranged = [a for _, _, a in fake_ad.searches if a and ";range=" in a[0]]
    assert ranged == [["member;range=1500-*"], ["member;range=3000-*"]]
    user_pages = [s for s in fake_ad.searches if s[0] == STAFF]
    assert len(user_pages) == 4  # 3,301 users in pages of 1,000
    assert src.warnings == []


async def test_ad_usn_incremental(fake_ad: FakeAD) -> None:
    kv = MemoryKV()
    cfg = ad_config(incremental={"mode": "usn", "full_every": 3})
    src = LdapSource(cfg, bind_password="pw", store=kv)  # type: ignore[arg-type]
    await src.read()
    assert src.last_read_full
    # a change after the mark: user 7 disabled, user 8 deleted, a new user
    fake_ad.users[f"CN=User 7,{STAFF}"]["userAccountControl"] = [b"514"]
    fake_ad.users[f"CN=User 7,{STAFF}"]["uSNChanged"] = [b"5001"]
    del fake_ad.users[f"CN=User 8,{STAFF}"]
    dn, attrs = ad_user(9999, "newbie", "New Bie", usn=5002, manager=f"CN=User 1,{STAFF}")
    fake_ad.users[dn] = attrs
    fake_ad.usn = 5002
    fake_ad.searches.clear()
    snap = await src.read()
    assert not src.last_read_full
    assert snap.people[gid(7)].disabled
    assert gid(8) not in snap.people
    assert snap.people[gid(9999)].manager == gid(1)
    assert len(snap.people) == 3301
    assert gid(8) not in snap.groups["Big"].members  # the member DN no longer maps
    changed = [s for s in fake_ad.searches if "uSNChanged>=5001" in s[1]]
    assert changed, fake_ad.searches
    await src.read()  # full, incremental, incremental, full, … (full_every=3)
    assert not src.last_read_full
    await src.read()
    assert src.last_read_full


async def test_ad_invalid_entries_become_warnings(fake_ad: FakeAD) -> None:
    del fake_ad.users[f"CN=User 5,{STAFF}"]["sAMAccountName"]
    src = LdapSource(ad_config(), bind_password="pw")
    snap = await src.read()
    assert gid(5) not in snap.people
    assert len(src.warnings) == 1 and "sAMAccountName" in src.warnings[0]


def test_bind_dn_without_password_is_refused() -> None:
    with pytest.raises(ValueError, match="no bind password"):
        LdapSource(ad_config(), bind_password=None)

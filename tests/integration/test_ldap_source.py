"""LdapSource against a real slapd with 1,000 generated people (fresh server per test)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from ldap3 import MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE

from bridge.directory.ldap_source import KV_MARK, KV_PEOPLE, LdapSource
from bridge.model.people import DirectoryError, DirectorySnapshot
from bridge.store import Stores, open_stores
from devstack.slapd import SlapdServer, department_of, it_admins, person_uid

from .ldap_fixtures import ldap_config, running_slapd

N = 1000
N_DEP = 20

pytestmark = pytest.mark.integration


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[SlapdServer]:
    with running_slapd(tmp_path, N, n_departments=N_DEP) as server:
        yield server


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Stores]:
    s = open_stores("sqlite:///ldap-state.db", base_dir=tmp_path)
    await s.database.open()
    await s.database.migrate()
    yield s
    await s.database.close()


def by_username(snap: DirectorySnapshot) -> dict[str, Any]:
    return {p.username: p for p in snap.people.values()}


def incremental(server: SlapdServer, **kw: Any) -> Any:
    return ldap_config(server, incremental={"mode": "modify_timestamp", "overlap_seconds": 60,
                                            "full_every": 100, **kw})


def modify(server: SlapdServer, dn: str, changes: dict[str, Any]) -> None:
    conn = server.connection()
    try:
        conn.modify(dn, changes)
    finally:
        conn.unbind()


async def test_full_read_matches_the_directory(slapd: SlapdServer) -> None:
    src = LdapSource(ldap_config(slapd), bind_password=slapd.rootpw)
    snap = await src.read()
    assert src.warnings == []
    assert len(snap.people) == N
    people = by_username(snap)

    # every attribute against what slapd holds (read independently)
    conn = slapd.connection()
    entries = conn.extend.standard.paged_search(
        f"ou=people,{slapd.suffix}", "(objectClass=inetOrgPerson)",
        attributes=["entryUUID", "uid", "displayName", "mail", "title", "departmentNumber",
                    "l"], paged_size=500, generator=False)
    conn.unbind()
    assert len(entries) == N
    for e in entries:
        a = e["attributes"]
        p = people[a["uid"][0]]
        assert [p.id] == a["entryUUID"]
        assert (p.display_name, p.email, p.title, p.department, p.location) == (
            a["displayName"][0], a["mail"][0], a["title"][0], a["departmentNumber"][0],
            a["l"][0])
        assert not p.disabled

    ids = {n: people[person_uid(n)].id for n in range(1, N + 1)}
    for n in range(1, N + 1):
        p = people[person_uid(n)]
        d = department_of(n, N_DEP)
        assert p.department == f"Department {d:02d}"
        if n <= N_DEP:
            assert p.manager is None and p.title == "Head of Department"
            assert "managers" in p.groups
        else:
            assert p.manager == ids[d]
        assert {f"dept-{d:02d}", "all-staff"} <= p.groups

    g = snap.groups
    assert g["dept-03"].name == "Department 03"
    assert g["dept-03"].members == {ids[n] for n in range(3, N + 1, N_DEP)}
    assert g["managers"].members == {ids[n] for n in range(1, N_DEP + 1)}
    assert g["it-admins"].members == {ids[n] for n in it_admins(N, n_departments=N_DEP)}
    assert g["all-staff"].members == set(ids.values())  # nested: groups of groups
    assert len(g) == N_DEP + 3


async def test_nested_group_added_online(slapd: SlapdServer) -> None:
    conn = slapd.connection()
    conn.add(slapd.group_dn("leadership"), ["groupOfNames"], {
        "cn": "leadership",
        "member": [slapd.group_dn("managers"), slapd.group_dn("it-admins"),
                   slapd.person_dn(500)],
        "owner": [slapd.person_dn(1)]})
    conn.add(slapd.group_dn("board"), ["groupOfNames"], {
        "cn": "board", "member": [slapd.group_dn("leadership")]})
    conn.unbind()
    src = LdapSource(ldap_config(slapd), bind_password=slapd.rootpw)
    snap = await src.read()
    people = by_username(snap)
    expected = {people[person_uid(n)].id
                for n in [*range(1, N_DEP + 1), *it_admins(N, n_departments=N_DEP), 500]}
    assert snap.groups["leadership"].members == expected
    assert snap.groups["leadership"].name == "leadership"  # no description: the id
    assert snap.groups["leadership"].owners == {people[person_uid(1)].id}
    assert snap.groups["board"].members == expected  # two levels deep
    assert {"leadership", "board"} <= people[person_uid(500)].groups

    flat = LdapSource(ldap_config(slapd, nested_groups=False), bind_password=slapd.rootpw)
    flat_snap = await flat.read()
    assert flat_snap.groups["leadership"].members == {people[person_uid(500)].id}
    assert flat_snap.groups["all-staff"].members == frozenset()


@pytest.mark.parametrize("mode", ["modify_timestamp", "entry_csn"])
async def test_incremental_reads_follow_changes(slapd: SlapdServer, store: Stores,
                                                mode: str) -> None:
    # one recent change before the full read: the mark (newest modifyTimestamp / entryCSN
    # seen) is then "now" rather than the generated entries' 2024 stamp, so the incremental
    # reads below fetch only what changed
    modify(slapd, slapd.person_dn(999), {"title": [(MODIFY_REPLACE, ["Touched"])]})
    src = LdapSource(incremental(slapd, mode=mode), bind_password=slapd.rootpw, store=store.kv)
    full = await src.read()
    assert src.last_read_full
    people = by_username(full)
    pid = {n: people[person_uid(n)].id for n in (5, 6, 7, 8, 9, 10, 11)}
    assert json.loads(await store.kv.get_kv(KV_MARK) or "{}")["mark"]

    # attribute change, disabled flag, group membership (member entry untouched), delete,
    # rename, a new person
    modify(slapd, slapd.person_dn(5), {"title": [(MODIFY_REPLACE, ["Chief Tinkerer"])],
                                       "l": [(MODIFY_REPLACE, ["Lisbon"])]})
    modify(slapd, slapd.person_dn(6), {"pwdAccountLockedTime": [(MODIFY_REPLACE,
                                                                 ["000001010000Z"])]})
    modify(slapd, slapd.group_dn("it-admins"), {"member": [(MODIFY_ADD,
                                                            [slapd.person_dn(8)])]})
    modify(slapd, slapd.group_dn("dept-09"), {"member": [(MODIFY_DELETE,
                                                          [slapd.person_dn(9)])]})
    conn = slapd.connection()
    conn.delete(slapd.person_dn(7))
    conn.modify_dn(slapd.person_dn(10), "uid=renamed10")
    conn.add(f"uid=newbie,ou=people,{slapd.suffix}", ["inetOrgPerson"], {
        "uid": "newbie", "cn": "New Bie", "sn": "Bie", "displayName": "New Bie",
        "mail": "newbie@corp.example.com", "manager": slapd.person_dn(5)})
    # person 30 (department 10) now names the renamed head as manager
    modify(slapd, slapd.person_dn(30), {"manager": [(MODIFY_REPLACE,
                                                     [f"uid=renamed10,ou=people,{slapd.suffix}"])]})
    conn.unbind()

    snap = await src.read()
    assert not src.last_read_full
    assert src.last_read_changed is not None and src.last_read_changed <= 10
    people = by_username(snap)
    assert len(snap.people) == N  # one deleted, one added
    p5 = snap.people[pid[5]]
    assert (p5.title, p5.location) == ("Chief Tinkerer", "Lisbon")
    assert snap.people[pid[6]].disabled
    assert "it-admins" in snap.people[pid[8]].groups
    assert pid[8] in snap.groups["it-admins"].members
    assert "dept-09" not in snap.people[pid[9]].groups
    assert "all-staff" not in snap.people[pid[9]].groups
    assert pid[7] not in snap.people
    assert pid[7] not in snap.groups["dept-07"].members  # the group still names the DN
    assert snap.people[pid[10]].username == "renamed10"
    assert people["user00030"].manager == pid[10]
    assert people["newbie"].manager == pid[5]
    # groups still name user00010's old DN (no refint overlay): not a member any more
    assert pid[10] not in snap.groups["managers"].members
    # unchanged people keep everything, managers included
    assert people[person_uid(500)] == by_username(full)[person_uid(500)]

    # the same state from a full read
    fresh = await LdapSource(ldap_config(slapd), bind_password=slapd.rootpw).read()
    assert dict(fresh.people) == dict(snap.people)
    assert dict(fresh.groups) == dict(snap.groups)

    # nothing changed: an incremental read with (almost) nothing to fetch
    again = await src.read()
    assert not src.last_read_full and dict(again.people) == dict(snap.people)


async def test_every_nth_run_is_full_and_state_survives_restart(slapd: SlapdServer,
                                                                 store: Stores) -> None:
    cfg = incremental(slapd, full_every=3)
    kinds = []
    for _ in range(4):  # a new LdapSource each time: the state lives in the store
        src = LdapSource(cfg, bind_password=slapd.rootpw, store=store.kv)
        await src.read()
        kinds.append(src.last_read_full)
    assert kinds == [True, False, False, True]
    # a changed configuration invalidates the state
    changed_cfg = cfg.model_copy(update={"attributes": cfg.attributes.model_copy(
        update={"title": "cn"})})
    other = LdapSource(changed_cfg, bind_password=slapd.rootpw, store=store.kv)
    await other.read()
    assert other.last_read_full


async def test_slapd_killed_raises_and_saves_nothing(slapd: SlapdServer, store: Stores) -> None:
    src = LdapSource(incremental(slapd), bind_password=slapd.rootpw, store=store.kv)
    await src.read()
    before = (await store.kv.get_kv(KV_MARK), await store.kv.get_kv(KV_PEOPLE))
    modify(slapd, slapd.person_dn(5), {"title": [(MODIFY_REPLACE, ["Changed"])]})
    slapd.kill()
    with pytest.raises(DirectoryError, match="cannot connect") as err:
        await src.read()
    assert slapd.rootpw not in str(err.value)
    assert (await store.kv.get_kv(KV_MARK), await store.kv.get_kv(KV_PEOPLE)) == before
    slapd.start()  # back: the next read works and catches up
    snap = await src.read()
    assert by_username(snap)[person_uid(5)].title == "Changed"


async def test_outage_mid_search_raises_and_saves_nothing(slapd: SlapdServer,
                                                          store: Stores) -> None:
    cfg = ldap_config(slapd, page_size=100, incremental={"mode": "entry_csn"})
    src = LdapSource(cfg, bind_password=slapd.rootpw, store=store.kv)
    pages: list[int] = []

    def after_page(page: int) -> None:
        pages.append(page)
        if page == 3:
            slapd.kill()

    src._after_page = after_page
    with pytest.raises(DirectoryError, match=r"users .*\(page 4\)") as err:
        await src.read()
    assert slapd.rootpw not in str(err.value)
    assert pages == [1, 2, 3]
    assert await store.kv.get_kv(KV_MARK) is None and await store.kv.get_kv(KV_PEOPLE) is None


async def test_hung_server_times_out_mid_search(slapd: SlapdServer, store: Stores) -> None:
    cfg = ldap_config(slapd, page_size=100, timeout_seconds=1,
                      incremental={"mode": "modify_timestamp"})
    src = LdapSource(cfg, bind_password=slapd.rootpw, store=store.kv)

    def after_page(page: int) -> None:
        if page == 2:
            slapd.pause()

    src._after_page = after_page
    try:
        with pytest.raises(DirectoryError, match=r"page 3") as err:
            await src.read()
    finally:
        slapd.resume()
    assert slapd.rootpw not in str(err.value)
    assert await store.kv.get_kv(KV_MARK) is None


async def test_wrong_password_is_a_clean_error(slapd: SlapdServer) -> None:
    password = "Hunter2-not-the-password"
    src = LdapSource(ldap_config(slapd), bind_password=password)
    with pytest.raises(DirectoryError, match="bind") as err:
        await src.read()
    text = f"{err.value} {err.value!r} {err.value.__cause__!r} {err.value.__context__!r}"
    assert password not in text
    assert slapd.rootdn in str(err.value)


async def test_small_pages_read_everything(slapd: SlapdServer) -> None:
    src = LdapSource(ldap_config(slapd, page_size=7), bind_password=slapd.rootpw)
    pages: list[int] = []
    src._after_page = pages.append
    snap = await src.read()
    assert len(snap.people) == N
    assert len(pages) == -(-N // 7)  # ceil: paging really happened
    assert len(snap.groups["all-staff"].members) == N


async def test_server_size_limit_is_an_error(tmp_path: Path) -> None:
    # anonymous may see 50 entries in all, paged or not
    with running_slapd(tmp_path, 200,
                       extra_config="limits anonymous size.soft=50 size.hard=50 "
                                    "size.prtotal=50") as server:
        cfg = ldap_config(server, bind_dn=None, bind_password=None, page_size=20)
        with pytest.raises(DirectoryError, match="size limit"):
            await LdapSource(cfg, bind_password=None).read()


async def test_empty_answer_is_an_empty_snapshot(slapd: SlapdServer) -> None:
    cfg = ldap_config(slapd, users={"filter": "(&(objectClass=inetOrgPerson)(uid=nobody))"})
    snap = await LdapSource(cfg, bind_password=slapd.rootpw).read()
    assert len(snap.people) == 0
    assert all(not g.members for g in snap.groups.values())


async def test_entries_without_username_are_skipped_with_a_warning(slapd: SlapdServer,
                                                                   store: Stores) -> None:
    conn = slapd.connection()
    conn.add(f"cn=No Uid,ou=people,{slapd.suffix}", ["inetOrgPerson"],
             {"cn": "No Uid", "sn": "Uid"})
    conn.unbind()
    src = LdapSource(incremental(slapd), bind_password=slapd.rootpw, store=store.kv)
    snap = await src.read()
    assert len(snap.people) == N
    assert len(src.warnings) == 1 and "cn=No Uid" in src.warnings[0]
    await src.read()  # incremental: still skipped, still reported, no full-read fallback
    assert not src.last_read_full and len(src.warnings) == 1


@pytest.fixture
def tls_slapd(tmp_path: Path) -> Iterator[SlapdServer]:
    with running_slapd(tmp_path, 50, tls=True) as server:
        yield server


@pytest.mark.parametrize("how", ["start_tls", "ldaps"])
async def test_tls_verified_with_the_ca_file(tls_slapd: SlapdServer, how: str) -> None:
    url = tls_slapd.ldaps_url if how == "ldaps" else tls_slapd.url
    cfg = ldap_config(tls_slapd, url=url, start_tls=how == "start_tls",
                      tls_ca_file=str(tls_slapd.ca_file))
    snap = await LdapSource(cfg, bind_password=tls_slapd.rootpw).read()
    assert len(snap.people) == 50


@pytest.mark.parametrize("how", ["start_tls", "ldaps"])
async def test_tls_unknown_certificate_is_refused(tls_slapd: SlapdServer, how: str) -> None:
    url = tls_slapd.ldaps_url if how == "ldaps" else tls_slapd.url
    cfg = ldap_config(tls_slapd, url=url, start_tls=how == "start_tls")
    with pytest.raises(DirectoryError) as err:
        await LdapSource(cfg, bind_password=tls_slapd.rootpw).read()
    assert tls_slapd.rootpw not in str(err.value)
    # tls_verify: false accepts it (for labs; never in production)
    insecure = ldap_config(tls_slapd, url=url, start_tls=how == "start_tls", tls_verify=False)
    assert len((await LdapSource(insecure, bind_password=tls_slapd.rootpw).read()).people) == 50

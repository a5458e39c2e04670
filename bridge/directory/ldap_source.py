"""OpenLDAP and Active Directory as a directory source (ldap3, paged search).

Two layers:

* **Pure functions** on plain answers ``{attribute: [values]}`` (values ``bytes`` or
  ``str``, attribute names in any case): GUID decoding, ``userAccountControl``, ranged
  attribute parsing, entry -> :class:`PersonRecord` / :class:`GroupRecord`, DN
  normalisation, group nesting and manager resolution. They are unit-tested from
  recorded entries without a server.
* :class:`LdapSource`: the blocking ldap3 work (run in ``asyncio.to_thread``) and the
  incremental state kept in the store's key/value table.

Groups are always read in full and are the truth for membership: a group change does not
touch the member's entry. Nested groups (a member DN that is itself a group read by the
group search) are resolved **locally and transitively** for both dialects when
``nested_groups`` is on (default), cycle-safe. For AD this means nesting through groups
outside the group search base, and ``primaryGroupID`` membership, are not seen; we do not
issue one LDAP_MATCHING_RULE_IN_CHAIN search per group.

Every failure (unreachable server, bind refused, a page that fails, a size limit, a
timeout, a broken answer) raises :class:`DirectoryError`, whose message never contains
the bind password; nothing partial is ever returned and the incremental state is only
saved after a complete read.

Incremental reads (``incremental.mode``): changed users since the stored mark (minus
``overlap_seconds`` for timestamps; AD's ``uSNChanged`` uses ``highestCommittedUSN`` read
before the search), plus one cheap search of every user's stable id (deletes, renames,
the DN -> id map for managers and group members), plus all groups; merged with the
stored people into a complete snapshot. Every ``full_every``-th run, and whenever the
stored state is missing, unreadable or written for a different configuration, is a
full read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..config.directory import LdapAttributeMap, LdapSearchConfig, LdapSourceConfig
from ..model.people import DirectoryError, DirectorySnapshot, Group, Person
from ..store.domains import KVStore

log = logging.getLogger(__name__)

KV_PEOPLE = "directory.ldap.people"
KV_MARK = "directory.ldap.mark"
_STATE_VERSION = 1
# unknown ids in an incremental read (present now, never seen, not changed) read one by one
# up to this many; more means the state is stale: read everything instead
_MAX_UNKNOWN = 100
_PAGED_OID = "1.2.840.113556.1.4.319"
_MAX_WARNINGS_LOGGED = 20

Attrs = Mapping[str, Sequence[Any]]

# -- pure helpers ------------------------------------------------------------------------


class EntryError(ValueError):
    """An entry that cannot become a person or group (skipped with a warning)."""


def lower_keys(attrs: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{attr: values}`` with lower-case names and list values (a scalar becomes [v])."""
    out: dict[str, list[Any]] = {}
    for k, v in attrs.items():
        vals = list(v) if isinstance(v, list | tuple) else [v]
        out.setdefault(k.lower(), []).extend(vals)
    return out


def as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def first_text(attrs: Mapping[str, Sequence[Any]], name: str | None) -> str | None:
    """The first non-empty value of ``name`` as stripped text (attrs keyed lower-case)."""
    if not name:
        return None
    for v in attrs.get(name.lower(), ()):
        t = as_text(v).strip()
        if t:
            return t
    return None


def decode_guid(value: bytes | str) -> str:
    """AD ``objectGUID`` (16 bytes, little-endian fields) -> canonical lower-case GUID.

    Text forms (``{…}`` or canonical, as some tools record them) are normalised too.
    """
    if isinstance(value, bytes | bytearray):
        if len(value) != 16:
            raise EntryError(f"objectGUID must be 16 bytes, got {len(value)}")
        return str(uuid.UUID(bytes_le=bytes(value)))
    try:
        return str(uuid.UUID(value.strip().strip("{}")))
    except ValueError as e:
        raise EntryError(f"not a GUID: {value!r}") from e


def uac_disabled(value: Any) -> bool:
    """``userAccountControl & 2`` (ACCOUNTDISABLE)."""
    try:
        return bool(int(as_text(value).strip()) & 2)
    except ValueError as e:
        raise EntryError(f"userAccountControl is not a number: {value!r}") from e


_FALSE = {"FALSE", "0", "NO", "N", "OFF"}


def flag_disabled(values: Sequence[Any]) -> bool:
    """OpenLDAP disabled flag: present (e.g. ``pwdAccountLockedTime``) or TRUE => disabled.

    An explicit false value (``FALSE``, ``0``, ``no``) is not disabled; absent is not.
    """
    for v in values:
        t = as_text(v).strip()
        if t:
            return t.upper() not in _FALSE
    return False


_RANGE_RE = re.compile(r"^(?P<base>[^;]+(?:;(?!range=)[^;]+)*);range=(?P<lo>\d+)-(?P<hi>\d+|\*)$",
                       re.IGNORECASE)


def parse_range(attr_name: str) -> tuple[str, int, int | None] | None:
    """``member;range=0-1499`` -> ("member", 0, 1499); ``…;range=1500-*`` -> (…, 1500, None).

    None for an attribute name without a range option.
    """
    m = _RANGE_RE.match(attr_name)
    if m is None:
        return None
    hi = m.group("hi")
    return m.group("base"), int(m.group("lo")), None if hi == "*" else int(hi)


def ranged_values(attrs: Mapping[str, Sequence[Any]], base: str) -> tuple[list[Any], int | None]:
    """All values of ``base`` in one answer (plain or ranged) and the next range start.

    The next start is None when the answer holds the last (or only) range. ``attrs`` may
    use any case for names.
    """
    base_l = base.lower()
    values: list[Any] = []
    nxt: int | None = None
    for name, vals in attrs.items():
        if name.lower() == base_l:
            values.extend(vals)
            continue
        r = parse_range(name)
        if r is None or r[0].lower() != base_l:
            continue
        values.extend(vals)
        _, lo, hi = r
        if hi is not None:
            if hi < lo:
                raise EntryError(f"bad range {name!r}")
            nxt = hi + 1
    return values, nxt


def normalize_dn(dn: str) -> str:
    """A DN in a form fit for comparison: RDN parts stripped and lower-cased.

    Escapes are kept as written (``\\,`` and ``\\2C`` are not unified); multi-valued RDNs
    keep their order. Good enough to match the DNs one server answers in ``member`` and
    ``manager`` values against the DNs of the entries it returns.
    """
    if "\\" not in dn and '"' not in dn:
        parts = dn.split(",")
    else:
        parts, cur, esc, quoted = [], [], False, False
        for ch in dn:
            if esc:
                cur.append(ch)
                esc = False
            elif ch == "\\":
                cur.append(ch)
                esc = True
            elif ch == '"':
                cur.append(ch)
                quoted = not quoted
            elif ch == "," and not quoted:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        parts.append("".join(cur))
    out = []
    for p in parts:
        a, sep, v = p.partition("=")
        out.append(f"{a.strip().lower()}{sep}{v.strip().lower()}")
    return ",".join(out)


# -- dialect / attribute names --------------------------------------------------------------

_AD_DEFAULTS = {
    "id": "objectGUID",
    "username": "sAMAccountName",
    "display_name": "displayName",
    "department": "department",
    "group_owner": "managedBy",
}


@dataclass(frozen=True)
class AttrNames:
    """The attribute names one dialect + attribute map reads."""

    dialect: str
    id: str
    username: str
    display_name: str
    email: str
    title: str
    department: str
    location: str
    manager: str
    disabled: str | None
    group_id: str
    group_name: str
    group_member: str
    group_owner: str

    @classmethod
    def of(cls, dialect: str, amap: LdapAttributeMap) -> AttrNames:
        """Effective names. For AD, fields the config left at their (OpenLDAP) defaults
        take AD's: objectGUID, sAMAccountName, displayName, department, managedBy; AD's
        disabled flag is always ``userAccountControl``."""
        values = amap.model_dump()
        if dialect == "ad":
            for k, v in _AD_DEFAULTS.items():
                if k not in amap.model_fields_set:
                    values[k] = v
            values["disabled"] = "userAccountControl"
        return cls(dialect=dialect, **values)

    def person_attributes(self) -> list[str]:
        names = [self.id, self.username, self.display_name, self.email, self.title,
                 self.department, self.location, self.manager]
        if self.disabled:
            names.append(self.disabled)
        return list(dict.fromkeys(names))

    def group_attributes(self) -> list[str]:
        return list(dict.fromkeys([self.group_id, self.group_name, self.group_member,
                                   self.group_owner]))


def stable_id(names: AttrNames, attrs: Mapping[str, Sequence[Any]]) -> str | None:
    """The entry's stable id: GUID-decoded for objectGUID, text otherwise; None if absent."""
    vals = attrs.get(names.id.lower()) or []
    for v in vals:
        if names.id.lower() == "objectguid":
            return decode_guid(v)
        t = as_text(v).strip()
        if t:
            return t
    return None


@dataclass(frozen=True)
class PersonRecord:
    """A person as read, before the manager DN is resolved against the other people."""

    dn: str
    person: Person
    manager_dn: str | None = None
    mark: str | None = None

    def to_json(self) -> dict[str, Any]:
        p = self.person
        return {"dn": self.dn, "manager_dn": self.manager_dn, "id": p.id,
                "username": p.username, "display_name": p.display_name, "email": p.email,
                "title": p.title, "department": p.department, "location": p.location,
                "disabled": p.disabled}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PersonRecord:
        return cls(dn=d["dn"], manager_dn=d.get("manager_dn"), person=Person(
            id=d["id"], username=d["username"], display_name=d["display_name"],
            email=d.get("email"), title=d.get("title"), department=d.get("department"),
            location=d.get("location"), disabled=bool(d.get("disabled"))))


def entry_to_person(dn: str, attrs: Mapping[str, Any], names: AttrNames,
                    mark_attr: str | None = None) -> PersonRecord:
    """One user entry -> :class:`PersonRecord`. Raises :class:`EntryError` when the
    entry has no stable id or no username (the caller skips it with a warning)."""
    a = lower_keys(attrs)
    pid = stable_id(names, a)
    if not pid:
        raise EntryError(f"{dn}: no {names.id} (stable id)")
    username = first_text(a, names.username)
    if not username:
        raise EntryError(f"{dn}: no {names.username} (username)")
    if names.dialect == "ad":
        uac = a.get("useraccountcontrol") or []
        disabled = uac_disabled(uac[0]) if uac else False
    else:
        disabled = flag_disabled(a.get(names.disabled.lower(), [])) if names.disabled else False
    person = Person(
        id=pid,
        username=username,
        display_name=first_text(a, names.display_name) or username,
        email=first_text(a, names.email),
        title=first_text(a, names.title),
        department=first_text(a, names.department),
        location=first_text(a, names.location),
        disabled=disabled,
    )
    return PersonRecord(dn=dn, person=person, manager_dn=first_text(a, names.manager),
                        mark=first_text(a, mark_attr))


@dataclass(frozen=True)
class GroupRecord:
    dn: str
    id: str
    name: str
    member_dns: tuple[str, ...] = ()
    owner_dns: tuple[str, ...] = ()


def entry_to_group(dn: str, attrs: Mapping[str, Any], names: AttrNames) -> GroupRecord:
    """One group entry -> :class:`GroupRecord`. Ranged member values must be complete
    (see :func:`ranged_values`); a ranged answer with more to fetch raises EntryError."""
    a = lower_keys(attrs)
    gid = first_text(a, names.group_id)
    if not gid:
        raise EntryError(f"{dn}: no {names.group_id} (group id)")
    members, nxt = ranged_values(a, names.group_member)
    owners, nxt_o = ranged_values(a, names.group_owner)
    if nxt is not None or nxt_o is not None:
        raise EntryError(f"{dn}: ranged values not fully read")
    return GroupRecord(
        dn=dn, id=gid, name=first_text(a, names.group_name) or gid,
        member_dns=tuple(t for t in (as_text(v).strip() for v in members) if t),
        owner_dns=tuple(t for t in (as_text(v).strip() for v in owners) if t),
    )


def resolve_groups(groups: Iterable[GroupRecord], person_ids: Mapping[str, str], *,
                   nested: bool = True) -> list[Group]:
    """Group records -> groups of person ids.

    ``person_ids`` maps normalised person DNs to ids. A member DN that is one of the
    groups is expanded transitively when ``nested`` (cycles are harmless); other member
    DNs (people outside the user search, foreign objects) are dropped. An owner DN that is
    a group stands for that group's members. Two groups with the same id raise
    :class:`DirectoryError` (memberships would silently depend on read order).
    """
    recs = list(groups)
    by_dn = {normalize_dn(g.dn): g for g in recs}
    seen: dict[str, GroupRecord] = {}
    for g in recs:
        if g.id in seen:
            raise DirectoryError(
                f"two LDAP groups share the id {g.id!r} ({seen[g.id].dn!r} and {g.dn!r}); "
                f"choose a unique attributes.group_id")
        seen[g.id] = g
    memo: dict[str, frozenset[str]] = {}

    def members_of(key: str, stack: set[str]) -> frozenset[str]:
        if key in memo:
            return memo[key]
        stack.add(key)
        out: set[str] = set()
        for m in by_dn[key].member_dns:
            mk = normalize_dn(m)
            pid = person_ids.get(mk)
            if pid is not None:
                out.add(pid)
            elif nested and mk in by_dn and mk not in stack:
                out |= members_of(mk, stack)
        stack.discard(key)
        result = frozenset(out)
        if not stack:  # only memoise complete answers (not ones cut short by a cycle)
            memo[key] = result
        return result

    result = []
    for key, g in by_dn.items():
        owners: set[str] = set()
        for o in g.owner_dns:
            ok = normalize_dn(o)
            if ok in person_ids:
                owners.add(person_ids[ok])
            elif ok in by_dn:
                owners |= members_of(ok, set())
        result.append(Group(id=g.id, name=g.name, members=members_of(key, set()),
                            owners=frozenset(owners)))
    return result


def assemble(records: Iterable[PersonRecord], groups: Iterable[GroupRecord], *,
             dn_to_id: Mapping[str, str] | None = None, nested: bool = True,
             source: str = "ldap") -> DirectorySnapshot:
    """People records + group records -> a snapshot (managers and groups resolved).

    ``dn_to_id`` maps normalised DNs to ids; by default built from ``records``.
    """
    recs = list(records)
    if dn_to_id is None:
        dn_to_id = {normalize_dn(r.dn): r.person.id for r in recs}
    ids = {r.person.id for r in recs}
    people = []
    for r in recs:
        mgr = dn_to_id.get(normalize_dn(r.manager_dn)) if r.manager_dn else None
        people.append(replace(r.person, manager=mgr if mgr in ids else None))
    try:
        return DirectorySnapshot.build(people, resolve_groups(groups, dn_to_id, nested=nested),
                                       source=source)
    except ValueError as e:
        raise DirectoryError(f"LDAP answer is inconsistent: {e}") from e


# -- incremental marks -------------------------------------------------------------------------

_MARK_ATTR = {"modify_timestamp": "modifyTimestamp", "entry_csn": "entryCSN",
              "usn": "uSNChanged"}


def parse_generalized_time(value: str) -> datetime:
    """``20240102030405Z`` / ``20240102030405.123Z`` -> aware UTC datetime."""
    m = re.match(r"^(\d{14})(?:[.,](\d+))?Z$", value.strip())
    if not m:
        raise ValueError(f"not a generalized time: {value!r}")
    return datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def mark_filter(mode: str, mark: str, overlap_seconds: int) -> str:
    """The filter part selecting entries changed since ``mark`` (minus the overlap)."""
    if mode == "modify_timestamp":
        t = parse_generalized_time(mark) - timedelta(seconds=overlap_seconds)
        return f"(modifyTimestamp>={t:%Y%m%d%H%M%S}Z)"
    if mode == "entry_csn":
        t = parse_generalized_time(mark.split("#", 1)[0]) - timedelta(seconds=overlap_seconds)
        return f"(entryCSN>={t:%Y%m%d%H%M%S}.000000Z#000000#000#000000)"
    if mode == "usn":
        return f"(uSNChanged>={int(mark) + 1})"
    raise ValueError(f"no mark filter for mode {mode!r}")


def later_mark(mode: str, a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a if b is None else b
    if mode == "usn":
        return a if int(a) >= int(b) else b
    return max(a, b)  # generalized times and CSNs of one server compare as strings


def and_filter(base: str, extra: str) -> str:
    base = base.strip()
    if not base.startswith("("):
        base = f"({base})"
    return f"(&{base}{extra})"


# -- the source --------------------------------------------------------------------------------


@dataclass
class _State:
    token: str
    fingerprint: str
    mode: str
    mark: str | None
    runs_since_full: int
    runs: int
    people: dict[str, PersonRecord]
    skipped: set[str] = field(default_factory=set)


@dataclass
class _Result:
    snapshot: DirectorySnapshot
    records: dict[str, PersonRecord]
    skipped: set[str]
    mark: str | None
    full: bool
    warnings: list[str]
    changed: int | None = None


class LdapSource:
    """OpenLDAP / Active Directory source. See the module docstring."""

    name = "ldap"

    def __init__(self, config: LdapSourceConfig, *, bind_password: str | None,
                 store: KVStore | None = None, base_dir: Path | None = None) -> None:
        if config.bind_dn is not None and not bind_password:
            # an empty password is an "unauthenticated bind": many servers answer success
            raise ValueError("bind_dn is set but no bind password was given")
        self.config = config
        self._password = bind_password
        self.store = store
        self.base_dir = base_dir
        self.names = AttrNames.of(config.dialect, config.attributes)
        self.warnings: list[str] = []
        self.last_read_full: bool | None = None
        self.last_read_seconds: float | None = None
        # users an incremental read fetched as changed (None after a full read)
        self.last_read_changed: int | None = None
        self._lock = asyncio.Lock()
        # test hook: called (in the worker thread) after each page of the user search
        self._after_page: Callable[[int], None] | None = None

    def __repr__(self) -> str:
        return f"LdapSource(url={self.config.url!r}, bind_dn={self.config.bind_dn!r})"

    # -- public ------------------------------------------------------------------------
    async def read(self) -> DirectorySnapshot:
        async with self._lock:
            t0 = time.monotonic()
            state = await self._load_state()
            result = await asyncio.to_thread(self._read_blocking, state)
            await self._save_state(state, result)
            self.warnings = result.warnings
            self.last_read_full = result.full
            self.last_read_changed = result.changed
            self.last_read_seconds = time.monotonic() - t0
            log.info("ldap: %s read, %d people, %d groups, %d warnings, %.2fs",
                     "full" if result.full else "incremental", len(result.snapshot.people),
                     len(result.snapshot.groups), len(result.warnings),
                     self.last_read_seconds)
            for w in result.warnings[:_MAX_WARNINGS_LOGGED]:
                log.warning("ldap: %s", w)
            if len(result.warnings) > _MAX_WARNINGS_LOGGED:
                log.warning("ldap: … and %d more warnings",
                            len(result.warnings) - _MAX_WARNINGS_LOGGED)
            return result.snapshot

    # -- state -------------------------------------------------------------------------
    @property
    def _mode(self) -> str:
        return self.config.incremental.mode

    def _fingerprint(self) -> str:
        c = self.config
        data = {"url": c.url, "dialect": c.dialect, "users": c.users.model_dump(),
                "names": self.names.__dict__, "mode": self._mode, "v": _STATE_VERSION}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]

    async def _load_state(self) -> _State | None:
        if self.store is None or self._mode == "none":
            return None
        try:
            mark_raw = await self.store.get_kv(KV_MARK)
            people_raw = await self.store.get_kv(KV_PEOPLE) if mark_raw else None
        except Exception as e:
            raise DirectoryError(f"cannot read the LDAP incremental state: {e}") from e
        if not mark_raw or not people_raw:
            return None
        try:
            m = json.loads(mark_raw)
            p = json.loads(people_raw)
            if m.get("token") != p.get("token") or m.get("version") != _STATE_VERSION:
                log.info("ldap: stored incremental state is inconsistent; full read")
                return None
            recs = {d["id"]: PersonRecord.from_json(d) for d in p["people"]}
            return _State(token=m["token"], fingerprint=m["fingerprint"], mode=m["mode"],
                          mark=m.get("mark"), runs_since_full=int(m["runs_since_full"]),
                          runs=int(m.get("runs", 0)), people=recs,
                          skipped=set(p.get("skipped", [])))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ldap: stored incremental state unreadable (%s); full read", e)
            return None

    async def _save_state(self, old: _State | None, result: _Result) -> None:
        if self.store is None or self._mode == "none":
            return
        token = secrets.token_hex(8)
        runs = (old.runs if old else 0) + 1
        people = {"token": token,
                  "people": [r.to_json() for _, r in sorted(result.records.items())],
                  "skipped": sorted(result.skipped)}
        mark = {"version": _STATE_VERSION, "token": token, "fingerprint": self._fingerprint(),
                "mode": self._mode, "mark": result.mark, "runs": runs,
                "runs_since_full": 0 if result.full else (old.runs_since_full + 1 if old else 0)}
        try:
            # people first: a crash between the two leaves tokens that differ -> full read
            await self.store.set_kv(KV_PEOPLE, json.dumps(people, separators=(",", ":")))
            await self.store.set_kv(KV_MARK, json.dumps(mark))
        except Exception as e:
            raise DirectoryError(f"cannot save the LDAP incremental state: {e}") from e

    def _wants_full(self, state: _State | None) -> bool:
        if state is None or state.mark is None:
            return True
        if state.fingerprint != self._fingerprint() or state.mode != self._mode:
            log.info("ldap: configuration changed since the stored state; full read")
            return True
        return state.runs_since_full + 1 >= self.config.incremental.full_every

    # -- blocking part -------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _read_blocking(self, state: _State | None) -> _Result:
        from ldap3.core import exceptions as lx

        url = self.config.url
        session = _Session(self.config, self._password, self.base_dir, self._after_page)
        try:
            session.phase = f"connecting to {url}"
            session.connect()
            if self._wants_full(state):
                return self._full(session)
            assert state is not None
            return self._incremental(session, state)
        except DirectoryError:
            raise
        except lx.LDAPBindError as e:
            raise DirectoryError(
                f"LDAP bind to {url} as {self.config.bind_dn or 'anonymous'} failed: "
                f"{self._scrub(str(e))}") from None
        except lx.LDAPInvalidCredentialsResult:
            raise DirectoryError(
                f"LDAP bind to {url} as {self.config.bind_dn or 'anonymous'} failed: "
                f"invalid credentials") from None
        except lx.LDAPSocketOpenError as e:
            raise DirectoryError(f"cannot connect to LDAP server {url}: "
                                 f"{self._scrub(str(e))}") from None
        except lx.LDAPSizeLimitExceededResult:
            raise DirectoryError(
                f"LDAP size limit exceeded while {session.phase}: the server refused to "
                f"return every entry (paging unsupported or a per-account size limit)"
            ) from None
        except lx.LDAPTimeLimitExceededResult:
            raise DirectoryError(f"LDAP time limit exceeded while {session.phase}") from None
        except (lx.LDAPSocketReceiveError, lx.LDAPSessionTerminatedByServerError,
                lx.LDAPSocketSendError, TimeoutError) as e:
            raise DirectoryError(
                f"LDAP connection to {url} failed while {session.phase}: "
                f"{type(e).__name__}: {self._scrub(str(e))}") from None
        except lx.LDAPOperationResult as e:
            detail = f": {e.message}" if getattr(e, "message", None) else ""
            raise DirectoryError(
                f"LDAP answered {e.description} while {session.phase}"
                f"{self._scrub(detail)}") from None
        except (lx.LDAPException, OSError) as e:
            raise DirectoryError(
                f"LDAP error while {session.phase}: {type(e).__name__}: "
                f"{self._scrub(str(e))}") from None
        except Exception as e:  # a broken answer: never return something partial
            raise DirectoryError(
                f"unexpected error while {session.phase}: {type(e).__name__}: "
                f"{self._scrub(str(e))}") from None
        finally:
            session.close()

    def _mark_attr(self) -> str | None:
        return _MARK_ATTR.get(self._mode)

    def _read_people(self, session: _Session, filt: str, warnings: list[str],
                     skipped: set[str], *, label: str) -> dict[str, PersonRecord]:
        names, mark_attr = self.names, self._mark_attr()
        attrs = names.person_attributes() + ([mark_attr] if mark_attr else [])
        out: dict[str, PersonRecord] = {}
        for dn, entry in session.paged(self.config.users, filt, attrs, label=label,
                                       hook=True):
            try:
                rec = entry_to_person(dn, entry, names, mark_attr)
            except EntryError as e:
                warnings.append(f"skipped user {e}")
                try:
                    sid = stable_id(names, lower_keys(entry))
                except EntryError:
                    sid = None
                if sid:
                    skipped.add(sid)
                continue
            if rec.person.id in out:
                raise DirectoryError(f"two LDAP users share the id {rec.person.id!r} "
                                     f"({out[rec.person.id].dn!r} and {dn!r})")
            out[rec.person.id] = rec
        return out

    def _read_groups(self, session: _Session, warnings: list[str]) -> list[GroupRecord]:
        gcfg = self.config.groups
        if gcfg is None:
            return []
        names = self.names
        out = []
        for dn, entry in session.paged(gcfg, gcfg.filter, names.group_attributes(),
                                       label="groups"):
            a = lower_keys(entry)
            for attr in (names.group_member, names.group_owner):
                session.complete_ranges(dn, a, attr)
            try:
                out.append(entry_to_group(dn, a, names))
            except EntryError as e:
                warnings.append(f"skipped group {e}")
        return out

    def _max_mark(self, records: Iterable[PersonRecord]) -> str | None:
        mark = None
        for r in records:
            mark = later_mark(self._mode, mark, r.mark)
        return mark

    def _full(self, session: _Session) -> _Result:
        warnings: list[str] = []
        skipped: set[str] = set()
        usn = session.highest_usn() if self._mode == "usn" else None
        records = self._read_people(session, self.config.users.filter, warnings, skipped,
                                    label="users")
        groups = self._read_groups(session, warnings)
        snapshot = assemble(records.values(), groups, nested=self.config.nested_groups)
        mark = usn if usn is not None else self._max_mark(records.values())
        return _Result(snapshot, records, skipped, mark, True, warnings)

    def _incremental(self, session: _Session, state: _State) -> _Result:
        assert state.mark is not None
        warnings: list[str] = []
        skipped = set(state.skipped)
        usn = session.highest_usn() if self._mode == "usn" else None
        filt = and_filter(self.config.users.filter,
                          mark_filter(self._mode, state.mark,
                                      self.config.incremental.overlap_seconds))
        changed_skipped: set[str] = set()
        changed = self._read_people(session, filt, warnings, changed_skipped,
                                    label="changed users")
        # every current user's id and DN: deletes, renames and the DN -> id map
        dn_to_id: dict[str, str] = {}
        current: dict[str, str] = {}
        for dn, entry in session.paged(self.config.users, self.config.users.filter,
                                       [self.names.id], label="user ids"):
            try:
                sid = stable_id(self.names, lower_keys(entry))
            except EntryError:
                sid = None
            if sid:
                current[sid] = dn
                dn_to_id[normalize_dn(dn)] = sid
        unknown = [sid for sid in current
                   if sid not in changed and sid not in state.people
                   and sid not in skipped and sid not in changed_skipped]
        if len(unknown) > _MAX_UNKNOWN:
            log.info("ldap: %d users unknown to the stored state; full read", len(unknown))
            return self._full(session)
        for sid in unknown:  # appeared without a newer mark (e.g. moved into the base)
            session.phase = f"reading {current[sid]}"
            entry = session.base(current[sid], self.names.person_attributes()
                                 + ([self._mark_attr()] if self._mark_attr() else []))
            if entry is None:
                continue
            try:
                rec = entry_to_person(current[sid], entry, self.names, self._mark_attr())
            except EntryError as e:
                warnings.append(f"skipped user {e}")
                changed_skipped.add(sid)
                continue
            changed[rec.person.id] = rec
        records: dict[str, PersonRecord] = {}
        for sid, dn in current.items():
            rec = changed.get(sid) or state.people.get(sid)
            if rec is None:
                continue
            records[sid] = rec if rec.dn == dn else replace(rec, dn=dn)
        # skipped ids that changed into valid people leave the skipped set
        for sid in sorted(skipped - changed_skipped):
            if sid in current and sid not in records:
                warnings.append(f"skipped user {current[sid]}: not a valid person (unchanged)")
        skipped = {s for s in (skipped | changed_skipped) if s in current and s not in records}
        groups = self._read_groups(session, warnings)
        snapshot = assemble(records.values(), groups, dn_to_id=dn_to_id,
                            nested=self.config.nested_groups)
        mark = usn if usn is not None else later_mark(self._mode, state.mark,
                                                      self._max_mark(changed.values()))
        return _Result(snapshot, records, skipped, mark, False, warnings,
                       changed=len(changed) + len(changed_skipped))


class _Session:
    """One ldap3 connection and the searches a read makes (blocking)."""

    def __init__(self, config: LdapSourceConfig, password: str | None,
                 base_dir: Path | None, after_page: Callable[[int], None] | None) -> None:
        self.config = config
        self._password = password
        self.base_dir = base_dir
        self.after_page = after_page
        self.conn: Any = None
        self.phase = "starting"

    def _tls(self) -> Any:
        import ldap3

        c = self.config
        if not (c.start_tls or c.url.startswith("ldaps://")):
            return None
        ca = c.tls_ca_file
        if ca is not None and not ca.is_absolute() and self.base_dir is not None:
            ca = self.base_dir / ca
        return ldap3.Tls(validate=ssl.CERT_REQUIRED if c.tls_verify else ssl.CERT_NONE,
                         ca_certs_file=str(ca) if ca is not None else None)

    def connect(self) -> None:
        import ldap3

        c = self.config
        server = ldap3.Server(c.url, use_ssl=c.url.startswith("ldaps://"), tls=self._tls(),
                              get_info=ldap3.NONE, connect_timeout=c.timeout_seconds)
        auto_bind = (ldap3.AUTO_BIND_TLS_BEFORE_BIND if c.start_tls
                     else ldap3.AUTO_BIND_NO_TLS)
        self.phase = f"binding to {c.url} as {c.bind_dn or 'anonymous'}"
        self.conn = ldap3.Connection(
            server, user=c.bind_dn, password=self._password, auto_bind=auto_bind,
            # ldap3 packs it into SO_RCVTIMEO: whole seconds
            receive_timeout=max(1, math.ceil(c.timeout_seconds)), raise_exceptions=True,
            auto_referrals=False, auto_range=False, read_only=True,
        )

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.unbind()
            except Exception:
                log.debug("ldap: unbind failed", exc_info=True)

    def paged(self, search: LdapSearchConfig, filt: str, attributes: list[str], *,
              label: str, hook: bool = False) -> Iterator[tuple[str, dict[str, list[Any]]]]:
        """Every entry of a paged search (raw attribute values)."""
        import ldap3

        scope = {"base": ldap3.BASE, "one": ldap3.LEVEL, "sub": ldap3.SUBTREE}[search.scope]
        cookie: bytes | None = None
        page = 0
        while True:
            page += 1
            self.phase = f"searching {label} under {search.base_dn!r} (page {page})"
            self.conn.search(search.base_dn, filt, search_scope=scope, attributes=attributes,
                             paged_size=self.config.page_size, paged_cookie=cookie)
            self._check_result()
            entries = [(r["dn"], r["raw_attributes"]) for r in self.conn.response
                       if r.get("type") == "searchResEntry"]
            controls = (self.conn.result or {}).get("controls") or {}
            cookie = ((controls.get(_PAGED_OID) or {}).get("value") or {}).get("cookie")
            yield from entries
            if hook and self.after_page is not None:
                self.after_page(page)
            if not cookie:
                return

    def _check_result(self) -> None:
        """ldap3 does not raise for sizeLimitExceeded / timeLimitExceeded (nor referrals):
        a truncated answer must never pass for a complete one."""
        result = self.conn.result or {}
        code = result.get("result", 0)
        if code == 0:
            return
        desc = result.get("description") or f"result code {code}"
        if code == 4:
            raise DirectoryError(
                f"LDAP size limit exceeded while {self.phase}: the server refused to return "
                f"every entry (raise the bind account's size limit, e.g. OpenLDAP "
                f"'limits ... size.prtotal=unlimited', or use paging)")
        if code == 3:
            raise DirectoryError(f"LDAP time limit exceeded while {self.phase}")
        message = result.get("message") or ""
        raise DirectoryError(f"LDAP answered {desc} while {self.phase}"
                             + (f": {message}" if message else ""))

    def base(self, dn: str, attributes: list[str]) -> dict[str, list[Any]] | None:
        import ldap3
        from ldap3.core.exceptions import LDAPNoSuchObjectResult

        try:
            self.conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE,
                             attributes=attributes)
        except LDAPNoSuchObjectResult:
            return None
        self._check_result()
        for r in self.conn.response:
            if r.get("type") == "searchResEntry":
                return dict(r["raw_attributes"])
        return None

    def complete_ranges(self, dn: str, attrs: dict[str, list[Any]], attr: str) -> None:
        """Fetch the rest of a ranged attribute (AD ``member;range=0-1499``) in place."""
        values, nxt = ranged_values(attrs, attr)
        if nxt is None and attr.lower() in attrs:
            return
        while nxt is not None:
            self.phase = f"reading {attr};range={nxt}-* of {dn}"
            answer = self.base(dn, [f"{attr};range={nxt}-*"])
            if answer is None:
                raise DirectoryError(f"group {dn} vanished while its {attr} values were read")
            more, nxt2 = ranged_values(answer, attr)
            if nxt2 is not None and nxt2 <= nxt:
                raise DirectoryError(f"LDAP range retrieval of {attr} on {dn} does not advance")
            if not more and nxt2 is not None:
                raise DirectoryError(f"LDAP range retrieval of {attr} on {dn} returned nothing")
            values.extend(more)
            nxt = nxt2
        for k in [k for k in attrs if (r := parse_range(k)) and r[0].lower() == attr.lower()]:
            del attrs[k]
        attrs[attr.lower()] = values

    def highest_usn(self) -> str | None:
        """AD rootDSE ``highestCommittedUSN`` (read before the search it marks)."""
        import ldap3

        self.phase = "reading highestCommittedUSN from the rootDSE"
        self.conn.search("", "(objectClass=*)", search_scope=ldap3.BASE,
                         attributes=["highestCommittedUSN"])
        self._check_result()
        for r in self.conn.response:
            if r.get("type") == "searchResEntry":
                vals = lower_keys(r["raw_attributes"]).get("highestcommittedusn")
                if vals:
                    return as_text(vals[0]).strip()
        return None

"""The LDAP directory source (:class:`LdapSource`): a full or incremental read, its state
loaded from and saved to the store, and ldap3's failures turned into
:class:`~bridge.model.people.DirectoryError` without the bind password.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from ...config.directory import LdapSourceConfig
from ...model.people import DirectoryError, DirectorySnapshot
from ...store.domains import KVStore
from .dialect import (
    AttrNames,
    GroupRecord,
    PersonRecord,
    assemble,
    entry_to_group,
    entry_to_person,
    stable_id,
)
from .entries import (
    EntryError,
    lower_keys,
    normalize_dn,
)
from .marks import (
    MARK_ATTR,
    and_filter,
    later_mark,
    mark_filter,
)
from .session import LdapSession
from .state import (
    IncrementalState,
    ReadResult,
    decode_state,
    encode_state,
    state_fingerprint,
)

log = logging.getLogger(__name__)

KV_PEOPLE = "directory.ldap.people"
KV_MARK = "directory.ldap.mark"
# unknown ids in an incremental read (present now, never seen, not changed) read one by one
# up to this many; more means the state is stale: read everything instead
_MAX_UNKNOWN = 100
_MAX_WARNINGS_LOGGED = 20


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
        return state_fingerprint(self.config, self.names, self._mode)

    async def _load_state(self) -> IncrementalState | None:
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
            state = decode_state(mark_raw, people_raw)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ldap: stored incremental state unreadable (%s); full read", e)
            return None
        if state is None:
            log.info("ldap: stored incremental state is inconsistent; full read")
        return state

    async def _save_state(self, old: IncrementalState | None, result: ReadResult) -> None:
        if self.store is None or self._mode == "none":
            return
        people, mark = encode_state(old, result, token=secrets.token_hex(8),
                                    fingerprint=self._fingerprint(), mode=self._mode)
        try:
            # people first: a crash between the two leaves tokens that differ -> full read
            await self.store.set_kv(KV_PEOPLE, people)
            await self.store.set_kv(KV_MARK, mark)
        except Exception as e:
            raise DirectoryError(f"cannot save the LDAP incremental state: {e}") from e

    def _wants_full(self, state: IncrementalState | None) -> bool:
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

    def _read_blocking(self, state: IncrementalState | None) -> ReadResult:
        from ldap3.core import exceptions as lx

        url = self.config.url
        session = LdapSession(self.config, self._password, self.base_dir, self._after_page)
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
        return MARK_ATTR.get(self._mode)

    def _read_people(self, session: LdapSession, filt: str, warnings: list[str],
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

    def _read_groups(self, session: LdapSession, warnings: list[str]) -> list[GroupRecord]:
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

    def _full(self, session: LdapSession) -> ReadResult:
        warnings: list[str] = []
        skipped: set[str] = set()
        usn = session.highest_usn() if self._mode == "usn" else None
        records = self._read_people(session, self.config.users.filter, warnings, skipped,
                                    label="users")
        groups = self._read_groups(session, warnings)
        snapshot = assemble(records.values(), groups, nested=self.config.nested_groups)
        mark = usn if usn is not None else self._max_mark(records.values())
        return ReadResult(snapshot, records, skipped, mark, True, warnings)

    def _incremental(self, session: LdapSession, state: IncrementalState) -> ReadResult:
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
        return ReadResult(snapshot, records, skipped, mark, False, warnings,
                       changed=len(changed) + len(changed_skipped))

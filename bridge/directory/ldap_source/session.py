"""One ldap3 connection and the searches a read makes: bind (TLS as configured), paged
search, base reads, completing ranged attributes and AD's ``highestCommittedUSN``. Blocking:
the source runs it in a worker thread.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ...config.directory import LdapSearchConfig, LdapSourceConfig
from ...model.people import DirectoryError
from .entries import (
    as_text,
    lower_keys,
    parse_range,
    ranged_values,
)

log = logging.getLogger(__name__)

_PAGED_OID = "1.2.840.113556.1.4.319"


class LdapSession:
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
        import ldap3  # imported where used: only an LDAP source pays for it

        c = self.config
        if not (c.start_tls or c.url.startswith("ldaps://")):
            return None
        ca = c.tls_ca_file
        if ca is not None and not ca.is_absolute() and self.base_dir is not None:
            ca = self.base_dir / ca
        return ldap3.Tls(validate=ssl.CERT_REQUIRED if c.tls_verify else ssl.CERT_NONE,
                         ca_certs_file=str(ca) if ca is not None else None)

    def connect(self) -> None:
        import ldap3  # imported where used: only an LDAP source pays for it

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
        import ldap3  # imported where used: only an LDAP source pays for it

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
        import ldap3  # imported where used: only an LDAP source pays for it
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
        import ldap3  # imported where used: only an LDAP source pays for it

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

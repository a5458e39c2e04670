"""Helpers for tests that need a real OpenLDAP (import them; this is not a conftest).

    from tests.integration.ldap_fixtures import ldap_config, running_slapd

    @pytest.fixture(scope="module")
    def slapd(tmp_path_factory):
        with running_slapd(tmp_path_factory.mktemp("ldap"), 1000) as server:
            yield server

A fresh server with 1,000 people costs ≈0.2 s (``slapadd -q`` then start), so a
function-scoped one per test that modifies entries is fine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config.directory import LdapSourceConfig
from devstack.slapd import SlapdServer, generate_directory_ldif, slapd_available

SUFFIX = "dc=corp,dc=test"
# entries generated with an old timestamp: an incremental read then only sees what a test
# changed afterwards
OLD_TIMESTAMP = "20240101000000Z"


def require_slapd() -> None:
    if not slapd_available():
        pytest.skip("slapd/slapadd not installed (apt-get install slapd ldap-utils)")


@contextlib.contextmanager
def running_slapd(tmp_path: Path, n_people: int, *, n_departments: int = 20,
                  groups: dict[str, list[int]] | None = None, seed: int = 1,
                  timestamp: str | None = OLD_TIMESTAMP, **server_kw: Any,
                  ) -> Iterator[SlapdServer]:
    """A started slapd loaded with :func:`generate_directory_ldif` (``n_people``);
    stopped on exit. ``server_kw`` go to :class:`SlapdServer` (``extra_config``, …)."""
    require_slapd()
    server = SlapdServer(tmp_path / "slapd", suffix=SUFFIX, **server_kw)
    server.load_ldif(generate_directory_ldif(n_people, suffix=SUFFIX,
                                             n_departments=n_departments, groups=groups,
                                             seed=seed, timestamp=timestamp))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ldap_config(server: SlapdServer, **overrides: Any) -> LdapSourceConfig:
    """An ``openldap`` source config for ``server`` (bound as its rootdn), reading the
    generated people (displayName as display name, pwdAccountLockedTime as the disabled
    flag) and groups. Pass the password to LdapSource as ``server.rootpw``."""
    data: dict[str, Any] = {
        "type": "ldap",
        "dialect": "openldap",
        "url": server.url,
        "bind_dn": server.rootdn,
        "bind_password": {"env": "ENCLAVE_LDAP_PASSWORD"},
        "users": {"base_dn": f"ou=people,{server.suffix}",
                  "filter": "(objectClass=inetOrgPerson)"},
        "groups": {"base_dn": f"ou=groups,{server.suffix}",
                   "filter": "(objectClass=groupOfNames)"},
        "attributes": {"display_name": "displayName", "disabled": "pwdAccountLockedTime"},
        "timeout_seconds": 5,
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return LdapSourceConfig.model_validate(data)


def ldap_source_with_password_file(server: SlapdServer, tmp_path: Path) -> dict[str, Any]:
    """The ``directory.source`` section for ``server``, its bind password in a file (as an
    operator would give it)."""
    (tmp_path / "ldap_password").write_text(server.rootpw + "\n")
    source = ldap_config(server).model_dump(mode="json", exclude_none=True)
    source["bind_password"] = {"file": str(tmp_path / "ldap_password")}
    return source

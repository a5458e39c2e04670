"""Two real Synapse homeservers federating on loopback: a corporate one and a personal one.

Enclave's separation between company staff and external contacts is only testable
against a second, independent homeserver whose users are the outsiders. A
:class:`FederatedPair` is two :class:`~devstack.synapse.SynapseServer` in
federation mode:

* ``corp`` — server name ``127.0.0.1:<fedport>``, bound to 127.0.0.1; carries Enclave's
  appservice registration and Synapse modules through ``corp_app_service_config_files``
  and ``corp_extra_config`` (e.g. ``{"modules": [...]}``).
* ``personal`` — server name ``127.0.0.2:<fedport>``, bound to 127.0.0.2 (the whole of
  127.0.0.0/8 is loopback on Linux; no set-up needed).
* ``partner`` (optional, ``with_partner=True``) — a third server, ``127.0.0.3:<fedport>``:
  a partner company's homeserver, for policies that trust a whole server.

IP-literal names with a port make each server connect straight to the other's TLS
federation listener, with no well-known or SRV lookup. Every port is picked free, so a
pair runs beside a developer stack and beside other pairs. Both servers start in
parallel threads (a cold start is a few seconds each); :meth:`FederatedPair.stop` — also
run by the context manager, and by each server's own finalizer at interpreter exit —
stops both.

A server that refused the other by ``federation_domain_whitelist`` is backed off by the
other for minutes, so a test that changes the whitelist builds a fresh pair rather than
restarting this one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .synapse import SynapseServer, free_port

__all__ = ["CORP_HOST", "PARTNER_HOST", "PERSONAL_HOST", "FederatedPair"]

CORP_HOST = "127.0.0.1"
PERSONAL_HOST = "127.0.0.2"
PARTNER_HOST = "127.0.0.3"


def _federating_server(
    base_dir: Path,
    host: str,
    *,
    extra_config: dict[str, Any] | None,
    app_service_config_files: Iterable[Path],
    whitelist: list[str] | None,
    database: str | None,
) -> SynapseServer:
    fed_port = free_port(host)
    return SynapseServer(
        base_dir=base_dir,
        server_name=f"{host}:{fed_port}",
        # port 0: picked at start, and picked again if it was taken meanwhile
        bind_host=host,
        federation_port=fed_port,
        federation_whitelist=whitelist,
        app_service_config_files=list(app_service_config_files),
        extra_config=dict(extra_config or {}),
        database=database,
    )


@dataclass
class FederatedPair:
    """A corporate and a personal Synapse that federate with each other.

    Build with :meth:`create` (nothing runs yet, so the corporate server's registration
    files can be written against its final server name), then :meth:`start`.
    """

    corp: SynapseServer
    personal: SynapseServer
    start_seconds: float | None = None
    partner: SynapseServer | None = None

    @classmethod
    def create(
        cls,
        base_dir: Path,
        *,
        corp_extra_config: dict[str, Any] | None = None,
        personal_extra_config: dict[str, Any] | None = None,
        corp_app_service_config_files: Sequence[Path] = (),
        restrict_to_pair: bool = False,
        corp_database: str | None = None,
        personal_database: str | None = None,
        with_partner: bool = False,
    ) -> FederatedPair:
        """Two unstarted servers under ``base_dir/corp`` and ``base_dir/personal``.

        ``restrict_to_pair`` sets both servers' ``federation_domain_whitelist`` to the
        two server names (default: no whitelist at all). A test may still change
        ``corp.federation_whitelist`` etc. before :meth:`start`; the overrides are
        rewritten on every start. Databases default to SQLite in each directory.
        """
        base_dir = Path(base_dir)
        corp = _federating_server(
            base_dir / "corp", CORP_HOST, extra_config=corp_extra_config,
            app_service_config_files=corp_app_service_config_files, whitelist=None,
            database=corp_database,
        )
        personal = _federating_server(
            base_dir / "personal", PERSONAL_HOST, extra_config=personal_extra_config,
            app_service_config_files=(), whitelist=None, database=personal_database,
        )
        partner = _federating_server(
            base_dir / "partner", PARTNER_HOST, extra_config=None,
            app_service_config_files=(), whitelist=None, database=None,
        ) if with_partner else None
        if restrict_to_pair:
            names = [corp.server_name, personal.server_name]
            if partner is not None:
                names.append(partner.server_name)
            for server in (corp, personal, partner):
                if server is not None:
                    server.federation_whitelist = list(names)
        return cls(corp=corp, personal=personal, partner=partner)

    @property
    def servers(self) -> tuple[SynapseServer, ...]:
        """``(corp, personal)``, and the partner's server when there is one."""
        if self.partner is not None:
            return self.corp, self.personal, self.partner
        return self.corp, self.personal

    @property
    def running(self) -> bool:
        """True while every server runs."""
        return all(s.running for s in self.servers)

    def start(self, timeout: float = 90) -> None:
        """Start both servers in parallel; block until both answer on their client port.

        On any failure both are stopped and the first error is raised (its message
        holds that server's log tail). ``start_seconds`` records the wall time taken.
        """
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="synapse-start") as pool:
            futures = [pool.submit(s.start, timeout) for s in self.servers]
            errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            self.stop()
            raise failed[0]
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop both servers (idempotent, in parallel: each may wait for a slow shutdown)."""
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="synapse-stop") as pool:
            for f in [pool.submit(s.stop) for s in self.servers]:
                f.result()

    def __enter__(self) -> FederatedPair:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- users -------------------------------------------------------------------------

    def register_corp_user(
        self, localpart: str, password: str | None = None, *, admin: bool = False
    ) -> tuple[str, str]:
        """A user on the corporate server: ``(user_id, access_token)``."""
        return self.corp.register_user(localpart, password or f"pw-{localpart}", admin=admin)

    def register_personal_user(
        self, localpart: str, password: str | None = None, *, admin: bool = False
    ) -> tuple[str, str]:
        """A user on the personal server (an external contact): ``(user_id, access_token)``."""
        return self.personal.register_user(
            localpart, password or f"pw-{localpart}", admin=admin
        )

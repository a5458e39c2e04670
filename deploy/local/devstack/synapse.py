"""Launch a throwaway, real Synapse homeserver for tests and the local stack.

Everything is synchronous and uses only the standard library for HTTP, so it can
be driven from plain pytest fixtures, from async tests (via ``asyncio.to_thread``)
and from command-line tools alike. Each :class:`SynapseServer` owns one directory
and at most one Synapse process; nothing is shared between instances.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "TEST_FEDERATION_RATE_LIMIT",
    "TEST_RATE_LIMIT",
    "TEST_RATE_LIMIT_KEYS",
    "SynapseServer",
    "free_port",
    "write_self_signed_cert",
]

# Large enough that no test ever trips a limiter, small enough to stay a sane float.
TEST_RATE_LIMIT: dict[str, float] = {"per_second": 10000, "burst_count": 100000}

# Dotted paths of every client-facing limiter in synapse/config/ratelimiting.py
# (1.163). rc_federation is left out on purpose: it has a different shape and is only
# opened (TEST_FEDERATION_RATE_LIMIT) on a server in federation mode.
TEST_RATE_LIMIT_KEYS: tuple[str, ...] = (
    "rc_message",
    "rc_registration",
    "rc_registration_token_validity",
    "rc_room_creation",
    "rc_admin_redaction",
    "rc_3pid_validation",
    "rc_login.address",
    "rc_login.account",
    "rc_login.failed_attempts",
    "rc_joins.local",
    "rc_joins.remote",
    "rc_joins_per_room",
    "rc_invites.per_room",
    "rc_invites.per_user",
    "rc_invites.per_issuer",
    "rc_third_party_invite",
    "rc_key_requests",
    "rc_presence.per_user",
    "rc_delayed_event_mgmt",
    "rc_reports",
    "rc_user_directory",
    "rc_profile",
    "rc_media_create",
)

# rc_federation's own shape (FederationRatelimitSettings): the defaults delay a peer
# after 10 requests a second and reject it after 50, which a burst of test traffic
# between two loopback servers reaches.
TEST_FEDERATION_RATE_LIMIT: dict[str, float] = {
    "window_size": 1000,
    "sleep_limit": 100000,
    "sleep_delay": 1,
    "reject_limit": 100000,
    "concurrent": 1000,
}

_LOG_TAIL_LINES = 40
_STDIO_LOG = "synapse.stdio.log"
_HOMESERVER_LOG = "homeserver.log"
_START_MARKER = "--- starting synapse"
# How many fresh ports to try when an automatically chosen one was taken between
# free_port() and Synapse binding it.
_PORT_RETRIES = 3


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` (default 127.0.0.1) that was free a moment ago.

    The kernel picks the port; there is an unavoidable race until the caller binds
    it, which :meth:`SynapseServer.start` handles by retrying with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def write_self_signed_cert(host: str, cert_path: Path, key_path: Path, days: int = 30) -> None:
    """Write a self-signed certificate for ``host`` (an IP literal or a DNS name) and its key.

    The subjectAltName carries the IP (or name) so the certificate is at least
    well-formed for the federation listener; peers in federation mode do not verify it
    (``federation_verify_certificates: false``). The key file is written mode 0600.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    alt: x509.GeneralName
    try:
        alt = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # a little slack for clocks that disagree by seconds
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _test_rate_limits() -> dict[str, Any]:
    limits: dict[str, Any] = {}
    for dotted in TEST_RATE_LIMIT_KEYS:
        node = limits
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = dict(TEST_RATE_LIMIT)
    return limits


def _database_config(database: str | None, base_dir: Path) -> dict[str, Any]:
    if database is None:
        return {"name": "sqlite3", "args": {"database": str(base_dir / "homeserver.db")}}
    url = urllib.parse.urlsplit(database)
    if url.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"unsupported database URL scheme {url.scheme!r}: {database!r}")
    dbname = urllib.parse.unquote(url.path.lstrip("/"))
    if not dbname:
        raise ValueError(f"database URL has no database name: {database!r}")
    args: dict[str, Any] = {"database": dbname, "cp_min": 1, "cp_max": 10}
    if url.username:
        args["user"] = urllib.parse.unquote(url.username)
    if url.password:
        args["password"] = urllib.parse.unquote(url.password)
    if url.hostname:
        args["host"] = url.hostname
    if url.port:
        args["port"] = url.port
    # Pass libpq options such as sslmode straight through to psycopg2.connect.
    for key, value in urllib.parse.parse_qsl(url.query):
        args[key] = value
    return {"name": "psycopg2", "args": args}


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except FileNotFoundError:
        return f"({path.name} does not exist)\n"


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    # Unlike Popen.poll(), leave the zombie unreaped: while it exists its pid (and so
    # the process-group id) cannot be recycled, which keeps a later killpg safe.
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    # Module-level so weakref.finalize can call it without keeping the server alive.
    # Synapse runs in its own session, so its pid is also its process-group id.
    if proc.returncode is not None:
        return  # already reaped; its group id may belong to someone else by now
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not _has_exited(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    # SIGKILL whatever is left in the group (the leader if it ignored SIGTERM, and any
    # helpers it spawned) before reaping the leader frees the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class SynapseServer:
    """A throwaway Synapse homeserver living in ``base_dir``.

    Listens on ``bind_host`` (127.0.0.1) only, with federation off and, unless
    ``production_rate_limits`` is set, every rate limiter opened wide. Use as a
    context manager, or call :meth:`start` / :meth:`stop` yourself; :meth:`stop` is
    also run when the object is garbage-collected or the interpreter exits, so a
    crashed test does not leave a homeserver behind.

    Federation mode (``federation_port`` set): a TLS federation listener on
    ``bind_host:federation_port`` with a self-signed certificate for ``bind_host``
    (written once into ``tls_cert_dir``, default ``base_dir``), no certificate checks
    towards peers, no IP blocklist (peers are loopback addresses), no key servers, and
    ``federation_whitelist`` as Synapse's ``federation_domain_whitelist`` (None: the
    key is left out, so every server may federate; entries need the port). The
    ``server_name`` must then end in ``:<federation_port>``, normally
    ``"<bind_host>:<federation_port>"``: with an IP literal plus port, peers connect
    straight to it with no well-known or SRV lookup.
    See :mod:`devstack.federation` for a ready pair of such servers.
    """

    base_dir: Path
    server_name: str = "corp.test"
    port: int = 0
    app_service_config_files: list[Path] = field(default_factory=list)
    registration_shared_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    database: str | None = None
    production_rate_limits: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable
    log_level: str = "INFO"
    bind_host: str = "127.0.0.1"
    federation_port: int | None = None
    tls_cert_dir: Path | None = None
    federation_whitelist: list[str] | None = None
    # serve Synapse's Prometheus metrics at /_synapse/metrics on the client listener
    # (enable_metrics; the gate module's metrics are there)
    metrics: bool = False

    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _finalizer: weakref.finalize | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Synapse is started with cwd=base_dir, so every path it sees must be absolute.
        self.base_dir = Path(self.base_dir).resolve()
        if self.tls_cert_dir is not None:
            self.tls_cert_dir = Path(self.tls_cert_dir).resolve()
        if self.federation_port is not None:
            # The port is part of the server name (and so of every user id), so it
            # cannot be picked later the way the client port is.
            if not 0 < self.federation_port < 65536:
                raise ValueError(f"federation_port must be a real port: {self.federation_port}")
            # peers connect to the port in the name, so it must be the listener's
            if not self.server_name.endswith(f":{self.federation_port}"):
                raise ValueError(
                    f"in federation mode server_name must end in ':{self.federation_port}'"
                    f" (e.g. '{self.bind_host}:{self.federation_port}'),"
                    f" not {self.server_name!r}"
                )

    # -- paths and state ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Client-server API base URL, e.g. ``http://127.0.0.1:8008``."""
        return f"http://{self.bind_host}:{self.port}"

    @property
    def federating(self) -> bool:
        """True in federation mode (``federation_port`` set)."""
        return self.federation_port is not None

    @property
    def federation_url(self) -> str | None:
        """Server-server API base URL (``https://host:port``), None with federation off."""
        if self.federation_port is None:
            return None
        return f"https://{self.bind_host}:{self.federation_port}"

    @property
    def tls_certificate_path(self) -> Path:
        """The federation listener's self-signed certificate (federation mode)."""
        return (self.tls_cert_dir or self.base_dir) / "federation-tls.crt"

    @property
    def tls_private_key_path(self) -> Path:
        """The federation listener's private key (federation mode)."""
        return (self.tls_cert_dir or self.base_dir) / "federation-tls.key"

    @property
    def config_path(self) -> Path:
        """The generated ``homeserver.yaml``."""
        return self.base_dir / "homeserver.yaml"

    @property
    def overrides_path(self) -> Path:
        """The overrides file, rewritten on every start and loaded after the base config."""
        return self.base_dir / "overrides.yaml"

    @property
    def log_path(self) -> Path:
        """Synapse's own log (``homeserver.log``)."""
        return self.base_dir / _HOMESERVER_LOG

    @property
    def stdio_log_path(self) -> Path:
        """Where the process's stdout/stderr go: tracebacks from config errors land here."""
        return self.base_dir / _STDIO_LOG

    @property
    def pid(self) -> int | None:
        """Pid of the running Synapse process, or None if not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the Synapse process started by :meth:`start` is alive."""
        return self._proc is not None and not _has_exited(self._proc)

    # -- configuration -------------------------------------------------------------

    def overrides(self) -> dict[str, Any]:
        """Return the settings written to ``overrides.yaml`` (``extra_config`` included).

        Synapse merges ``-c`` files key by key at the top level only, so each key
        here replaces the generated value wholesale; ``extra_config`` follows the
        same rule.
        """
        cfg: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": self.base_url + "/",
            "listeners": self._client_listeners(),
            "database": _database_config(self.database, self.base_dir),
            "log_config": str(self.base_dir / "log.config"),
            "media_store_path": str(self.base_dir / "media_store"),
            "pid_file": str(self.base_dir / "homeserver.pid"),
            # An empty whitelist makes Synapse refuse all federation traffic, and with no
            # key servers it never reaches out to matrix.org. Federation mode drops it.
            "federation_domain_whitelist": [],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "report_stats": False,
            "enable_registration": False,
            "registration_shared_secret": self.registration_shared_secret,
            # The default cost makes each registration/login take ~400 ms.
            "bcrypt_rounds": 4,
            "presence": {"enabled": False},
            "url_preview_enabled": False,
            # Separation: nobody reads the profile of someone they share no room with, and
            # only signed-in users read profiles at all (as deploy/ tells production to)
            "limit_profile_requests_to_users_who_share_rooms": True,
            "require_auth_for_profile_requests": True,
            # ... and other servers' users (personal contacts) not at all
            "allow_profile_lookup_over_federation": False,
            "app_service_config_files": [
                str(Path(p).resolve()) for p in self.app_service_config_files
            ],
            "server_notices": {"system_mxid_localpart": "notices"},
        }
        if not self.production_rate_limits:
            cfg.update(_test_rate_limits())
        if self.federating:
            del cfg["federation_domain_whitelist"]
            cfg.update(self._federation_overrides())
            if not self.production_rate_limits:
                cfg["rc_federation"] = dict(TEST_FEDERATION_RATE_LIMIT)
        if self.metrics:
            cfg["enable_metrics"] = True
        cfg.update(self.extra_config)
        return cfg

    def _federation_overrides(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "listeners": [
                *self._client_listeners(),
                {
                    "port": self.federation_port,
                    "bind_addresses": [self.bind_host],
                    "type": "http",
                    "tls": True,
                    "x_forwarded": False,
                    # "federation" also serves /_matrix/key, which peers fetch the
                    # signing keys from (there are no trusted key servers)
                    "resources": [{"names": ["federation"], "compress": False}],
                },
            ],
            "tls_certificate_path": str(self.tls_certificate_path),
            "tls_private_key_path": str(self.tls_private_key_path),
            "federation_verify_certificates": False,
            # The default blocklist holds 127.0.0.0/8: peers on loopback would be
            # refused. ip_range_whitelist alone does not unblock IP-literal names.
            "ip_range_blacklist": [],
            "trusted_key_servers": [],
        }
        if self.federation_whitelist is not None:
            cfg["federation_domain_whitelist"] = list(self.federation_whitelist)
        return cfg

    def _client_listeners(self) -> list[dict[str, Any]]:
        return [
            {
                "port": self.port,
                "bind_addresses": [self.bind_host],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client", *(["metrics"] if self.metrics else [])],
                               "compress": False}],
            }
        ]

    def _log_config(self) -> dict[str, Any]:
        # Our own log config instead of the generated one: unbuffered (so the failure
        # tail is complete) and always pointing into base_dir.
        return {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                    " - %(request)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
            "root": {"level": self.log_level, "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    def _write_overrides(self) -> None:
        (self.base_dir / "log.config").write_text(
            yaml.safe_dump(self._log_config(), sort_keys=False), encoding="utf-8"
        )
        self.overrides_path.write_text(
            yaml.safe_dump(self.overrides(), sort_keys=False), encoding="utf-8"
        )

    def generate(self) -> None:
        """Create ``homeserver.yaml`` and the signing key (once), then write the overrides.

        In federation mode the listener's certificate is also made once, here.

        The base config is only generated the first time, so the signing key and
        secrets survive restarts; the overrides are rewritten every time so changes
        to fields such as ``app_service_config_files`` take effect on the next start.
        """
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.bind_host)
        if not self.config_path.exists():
            result = subprocess.run(
                [
                    self.python,
                    "-m",
                    "synapse.app.homeserver",
                    "--generate-config",
                    "--server-name",
                    self.server_name,
                    "--config-path",
                    str(self.config_path),
                    "--data-directory",
                    str(self.base_dir),
                    "--report-stats=no",
                ],
                cwd=self.base_dir,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"synapse --generate-config failed ({result.returncode}):\n"
                    f"{result.stdout}{result.stderr}"
                )
        if self.federating and not (
            self.tls_certificate_path.exists() and self.tls_private_key_path.exists()
        ):
            write_self_signed_cert(
                self.bind_host, self.tls_certificate_path, self.tls_private_key_path
            )
        self._write_overrides()

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start Synapse and block until ``/_matrix/client/versions`` answers 200.

        Raises RuntimeError with the tail of the logs if the process exits or does
        not answer within ``timeout`` seconds. Does nothing if already running.
        """
        if self.running:
            return
        auto_port = self.port == 0
        for attempt in range(_PORT_RETRIES):
            self.generate()
            try:
                self._spawn_and_wait(timeout)
                return
            except RuntimeError:
                this_run = _tail(self.stdio_log_path, 200).rpartition(_START_MARKER)[2]
                port_taken = "Address already in use" in this_run
                if not (auto_port and port_taken and attempt + 1 < _PORT_RETRIES):
                    raise
                self.port = 0

    def _spawn_and_wait(self, timeout: float) -> None:
        # Mark where this run's output starts so a retry is not fooled by an old error.
        with self.stdio_log_path.open("a", encoding="utf-8") as marker:
            marker.write(f"{_START_MARKER} on {self.base_url} at {time.ctime()} ---\n")
        with self.stdio_log_path.open("ab") as out:
            # The child keeps its own copy of the descriptor, so closing ours is fine.
            proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "synapse.app.homeserver",
                    "-c",
                    str(self.config_path),
                    "-c",
                    str(self.overrides_path),
                ],
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _terminate, proc, 20.0)

        deadline = time.monotonic() + timeout
        url = self.base_url + "/_matrix/client/versions"
        while True:
            if _has_exited(proc):
                self.stop()
                raise RuntimeError(
                    f"Synapse exited with code {proc.returncode} during startup\n"
                    + self._log_tails()
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Synapse did not answer {url} within {timeout:.0f}s\n" + self._log_tails()
                )
            time.sleep(0.1)

    def _log_tails(self) -> str:
        return (
            f"--- last {_LOG_TAIL_LINES} lines of {self.stdio_log_path} ---\n"
            f"{_tail(self.stdio_log_path)}"
            f"--- last {_LOG_TAIL_LINES} lines of {self.log_path} ---\n"
            f"{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM Synapse's process group, SIGKILL it after ``timeout`` s. Idempotent."""
        proc, finalizer = self._proc, self._finalizer
        self._proc = self._finalizer = None
        if finalizer is not None:
            finalizer.detach()
        if proc is not None:
            _terminate(proc, timeout)

    def kill(self) -> None:
        """SIGKILL Synapse's process group (a crash: nothing is flushed) and reap it."""
        proc, finalizer = self._proc, self._finalizer
        self._proc = self._finalizer = None
        if finalizer is not None:
            finalizer.detach()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port, database and base directory."""
        self.stop()
        self.start()

    def __enter__(self) -> SynapseServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- HTTP helpers --------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        access_token: str | None = None,
        timeout: float = 30,
    ) -> Any:
        """Call the homeserver and return the decoded JSON response.

        ``path`` starts with ``/`` (e.g. ``/_synapse/admin/v1/server_version``).
        Raises RuntimeError with the status and response body on a non-2xx answer,
        so test failures show Synapse's errcode.
        """
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if access_token is not None:
            req.add_header("Authorization", f"Bearer {access_token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise RuntimeError(f"{method} {path} -> {err.code}: {detail}") from None
        return json.loads(raw) if raw else None

    def register_user(self, localpart: str, password: str, admin: bool = False) -> tuple[str, str]:
        """Create a user with shared-secret registration; return ``(user_id, access_token)``.

        Works with ``enable_registration: false`` and is not subject to the
        registration rate limit, which is why tests and the local stack use it.
        """
        path = "/_synapse/admin/v1/register"
        nonce = self.request("GET", path)["nonce"]
        mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [
                    nonce.encode(),
                    localpart.encode(),
                    password.encode(),
                    b"admin" if admin else b"notadmin",
                ]
            )
        )
        resp = self.request(
            "POST",
            path,
            {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
        )
        return resp["user_id"], resp["access_token"]

"""Launch a throwaway, real OpenLDAP ``slapd`` for tests and benchmarks.

One :class:`SlapdServer` owns one directory (``slapd.conf``, the mdb database, the LDIF it
was loaded from) and at most one slapd process, listening on 127.0.0.1 only. Load data
with :meth:`SlapdServer.load_ldif` (``slapadd -q``, fast: 10k people in well under a
second) *before* :meth:`SlapdServer.start`; change entries online through
:meth:`SlapdServer.connection` (bound as the rootdn).

:func:`generate_directory_ldif` writes a deterministic company directory: people
``uid=user00001`` … under ``ou=people``, department heads as managers, and
``groupOfNames`` groups under ``ou=groups`` (one per department, ``managers``,
``it-admins``, ``all-staff`` nesting every department group, plus any you ask for).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from .synapse import free_port

if TYPE_CHECKING:
    import ldap3

__all__ = [
    "SLAPADD",
    "SLAPD",
    "SlapdServer",
    "department_of",
    "generate_directory_ldif",
    "group_dn",
    "it_admins",
    "person_dn",
    "person_uid",
    "slapd_available",
]

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
_SCHEMAS = ("core", "cosine", "inetorgperson", "nis", "dyngroup")
_EMAIL_DOMAIN = "corp.example.com"


def _terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    # Module-level so weakref.finalize can call it without keeping the server alive.
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)  # a paused slapd must see the signal
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class SlapdServer:
    """A private slapd (mdb backend, ``dbnosync``) in ``base_dir``.

    Usable as a context manager. The process is also stopped when the object is
    garbage-collected or the interpreter exits, so a crashed test leaves nothing behind.
    ``ppolicy`` loads the password-policy overlay, which defines ``pwdAccountLockedTime``
    (the usual OpenLDAP "account locked" flag) so tests can mark people disabled.
    ``extra_config`` is appended to the database section (e.g. ``limits`` lines).
    ``tls`` makes a self-signed certificate for 127.0.0.1 (:attr:`ca_file`), enables
    StartTLS on :attr:`url` and also listens on :attr:`ldaps_url`.
    """

    def __init__(self, base_dir: Path, *, suffix: str = "dc=corp,dc=test",
                 rootdn: str = "cn=admin,dc=corp,dc=test", rootpw: str = "secret",
                 port: int | None = None, ppolicy: bool = True,
                 extra_config: str = "", tls: bool = False) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.suffix = suffix
        self.rootdn = rootdn
        self.rootpw = rootpw
        self.port = port or free_port()
        self.ppolicy = ppolicy
        self.extra_config = extra_config
        self.tls = tls
        self.ldaps_port = free_port() if tls else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.db_dir.mkdir(exist_ok=True)
        if tls:
            self._make_certificate()
        self._write_conf()

    # -- paths ---------------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.base_dir / "slapd.conf"

    @property
    def db_dir(self) -> Path:
        return self.base_dir / "db"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "slapd.log"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        if self.ldaps_port is None:
            raise RuntimeError("SlapdServer(tls=True) is needed for ldaps")
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ca_file(self) -> Path:
        """The self-signed certificate (its own CA) when ``tls``."""
        return self.base_dir / "tls" / "cert.pem"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def person_dn(self, n: int) -> str:
        return person_dn(n, suffix=self.suffix)

    def group_dn(self, name: str) -> str:
        return group_dn(name, suffix=self.suffix)

    # -- setup ---------------------------------------------------------------------------
    def _make_certificate(self) -> None:
        d = self.base_dir / "tls"
        d.mkdir(exist_ok=True)
        if self.ca_file.exists():
            return
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(d / "key.pem"), "-out", str(self.ca_file)],
            check=True, capture_output=True)

    def _write_conf(self) -> None:
        lines = [f"include /etc/ldap/schema/{s}.schema" for s in _SCHEMAS]
        lines += [
            f"pidfile {self.base_dir / 'slapd.pid'}",
            f"argsfile {self.base_dir / 'slapd.args'}",
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
            "moduleload dynlist",
        ]
        if self.ppolicy:
            lines.append("moduleload ppolicy")
        if self.tls:
            lines += [f"TLSCertificateFile {self.ca_file}",
                      f"TLSCertificateKeyFile {self.base_dir / 'tls' / 'key.pem'}"]
        lines += [
            "sizelimit unlimited",
            "timelimit unlimited",
            "",
            "database mdb",
            f'suffix "{self.suffix}"',
            f'rootdn "{self.rootdn}"',
            f"rootpw {self.rootpw}",
            f"directory {self.db_dir}",
            "maxsize 1073741824",
            "dbnosync",
            "index objectClass,uid,mail,member,entryCSN,entryUUID eq",
            "index modifyTimestamp eq",
            "access to * by * read",
        ]
        if self.extra_config:
            lines.append(self.extra_config)
        if self.ppolicy:
            lines.append("overlay ppolicy")
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def load_ldif(self, text: str) -> None:
        """Bulk-load entries with ``slapadd -q`` (only while slapd is stopped)."""
        if self.running:
            raise RuntimeError("load_ldif needs slapd stopped (slapadd writes the db directly)")
        path = self.base_dir / f"load-{time.monotonic_ns()}.ldif"
        path.write_text(text, encoding="utf-8")
        res = subprocess.run([SLAPADD, "-q", "-f", str(self.conf_path), "-l", str(path)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"slapadd failed ({res.returncode}): {res.stderr[-2000:]}")

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 10) -> None:
        """Start slapd and block until an LDAP bind as the rootdn succeeds."""
        if self.running:
            return
        with self.log_path.open("ab") as out:
            proc = subprocess.Popen(
                [SLAPD, "-f", str(self.conf_path), "-h", self._listen(), "-d", "0"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _terminate, proc, signal.SIGKILL, 5.0)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._forget()
                raise RuntimeError(f"slapd exited with code {proc.returncode}:\n"
                                   f"{self._log_tail()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"slapd did not answer on {self.url} within {timeout}s\n"
                                   f"{self._log_tail()}")
            time.sleep(0.05)

    def _listen(self) -> str:
        urls = [f"{self.url}/"]
        if self.tls:
            urls.append(f"{self.ldaps_url}/")
        return " ".join(urls)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        try:
            conn = self.connection()
        except Exception:
            return False
        conn.unbind()
        return True

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""

    def _forget(self) -> subprocess.Popen[bytes] | None:
        proc, fin = self._proc, self._finalizer
        self._proc = self._finalizer = None
        if fin is not None:
            fin.detach()
        return proc

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s. Idempotent."""
        proc = self._forget()
        if proc is not None:
            _terminate(proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL at once (an outage). :meth:`start` brings it back on the same port."""
        proc = self._forget()
        if proc is not None:
            _terminate(proc, signal.SIGKILL, 5.0)

    def pause(self) -> None:
        """SIGSTOP: slapd keeps its sockets open but answers nothing (a hung server)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> SlapdServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------------
    def connection(self) -> ldap3.Connection:
        """A bound (rootdn) synchronous ldap3 connection; the caller unbinds it."""
        import ldap3

        server = ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=5)
        return ldap3.Connection(server, user=self.rootdn, password=self.rootpw,
                                auto_bind=True, raise_exceptions=True, receive_timeout=10)


# -- generated directory -------------------------------------------------------------------
_GIVEN = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
          "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter",
          "Zoë", "José", "Åsa", "Łukasz", "Mei", "Ngozi", "Priya", "Sven", "Yuki")
_SURNAMES = ("Smith", "Jones", "Müller", "García", "Nguyen", "Kowalski", "O'Brien", "Rossi",
             "Tanaka", "Okafor", "Dubois", "Andersson", "Singh", "Cohen", "Silva", "Novak")
_TITLES = ("Engineer", "Senior Engineer", "Analyst", "Designer", "Accountant", "Consultant",
           "Support Specialist", "Product Manager", "Recruiter", "Technician")
_LOCATIONS = ("Berlin", "London", "Paris", "Madrid", "Warsaw", "Stockholm", "Remote")


def person_uid(n: int) -> str:
    """The uid of person number ``n`` (1-based): ``user00001``."""
    return f"user{n:05d}"


def person_dn(n: int, *, suffix: str = "dc=corp,dc=test") -> str:
    return f"uid={person_uid(n)},ou=people,{suffix}"


def group_dn(name: str, *, suffix: str = "dc=corp,dc=test") -> str:
    return f"cn={name},ou=groups,{suffix}"


def department_of(n: int, n_departments: int = 20) -> int:
    """Department number (1-based) of person ``n``: people are dealt round-robin."""
    return (n - 1) % n_departments + 1


def _ldif_value(attr: str, value: str) -> str:
    if value.isascii() and not value.startswith((" ", ":", "<")) and not value.endswith(" "):
        return f"{attr}: {value}"
    import base64

    return f"{attr}:: {base64.b64encode(value.encode()).decode()}"


def _entry(dn: str, attrs: list[tuple[str, str]], timestamp: str | None = None) -> str:
    if timestamp is not None:
        csn = f"{timestamp[:14]}.000000Z#000000#000#000000"
        attrs = [*attrs, ("createTimestamp", timestamp), ("modifyTimestamp", timestamp),
                 ("entryCSN", csn)]
    return "\n".join([_ldif_value("dn", dn), *(_ldif_value(a, v) for a, v in attrs)]) + "\n"


def generate_directory_ldif(n_people: int, *, suffix: str = "dc=corp,dc=test",
                            n_departments: int = 20,
                            groups: dict[str, list[int]] | None = None,
                            seed: int = 1, timestamp: str | None = None) -> str:
    """A deterministic directory as LDIF (suffix entry included), for ``slapadd``.

    People are numbered 1..n_people (``uid=user00001`` …). Person ``n`` is in department
    ``(n-1) % n_departments + 1`` ("Department 01" …); person ``d`` (the first of each
    department) is that department's head: title "Head of Department", no manager, and
    everyone else's ``manager``. Groups (``groupOfNames``, cn = name): ``dept-NN`` (the
    department's people), ``managers`` (the heads), ``it-admins`` (five people),
    ``all-staff`` (member = every ``dept-NN`` group: nested), plus ``groups`` (name ->
    person numbers). A group with no members gets the suffix DN as a placeholder member
    (``groupOfNames`` requires one).

    ``timestamp`` (generalized time, e.g. ``20240101000000Z``) stamps every entry's
    ``createTimestamp``/``modifyTimestamp``/``entryCSN`` (slapadd keeps them), so entries
    look old and an incremental read only sees what a test changes afterwards.
    """
    rng = random.Random(seed)
    n_dep = max(1, min(n_departments, max(n_people, 1)))
    dc = suffix.split(",")[0].split("=", 1)[1]
    out = [
        _entry(suffix, [("objectClass", "dcObject"), ("objectClass", "organization"),
                        ("dc", dc), ("o", "Corp")], timestamp),
        _entry(f"ou=people,{suffix}", [("objectClass", "organizationalUnit"), ("ou", "people")],
               timestamp),
        _entry(f"ou=groups,{suffix}", [("objectClass", "organizationalUnit"), ("ou", "groups")],
               timestamp),
    ]
    dept_members: dict[int, list[int]] = {d: [] for d in range(1, n_dep + 1)}
    for n in range(1, n_people + 1):
        d = department_of(n, n_dep)
        dept_members[d].append(n)
        given, sn = rng.choice(_GIVEN), rng.choice(_SURNAMES)
        head = n <= n_dep
        attrs = [
            ("objectClass", "inetOrgPerson"),
            ("uid", person_uid(n)),
            ("cn", f"{given} {sn} {n}"),
            ("sn", sn),
            ("givenName", given),
            ("displayName", f"{given} {sn}"),
            ("mail", f"{person_uid(n)}@{_EMAIL_DOMAIN}"),
            ("title", "Head of Department" if head else rng.choice(_TITLES)),
            ("departmentNumber", f"Department {d:02d}"),
            ("l", rng.choice(_LOCATIONS)),
        ]
        if not head:
            attrs.append(("manager", person_dn(d, suffix=suffix)))
        out.append(_entry(person_dn(n, suffix=suffix), attrs, timestamp))

    def group(name: str, member_dns: list[str], description: str) -> None:
        attrs = [("objectClass", "groupOfNames"), ("cn", name), ("description", description)]
        attrs += [("member", m) for m in (member_dns or [suffix])]
        out.append(_entry(group_dn(name, suffix=suffix), attrs, timestamp))

    for d, members in dept_members.items():
        group(f"dept-{d:02d}", [person_dn(m, suffix=suffix) for m in members],
              f"Department {d:02d}")
    heads = list(range(1, min(n_dep, n_people) + 1))
    group("managers", [person_dn(m, suffix=suffix) for m in heads], "Department heads")
    admins = it_admins(n_people, n_departments=n_dep, seed=seed)
    group("it-admins", [person_dn(m, suffix=suffix) for m in admins], "IT administrators")
    group("all-staff", [group_dn(f"dept-{d:02d}", suffix=suffix) for d in dept_members],
          "Everyone (nested department groups)")
    for name, members in (groups or {}).items():
        group(name, [person_dn(m, suffix=suffix) for m in members], name)
    return "\n".join(out)


def it_admins(n_people: int, *, n_departments: int = 20, seed: int = 1) -> list[int]:
    """The person numbers :func:`generate_directory_ldif` puts in ``it-admins``."""
    n_dep = max(1, min(n_departments, max(n_people, 1)))
    others = list(range(n_dep + 1, n_people + 1))
    return sorted(random.Random(f"it-admins-{seed}").sample(others, min(5, len(others))))


def slapd_available() -> bool:
    """Whether slapd and slapadd are installed (tests skip without them)."""
    return all(os.access(tool, os.X_OK) for tool in (SLAPD, SLAPADD))

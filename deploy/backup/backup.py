"""Backup and restore of an Enclave installation: Synapse and Enclave, databases and files.

``enclave-backup`` and ``enclave-restore`` (beside this file) are thin wrappers that run
``python backup.py backup|restore|check ...`` with Enclave's Python (the project venv, or
``$ENCLAVE_PYTHON``). README.md beside this file is the operator's documentation: what is
backed up, in which order and why, scheduling, restore steps and what is not covered.

One backup is one directory ``<out>/enclave-backup-<UTC time>/`` (written as
``….partial`` and renamed when complete) holding one file per part, ``MANIFEST.json``
(every part: what it is, where it is restored to, size, SHA-256) and ``SHA256SUMS``
(``sha256sum -c SHA256SUMS`` checks the parts and the manifest without Python).

Parts, in the order they are taken:

1. configuration and key files: Synapse's config files, signing key, log config,
   appservice registrations and other ``*_path`` files; Enclave's config and secret files;
2. Synapse's database (SQLite: online backup API; PostgreSQL: ``pg_dump -Fc``);
3. Synapse's media store (tar);
4. Enclave's inbox journal (SQLite only; in PostgreSQL it is a table of the database);
5. Enclave's database and its compliance archive, as one cut: with every room of the archive
   locked (the archive's own per-room ``flock``), the database snapshot is fixed and the
   room files are hard-linked (or copied); then the locks go and the snapshot is copied. The
   archive part is cut to the archive heads of that snapshot, so ``enclave archive verify``
   passes on the restored pair;
6. the bots' end-to-end encryption stores (tar; SQLite files by the backup API).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import yaml

FORMAT = "enclave-backup/1"
MANIFEST_NAME = "MANIFEST.json"
SUMS_NAME = "SHA256SUMS"
NAME_PREFIX = "enclave-backup-"
PARTIAL_SUFFIX = ".partial"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_WARNINGS = 3  # backup: complete, with warnings (kept; look at them)
EXIT_CORRUPT = 3  # restore/check: a checksum or the manifest does not match
EXIT_NOT_EMPTY = 4  # restore: a target holds data and --force was not given
EXIT_RUNNING = 5  # restore: Synapse or Enclave still uses a target

# libpq connection keywords Synapse's database.args may carry (the rest are Synapse's own)
_LIBPQ_KEYS = ("host", "hostaddr", "port", "user", "dbname", "sslmode", "sslrootcert",
               "sslcert", "sslkey", "sslcrl", "options", "application_name",
               "connect_timeout", "target_session_attrs", "service")
# Synapse keys ending in _path/_file that are not files worth restoring
_SYNAPSE_SKIP_KEYS = {"pid_file", "media_store_path", "uploads_path", "signing_key_path",
                      "log_file"}


class BackupError(Exception):
    """A failure with a message for the operator (no traceback)."""


def log(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def utc_stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


# -- databases -----------------------------------------------------------------------------
@dataclass
class Database:
    """Where a database lives. ``conninfo`` never holds the password."""

    engine: str  # "sqlite" | "postgresql"
    path: Path | None = None
    conninfo: str | None = None
    password: str | None = None
    # how restore finds the password again: {"file": <backed-up secret path>},
    # {"env": NAME} or {"synapse_config": true}
    password_from: dict[str, Any] | None = None

    def describe(self) -> str:
        return str(self.path) if self.engine == "sqlite" else str(self.conninfo)


def _libpq_quote(value: str) -> str:
    if value and all(c not in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pg_env(password: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = password
    return env


def strip_url_password(url: str) -> tuple[str, str | None]:
    """A postgresql:// URL without its password (returned apart)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (parts.username or "") + "@" + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), \
        parts.password


def synapse_database(merged: dict[str, Any], base: Path) -> Database:
    db = merged.get("database") or {}
    name = db.get("name", "sqlite3")
    args = db.get("args") or {}
    if name == "sqlite3":
        raw = args.get("database")
        if not raw or raw == ":memory:":
            raise BackupError("Synapse's SQLite database is not a file (database.args.database)")
        path = Path(raw)
        return Database("sqlite", path=path if path.is_absolute() else base / path)
    if name in ("psycopg2", "psycopg"):
        pairs = dict(args)
        if "database" in pairs and "dbname" not in pairs:
            pairs["dbname"] = pairs.pop("database")
        conninfo = " ".join(f"{k}={_libpq_quote(str(pairs[k]))}" for k in _LIBPQ_KEYS
                            if pairs.get(k) not in (None, ""))
        password = args.get("password")
        return Database("postgresql", conninfo=conninfo,
                        password=str(password) if password else None,
                        password_from={"synapse_config": True} if password else None)
    raise BackupError(f"Synapse database engine {name!r} is not supported")


def database_from_flag(value: str) -> Database:
    """A postgresql:// URL, ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or a path."""
    if value.startswith(("postgresql://", "postgres://")):
        url, password = strip_url_password(value)
        return Database("postgresql", conninfo=url, password=password)
    raw = value[len("sqlite://"):] if value.startswith("sqlite://") else value
    if value.startswith("sqlite://"):
        raw = raw[1:] if raw.startswith("/") else raw
    return Database("sqlite", path=Path(raw).resolve())


def sqlite_snapshot(src: Path, dst: Path,
                    inside: Callable[[sqlite3.Connection], None] | None = None) -> None:
    """A consistent copy of a live SQLite database by the online backup API.

    A read transaction on the source fixes the snapshot first; ``inside(conn)`` runs in it
    (reads that must see the same snapshot, and whatever has to happen while it is fixed),
    then the backup copies that snapshot. The copy is switched to a rollback journal (one
    self-contained file) and checked with ``PRAGMA quick_check``."""
    if not src.is_file():
        raise BackupError(f"SQLite database {src} does not exist")
    source = sqlite3.connect(src.resolve().as_uri() + "?mode=rw", uri=True, timeout=60,
                             isolation_level=None)
    try:
        source.execute("BEGIN")
        source.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        if inside is not None:
            inside(source)
        target = sqlite3.connect(dst)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")
            check = target.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            target.close()
        if check != "ok":
            raise BackupError(f"the copy of {src} fails quick_check: {check}")
        source.execute("ROLLBACK")
    finally:
        source.close()
    os.chmod(dst, 0o600)


def sqlite_table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name=?",
                        (name,)).fetchone()[0] > 0


def run_tool(cmd: list[str], *, env: dict[str, str] | None = None, what: str) -> str:
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BackupError(f"{cmd[0]} is not installed (PostgreSQL client tools are needed "
                          f"for {what})") from None
    if res.returncode != 0:
        raise BackupError(f"{what} failed ({cmd[0]} exit {res.returncode}): "
                          f"{res.stderr.strip()[-2000:]}")
    return res.stdout


def pg_dump(db: Database, dst: Path, snapshot: str | None = None) -> None:
    cmd = ["pg_dump", "-Fc", "--no-password", "-f", str(dst)]
    if snapshot:
        cmd.append(f"--snapshot={snapshot}")
    cmd += ["-d", str(db.conninfo)]
    run_tool(cmd, env=pg_env(db.password), what=f"pg_dump of {db.conninfo}")
    os.chmod(dst, 0o600)
    # the dump must at least be readable by the tool that restores it
    run_tool(["pg_restore", "--list", str(dst)], what=f"checking the dump {dst.name}")


# -- archive heads ------------------------------------------------------------------------
@dataclass(frozen=True)
class Head:
    entries: int
    head: str


def heads_from_sqlite(conn: sqlite3.Connection) -> dict[str, Head]:
    if not sqlite_table_exists(conn, "archive_heads"):
        return {}
    return {r[0]: Head(int(r[1]), r[2])
            for r in conn.execute("SELECT room_id, entries, head FROM archive_heads")}


def enclave_counts_sqlite(conn: sqlite3.Connection) -> dict[str, int]:
    out: dict[str, int] = {}
    for table, key in (("archive_events", "archive_events"), ("archive_media", "archive_media"),
                       ("events", "inbox_events")):
        if sqlite_table_exists(conn, table):
            out[key] = int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    if sqlite_table_exists(conn, "enclave_schema"):
        out["schema_version"] = int(conn.execute(
            "SELECT MAX(version) FROM enclave_schema").fetchone()[0] or 0)
    return out


# -- archive snapshot ---------------------------------------------------------------------
class ArchiveLocks:
    """The archive's per-room advisory locks (``locks/<room dir>.lock``), the same ``flock``
    Enclave takes around every write to a room (bridge/retention/archive/)."""

    def __init__(self, root: Path, timeout: float):
        self.root = root
        self.timeout = timeout
        self.fds: dict[str, int] = {}

    def take(self, dirname: str) -> None:
        if dirname in self.fds:
            return
        path = self.root / "locks" / f"{dirname}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except PermissionError:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise BackupError(f"cannot lock {path}: {e}; run the backup as the user "
                                  "Enclave runs as") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise BackupError(f"archive room {dirname} stayed locked for "
                                      f"{self.timeout:.0f}s (a long write or purge?); try "
                                      "again, or raise --lock-timeout") from None
                time.sleep(0.05)
        self.fds[dirname] = fd

    def release(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def room_dirs(root: Path) -> list[str]:
    base = root / "rooms"
    return sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []


def stage_room(src: Path, dst: Path) -> None:
    """Hard-link (else copy) a room's files: taken under the room's lock, a link keeps the
    bytes of that moment (segments and manifest are only appended to, and a pruned segment
    is unlinked, not rewritten)."""
    dst.mkdir(parents=True, exist_ok=True)
    if not src.is_dir():
        return
    for f in src.iterdir():
        if not f.is_file():
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copyfile(f, dst / f.name)


@dataclass
class RoomCut:
    manifest_bytes: int
    segments: dict[str, int]  # segment -> committed length
    entries: int
    events: int
    media: int


def cut_room(manifest: bytes, room_id: str, head: Head) -> RoomCut | str:
    """The committed part of a room's archive files at ``head``, or why it cannot be cut."""
    from bridge.retention.archive import parse_manifest

    m = parse_manifest(manifest, room_id)
    if len(m.entries) < head.entries:
        why = f" (entry {m.problem[0]}: {m.problem[2]})" if m.problem else ""
        return (f"the manifest has {len(m.entries)} valid entries, the database head "
                f"{head.entries}{why}")
    if head.entries and m.entries[head.entries - 1]["hash"] != head.head:
        return f"manifest entry {head.entries} differs from the database head"
    committed = m.entries[:head.entries]
    nbytes = sum(len(line) + 1 for line in manifest.split(b"\n")[:head.entries])
    pruned = {e["segment"] for e in committed if e["op"] == "prune"}
    ends: dict[str, int] = {}
    events = media = 0
    for e in committed:
        if e["op"] == "append" and e["segment"] not in pruned:
            ends[e["segment"]] = max(ends.get(e["segment"], 0), e["offset"] + e["length"])
            events += e["count"]
        elif e["op"] == "media":
            media += 1
    return RoomCut(nbytes, ends, head.entries, events, media)


# -- tar with a running hash ----------------------------------------------------------------
class HashingWriter(io.RawIOBase):
    def __init__(self, f: IO[bytes]):
        self.f = f
        self.h = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.f.write(data)
        self.h.update(data)
        self.size += len(data)
        return len(data)


@contextlib.contextmanager
def hashed_tar(path: Path) -> Iterator[tuple[tarfile.TarFile, HashingWriter]]:
    with path.open("wb") as raw:
        os.chmod(path, 0o600)
        hw = HashingWriter(raw)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            yield tf, hw
        raw.flush()
        os.fsync(raw.fileno())


def tar_add_file(tf: tarfile.TarFile, path: Path, arcname: str, size: int | None = None,
                 ) -> int | None:
    """Add a regular file (its first ``size`` bytes); its size, None if it vanished."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    with f:
        info = tf.gettarinfo(arcname=arcname, fileobj=f)
        if size is not None:
            if info.size < size:
                raise BackupError(f"{path} is {info.size} bytes, {size} are committed")
            info.size = size
        tf.addfile(info, f)
    return info.size


def tar_add_bytes(tf: tarfile.TarFile, data: bytes, arcname: str, like: Path) -> None:
    info = tf.gettarinfo(str(like), arcname=arcname)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def tar_tree(tf: tarfile.TarFile, root: Path, prefix: str = "",
             skip: Callable[[Path], bool] | None = None) -> tuple[int, int]:
    """Add every regular file under ``root`` (sorted); (files, bytes). Files that vanish
    while the tree is read are left out (a live directory)."""
    files = total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames):
            p = here / name
            if skip is not None and skip(p):
                continue
            if not p.is_file() or p.is_symlink():
                continue
            size = tar_add_file(tf, p, prefix + str(p.relative_to(root)))
            if size is not None:
                files += 1
                total += size
    return files, total


# -- what an installation consists of ---------------------------------------------------------
@dataclass
class FileItem:
    role: str
    path: Path


@dataclass
class Synapse:
    configs: list[Path]
    merged: dict[str, Any]
    db: Database
    media: Path | None
    files: list[FileItem]
    pid_file: Path | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Enclave:
    config: Path | None
    db: Database
    archive: Path | None
    crypto: Path | None
    files: list[FileItem]
    warnings: list[str] = field(default_factory=list)
    probe: list[str] = field(default_factory=list)  # URLs that answer while it runs


def expand_configs(paths: list[Path]) -> list[Path]:
    """Config files as Synapse reads them: a directory stands for its *.yaml, sorted."""
    out: list[Path] = []
    for p in paths:
        p = p.resolve()
        if p.is_dir():
            out += sorted(x for x in p.iterdir() if x.suffix == ".yaml" and x.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise BackupError(f"Synapse config {p} does not exist")
    return out


def merge_synapse(configs: list[Path]) -> dict[str, Any]:
    """Synapse merges its -c files key by key at the top level, later files winning."""
    merged: dict[str, Any] = {}
    for c in configs:
        data = yaml.safe_load(c.read_text()) or {}
        if not isinstance(data, dict):
            raise BackupError(f"{c} is not a YAML mapping")
        merged.update(data)
    return merged


def _walk_paths(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_paths(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _walk_paths(v, key)
    elif isinstance(node, str) and (key.endswith(("_path", "_file")) or key == "log_config"):
        yield key, node


def read_synapse(args: argparse.Namespace) -> Synapse | None:
    if not args.synapse_config and not args.synapse_db:
        return None
    configs = expand_configs(args.synapse_config or [])
    merged = merge_synapse(configs) if configs else {}
    base = configs[0].parent if configs else Path.cwd()

    def resolve(p: str | Path) -> Path:
        p = Path(p)
        return p if p.is_absolute() else base / p

    if args.synapse_db:
        db = database_from_flag(args.synapse_db)
    elif configs:
        db = synapse_database(merged, base)
    else:
        raise BackupError("give --synapse-config (or --synapse-db)")
    media = Path(args.synapse_media).resolve() if args.synapse_media else (
        resolve(merged.get("media_store_path", "media_store")) if configs else None)
    files = [FileItem("synapse-config", c) for c in configs]
    if configs:
        server_name = merged.get("server_name")
        key = merged.get("signing_key_path") or (f"{server_name}.signing.key"
                                                 if server_name else None)
        if key is None or not resolve(key).is_file():
            raise BackupError(f"Synapse's signing key {key} was not found "
                              "(signing_key_path): without it the server's identity is lost")
        files.append(FileItem("synapse-signing-key", resolve(key)))
        for conf in configs:  # each file's references: a later file may override them
            data = yaml.safe_load(conf.read_text()) or {}
            for reg in data.get("app_service_config_files") or []:
                files.append(FileItem("appservice-registration", resolve(reg)))
            for k, v in _walk_paths(data):
                p = resolve(v)
                if k not in _SYNAPSE_SKIP_KEYS and p.is_file():
                    files.append(FileItem(f"synapse-file:{k}", p))
    pid = merged.get("pid_file")
    return Synapse(configs, merged, db, media, files, resolve(pid) if pid else None)


def _secret_files(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("file"), str) and set(node) <= {"file", "env"}:
            yield node["file"]
        for v in node.values():
            yield from _secret_files(v)
    elif isinstance(node, list):
        for v in node:
            yield from _secret_files(v)


def read_enclave(args: argparse.Namespace) -> Enclave | None:
    if not args.enclave_config and not args.enclave_db:
        return None
    from bridge.config import ConfigError

    try:
        return _read_enclave(args)
    except ConfigError as e:
        raise BackupError(str(e)) from None


def _read_enclave(args: argparse.Namespace) -> Enclave:
    files: list[FileItem] = []
    notes: list[str] = []
    archive = crypto = None
    if args.enclave_config:
        from bridge.config import load_config

        cfg_path = Path(args.enclave_config).resolve()
        loaded = load_config(cfg_path)
        cfg = loaded.config
        files.append(FileItem("enclave-config", cfg_path))
        raw = yaml.safe_load(cfg_path.read_text()) or {}
        for ref in _secret_files(raw):
            p = loaded.resolve(ref)
            if p.is_file():
                files.append(FileItem("enclave-secret", p))
            else:
                notes.append(f"secret file {p} named in {cfg_path} does not exist; "
                             "not backed up")
        src = cfg.directory.source if cfg.directory else None
        ca = getattr(src, "tls_ca_file", None)
        if ca is not None and loaded.resolve(ca).is_file():
            files.append(FileItem("enclave-file:tls_ca_file", loaded.resolve(ca)))
        if args.enclave_db:
            db = database_from_flag(args.enclave_db)
        elif cfg.database.url.startswith("sqlite://"):
            from bridge.store.db import database_from_url

            db = Database("sqlite", path=Path(database_from_url(
                cfg.database.url, base_dir=loaded.base_dir).path))  # type: ignore[attr-defined]
        else:
            url, inline = strip_url_password(cfg.database.url)
            db = Database("postgresql", conninfo=url, password=inline)
            ref = cfg.database.password
            if ref is not None:
                db.password = loaded.secret(ref, "database.password").get()
                db.password_from = ({"env": ref.env} if ref.env is not None
                                    else {"file": str(loaded.resolve(ref.file or "").resolve())})
        if args.archive:
            archive = Path(args.archive).resolve()
        elif cfg.retention is not None:
            # the path the composition root gives the archive (relative to the config file)
            archive = loaded.resolve(cfg.retention.archive.path).resolve()
        if cfg.bots is not None and cfg.bots.encryption.enabled:
            crypto = loaded.resolve(cfg.bots.encryption.store_dir).resolve()
    else:
        db = database_from_flag(args.enclave_db)
        archive = Path(args.archive).resolve() if args.archive else None
    probe = []
    if args.enclave_config:
        host = _loopback(cfg.appservice.bind_host)
        probe.append(f"http://{host}:{cfg.appservice.port}/health")
    return Enclave(Path(args.enclave_config).resolve() if args.enclave_config else None,
                   db, archive, crypto, files, notes, probe)


def _loopback(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def _synapse_probes(merged: dict[str, Any]) -> list[str]:
    """The plain-HTTP client listeners' versions URLs: they answer while Synapse runs."""
    out = []
    for lis in merged.get("listeners") or []:
        if not isinstance(lis, dict) or lis.get("tls") or lis.get("type") != "http" \
                or not isinstance(lis.get("port"), int):
            continue
        names = {n for r in lis.get("resources") or [] for n in (r.get("names") or [])}
        if "client" in names:
            host = _loopback(str((lis.get("bind_addresses") or ["127.0.0.1"])[0]))
            out.append(f"http://{host}:{lis['port']}/_matrix/client/versions")
    return out


# -- writing a backup -------------------------------------------------------------------------
@dataclass
class Writer:
    dir: Path
    parts: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _seen: set[Path] = field(default_factory=set)

    def record(self, part: dict[str, Any], *, sha: str | None = None,
               size: int | None = None) -> dict[str, Any]:
        p = self.dir / part["file"]
        if sha is None:
            fsync_path(p)
            sha, size = sha256_file(p), p.stat().st_size
        part["size"], part["sha256"] = size, sha
        self.parts.append(part)
        return part

    def warn(self, msg: str) -> None:
        warn(msg)
        self.warnings.append(msg)

    def add_files(self, items: list[FileItem]) -> None:
        (self.dir / "files").mkdir(exist_ok=True)
        for item in items:
            src = item.path.resolve()
            if src in self._seen:
                continue
            self._seen.add(src)
            name = f"files/{len(self._seen):03d}-{src.name}"
            data = src.read_bytes()
            dst = self.dir / name
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.record({"name": item.role, "kind": "file", "file": name,
                         "target": str(src), "mode": src.stat().st_mode & 0o7777})

    def add_sqlite(self, name: str, src: Path, file: str,
                   inside: Callable[[sqlite3.Connection], None] | None = None,
                   **extra: Any) -> dict[str, Any]:
        sqlite_snapshot(src, self.dir / file, inside)
        return self.record({"name": name, "kind": "sqlite", "file": file,
                            "target": str(src.resolve()), **extra})

    def add_tree(self, name: str, root: Path, file: str,
                 skip: Callable[[Path], bool] | None = None) -> None:
        with hashed_tar(self.dir / file) as (tf, hw):
            files, nbytes = tar_tree(tf, root, skip=skip)
        self.record({"name": name, "kind": "tar", "file": file, "target": str(root),
                     "files": files, "content_bytes": nbytes}, sha=hw.h.hexdigest(),
                    size=hw.size)


def backup_synapse(w: Writer, syn: Synapse) -> None:
    if syn.db.engine == "sqlite":
        assert syn.db.path is not None
        log(f"synapse database (SQLite online backup): {syn.db.path}")
        w.add_sqlite("synapse-db", syn.db.path, "synapse-db.sqlite")
    else:
        log(f"synapse database (pg_dump -Fc): {syn.db.conninfo}")
        pg_dump(syn.db, w.dir / "synapse-db.pgdump")
        w.record({"name": "synapse-db", "kind": "pg_dump", "file": "synapse-db.pgdump",
                  "conninfo": syn.db.conninfo, "password_from": syn.db.password_from})
    if syn.media is not None:
        if syn.media.is_dir():
            log(f"synapse media store: {syn.media}")
            w.add_tree("synapse-media", syn.media, "synapse-media.tar")
        else:
            w.warn(f"Synapse's media store {syn.media} does not exist; not backed up")


async def _pg_enclave_snapshot(db: Database, locked: Callable[[dict[str, Head]], None],
                               dump: Path) -> dict[str, Any]:
    """Fix a PostgreSQL snapshot (exported), read the archive heads and counts in it, call
    ``locked`` (still under the archive locks), then pg_dump exactly that snapshot."""
    import asyncpg

    conn = await asyncpg.connect(str(db.conninfo), password=db.password)
    try:
        tr = conn.transaction(isolation="repeatable_read", readonly=True)
        await tr.start()
        snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
        heads: dict[str, Head] = {}
        counts: dict[str, int] = {}
        if await conn.fetchval("SELECT to_regclass('archive_heads') IS NOT NULL"):
            heads = {r[0]: Head(int(r[1]), r[2]) for r in await conn.fetch(
                "SELECT room_id, entries, head FROM archive_heads")}
        for table, key in (("archive_events", "archive_events"),
                           ("archive_media", "archive_media"), ("events", "inbox_events")):
            if await conn.fetchval(f"SELECT to_regclass('{table}') IS NOT NULL"):
                counts[key] = int(await conn.fetchval(f"SELECT COUNT(*) FROM {table}"))
        if await conn.fetchval("SELECT to_regclass('enclave_schema') IS NOT NULL"):
            counts["schema_version"] = int(await conn.fetchval(
                "SELECT COALESCE(MAX(version), 0) FROM enclave_schema"))
        locked(heads)
        await asyncio.to_thread(pg_dump, db, dump, snapshot)
        await tr.rollback()
    finally:
        await conn.close()
    return counts


def backup_enclave(w: Writer, enc: Enclave, lock_timeout: float) -> None:
    db = enc.db
    if db.engine == "sqlite":
        from bridge.store import journal_path

        assert db.path is not None
        journal = journal_path(db.path)
        if journal.is_file():
            # before the main database: a transaction the inbox expands meanwhile is then
            # in both copies (deduplicated on restore), never in neither
            log(f"enclave inbox journal (SQLite online backup): {journal}")
            w.add_sqlite("enclave-journal", journal, "enclave-journal.sqlite")
    archive = enc.archive if enc.archive is not None and enc.archive.is_dir() else None
    if enc.archive is not None and archive is None:
        w.warn(f"Enclave's archive {enc.archive} does not exist; not backed up")
    locks = ArchiveLocks(archive, lock_timeout) if archive is not None else None
    stage: Path | None = None
    heads: dict[str, Head] = {}
    staged: set[str] = set()

    def under_locks(snapshot_heads: dict[str, Head]) -> None:
        """The database snapshot is fixed and every room already on disk is locked: lock
        the rooms the snapshot knows beyond those, link every room's files, unlock."""
        nonlocal stage
        heads.update(snapshot_heads)
        if archive is None or locks is None:
            return
        from bridge.retention.archive import room_dir_name

        stage = archive / f".backup-{utc_stamp()}-{os.getpid()}"
        try:
            stage.mkdir()
        except OSError:  # the archive is not ours to write: copy into the backup instead
            stage = w.dir / "archive-stage"
            stage.mkdir()
        for room_id in heads:
            locks.take(room_dir_name(room_id))
        for d in sorted(locks.fds):
            stage_room(archive / "rooms" / d, stage / "rooms" / d)
            staged.add(d)
        locks.release()

    try:
        if locks is not None:
            assert archive is not None
            _remove_stale_stages(archive)
            for d in room_dirs(archive):
                locks.take(d)
        if db.engine == "sqlite":
            assert db.path is not None
            counts: dict[str, int] = {}

            def inside(conn: sqlite3.Connection) -> None:
                counts.update(enclave_counts_sqlite(conn))
                under_locks(heads_from_sqlite(conn))

            log(f"enclave database (SQLite online backup): {db.path}")
            w.add_sqlite("enclave-db", db.path, "enclave-db.sqlite", inside, counts=counts)
        else:
            log(f"enclave database (pg_dump -Fc, exported snapshot): {db.conninfo}")
            counts = asyncio.run(_pg_enclave_snapshot(db, under_locks,
                                                      w.dir / "enclave-db.pgdump"))
            w.record({"name": "enclave-db", "kind": "pg_dump", "file": "enclave-db.pgdump",
                      "conninfo": db.conninfo, "password_from": db.password_from,
                      "counts": counts})
        if locks is not None:
            locks.release()
        if archive is not None and stage is not None:
            log(f"enclave archive (cut to the database's archive heads): {archive}")
            _tar_archive(w, archive, stage, heads, staged)
    finally:
        if locks is not None:
            locks.release()
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    if enc.crypto is not None and enc.crypto.is_dir():
        log(f"bots' encryption stores: {enc.crypto}")
        _tar_crypto(w, enc.crypto)


def _remove_stale_stages(archive: Path) -> None:
    for d in archive.glob(".backup-*-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _tar_archive(w: Writer, archive: Path, stage: Path, heads: dict[str, Head],
                 staged: set[str]) -> None:
    from bridge.retention.archive import MANIFEST, room_dir_name

    totals = {"rooms": 0, "entries": 0, "events": 0, "media_entries": 0}
    skipped = sorted(staged - {room_dir_name(r) for r, h in heads.items() if h.entries})
    with hashed_tar(w.dir / "enclave-archive.tar") as (tf, hw):
        for room_id, head in sorted(heads.items()):
            if not head.entries:
                continue
            d = room_dir_name(room_id)
            rdir = stage / "rooms" / d
            mpath = rdir / MANIFEST
            if not mpath.is_file():
                w.warn(f"archive of {room_id}: {MANIFEST} is missing although the database "
                       f"head says {head.entries} entries; the live archive is already "
                       "broken (enclave archive verify)")
                continue
            manifest = mpath.read_bytes()
            cut = cut_room(manifest, room_id, head)
            if isinstance(cut, str):
                w.warn(f"archive of {room_id}: {cut}; copied as it is (run enclave archive "
                       "verify on the live archive)")
                tar_tree(tf, rdir, prefix=f"rooms/{d}/")
                continue
            tar_add_bytes(tf, manifest[:cut.manifest_bytes], f"rooms/{d}/{MANIFEST}", mpath)
            for seg, end in sorted(cut.segments.items()):
                if tar_add_file(tf, rdir / seg, f"rooms/{d}/{seg}", end) is None:
                    w.warn(f"archive of {room_id}: {seg} is missing")
            totals["rooms"] += 1
            totals["entries"] += cut.entries
            totals["events"] += cut.events
            totals["media_entries"] += cut.media
        media = archive / "media"
        files = 0
        if media.is_dir():
            files, _ = tar_tree(tf, media, prefix="media/",
                                skip=lambda p: p.name.startswith(".tmp-"))
    w.record({"name": "enclave-archive", "kind": "tar", "file": "enclave-archive.tar",
              "target": str(archive), **totals, "media_files": files,
              "skipped_uncommitted_rooms": skipped},
             sha=hw.h.hexdigest(), size=hw.size)


def _tar_crypto(w: Writer, root: Path) -> None:
    """The bots' stores: nio's SQLite files by the backup API, the rest as they are."""
    tmp = w.dir / "crypto-stage"
    tmp.mkdir()
    try:
        for dirpath, _dirs, filenames in os.walk(root):
            for name in filenames:
                p = Path(dirpath) / name
                if name.endswith(("-wal", "-shm", "-journal")) or not p.is_file():
                    continue
                dst = tmp / p.relative_to(root)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if name.endswith(".db"):
                    sqlite_snapshot(p, dst)
                else:
                    shutil.copy2(p, dst)
                os.chmod(dst, p.stat().st_mode & 0o7777)
        with hashed_tar(w.dir / "enclave-crypto.tar") as (tf, hw):
            files, nbytes = tar_tree(tf, tmp)
        w.record({"name": "enclave-crypto", "kind": "tar", "file": "enclave-crypto.tar",
                  "target": str(root), "files": files, "content_bytes": nbytes},
                 sha=hw.h.hexdigest(), size=hw.size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(w: Writer, meta: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, **meta, "parts": w.parts, "warnings": w.warnings}
    path = w.dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.chmod(path, 0o600)
    fsync_path(path)
    sums = [f"{p['sha256']}  {p['file']}" for p in w.parts]
    sums.append(f"{sha256_file(path)}  {MANIFEST_NAME}")
    (w.dir / SUMS_NAME).write_text("\n".join(sums) + "\n")
    os.chmod(w.dir / SUMS_NAME, 0o600)
    fsync_path(w.dir / SUMS_NAME)


def rotate(out: Path, keep: int) -> list[Path]:
    done = sorted(d for d in out.iterdir() if d.is_dir() and d.name.startswith(NAME_PREFIX)
                  and not d.name.endswith(PARTIAL_SUFFIX) and (d / MANIFEST_NAME).is_file())
    gone = done[:-keep] if keep > 0 else []
    for d in gone:
        shutil.rmtree(d)
    return gone


def cmd_backup(args: argparse.Namespace) -> int:
    syn = read_synapse(args)
    enc = read_enclave(args)
    if syn is None and enc is None:
        raise BackupError("nothing to back up: give --synapse-config and/or --enclave-config")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = utc_stamp()
    final = out / f"{NAME_PREFIX}{stamp}"
    tmp = out / f"{NAME_PREFIX}{stamp}{PARTIAL_SUFFIX}"
    if final.exists() or tmp.exists():
        raise BackupError(f"{final} already exists (two backups in one second?)")
    tmp.mkdir(mode=0o700)
    w = Writer(tmp)
    for note in (syn.warnings if syn else []) + (enc.warnings if enc else []):
        w.warn(note)
    started = time.time()
    try:
        files = (syn.files if syn else []) + (enc.files if enc else [])
        for extra in args.extra_file or []:
            files.append(FileItem("extra-file", Path(extra).resolve()))
        log(f"configuration and key files: {len({f.path.resolve() for f in files})}")
        w.add_files(files)
        if syn is not None:  # Synapse first: see README.md, "Order"
            backup_synapse(w, syn)
        if enc is not None:
            backup_enclave(w, enc, args.lock_timeout)
        meta = {
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 3),
            "host": socket.gethostname(),
            "synapse": None if syn is None else {
                "configs": [str(c) for c in syn.configs], "database": syn.db.engine,
                "server_name": syn.merged.get("server_name"),
                "pid_file": str(syn.pid_file) if syn.pid_file else None,
                "probe": _synapse_probes(syn.merged)},
            "enclave": None if enc is None else {
                "config": str(enc.config) if enc.config else None,
                "database": enc.db.engine, "version": _enclave_version(),
                "probe": enc.probe},
            "order": list(dict.fromkeys(p["name"] for p in w.parts)),
        }
        write_manifest(w, meta)
        fsync_path(tmp)
        tmp.rename(final)
        fsync_path(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(p["size"] for p in w.parts)
    log(f"backup complete: {final} ({len(w.parts)} parts, {total} bytes, "
        f"{time.time() - started:.1f}s)")
    if args.keep:
        for d in rotate(out, args.keep):
            log(f"removed old backup {d}")
    if w.warnings:
        warn(f"{len(w.warnings)} warning(s), recorded in {final / MANIFEST_NAME}")
        return EXIT_WARNINGS
    return EXIT_OK


def _enclave_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("matrix-enclave")
    except Exception:
        return None


# -- checking and restoring -----------------------------------------------------------------
def load_manifest(backup: Path) -> dict[str, Any]:
    path = backup / MANIFEST_NAME
    if not path.is_file():
        raise BackupError(f"{backup} is not a complete backup (no {MANIFEST_NAME})")
    sums = backup / SUMS_NAME
    if sums.is_file():
        want = {line.split("  ", 1)[1]: line.split("  ", 1)[0]
                for line in sums.read_text().splitlines() if "  " in line}
        if want.get(MANIFEST_NAME) != sha256_file(path):
            raise ChecksumError([f"{MANIFEST_NAME}: SHA-256 differs from {SUMS_NAME}"])
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ChecksumError([f"{MANIFEST_NAME} is not valid JSON: {e}"]) from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"unknown backup format {manifest.get('format')!r} (this tool "
                          f"reads {FORMAT})")
    return manifest


class ChecksumError(BackupError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the backup does not match its manifest; nothing was restored:\n"
                         + "\n".join(f"  - {p}" for p in problems))


def verify_parts(backup: Path, manifest: dict[str, Any]) -> None:
    problems = []
    for part in manifest["parts"]:
        p = backup / part["file"]
        if not p.is_file():
            problems.append(f"{part['file']} ({part['name']}) is missing")
            continue
        size = p.stat().st_size
        if size != part["size"]:
            problems.append(f"{part['file']} ({part['name']}): {size} bytes, the manifest "
                            f"says {part['size']}")
            continue
        sha = sha256_file(p)
        if sha != part["sha256"]:
            problems.append(f"{part['file']} ({part['name']}): SHA-256 checksum mismatch "
                            f"({sha}, the manifest says {part['sha256']})")
    if problems:
        raise ChecksumError(problems)


def cmd_check(args: argparse.Namespace) -> int:
    backup = Path(args.backup).resolve()
    manifest = load_manifest(backup)
    verify_parts(backup, manifest)
    log(f"{backup}: {len(manifest['parts'])} parts match their SHA-256 checksums "
        f"(taken {manifest.get('created_at')})")
    for part in manifest["parts"]:
        log(f"  {part['name']:<26} {part['kind']:<8} {part['size']:>12}  {part['file']}")
    return EXIT_OK


def map_path(path: str, maps: list[tuple[str, str]]) -> Path:
    for old, new in maps:
        if path == old or path.startswith(old.rstrip("/") + "/"):
            return Path(new + path[len(old.rstrip("/")):])
    return Path(path)


@dataclass
class Target:
    part: dict[str, Any]
    path: Path | None = None
    conninfo: str | None = None
    password: str | None = None


def _restore_password(part: dict[str, Any], manifest: dict[str, Any],
                      backup: Path) -> str | None:
    """The password of a PostgreSQL target: from the backed-up config or secret file."""
    src = part.get("password_from") or {}
    if src.get("env"):
        return os.environ.get(src["env"])
    if src.get("file"):
        for p in manifest["parts"]:
            if p["kind"] == "file" and p["target"] == src["file"]:
                return (backup / p["file"]).read_text().strip()
    if src.get("synapse_config"):
        merged: dict[str, Any] = {}
        for p in manifest["parts"]:
            if p["name"] == "synapse-config":
                merged.update(yaml.safe_load((backup / p["file"]).read_text()) or {})
        pw = ((merged.get("database") or {}).get("args") or {}).get("password")
        return str(pw) if pw else None
    return None


def _pg_query(conninfo: str, password: str | None, sql: str) -> str:
    return run_tool(["psql", "-X", "-A", "-t", "--no-password", "-d", conninfo, "-c", sql],
                    env=pg_env(password), what=f"connecting to {conninfo}").strip()


def _sqlite_family(path: Path) -> list[Path]:
    return [path] + [Path(f"{path}{s}") for s in ("-wal", "-shm", "-journal")]


def _occupied(t: Target) -> str | None:
    """Why a target is not empty, or None."""
    kind = t.part["kind"]
    if kind == "pg_dump":
        assert t.conninfo is not None
        n = int(_pg_query(t.conninfo, t.password,
                          "SELECT COUNT(*) FROM pg_catalog.pg_tables WHERE schemaname NOT IN "
                          "('pg_catalog', 'information_schema')") or 0)
        return f"database {t.conninfo} has {n} tables" if n else None
    assert t.path is not None
    if kind == "sqlite":
        there = [p for p in _sqlite_family(t.path) if p.exists()]
        return f"{there[0]} exists" if there else None
    if kind == "tar":
        if t.path.is_dir() and any(t.path.iterdir()):
            return f"{t.path} is not empty"
        return f"{t.path} exists and is not a directory" if (
            t.path.exists() and not t.path.is_dir()) else None
    if t.path.is_file() and sha256_file(t.path) == t.part["sha256"]:
        return None  # already in place, byte for byte
    return f"{t.path} exists" if t.path.exists() or t.path.is_symlink() else None


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _services_running(manifest: dict[str, Any], targets: list[Target],
                      maps: list[tuple[str, str]]) -> list[str]:
    found = []
    for side in ("synapse", "enclave"):
        for url in (manifest.get(side) or {}).get("probe") or []:
            if _answers(url):
                found.append(f"{side.capitalize()} answers at {url}")
    syn = manifest.get("synapse") or {}
    if syn.get("pid_file"):
        pid_file = map_path(syn["pid_file"], maps)
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            if pid_alive(pid):
                found.append(f"Synapse runs (pid {pid}, {pid_file})")
    for t in targets:
        if t.part["name"] == "enclave-db" and t.part["kind"] == "sqlite" and t.path:
            lock = Path(f"{t.path}.run.lock")
            if lock.exists():
                fd = os.open(lock, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    found.append(f"Enclave runs on {t.path} ({lock} is held)")
                finally:
                    os.close(fd)
        if t.part["kind"] == "pg_dump" and t.conninfo:
            with contextlib.suppress(BackupError):
                n = int(_pg_query(t.conninfo, t.password,
                                  "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = "
                                  "current_database() AND pid <> pg_backend_pid()") or 0)
                if n:
                    found.append(f"{n} other session(s) use {t.conninfo}")
    return found


def _move_aside(path: Path, stamp: str) -> Path | None:
    if not (path.exists() or path.is_symlink()):
        return None
    aside = path.with_name(f"{path.name}.pre-restore-{stamp}")
    path.rename(aside)
    return aside


def _write_atomically(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.restore-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, mode)
    fsync_path(tmp)
    tmp.rename(dst)
    fsync_path(dst.parent)


def _extract(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.restore-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    with tarfile.open(src, "r") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(tmp, filter="data")
        else:  # Python < 3.11.4: the same refusals by hand (our tars hold plain files only)
            for m in tf.getmembers():
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") \
                        or ".." in Path(m.name).parts:
                    raise BackupError(f"{src.name}: refusing member {m.name!r}")
            tf.extractall(tmp)
    if dst.is_dir():
        dst.rmdir()  # empty (checked), or moved aside with --force
    tmp.rename(dst)


def cmd_restore(args: argparse.Namespace) -> int:
    backup = Path(args.backup).resolve()
    manifest = load_manifest(backup)
    log(f"checking {len(manifest['parts'])} parts of {backup} ...")
    verify_parts(backup, manifest)  # before anything is touched
    maps = []
    for m in args.map or []:
        old, sep, new = m.partition("=")
        if not sep or not old or not new:
            raise BackupError(f"--map {m!r}: give OLD=NEW")
        maps.append((str(Path(old)), str(Path(new))))
    targets: list[Target] = []
    for part in manifest["parts"]:
        t = Target(part)
        if part["kind"] == "pg_dump":
            override = args.synapse_db if part["name"] == "synapse-db" else args.enclave_db
            if override:
                t.conninfo, t.password = strip_url_password(override) if override.startswith(
                    ("postgresql://", "postgres://")) else (override, None)
            else:
                t.conninfo = part["conninfo"]
            t.password = t.password or _restore_password(part, manifest, backup)
        else:
            t.path = map_path(part["target"], maps)
        targets.append(t)
    running = _services_running(manifest, targets, maps)
    if running:
        for r in running:
            print(f"error: {r}", file=sys.stderr)
        print("error: stop Synapse and Enclave before restoring; nothing was restored",
              file=sys.stderr)
        return EXIT_RUNNING
    occupied = [(t, why) for t in targets if (why := _occupied(t))]
    if occupied and not args.force:
        for _, why in occupied:
            print(f"error: target not empty: {why}", file=sys.stderr)
        print("error: refusing to overwrite; restore into empty targets or give --force "
              "(files and folders are then moved aside as *.pre-restore-<time>, databases "
              "are restored with pg_restore --clean); nothing was restored", file=sys.stderr)
        return EXIT_NOT_EMPTY
    stamp = utc_stamp()
    moved: list[Path] = []
    for t, _why in occupied:
        if t.path is not None:
            family = _sqlite_family(t.path) if t.part["kind"] == "sqlite" else [t.path]
            moved += [a for p in family if (a := _move_aside(p, stamp)) is not None]
    for n, t in enumerate(targets):
        try:
            _restore_part(t, backup)
        except (OSError, BackupError, tarfile.TarError) as e:
            raise BackupError(f"restoring {t.part['name']} ({t.path or t.conninfo}) failed: "
                              f"{e}\n{n} of {len(targets)} parts were restored before it; fix "
                              "the cause and run the restore again with --force") from None
    log(f"restored {len(targets)} parts from {backup} (taken {manifest.get('created_at')})")
    for m in moved:
        log(f"  moved aside: {m}")
    print_next_steps(manifest, targets, maps)
    return EXIT_OK


def _restore_part(t: Target, backup: Path) -> None:
    part, src = t.part, backup / t.part["file"]
    kind = part["kind"]
    if kind == "file":
        assert t.path is not None
        mode = int(part.get("mode", 0o600))
        if t.path.is_file() and sha256_file(t.path) == part["sha256"]:
            os.chmod(t.path, mode)  # already in place, byte for byte
        else:
            _write_atomically(src, t.path, mode)
    elif kind == "sqlite":
        assert t.path is not None
        log(f"{part['name']}: {t.path}")
        _write_atomically(src, t.path, 0o600)
    elif kind == "tar":
        assert t.path is not None
        log(f"{part['name']}: {t.path}")
        _extract(src, t.path)
    elif kind == "pg_dump":
        assert t.conninfo is not None
        log(f"{part['name']}: pg_restore --clean --if-exists into {t.conninfo}")
        run_tool(["pg_restore", "--clean", "--if-exists", "--no-owner", "--single-transaction",
                  "--exit-on-error", "--no-password", "-d", t.conninfo, str(src)],
                 env=pg_env(t.password), what=f"pg_restore into {t.conninfo}")
    else:
        raise BackupError(f"unknown part kind {kind!r}")


def print_next_steps(manifest: dict[str, Any], targets: list[Target],
                     maps: list[tuple[str, str]]) -> None:
    enc = manifest.get("enclave") or {}
    cfg = str(map_path(enc["config"], maps)) if enc.get("config") else "CONFIG"
    archive = next((t.part for t in targets if t.part["name"] == "enclave-archive"), None)
    db = next((t.part for t in targets if t.part["name"] == "enclave-db"), None)
    counts = (db or {}).get("counts") or {}
    lines = ["", "Next steps:",
             "  1. start Synapse (e.g. systemctl start matrix-synapse) and wait until "
             "/_matrix/client/versions answers",
             f"  2. enclave migrate -c {cfg}"
             + (f"   (the backup is at schema version {counts['schema_version']})"
                if "schema_version" in counts else ""),
             f"  3. start Enclave (e.g. systemctl start enclave, or enclave run -c {cfg}); "
             "curl its /ready",
             f"  4. enclave archive verify -c {cfg}"
             + (f"   (expect: archive OK, {archive['events']} events in {archive['rooms']} "
                "rooms)" if archive else ""),
             "  5. log in as a user and read a room; check a media file downloads",
             "  Events sent after the backup was taken are not in it (see README.md, "
             "'What a restore guarantees')."]
    log("\n".join(lines))


# -- command line -------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enclave-backup.py",
                                description="Back up and restore Synapse + Enclave.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backup", help="take a backup (services may keep running)")
    b.add_argument("--synapse-config", action="append", type=Path, metavar="YAML",
                   help="Synapse's homeserver.yaml (repeat for more -c files, in Synapse's "
                        "order; a folder means its *.yaml)")
    b.add_argument("--enclave-config", type=Path, metavar="YAML", help="Enclave's config")
    b.add_argument("--out", required=True, type=Path,
                   help="folder the timestamped backup folder is created in")
    b.add_argument("--synapse-db", metavar="PATH|URL",
                   help="override: Synapse's SQLite file or postgresql:// URL")
    b.add_argument("--synapse-media", metavar="DIR", help="override: Synapse's media store")
    b.add_argument("--enclave-db", metavar="URL",
                   help="override: Enclave's sqlite:///… or postgresql:// URL")
    b.add_argument("--archive", metavar="DIR", help="override: Enclave's archive folder")
    b.add_argument("--extra-file", action="append", metavar="PATH",
                   help="another file to back up and restore in place (repeatable)")
    b.add_argument("--lock-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long to wait for a busy archive room (default 120)")
    b.add_argument("--keep", type=int, default=0, metavar="N",
                   help="then delete all but the newest N complete backups in --out")
    b.set_defaults(fn=cmd_backup)
    r = sub.add_parser("restore", help="restore a backup into empty targets")
    r.add_argument("backup", type=Path, help="the backup folder")
    r.add_argument("--force", action="store_true",
                   help="restore over existing data (files moved aside, databases cleaned)")
    r.add_argument("--map", action="append", metavar="OLD=NEW",
                   help="restore paths under OLD to NEW instead (repeatable)")
    r.add_argument("--synapse-db", metavar="CONNINFO|URL",
                   help="restore Synapse's PostgreSQL dump into this database instead")
    r.add_argument("--enclave-db", metavar="CONNINFO|URL",
                   help="restore Enclave's PostgreSQL dump into this database instead")
    r.set_defaults(fn=cmd_restore)
    c = sub.add_parser("check", help="verify a backup's checksums; change nothing")
    c.add_argument("backup", type=Path)
    c.set_defaults(fn=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ChecksumError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CORRUPT
    except BackupError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

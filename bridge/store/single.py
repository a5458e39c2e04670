"""One ``enclave run`` per SQLite store: SQLite has no way to share leadership between
processes (no leases across machines, one writer), so a second service is refused."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .base import SchemaError
from .db import SQLiteDatabase
from .shared import SharedDatabase


class StoreInUse(SchemaError):
    """Another ``enclave run`` holds the SQLite store."""


class SingleProcessLock:
    """An exclusive ``flock`` on ``<database>.run.lock`` while the service runs.

    The kernel drops it when the process dies (even SIGKILL), so a crash never leaves a
    stale lock behind. CLI commands do not take it: they run beside the service.
    """

    def __init__(self, db_path: Path):
        self.path = Path(str(db_path) + ".run.lock")
        self._fd: int | None = None

    @classmethod
    def for_database(cls, database: SharedDatabase) -> SingleProcessLock | None:
        """The lock for a SQLite database; None for PostgreSQL (replicas share it)."""
        if not isinstance(database.db, SQLiteDatabase):
            return None
        return cls(database.db.path)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUse(
                f"another `enclave run` (pid {holder}) is using the SQLite store "
                f"{str(self.path)[:-len('.run.lock')]}; a SQLite store serves one process — "
                "use PostgreSQL (database.url) to run several replicas") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

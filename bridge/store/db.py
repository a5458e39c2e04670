"""Thin async database adapters: one SQL dialect (``?`` placeholders) over SQLite and PostgreSQL.

The store writes its SQL once; :class:`PostgresDatabase` rewrites ``?`` to ``$n``. Both
adapters expose the same small connection API inside ``async with db.transaction() as c``.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg

T = TypeVar("T")
Step = tuple[str, Sequence[Any], bool]


class Row(Protocol):
    def __getitem__(self, key: str | int) -> Any: ...


class Conn(Protocol):
    async def execute(self, sql: str, *args: Any) -> None: ...
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def execute_script(self, script: str) -> None: ...


class DatabaseError(Exception):
    """The database could not be opened or used."""


class Database(ABC):
    dialect: str

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> Any:
        """``async with db.transaction() as conn``: commit on success, roll back on error."""

    @abstractmethod
    async def batch(self, steps: Sequence[Step], *, require_first: bool = False) -> list[int]:
        """Run (sql, args, many) steps in one transaction; return each step's row count.

        With ``require_first``, a first step that changes no row ends the batch there (the
        rest is skipped): an insert-if-new guard for the whole batch. Row counts of ``many``
        steps are not reliable on every engine (-1 when unknown).
        """


class _SQLiteConn:
    def __init__(self, db: SQLiteDatabase):
        self._db = db

    async def execute(self, sql: str, *args: Any) -> None:
        await self._db._call(lambda c: c.execute(sql, args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        await self._db._call(lambda c: c.executemany(sql, rows))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._db._call(lambda c: c.execute(sql, args).fetchall())

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    async def execute_script(self, script: str) -> None:
        # executescript would COMMIT our open transaction; run statement by statement instead
        for stmt in _split_sql(script):
            await self.execute(stmt)


class SQLiteDatabase(Database):
    """One connection on one worker thread, serialised by a lock (SQLite has one writer).

    Not aiosqlite: it costs a thread hop per statement, and the ingest path needs a whole
    transaction in one hop (:meth:`batch`) to answer the homeserver quickly.
    """

    dialect = "sqlite"

    def __init__(self, path: Path, *, synchronous: str = "full"):
        self.path = path
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None or self._executor is None:
            raise DatabaseError("database is not open")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss, which is what lets us answer
        # the homeserver's PUT only after the commit.
        conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enclave-sqlite")
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._connect
            )
        except sqlite3.Error as e:
            self._executor.shutdown()
            self._executor = None
            raise DatabaseError(f"cannot open SQLite database {self.path}: {e}") from e

    async def close(self) -> None:
        if self._conn is not None and self._executor is not None:
            async with self._lock:
                await self._call(lambda c: c.close())
            self._conn = None
            self._executor.shutdown()
            self._executor = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._lock:
            await self._call(lambda c: c.execute("BEGIN IMMEDIATE"))
            try:
                yield _SQLiteConn(self)
            except BaseException:
                await self._call(lambda c: c.execute("ROLLBACK"))
                raise
            else:
                await self._call(lambda c: c.execute("COMMIT"))

    async def batch(self, steps: Sequence[Step], *, require_first: bool = False) -> list[int]:
        def run(c: sqlite3.Connection) -> list[int]:
            counts: list[int] = []
            c.execute("BEGIN IMMEDIATE")
            try:
                for sql, args, many in steps:
                    cur = c.executemany(sql, args) if many else c.execute(sql, args)
                    counts.append(cur.rowcount)
                    if require_first and counts == [0]:
                        break
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
            return counts

        async with self._lock:
            return await self._call(run)


@lru_cache(maxsize=512)
def _to_pg(sql: str) -> str:
    n = 0

    def repl(_: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return re.sub(r"\?", repl, sql)


class _PgConn:
    def __init__(self, conn: asyncpg.Connection):
        self._c = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._c.execute(_to_pg(sql), *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._c.executemany(_to_pg(sql), rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._c.fetch(_to_pg(sql), *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._c.fetchrow(_to_pg(sql), *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._c.fetchval(_to_pg(sql), *args)

    async def execute_script(self, script: str) -> None:
        await self._c.execute(script)


class PostgresDatabase(Database):
    dialect = "postgres"

    def __init__(self, dsn: str, *, password: str | None = None, pool_size: int = 10):
        self.dsn = dsn
        self._password = password
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, password=self._password, min_size=1, max_size=self.pool_size
            )
        except (OSError, asyncpg.PostgresError) as e:
            raise DatabaseError(f"cannot connect to PostgreSQL: {e}") from e

    async def batch(self, steps: Sequence[Step], *, require_first: bool = False) -> list[int]:
        if self._pool is None:
            raise DatabaseError("database is not open")
        counts: list[int] = []
        async with self._pool.acquire() as conn, conn.transaction():
            for sql, args, many in steps:
                if many:
                    await conn.executemany(_to_pg(sql), args)
                    counts.append(-1)
                else:
                    status = await conn.execute(_to_pg(sql), *args)
                    tail = status.rsplit(" ", 1)[-1]
                    counts.append(int(tail) if tail.isdigit() else -1)
                if require_first and counts == [0]:
                    break
        return counts

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        if self._pool is None:
            raise DatabaseError("database is not open")
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PgConn(conn)


def _split_sql(script: str) -> list[str]:
    body = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def database_from_url(
    url: str, *, base_dir: Path, password: str | None = None,
    sqlite_synchronous: str = "full", pool_size: int = 10,
) -> Database:
    """``sqlite:///rel/path.db`` (relative to base_dir), ``sqlite:////abs.db`` or a PG URL."""
    if url.startswith("sqlite://"):
        raw = url[len("sqlite://"):]
        raw = raw[1:] if raw.startswith("/") else raw
        p = Path(raw)
        if not p.is_absolute():
            p = base_dir / p
        return SQLiteDatabase(p, synchronous=sqlite_synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, password=password, pool_size=pool_size)
    raise DatabaseError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")

"""Thin async database adapters: one SQL dialect (``?`` placeholders) over SQLite and PostgreSQL.

The store writes its SQL once; :class:`PostgresDatabase` rewrites ``?`` to ``$n``. Both
adapters expose the same small connection API inside ``async with db.transaction() as c``.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    # (sql prefix, callback) pairs of on_commit; a class-level empty default so the
    # engines' constructors need not know of it
    _commit_hooks: tuple[tuple[str, Callable[[], None]], ...] = ()

    def on_commit(self, sql_prefix: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after each :meth:`batch` that committed a step whose SQL starts
        with ``sql_prefix`` (an in-process wake-up, e.g. for the audit stream); return a
        function that removes it."""
        hook = (sql_prefix, callback)
        self._commit_hooks = (*self._commit_hooks, hook)

        def remove() -> None:
            self._commit_hooks = tuple(h for h in self._commit_hooks if h is not hook)

        return remove

    def _committed(self, steps: Sequence[Step]) -> None:
        for prefix, callback in self._commit_hooks:
            if any(sql.startswith(prefix) for sql, _, _ in steps):
                callback()

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> Any:
        """``async with db.transaction() as conn``: commit on success, roll back on error."""

    @abstractmethod
    async def batch(
        self, steps: Sequence[Step], *, require_first: bool = False, urgent: bool = True
    ) -> list[int]:
        """Run (sql, args, many) steps in one transaction; return each step's row count.

        With ``require_first``, a first step that changes no row ends the batch there (the
        rest is skipped): an insert-if-new guard for the whole batch. Row counts of ``many``
        steps are not reliable on every engine (-1 when unknown).

        ``urgent=False`` marks a write whose caller can wait a moment (the inbox's done
        marks): an engine may hold it briefly to commit it together with the next urgent
        write. It is as durable as any other once this returns.
        """

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run one read-only statement outside any write transaction; return its rows.

        Sees every transaction committed before the call. Never use it for a read that
        must see the caller's own uncommitted writes (use :meth:`transaction`).
        """

    @abstractmethod
    async def fetch_many(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Row]]:
        """Run read-only statements on one consistent snapshot; the rows of each."""


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


class _Job:
    """One :meth:`SQLiteDatabase.batch` call waiting for the writer (group commit)."""

    __slots__ = ("fut", "require_first", "steps", "urgent")

    def __init__(self, steps: Sequence[Step], require_first: bool, fut: asyncio.Future[Any],
                 urgent: bool):
        self.steps = steps
        self.require_first = require_first
        self.fut = fut
        self.urgent = urgent


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _run_steps(c: sqlite3.Connection, steps: Sequence[Step], require_first: bool) -> list[int]:
    counts: list[int] = []
    for sql, args, many in steps:
        cur = c.executemany(sql, args) if many else c.execute(sql, args)
        counts.append(cur.rowcount)
        if require_first and counts == [0]:
            break
    return counts


def _rollback(c: sqlite3.Connection) -> None:
    # SQLite may already have rolled back by itself (I/O error, disk full, ...)
    if c.in_transaction:
        c.execute("ROLLBACK")


def _run_group(c: sqlite3.Connection, jobs: Sequence[_Job]) -> list[list[int] | Exception]:
    """Run every job in ONE write transaction (one commit, one fsync for all of them).

    Each job runs inside its own SAVEPOINT, so a job that fails is undone alone and the
    others still commit, exactly as if each had been its own transaction. Nothing is
    reported to any caller before the COMMIT has returned.
    """
    out: list[list[int] | Exception] = []
    alone = len(jobs) == 1
    c.execute("BEGIN IMMEDIATE")
    try:
        for job in jobs:
            if alone:
                out.append(_run_steps(c, job.steps, job.require_first))
                continue
            c.execute("SAVEPOINT enclave_job")
            try:
                counts = _run_steps(c, job.steps, job.require_first)
            except Exception as e:
                if not c.in_transaction:
                    raise  # the whole transaction is gone: every job fails
                c.execute("ROLLBACK TO enclave_job")
                c.execute("RELEASE enclave_job")
                out.append(e)
            else:
                c.execute("RELEASE enclave_job")
                out.append(counts)
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return out


class SQLiteDatabase(Database):
    """SQLite in WAL mode: one writer connection and one reader connection, each on its own
    worker thread.

    Not aiosqlite: it costs a thread hop per statement, and the ingest path needs a whole
    transaction in one hop (:meth:`batch`) to answer the homeserver quickly.

    Writes: :meth:`batch` calls that arrive while the writer is busy are committed together
    (group commit: one ``COMMIT``, so one fsync with ``synchronous=FULL``, for all of them;
    each caller still gets its answer only after that commit, and each runs in its own
    savepoint). :meth:`transaction` holds the writer for a multi-step transaction.
    Reads (:meth:`fetch`, :meth:`fetch_many`) use the reader connection: WAL readers see
    every committed transaction and neither wait for the writer nor block it.
    """

    dialect = "sqlite"

    def __init__(self, path: Path, *, synchronous: str = "full"):
        self.path = path
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None
        self._rexecutor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._queue: list[_Job] = []
        self._flusher: asyncio.Task[None] | None = None
        self._linger: asyncio.Future[None] | None = None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None or self._executor is None:
            raise DatabaseError("database is not open")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._rconn is None or self._rexecutor is None:
            raise DatabaseError("database is not open")
        conn = self._rconn
        return await asyncio.get_running_loop().run_in_executor(self._rexecutor, fn, conn)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss, which is what lets us answer
        # the homeserver's PUT only after the commit.
        conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA query_only=ON")
        return conn

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enclave-sqlite")
        self._rexecutor = ThreadPoolExecutor(max_workers=1,
                                             thread_name_prefix="enclave-sqlite-read")
        try:
            # the writer first: it creates the file and switches it to WAL
            self._conn = await loop.run_in_executor(self._executor, self._connect)
            self._rconn = await loop.run_in_executor(self._rexecutor, self._connect_reader)
        except sqlite3.Error as e:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._executor.shutdown()
            self._rexecutor.shutdown()
            self._executor = self._rexecutor = None
            raise DatabaseError(f"cannot open SQLite database {self.path}: {e}") from e

    async def close(self) -> None:
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(flusher)  # let queued writes commit
        if self._rconn is not None and self._rexecutor is not None:
            await self._read(lambda c: c.close())
            self._rconn = None
            self._rexecutor.shutdown()
            self._rexecutor = None
        if self._conn is not None and self._executor is not None:
            async with self._lock:
                await self._call(lambda c: c.close())
            self._conn = None
            self._executor.shutdown()
            self._executor = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._lock:
            try:
                await self._call(lambda c: c.execute("BEGIN IMMEDIATE"))
            except BaseException:
                # Cancelled while the worker thread runs BEGIN: the thread still opens the
                # transaction after we stopped waiting. Undo it before releasing the writer,
                # or every later write fails with "cannot start a transaction within a
                # transaction" until a restart.
                await self._rollback_now()
                raise
            try:
                yield _SQLiteConn(self)
                await self._call(lambda c: c.execute("COMMIT"))
            except BaseException:
                await self._rollback_now()  # no-op if COMMIT went through
                raise

    async def _rollback_now(self) -> None:
        """Roll back whatever is open, even while being cancelled.

        Submitted to the (FIFO, single-thread) writer at once, so it runs before any later
        statement; a second cancellation stops only our waiting, not the rollback.
        """
        if self._conn is None or self._executor is None:
            return
        fut = asyncio.get_running_loop().run_in_executor(self._executor, _rollback, self._conn)
        with contextlib.suppress(sqlite3.Error):
            await asyncio.shield(fut)

    # How long a non-urgent write may wait for an urgent one to share its commit (fsync).
    LINGER_SECONDS = 0.002

    async def batch(
        self, steps: Sequence[Step], *, require_first: bool = False, urgent: bool = True
    ) -> list[int]:
        if self._conn is None:
            raise DatabaseError("database is not open")
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(steps, require_first, fut, urgent))
        if urgent and self._linger is not None:
            _wake(self._linger)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="sqlite-group-commit")
        return await fut

    async def _flush(self) -> None:
        """Commit queued batches, all that have arrived so far in one transaction, until
        the queue is empty."""
        jobs: list[_Job] = []
        try:
            while self._queue:
                if not any(j.urgent for j in self._queue):
                    await self._wait_for_urgent()
                # a caller cancelled meanwhile does not take its write back: like a
                # statement already sent, it still commits (no half-done state either way)
                jobs, self._queue = self._queue, []
                if jobs:
                    await self._commit_group(jobs)
                jobs = []
        except BaseException:
            # cancelled (shutdown): the outcome of a group in flight is unknown to us
            for job in [*jobs, *self._queue]:
                if not job.fut.done():
                    job.fut.set_exception(DatabaseError("write interrupted"))
            self._queue = []
            raise

    async def _wait_for_urgent(self) -> None:
        """Only non-urgent writes are queued: give an urgent one (ingest) a moment to arrive
        and share their commit, instead of paying a commit (an fsync) of their own."""
        loop = asyncio.get_running_loop()
        self._linger = waiter = loop.create_future()
        timer = loop.call_later(self.LINGER_SECONDS, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._linger = None

    async def _commit_group(self, jobs: list[_Job]) -> None:
        try:
            async with self._lock:
                results = await self._call(lambda c: _run_group(c, jobs))
        except Exception as e:
            for job in jobs:
                if not job.fut.done():
                    job.fut.set_exception(e)
            return
        for job, res in zip(jobs, results, strict=True):
            if job.fut.done():
                continue
            if isinstance(res, Exception):
                job.fut.set_exception(res)
            else:
                job.fut.set_result(res)
                if self._commit_hooks:
                    self._committed(job.steps)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._read(lambda c: c.execute(sql, args).fetchall())

    async def fetch_many(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Row]]:
        def run(c: sqlite3.Connection) -> list[list[Row]]:
            c.execute("BEGIN")  # one snapshot for all of them
            try:
                return [c.execute(sql, args).fetchall() for sql, args in queries]
            finally:
                _rollback(c)

        return await self._read(run)


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


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to reset.

    asyncpg's default runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` — one more round trip on EVERY release (≈10-15 % of the CPU per transaction).
    Enclave keeps no session state on pooled connections: no advisory locks, cursors
    outside transactions, LISTEN or SET. An open transaction is still rolled back by the
    pool itself before this hook. Whoever adds session state must reset it here.
    """


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
                self.dsn, password=self._password, min_size=1, max_size=self.pool_size,
                reset=_keep_session,
            )
        except (OSError, asyncpg.PostgresError) as e:
            raise DatabaseError(f"cannot connect to PostgreSQL: {e}") from e

    async def batch(
        self, steps: Sequence[Step], *, require_first: bool = False, urgent: bool = True
    ) -> list[int]:
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
        if self._commit_hooks:
            self._committed(steps)
        return counts

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        if self._pool is None:
            raise DatabaseError("database is not open")
        return list(await self._pool.fetch(_to_pg(sql), *args))

    async def fetch_many(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Row]]:
        if self._pool is None:
            raise DatabaseError("database is not open")
        async with self._pool.acquire() as conn, conn.transaction(
            isolation="repeatable_read", readonly=True
        ):
            return [list(await conn.fetch(_to_pg(sql), *args)) for sql, args in queries]

    async def fetchval_autocommit(self, sql: str, *args: Any) -> Any:
        """One statement in its own (implicit) transaction: one round trip, one commit."""
        if self._pool is None:
            raise DatabaseError("database is not open")
        return await self._pool.fetchval(_to_pg(sql), *args)

    async def listen(self, channel: str, callback: Callable[[], None]) -> asyncpg.Connection:
        """A dedicated connection that calls ``callback`` on every NOTIFY on ``channel``
        (the pool's connections keep no session state: LISTEN lives on its own)."""
        conn = await asyncpg.connect(self.dsn, password=self._password)
        await conn.add_listener(channel, lambda *_: callback())
        return conn

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

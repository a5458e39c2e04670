"""Store fixtures: every store test runs on SQLite (tmp_path) and on PostgreSQL (127.0.0.1).

PostgreSQL: one fresh database per test module (random name, dropped WITH (FORCE) after),
the schema reset before each test. Skipped only when the server is unreachable, unless
ENCLAVE_REQUIRE_POSTGRES is set (CI), where unreachable is a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from bridge.store import Stores, open_stores

PG_ADMIN_DSN = os.environ.get(
    "ENCLAVE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin() -> psycopg2.extensions.connection:
    conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
    conn.autocommit = True
    return conn


def _dsn_for(db: str) -> str:
    base, _, _ = PG_ADMIN_DSN.rpartition("/")
    return f"{base}/{db}"


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    try:
        admin = _admin()
    except psycopg2.OperationalError as e:
        if os.environ.get("ENCLAVE_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required but unreachable at {PG_ADMIN_DSN}: {e}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_DSN}: {e}")
    name = f"enclave_test_{secrets.token_hex(6)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    try:
        yield _dsn_for(name)
    finally:
        admin = _admin()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return "sqlite:///store.db"
    dsn = request.getfixturevalue("pg_database")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:  # a fresh, empty database for every test
        cur.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    conn.close()
    return dsn


MakeStore = Callable[..., Awaitable[Stores]]


@pytest.fixture
async def make_store(db_url: str, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Open (and by default migrate) the stores of one database; several calls = several
    processes/restarts. ``extra_migrations``: extensions' schemas (the bots') migrated with
    it."""
    opened: list[Stores] = []

    async def make(*, migrate: bool = True, extra_migrations: Sequence[Any] = ()) -> Stores:
        s = open_stores(db_url, base_dir=tmp_path, pool_size=4,
                        extra_migrations=extra_migrations)
        await s.database.open()
        opened.append(s)
        if migrate:
            await s.database.migrate()
        return s

    yield make
    for s in opened:
        await s.database.close()


@pytest.fixture
async def store(make_store: MakeStore) -> Stores:
    return await make_store()

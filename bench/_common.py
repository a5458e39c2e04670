"""Small helpers the benchmarks share."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def git_rev() -> dict[str, Any]:
    """The commit measured, and whether bridge/ had uncommitted changes."""
    def run(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": run("rev-parse", "HEAD"),
            "dirty": bool(run("status", "--porcelain", "--", "bridge"))}


async def pg_admin(sql: str, dsn: str = PG_ADMIN_DSN) -> None:
    """Run one statement on the machine's PostgreSQL as its admin (CREATE/DROP DATABASE)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()

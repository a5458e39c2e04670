"""Shared fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.store import Stores, open_stores


async def new_store(path: Path) -> Stores:
    """The migrated SQLite stores under ``path`` (a second call: the same database
    reopened, as after a restart)."""
    store = open_stores("sqlite:///inbox.db", base_dir=path)
    await store.database.open()
    await store.database.migrate()
    return store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Stores]:
    s = await new_store(tmp_path)
    yield s
    await s.database.close()

CONFIG_TEMPLATE = """\
homeserver:
  url: {hs_url}
  server_name: corp.example.com
appservice:
  public_url: http://127.0.0.1:29330
  as_token:
    file: secrets/as_token
  hs_token:
    file: secrets/hs_token
database:
  url: sqlite:///var/enclave.db
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write a config (and, unless told otherwise, real token files); return its path."""

    def make(*, tokens: bool = True, hs_url: str = "http://127.0.0.1:8008",
             extra: str = "") -> Path:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(CONFIG_TEMPLATE.format(hs_url=hs_url) + extra)
        if tokens:
            (tmp_path / "secrets").mkdir(exist_ok=True)
            (tmp_path / "secrets/as_token").write_text("as-token-real-value\n")
            (tmp_path / "secrets/hs_token").write_text("hs-token-real-value\n")
        return cfg

    return make

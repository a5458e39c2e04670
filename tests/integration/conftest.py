"""Fixtures for the end-to-end tests (helpers in harness.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import EnclaveProcess, Stack, nio


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack.create(tmp_path_factory.mktemp("stack"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A Synapse of the test module's own, with Enclave's admin identity: the directory
    tests create, count and deactivate accounts, so they do not share the session's."""
    from .directory_helpers import ensure_enclave_admin

    s = Stack.create(tmp_path_factory.mktemp("stack"))
    ensure_enclave_admin(s)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def enclave_factory(tmp_path: Path) -> Iterator[Callable[..., EnclaveProcess]]:
    """``make(stack, handlers=..., env=..., **config)`` -> an unstarted EnclaveProcess.

    Each call writes its own config and SQLite database under tmp_path.
    """
    made: list[EnclaveProcess] = []

    def make(stack: Stack, *, env: dict[str, str] | None = None, name: str = "enclave",
             **config: Any) -> EnclaveProcess:
        cfg = stack.write_enclave_config(tmp_path / name / "config.yaml", **config)
        proc = EnclaveProcess(cfg, stack.as_port, env=env)
        made.append(proc)
        return proc

    yield make
    for p in made:
        p.cleanup()


@pytest.fixture
async def staff() -> AsyncIterator[list[nio.AsyncClient]]:
    """A list the test appends its nio clients to; all are closed afterwards."""
    clients: list[nio.AsyncClient] = []
    yield clients
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()

"""bridge/policy/ is pure: it imports nothing that does I/O, sleeps or reads the clock.

Decisions are data: plan, apply, explain and the live service call the same functions, which
only works if they cannot touch the network, the disk, the database or the time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
POLICY = ROOT / "bridge" / "policy"

# Top-level modules whose import means I/O, concurrency, randomness or clock reads.
FORBIDDEN_MODULES = frozenset({
    "asyncio", "aiohttp", "sqlite3", "asyncpg", "psycopg2", "socket", "ssl", "select",
    "selectors", "requests", "httpx", "urllib", "http", "nio", "os", "io", "pathlib",
    "shutil", "subprocess", "signal", "threading", "multiprocessing", "concurrent", "time",
    "random", "secrets", "uuid", "logging", "tempfile", "glob", "ldap3", "yaml", "orjson",
    "prometheus_client", "matrix_enclave", "aiofiles", "mmap", "fcntl", "sched",
})
# Names that read the clock or the environment even from an allowed module.
FORBIDDEN_FROM = {
    "datetime": {"now", "utcnow", "today"},  # ``from datetime import ...`` only types are ok
}
FORBIDDEN_CALLS = {
    ("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today"),
    ("time", "time"), ("time", "sleep"), ("time", "monotonic"),
}
FORBIDDEN_BUILTINS = {"open", "input", "print", "breakpoint", "exec", "eval", "__import__"}
# Inside the project only these packages may be imported by policy code.
ALLOWED_BRIDGE = (
    "bridge.policy", "bridge.kernel", "bridge.config.models", "bridge.config.directory",
    "bridge.config.policy",
    "bridge.model.people",  # frozen dataclasses of people and groups, no I/O
)


def _resolve(module: str | None, level: int, path: Path) -> str:
    if level == 0:
        return module or ""
    pkg = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]  # the module's package
    base = pkg[: len(pkg) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def violations(source: str, path: Path) -> list[str]:
    """Every impure import or call in one module's source, as 'line: what'."""
    out: list[str] = []
    tree = ast.parse(source, filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node.module, node.level, path)
            names = [mod]
            banned = FORBIDDEN_FROM.get(mod, set())
            out += [f"{node.lineno}: from {mod} import {a.name}" for a in node.names
                    if a.name in banned]
            if mod == "bridge" or mod.endswith("bridge"):
                names += [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FORBIDDEN_BUILTINS:
                out.append(f"{node.lineno}: call to {f.id}()")
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    and (f.value.id, f.attr) in FORBIDDEN_CALLS):
                out.append(f"{node.lineno}: call to {f.value.id}.{f.attr}()")
        for name in names:
            top = name.split(".")[0]
            if top in FORBIDDEN_MODULES:
                out.append(f"{node.lineno}: import of {name}")
            elif top == "bridge" and name != "bridge" and not name.startswith(ALLOWED_BRIDGE):
                out.append(f"{node.lineno}: import of {name} (only {ALLOWED_BRIDGE} allowed)")
    return out


POLICY_MODULES = sorted(POLICY.rglob("*.py"))


def test_policy_package_found() -> None:
    assert POLICY / "actions.py" in POLICY_MODULES


@pytest.mark.parametrize("path", POLICY_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_policy_module_is_pure(path: Path) -> None:
    assert violations(path.read_text(), path) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import os.path",
        "from os import environ",
        "import aiohttp.web",
        "from sqlite3 import connect",
        "import asyncpg as pg",
        "import socket",
        "import requests",
        "from nio import AsyncClient",
        "import subprocess",
        "from time import sleep",
        "import time\nx = time.time()",
        "from datetime import datetime\nx = datetime.now()",
        "from datetime import now",
        "import random",
        "import logging",
        "from pathlib import Path",
        "from ..store import Store",
        "from ..matrix.client import MatrixClient",
        "from bridge.config.loader import load_config",
        "from ..directory.ldap_source import LdapSource",
        "from .. import app",
        "def f():\n    import asyncio\n",
        "data = open('/etc/passwd').read()",
        "print('x')",
        "mod = __import__('socket')",
    ],
)
def test_checker_catches(source: str) -> None:
    # the guard of the guard: each of these must be reported
    assert violations(source, POLICY / "example.py")


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations",
        "import dataclasses\nfrom dataclasses import dataclass, field",
        "from typing import Any, ClassVar",
        "from collections.abc import Sequence",
        "import re\nimport enum\nimport itertools\nimport fnmatch",
        "from datetime import datetime, timedelta, timezone",
        "from .actions import Action",
        "from ..config.models import InboxConfig",
        "from bridge.policy.actions import Kick",
        "from ..config.directory import MappingConfig",
        "from ..model.people import Person",
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    assert violations(source, POLICY / "example.py") == []


def test_importing_policy_pulls_in_no_io_module() -> None:
    """Transitively: a fresh interpreter importing every policy module loads no I/O stack."""
    mods = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in POLICY_MODULES]
    mods = [m.removesuffix(".__init__") for m in mods]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    loaded = {m.split(".")[0] for m in out}
    heavy = {"asyncio", "aiohttp", "sqlite3", "_sqlite3", "asyncpg", "psycopg2", "socket",
             "ssl", "requests", "nio", "subprocess", "yaml", "bridge.store", "bridge.matrix"}
    assert not loaded & heavy
    assert not {m for m in out if m.startswith(("bridge.store", "bridge.matrix"))}

"""The composition root (bridge/root.py) and the extension seam (bridge/extension.py).

Every service is built once and wired through constructors; the inbox's handlers run in one
explicit order; extensions (the bots) are found through an entry point, so `bridge` imports
no `bots` module and the two packages have no import cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.config import ConfigError, check_secrets, load_config
from bridge.extension import Extension, Plugin, ScheduledJob, discover_extensions
from bridge.matrix.inbox import FunctionHandler
from bridge.root import Root

ROOT = Path(__file__).resolve().parents[2]

POLICY_AND_RETENTION = """\
policy:
  room_classes:
    - id: internal
    - id: external
retention:
  default: {keep: 365d}
inbox:
  handlers: ["tests.unit.test_root:configured_handler"]
"""


def configured_handler(root: Root) -> FunctionHandler:
    async def handle(event: dict[str, Any], meta: Any) -> list[Any]:
        return []

    return FunctionHandler("configured", handle)


class ThirdPartyBot(Extension):
    """What a third-party bot package would put behind the entry point."""

    name = "third-party"

    def __init__(self) -> None:
        self.roots: list[Root] = []

    def setup(self, root: Any) -> Plugin:
        self.roots.append(root)

        async def handle(event: dict[str, Any], meta: Any) -> list[Any]:
            return []

        async def job(reason: str) -> None:
            return None

        return Plugin(handlers=[FunctionHandler("third-party", handle)],
                      jobs=[ScheduledJob("third-party-digest", 60, job, at_start=False)])


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative ones resolved), at any level of the
    code: module level, function-local and TYPE_CHECKING alike."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])  # a module's package; an __init__'s is its folder
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _module_files() -> dict[str, Path]:
    out = {}
    for pkg in ("bridge", "bots"):
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def test_bridge_never_imports_bots() -> None:
    offenders = sorted(
        str(p.relative_to(ROOT)) for name, p in _module_files().items()
        if name.startswith("bridge") and any(
            m == "bots" or m.startswith("bots.") for m in _imports(p)))
    assert offenders == []


def test_bridge_and_bots_have_no_import_cycle() -> None:
    files = _module_files()

    def target(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        if path.name == "__init__.py":
            continue  # a package's __init__ re-exports; its importers are not in a cycle
        graph[name] = {t for m in _imports(path) if (t := target(m)) and t != name
                       and files[t].name != "__init__.py"}
    # Tarjan: every strongly connected component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_bots_are_found_through_the_entry_point() -> None:
    from bots.extension import BotsExtension

    found = discover_extensions()
    assert any(isinstance(e, BotsExtension) for e in found), found
    (bots,) = [e for e in found if isinstance(e, BotsExtension)]
    assert bots.config_sections == ("bots",)
    assert bots.migrations() is not None and bots.migrations().component == "bots"


async def test_the_root_builds_each_service_once_in_an_explicit_order(
        config_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # the configured handler is named by module path, as an operator's would be: the
    # checkout's top folder must be importable however pytest was started
    monkeypatch.syspath_prepend(str(ROOT))
    loaded = load_config(config_dir(extra=POLICY_AND_RETENTION))
    ext = ThirdPartyBot()
    root = Root(loaded, check_secrets(loaded), extensions=[ext])
    try:
        # one of each, shared by everything that needs it
        assert root.stores is root.stores and root.executor is root.executor
        assert root.separation is not None and root.retention is not None
        assert root.separation.executor is root.executor is root.retention.executor
        assert root.executor.client is root.client
        # wired through constructors: separation asks retention for a new room's state
        assert root.separation.creation_state == root.retention.creation_state
        ttl = loaded.config.cluster.lease_ttl_seconds * 1000
        assert root.separation.lease_ttl_ms == root.retention.lease_ttl_ms == ttl
        # the order every event goes through: archive first, the configured handlers,
        # separation, then the extensions'
        assert [h.name for h in root.handlers] == [
            "retention", "configured", "separation", "third-party"]
        assert root.inbox.handlers == root.handlers
        assert ext.roots == [root]  # set up once
        assert [j.id for j in root.jobs] == [
            "separation-reconcile", "retention-purge", "third-party-digest"]
        assert root.executor.installation_id == ""  # the store has not been opened yet
    finally:
        await root.close_client(wait_seconds=1)


async def test_the_installation_id_is_read_when_the_store_opens(
        config_dir: Callable[..., Path]) -> None:
    loaded = load_config(config_dir())
    secrets = check_secrets(loaded)
    first = Root(loaded, secrets, extensions=[])
    await first.open_store(migrate=True, create_installation_id=True)
    iid = first.executor.installation_id
    await first.close_client(wait_seconds=1)
    await first.database.close()
    assert len(iid) == 16
    again = Root(loaded, secrets, extensions=[])
    async with again.opened():
        assert again.executor.installation_id == iid
        assert again.executor.action_key(7) == f"{iid}/action:7"


def test_a_section_no_installed_extension_handles_is_refused(
        config_dir: Callable[..., Path]) -> None:
    loaded = load_config(config_dir(extra="bots:\n  encryption: {enabled: false}\n"))
    with pytest.raises(ConfigError, match="bots: no installed extension handles"):
        Root(loaded, check_secrets(loaded), extensions=[])
    Root(loaded, check_secrets(loaded))  # with the installed bots: accepted


async def test_the_archive_is_local_by_default_and_s3_when_configured(
        config_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.retention.archive import LocalArchive
    from bridge.retention.archive.s3 import S3Archive

    local = load_config(config_dir(extra="retention: {}\n"))
    assert isinstance(Root(local, check_secrets(local), extensions=[]).archive, LocalArchive)
    monkeypatch.setenv("ENCLAVE_TEST_S3_SECRET", "s3-real-secret-value")
    loaded = load_config(config_dir(extra=(
        "retention:\n  archive:\n    s3:\n      bucket: enclave-archive\n"
        "      endpoint_url: http://127.0.0.1:1\n      prefix: prod/\n"
        "      access_key_id: AKIAEXAMPLE\n"
        "      secret_access_key: {env: ENCLAVE_TEST_S3_SECRET}\n")))
    root = Root(loaded, check_secrets(loaded), extensions=[])
    archive = root.archive
    assert isinstance(archive, S3Archive)
    assert (archive.bucket, archive.prefix, archive.lock_mode) == (
        "enclave-archive", "prod/", "compliance")
    assert "s3-real-secret-value" not in repr(vars(archive))

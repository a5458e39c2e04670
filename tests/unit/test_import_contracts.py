"""The import-linter contracts (``pyproject.toml``, run by ``make lint``) keep the tree and
break on what they forbid: a copy of the packages with one deliberately bad import added is
refused, naming the contract it breaks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
NAMES = {c["id"]: c["name"] for c in CONFIG["contracts"]}

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def copy_tree(dest: Path) -> Path:
    """The packages lint-imports reads (bridge, bots, the dev launchers) and the config."""
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "bridge", dest / "bridge", ignore=skip)
    shutil.copytree(ROOT / "bots", dest / "bots", ignore=skip)
    shutil.copytree(ROOT / "deploy" / "local" / "devstack", dest / "local" / "devstack",
                    ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def add_import(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}  # deliberately added by the test\n")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # the copy first on the path: it, not the checkout (or an editable install), is analysed
    env = {**os.environ, "COLUMNS": "500",  # one line per contract in the report
           "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "local")])}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"),
                           "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120)


def verdicts(out: str) -> dict[str, str]:
    """Contract name -> KEPT / BROKEN, from the report."""
    found = {}
    for name in NAMES.values():
        for verdict in ("KEPT", "BROKEN"):
            if f"{name} {verdict}" in out:
                found[name] = verdict
    return found


def test_no_contract_ignores_an_import() -> None:
    # every arrow of the tree keeps the rules: none is waved through
    assert [c["id"] for c in CONFIG["contracts"] if c.get("ignore_imports")] == []


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    r = lint(copy_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert verdicts(r.stdout) == {name: "KEPT" for name in NAMES.values()}, r.stdout


@pytest.mark.parametrize(("edits", "broken"), [
    # a cycle between two services of one layer (siblings there may import each other)
    ([("bridge.retention.events", "import bridge.separation.service"),
      ("bridge.separation.service", "import bridge.retention.events")], {"acyclic"}),
    # an upward arrow: the root's CLI from a service, which the CLI imports
    ([("bridge.retention.service", "import bridge.cli.kit")], {"layers", "acyclic"}),
    # the kernel reaching up into an adapter (which imports the kernel: a cycle too)
    ([("bridge.kernel.power", "import bridge.matrix.client")], {"layers", "kernel", "acyclic"}),
    ([("bridge.model.people", "import bridge.kernel.power")], {"layers", "model"}),
    ([("bridge.root", "import bots.extension")], {"no-bots"}),  # and bots import bridge.cli
    ([("bridge.cli.kit", "import devstack.synapse")], {"no-devstack"}),
], ids=["cycle", "upward", "kernel", "model", "bots", "devstack"])
def test_a_bad_import_breaks_its_contract(tmp_path: Path, edits: list[tuple[str, str]],
                                          broken: set[str]) -> None:
    tree = copy_tree(tmp_path)
    for module, line in edits:
        add_import(tree, module, line)
    r = lint(tree)
    assert r.returncode != 0, r.stdout
    # the contract it breaks is named (an arrow may break more: a cycle is also upward)
    found = {name for name, v in verdicts(r.stdout).items() if v == "BROKEN"}
    assert {NAMES[i] for i in broken} <= found, r.stdout
    # and so is where: a package the added import leaves (bridge.retention: ".retention")
    report = r.stdout.split("Broken contracts")[-1]
    assert any(m.split(".")[1] in report for m, _ in edits), r.stdout

"""The bots' decision modules are pure: no I/O, no clock reads, no asyncio.

The same AST check as ``bridge/policy`` (tests/unit/policy/test_purity.py), with the
project modules these may use: typed config, directory records, each other.
``apscheduler.triggers`` is allowed: CronTrigger computes fire times from the times it
is given and reads no clock.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ..policy.test_purity import violations

ROOT = Path(__file__).resolve().parents[3]
PURE = [ROOT / p for p in (
    "bots/commands.py", "bots/scheduling.py", "bots/markdown.py",
    "bots/announcements/audience.py", "bots/announcements/spec.py",
    "bots/announcements/acks.py", "bots/announcements/report.py", "bots/crypto/decisions.py",
    "bots/capture/decisions.py",
)]
# bridge.policy: purity-tested itself (tests/unit/policy/test_purity.py)
ALLOWED_PROJECT = ("bridge.config.bots", "bridge.model.people", "bridge.kernel", "bots.commands",
                   "bridge.policy",
                   "bots.announcements.audience", "bots.announcements.spec")


def _real(v: str) -> bool:
    """A violation that is not one of the allowed project imports."""
    if "(only" in v:
        name = v.split("import of ", 1)[1].split(" ", 1)[0]
        return not name.startswith(ALLOWED_PROJECT)
    return True


def _type_checking_lines(source: str) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    out: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                out.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return out


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_decision_module_is_pure(path: Path) -> None:
    text = path.read_text()
    skip = _type_checking_lines(text)
    found = [v for v in violations(text, path)
             if _real(v) and int(v.split(":", 1)[0]) not in skip]
    # project modules outside bridge.* are not seen by the policy checker: check them here
    for n, line in enumerate(text.splitlines(), 1):
        if n in skip or not line.lstrip().startswith(("import", "from")) \
                or line.lstrip().startswith("from bridge.policy"):  # pure by its own test
            continue
        if any(bad in line for bad in ("bridge.store", "bridge.matrix", ".services",
                                       ".actions", ".jobs", ".delivery", ".bot ",
                                       ".webhooks", "..sending")):
            found.append(f"{n}: {line.strip()}")
    assert found == []


def test_checker_sees_impure_imports_here() -> None:
    src = "import asyncio\nfrom bridge.store import Store\n"
    assert [v for v in violations(src, PURE[0]) if _real(v)]

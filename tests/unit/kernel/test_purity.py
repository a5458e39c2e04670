"""bridge/kernel/ is pure and stands alone: no I/O, no clock, no other part of bridge."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.policy.test_purity import ROOT, violations

KERNEL_MODULES = sorted((ROOT / "bridge" / "kernel").rglob("*.py"))


def test_kernel_package_found() -> None:
    assert ROOT / "bridge" / "kernel" / "power.py" in KERNEL_MODULES


@pytest.mark.parametrize("path", KERNEL_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernel_module_is_pure(path: Path) -> None:
    found = [v for v in violations(path.read_text(), path)
             # policy may import the kernel; the kernel imports nothing of bridge but itself
             if "import of bridge.kernel" not in v]
    assert found == []
    source = path.read_text()
    assert "from .." not in source and "import bridge." not in source

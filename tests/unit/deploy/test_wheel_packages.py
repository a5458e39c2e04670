"""What the wheel ships: the product packages, not the local dev/test launchers."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[3]


def shipped_packages() -> set[str]:
    """The packages setuptools puts in the wheel, from pyproject's packages.find."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]
    return set(find_packages(where=str(ROOT), include=find.get("include", ["*"]),
                             exclude=find.get("exclude", [])))


def test_devstack_is_not_in_the_wheel() -> None:
    packages = shipped_packages()
    assert not {p for p in packages if p.startswith(("bridge.devstack", "devstack"))}
    # the product is all there
    assert {"bridge", "bridge.kernel", "bridge.retention", "bridge.matrix", "bots",
            "bots.announcements"} <= packages
    assert not {p for p in packages if p.startswith(("tests", "bench", "deploy"))}


def test_make_run_uses_the_checkouts_devstack() -> None:
    # ``make run`` starts the launcher of the checkout: a distribution of its own
    # (deploy/local), which deploy/install.sh installs editable beside Enclave
    assert (ROOT / "deploy" / "local" / "devstack" / "stack.py").is_file()
    assert not (ROOT / "bridge" / "devstack").exists()
    local = tomllib.loads((ROOT / "deploy" / "local" / "pyproject.toml").read_text())
    assert local["tool"]["setuptools"]["packages"] == ["devstack"]
    assert "-m devstack.stack" in (ROOT / "Makefile").read_text()
    assert "-e deploy/local" in (ROOT / "deploy" / "install.sh").read_text()

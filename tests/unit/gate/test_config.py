"""The ``gate:`` config section: a secret reference, checked like every other secret."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.config import ConfigError, check_secrets, load_config

GATE = "gate:\n  secret:\n    file: secrets/gate_secret\n"


def test_no_gate_section_means_no_gate_secret(config_dir: Callable[..., Path]) -> None:
    loaded = load_config(config_dir())
    assert loaded.config.gate is None
    assert "gate.secret" not in check_secrets(loaded)


def test_gate_secret_is_read_and_checked(config_dir: Callable[..., Path]) -> None:
    path = config_dir(extra=GATE)
    (path.parent / "secrets" / "gate_secret").write_text("a-real-gate-secret\n")

    secrets = check_secrets(load_config(path))

    assert secrets["gate.secret"].get() == "a-real-gate-secret"
    assert "a-real-gate-secret" not in repr(secrets["gate.secret"])


@pytest.mark.parametrize(("content", "says"), [
    (None, "cannot read"), ("changeme\n", "placeholder"),
])
def test_missing_or_placeholder_gate_secret_fails_validation(
        config_dir: Callable[..., Path], content: str | None, says: str) -> None:
    path = config_dir(extra=GATE)
    if content is not None:
        (path.parent / "secrets" / "gate_secret").write_text(content)

    with pytest.raises(ConfigError) as err:
        check_secrets(load_config(path))

    assert "gate.secret" in str(err.value) and says in str(err.value)


def test_inline_gate_secret_is_refused(config_dir: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(config_dir(extra="gate:\n  secret: hunter2\n"))
    assert "never written inline" in str(err.value) and "hunter2" not in str(err.value)

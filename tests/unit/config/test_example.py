"""config.example.yaml validates, and documents every key the models know (no drift)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from bridge.config import check_secrets, load_config, parse_config
from bridge.config.models import EnclaveConfig, SecretRef

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "config.example.yaml"


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """The models inside an annotation: Optional[M], list[M], or every branch of a union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        out.extend(m for m in _models_of(arg) if m not in out)
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    models = _models_of(annotation)
    return models[0] if len(models) == 1 else None


def model_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of the config models, e.g. ('appservice', 'as_token', 'file').

    A union of models (``directory.source``: file, ldap or scim) contributes the keys of
    every branch under the same path.
    """
    out = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        if path not in out:
            out.append(path)
        for sub in _models_of(field.annotation):
            out.extend(k for k in model_keys(sub, path) if k not in out)
    return out


def _example_key_paths() -> set[tuple[str, ...]]:
    """Key paths set in the example, plus those only shown in commented-out blocks.

    A commented block (e.g. ``# password:`` / ``#   env: X``) is read by stripping one
    ``#`` from lines that look like YAML keys and re-parsing the section.
    """
    text = EXAMPLE.read_text()
    paths: set[tuple[str, ...]] = set()

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                paths.add((*prefix, str(k)))
                walk(v, (*prefix, str(k)))
        elif isinstance(node, list):  # a list of models: each item's keys under the list
            for item in node:
                walk(item, prefix)

    walk(yaml.safe_load(text), ())
    key_line = re.compile(r"^(\s*)# ?(\s*[a-z_][a-z0-9_]*:(\s.*)?)$")
    uncommented = "\n".join(
        (m.group(1) + m.group(2)) if (m := key_line.match(line)) else line
        for line in text.splitlines()
    )
    walk(yaml.safe_load(uncommented), ())
    return paths


def test_model_walk_finds_nested_keys() -> None:
    # guards the drift test itself: if the walk stopped recursing, it would pass vacuously
    keys = model_keys(EnclaveConfig)
    assert ("appservice", "as_token", "file") in keys
    assert ("database", "password", "env") in keys
    assert ("inbox", "handlers") in keys
    # every branch of the source union
    assert ("directory", "source", "path") in keys
    assert ("directory", "source", "bind_password", "file") in keys
    assert ("directory", "source", "debounce_seconds") in keys
    assert len(keys) > 30


def _fields_at(path: tuple[str, ...]) -> list[Any]:
    """The field(s) at a key path (several where a union's branches share a key)."""
    models: list[type[BaseModel]] = [EnclaveConfig]
    fields: list[Any] = []
    for part in path:
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [s for f in fields for s in _models_of(f.annotation)]
    return fields


def _is_secret_ref_key(path: tuple[str, ...]) -> bool:
    return len(path) > 1 and any(
        _model_of(f.annotation) is SecretRef for f in _fields_at(path[:-1]))


@pytest.mark.parametrize("path", model_keys(EnclaveConfig), ids=".".join)
def test_example_documents_every_key(path: tuple[str, ...]) -> None:
    documented = _example_key_paths()
    if _is_secret_ref_key(path):
        # {file: PATH} / {env: VAR} is one shape shared by every secret: it must be shown
        # for at least one secret (the header explains both forms), not for each of them.
        ok = any(p[-1] == path[-1] and _is_secret_ref_key(p) for p in documented)
    else:
        ok = path in documented
    assert ok, f"config.example.yaml does not document {'.'.join(path)}: add it with a comment"


def _inside_mapping_field(path: tuple[str, ...]) -> bool:
    """A key inside a free-form mapping setting (e.g. ``attributes: {department: [...]}``)."""
    return any(
        f.annotation is not None and getattr(f.annotation, "__origin__", None) is dict
        for n in range(1, len(path)) for f in _fields_at(path[:n]))


def test_example_has_no_unknown_keys() -> None:
    known = set(model_keys(EnclaveConfig))
    unknown = {p for p in _example_key_paths() - known if not _inside_mapping_field(p)}
    assert not unknown


def test_example_parses() -> None:
    cfg = parse_config(EXAMPLE.read_text(), source=str(EXAMPLE))
    assert cfg.homeserver.server_name == "corp.example.com"


def test_example_passes_check_secrets_once_secret_files_exist(tmp_path: Path) -> None:
    copy = tmp_path / "config.yaml"
    shutil.copy(EXAMPLE, copy)
    loaded = load_config(copy)
    refs = [loaded.config.appservice.as_token, loaded.config.appservice.hs_token,
            loaded.config.homeserver.registration_shared_secret]
    for i, ref in enumerate(refs):
        assert ref is not None and ref.file is not None
        p = loaded.resolve(ref.file)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"real-secret-value-{i}\n")
    secrets = check_secrets(loaded)
    assert sorted(secrets) == [
        "appservice.as_token", "appservice.hs_token", "homeserver.registration_shared_secret",
    ]
    assert secrets["appservice.hs_token"].get() == "real-secret-value-1"

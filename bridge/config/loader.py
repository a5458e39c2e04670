"""Load and validate the YAML config, with errors that name the key path and the YAML line."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .models import EnclaveConfig, SecretRef

# Values that the shipped example and docs use; a secret still equal to one of them was
# never set by the operator.
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "change-me", "change_me", "replace-me", "replace_me", "secret", "xxx", ""}
)
M = TypeVar("M", bound=BaseModel)
PLACEHOLDER_PREFIXES = ("CHANGE_ME", "CHANGEME", "REPLACE_ME", "<")


class ConfigError(Exception):
    """A config file that cannot be used. ``str()`` is the full, human-readable report."""

    def __init__(self, source: str, problems: list[str], *, what: str = "configuration"):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Error in {what} {source}:\n{lines}")


class Secret:
    """A secret value that never shows itself in repr/str/logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True)
class LoadedConfig:
    config: EnclaveConfig
    path: Path | None
    base_dir: Path
    # the YAML line of each key path, for messages that point into the file
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict, compare=False, repr=False)

    def line_of(self, dotted: str) -> int | None:
        """The YAML line of a path such as ``policy.room_classes[2].allow`` (or its
        nearest given parent), None if unknown."""
        loc: list[Any] = []
        for part in dotted.split("."):
            m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
            if m is None:
                return None
            loc.append(m.group(1))
            loc.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
        return _nearest_line(self.lines, tuple(loc))

    def resolve(self, p: Path | str) -> Path:
        """Resolve a path from the config relative to the config file's folder."""
        p = Path(p)
        return p if p.is_absolute() else (self.base_dir / p)

    def secret(self, ref: SecretRef, key_path: str) -> Secret:
        """Read a secret from its file or env var; refuse missing or placeholder values."""
        if ref.env is not None:
            value = os.environ.get(ref.env)
            where = f"environment variable {ref.env}"
            if value is None:
                raise ConfigError(
                    f"at {key_path}", [f"{where} is not set (needed for {key_path})"]
                )
        else:
            assert ref.file is not None
            fp = self.resolve(ref.file)
            where = f"file {fp}"
            try:
                value = fp.read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(
                    f"at {key_path}", [f"cannot read {where}: {e.strerror}"]
                ) from None
        value = value.strip()
        if value.lower() in PLACEHOLDER_SECRETS or value.upper().startswith(
            PLACEHOLDER_PREFIXES
        ):
            raise ConfigError(
                f"at {key_path}",
                [f"{where} holds a placeholder, not a real secret: set a real value"],
            )
        return Secret(value)


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _scan(root: yaml.Node | None) -> tuple[dict[tuple[Any, ...], int], list[str]]:
    """One walk of the YAML tree: the 1-based line of each key path (('a', 0, 'b')), and the
    keys given twice in one mapping (YAML keeps the last silently, which hides mistakes: a
    second ``appservice:`` section would replace the first one wholesale)."""
    lines: dict[tuple[Any, ...], int] = {}
    duplicates: list[str] = []

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
                line = k.start_mark.line + 1
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if key in seen:
                        duplicates.append(
                            f"at {format_loc((*path, key))} (line {line}): duplicate key "
                            f"(first given at line {seen[key]}); YAML would silently keep "
                            "only the last one"
                        )
                    else:
                        seen[key] = line
                lines[(*path, key)] = line
                walk(v, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*path, i))

    if root is not None:
        walk(root, ())
    return lines, duplicates


def format_loc(loc: tuple[Any, ...]) -> str:
    """('policy', 'room_classes', 2, 'retention') -> 'policy.room_classes[2].retention'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def _nearest_line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    # pydantic adds pseudo-locations (e.g. a validator name); walk up to the nearest real key
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


class _DuplicateKey(Exception):
    """A key given twice in one mapping: the slow path (:func:`_scan`) words the error."""


class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's parser where PyYAML has it, ~3x faster on big files)
    that stops at a key given twice, instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for k, _ in node.value:
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                if k.value in seen:
                    raise _DuplicateKey
                seen.add(k.value)
        return super().construct_mapping(node, deep=deep)


_FastLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                            _FastLoader.construct_yaml_map)


def yaml_lines(text: str) -> dict[tuple[Any, ...], int]:
    """The 1-based YAML line of each key path of ``text`` (('cases', 3) -> 41)."""
    return _scan(_compose(text))[0]


def parse_yaml_model(model: type[M], text: str, *, source: str = "<string>",
                     what: str = "sections", file_kind: str = "configuration",
                     with_lines: bool = True) -> tuple[M, dict[tuple[Any, ...], int]]:
    """Parse YAML text into ``model`` (strict pydantic), raising :class:`ConfigError` whose
    problems name the key path and its YAML line; also the line of each key path (``{}``
    with ``with_lines`` False, for big files: :func:`yaml_lines` gives them when needed).

    The one error format of every YAML file Enclave reads strictly (the config, policy
    test cases): duplicate keys refused, unknown keys named as such. ``file_kind`` names
    the file in the error's first line."""

    def error(problems: list[str]) -> ConfigError:
        return ConfigError(f"in {source}", problems, what=file_kind)

    lines: dict[tuple[Any, ...], int] | None = None
    try:
        data = yaml.load(text, Loader=_FastLoader)  # a safe loader
    except _DuplicateKey:
        duplicates = _scan(_compose(text))[1]
        raise error(duplicates or ["a key is given twice in one mapping"]) from None
    except yaml.YAMLError as fast:
        e: yaml.YAMLError = fast
        try:  # PyYAML's own parser words syntax errors the way the docs show them
            yaml.safe_load(text)
        except yaml.YAMLError as slow:
            e = slow
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise error([f"invalid YAML{where}: {problem}"]) from None
    if data is None:
        raise error(["the file is empty"])
    if not isinstance(data, dict):
        raise error([f"the top level must be a mapping of {what}"])
    if with_lines:
        lines = yaml_lines(text)
    try:
        return model.model_validate(data), lines or {}
    except ValidationError as e:
        if lines is None:
            lines = yaml_lines(text)
        problems = []
        for err in e.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            line = _nearest_line(lines, loc)
            at = format_loc(loc) + (f" (line {line})" if line else "")
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not a setting Enclave knows; check the spelling)"
            problems.append(f"at {at}: {msg}")
        raise error(problems) from None


def parse_config(text: str, *, source: str = "<string>") -> EnclaveConfig:
    """Parse YAML text into an :class:`EnclaveConfig`, raising :class:`ConfigError`."""
    return parse_yaml_model(EnclaveConfig, text, source=source)[0]


def load_config(path: str | Path) -> LoadedConfig:
    """Read and validate a config file; relative paths inside resolve against its folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"in {p}", [f"cannot read the file: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(f"in {p}", ["the file is not UTF-8 text"]) from None
    cfg, lines = parse_yaml_model(EnclaveConfig, text, source=str(p))
    return LoadedConfig(config=cfg, path=p, base_dir=p.resolve().parent, lines=lines)


def check_secrets(loaded: LoadedConfig) -> dict[str, Secret]:
    """Resolve every configured secret now, so a missing one fails validation, not at 3 a.m."""
    cfg = loaded.config
    refs: dict[str, SecretRef | None] = {
        "appservice.as_token": cfg.appservice.as_token,
        "appservice.hs_token": cfg.appservice.hs_token,
        "database.password": cfg.database.password,
        "homeserver.registration_shared_secret": cfg.homeserver.registration_shared_secret,
    }
    src = cfg.directory.source if cfg.directory else None
    if src is not None and src.type == "ldap":
        refs["directory.source.bind_password"] = src.bind_password
    if src is not None and src.type == "scim":
        refs["directory.source.token"] = src.token
    if cfg.gate is not None:
        refs["gate.secret"] = cfg.gate.secret
    s3 = cfg.retention.archive.s3 if cfg.retention is not None else None
    if s3 is not None:
        refs["retention.archive.s3.secret_access_key"] = s3.secret_access_key
    announcements = cfg.bots.announcements if cfg.bots is not None else None
    for hook in announcements.webhooks if announcements is not None else []:
        # bots/announcements/webhooks.py secret_key(): the hook's token or HMAC secret
        refs[f"bots.announcements.webhooks.{hook.id}.auth"] = (
            hook.auth.token if hook.auth.type == "token" else hook.auth.secret)
    out: dict[str, Secret] = {}
    problems: list[str] = []
    for key, ref in refs.items():
        if ref is None:
            continue
        try:
            out[key] = loaded.secret(ref, key)
        except ConfigError as e:
            problems.extend(f"at {key}: {p}" for p in e.problems)
    if problems:
        raise ConfigError(f"in {loaded.path}", problems)
    return out

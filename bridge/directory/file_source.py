"""People and groups from a YAML or CSV file (the local stack's default source).

YAML::

    people:
      - id: "1001"              # optional: defaults to the username
        username: alice
        display_name: Alice Adams
        email: alice@corp.example.com
        title: Engineer
        department: Engineering
        location: Berlin
        manager: "1000"         # the manager's id or username
        disabled: false
        groups: [it-admins]     # group ids
        initial_password: ...   # evaluation only (allow_initial_passwords)
    groups:                     # optional
      - id: it-admins
        name: IT administrators # optional: defaults to the id
        members: [alice]        # ids or usernames
        owners: [bob]

CSV: a header row naming some of the columns ``id, username, display_name, email, title,
department, location, manager, disabled, groups, initial_password`` (``username`` and
``display_name`` are required), one person per row; ``groups`` separated by ``;``,
``disabled`` one of true/false/yes/no/1/0 (empty: false); an empty cell is an unset value.

The file is checked strictly: anything wrong (unknown key, a number where a string belongs,
a duplicate id or username, a manager or group member who is not in the file …) raises
:class:`DirectoryError` naming the file, the place (``people[3].email`` or ``line 4``) and
the problem, so a sync changes nothing rather than acting on a half-read file.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..model.people import DirectoryError, DirectorySnapshot, Group, Person

_EMAIL_SHAPE = "must look like name@domain"
_MAX_ERRORS = 10
CSV_COLUMNS = (
    "id", "username", "display_name", "email", "title", "department", "location", "manager",
    "disabled", "groups", "initial_password",
)
_CSV_REQUIRED = ("username", "display_name")
_CSV_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False,
              "": False}


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _PersonRow(_Row):
    id: str | None = Field(None, min_length=1)
    username: str = Field(min_length=1)
    display_name: str = Field(min_length=1)
    email: str | None = None
    title: str | None = None
    department: str | None = None
    location: str | None = None
    manager: str | None = Field(None, min_length=1)
    disabled: bool = False
    groups: list[str] = Field(default_factory=list)
    initial_password: str | None = None

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is not None:
            local, at, domain = v.rpartition("@")
            if not (at and local and domain) or any(c.isspace() for c in v):
                raise ValueError(_EMAIL_SHAPE)
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        if any(not g for g in v):
            raise ValueError("a group id is empty")
        return v


class _GroupRow(_Row):
    id: str = Field(min_length=1)
    name: str | None = None
    members: list[str] = Field(default_factory=list)
    owners: list[str] = Field(default_factory=list)


class _YamlFile(_Row):
    people: list[_PersonRow]
    groups: list[_GroupRow] = Field(default_factory=list)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # construct_mapping reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _construct_mapping)


def _yaml_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problem(err: Any) -> str:
    kind, value, loc = err["type"], err.get("input"), tuple(err["loc"])
    if kind == "extra_forbidden":
        model = (_YamlFile if len(loc) < 3 else _GroupRow if loc[0] == "groups"
                 else _PersonRow)
        return f"unknown key; allowed: {', '.join(model.model_fields)}"
    if kind == "missing":
        return "required"
    if kind == "string_type" and isinstance(value, int | float | bool):
        return f"must be a string, not {value!r} (quote it in YAML)"
    if kind == "string_type":
        return "must be a string"
    if kind == "bool_type":
        return "must be true or false"
    if kind == "list_type":
        return "must be a list"
    if kind in ("model_type", "dict_type"):
        return "must be a mapping of keys to values"
    if kind == "string_too_short":
        return "must not be empty"
    return str(err["msg"]).removeprefix("Value error, ")


def _validation_problems(exc: ValidationError,
                         where: Callable[[tuple[Any, ...]], str]) -> list[str]:
    return [f"{where(tuple(err['loc']))}: {_problem(err)}" for err in exc.errors()]


class FileSource:
    """Reads people and groups from a YAML or CSV file; see the module docstring."""

    name = "file"

    def __init__(self, path: Path, *, format: str = "auto",
                 allow_initial_passwords: bool = False) -> None:
        if format not in ("auto", "yaml", "csv"):
            raise ValueError(f"format must be auto, yaml or csv, not {format!r}")
        self.path = Path(path)
        self.format = format
        self.allow_initial_passwords = allow_initial_passwords
        # non-fatal remarks about the last read (e.g. passwords ignored)
        self.warnings: list[str] = []

    async def read(self) -> DirectorySnapshot:
        """Read and check the whole file; :class:`DirectoryError` if anything is wrong."""
        return await asyncio.to_thread(self.read_sync)

    def read_sync(self) -> DirectorySnapshot:
        """:meth:`read` without the thread (for the CLI and tests)."""
        self.warnings = []
        fmt = self.format
        if fmt == "auto":
            suffix = self.path.suffix.lower()
            if suffix in (".yaml", ".yml"):
                fmt = "yaml"
            elif suffix == ".csv":
                fmt = "csv"
            else:
                raise self._error(f"cannot tell the format from the suffix {suffix!r}; "
                                  "name it .yaml/.yml/.csv or set format: yaml or csv")
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise self._error("no such file") from None
        except UnicodeDecodeError as e:
            raise self._error(f"not UTF-8 text (byte {e.start})") from e
        except OSError as e:
            raise self._error(f"cannot read: {e.strerror or e}") from e
        if fmt == "yaml":
            rows, group_rows, where = self._parse_yaml(text)
        else:
            rows, where = self._parse_csv(text)
            group_rows = []
        return self._build(rows, group_rows, where)

    # -- parsing ----------------------------------------------------------------------------

    def _error(self, *problems: str) -> DirectoryError:
        shown = list(problems[:_MAX_ERRORS])
        if len(problems) > _MAX_ERRORS:
            shown.append(f"… and {len(problems) - _MAX_ERRORS} more")
        return DirectoryError(f"directory file {self.path}: " + "; ".join(shown))

    def _parse_yaml(self, text: str) -> tuple[list[_PersonRow], list[_GroupRow],
                                              Callable[[tuple[Any, ...]], str]]:
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise self._error(f"YAML syntax error{at}: {e.problem or e.context}") from e
        except yaml.YAMLError as e:
            raise self._error(f"YAML syntax error: {e}") from e
        if data is None:
            raise self._error("the file is empty; it needs a 'people:' list")
        if not isinstance(data, dict):
            raise self._error("the top level must be a mapping with a 'people:' list")
        try:
            parsed = _YamlFile.model_validate(data)
        except ValidationError as e:
            raise self._error(*_validation_problems(e, _yaml_loc)) from None
        return list(parsed.people), list(parsed.groups), _yaml_loc

    def _parse_csv(self, text: str) -> tuple[list[_PersonRow],
                                             Callable[[tuple[Any, ...]], str]]:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        header: list[str] | None = None
        rows: list[_PersonRow] = []
        lines: list[int] = []  # the line each row starts on
        problems: list[str] = []
        last = 0
        try:
            for record in reader:
                start, last = last + 1, reader.line_num
                if not any(cell.strip() for cell in record):
                    continue  # blank line
                if header is None:
                    header = [c.strip() for c in record]
                    problems += self._check_header(header, start)
                    if problems:
                        raise self._error(*problems)
                    continue
                if len(record) != len(header):
                    problems.append(f"line {start}: {len(record)} fields, the header has "
                                    f"{len(header)}")
                    continue
                row = self._csv_row(dict(zip(header, record, strict=True)), start, problems)
                if row is not None:
                    rows.append(row)
                    lines.append(start)
        except csv.Error as e:
            problems.append(f"line {reader.line_num}: CSV syntax error: {e}")
        if header is None:
            problems.append("the file is empty; it needs a header row")
        if problems:
            raise self._error(*problems)

        def where(loc: tuple[Any, ...]) -> str:
            # loc as the YAML side builds it: ("people", index, field?, …)
            line = f"line {lines[loc[1]]}"
            return f"{line}, column {loc[2]}" if len(loc) > 2 else line

        return rows, where

    @staticmethod
    def _check_header(header: list[str], line: int) -> list[str]:
        problems = []
        unknown = [c for c in header if c not in CSV_COLUMNS]
        if unknown:
            problems.append(f"line {line}: unknown column(s) {', '.join(map(repr, unknown))}; "
                            f"allowed: {', '.join(CSV_COLUMNS)}")
        dup = sorted({c for c in header if header.count(c) > 1})
        if dup:
            problems.append(f"line {line}: column(s) {', '.join(dup)} given twice")
        missing = [c for c in _CSV_REQUIRED if c not in header]
        if missing:
            problems.append(f"line {line}: missing column(s) {', '.join(missing)}")
        return problems

    @staticmethod
    def _csv_row(cells: dict[str, str], line: int, problems: list[str]) -> _PersonRow | None:
        data: dict[str, Any] = {}
        for col, raw in cells.items():
            value = raw if col == "initial_password" else raw.strip()
            if col == "disabled":
                flag = _CSV_BOOLS.get(value.lower())
                if flag is None:
                    problems.append(f"line {line}, column disabled: {value!r} is not one of "
                                    "true/false/yes/no/1/0")
                    return None
                data[col] = flag
            elif col == "groups":
                data[col] = [g.strip() for g in value.split(";") if g.strip()]
            elif value:
                data[col] = value
        try:
            return _PersonRow.model_validate(data)
        except ValidationError as e:
            problems += _validation_problems(
                e, lambda loc: f"line {line}, column {loc[0]}" if loc else f"line {line}")
            return None

    # -- checking and building --------------------------------------------------------------

    def _build(self, rows: list[_PersonRow], group_rows: list[_GroupRow],
               where: Callable[[tuple[Any, ...]], str]) -> DirectorySnapshot:
        problems: list[str] = []
        by_id: dict[str, int] = {}
        by_username: dict[str, int] = {}
        for i, r in enumerate(rows):
            pid = r.id if r.id is not None else r.username
            if pid in by_id:
                problems.append(f"{where(('people', i, 'id'))}: duplicate id {pid!r} "
                                f"(also at {where(('people', by_id[pid]))})")
            else:
                by_id[pid] = i
            if r.username in by_username:
                problems.append(f"{where(('people', i, 'username'))}: duplicate username "
                                f"{r.username!r} (also at "
                                f"{where(('people', by_username[r.username]))})")
            else:
                by_username[r.username] = i
        ids = [r.id if r.id is not None else r.username for r in rows]

        def resolve(ref: str, loc: tuple[Any, ...]) -> str | None:
            by_i, by_u = by_id.get(ref), by_username.get(ref)
            if by_i is not None and by_u is not None and by_i != by_u:
                problems.append(f"{where(loc)}: {ref!r} is ambiguous: the id of "
                                f"{where(('people', by_i))} and the username of "
                                f"{where(('people', by_u))}")
                return None
            if by_i is None and by_u is None:
                problems.append(f"{where(loc)}: {ref!r} is neither the id nor the username "
                                "of a person in the file")
                return None
            return ids[by_i if by_i is not None else by_u]  # type: ignore[index]

        people: list[Person] = []
        with_passwords = 0
        for i, r in enumerate(rows):
            manager = None
            if r.manager is not None:
                manager = resolve(r.manager, ("people", i, "manager"))
                if manager == ids[i]:
                    problems.append(f"{where(('people', i, 'manager'))}: a person cannot be "
                                    "their own manager")
            if r.initial_password:
                with_passwords += 1
            people.append(Person(
                id=ids[i], username=r.username, display_name=r.display_name, email=r.email,
                title=r.title, department=r.department, location=r.location,
                manager=manager, disabled=r.disabled, groups=frozenset(r.groups),
                initial_password=r.initial_password if self.allow_initial_passwords else None,
            ))

        groups: list[Group] = []
        seen_groups: dict[str, int] = {}
        for gi, g in enumerate(group_rows):
            if g.id in seen_groups:
                problems.append(f"{_yaml_loc(('groups', gi, 'id'))}: duplicate group id "
                                f"{g.id!r} (also at {_yaml_loc(('groups', seen_groups[g.id]))})")
                continue
            seen_groups[g.id] = gi
            members = [resolve(m, ("groups", gi, "members", k)) for k, m in enumerate(g.members)]
            owners = [resolve(o, ("groups", gi, "owners", k)) for k, o in enumerate(g.owners)]
            groups.append(Group(
                id=g.id, name=g.name or g.id,
                members=frozenset(m for m in members if m is not None),
                owners=frozenset(o for o in owners if o is not None),
            ))

        if problems:
            raise self._error(*problems)
        if with_passwords and not self.allow_initial_passwords:
            self.warnings.append(
                f"directory file {self.path}: initial_password given for {with_passwords} "
                "person(s) and ignored: allow_initial_passwords is off")
        try:
            return DirectorySnapshot.build(people, groups, source=f"file:{self.path.name}")
        except ValueError as e:  # pragma: no cover - duplicates are caught above
            raise self._error(str(e)) from e

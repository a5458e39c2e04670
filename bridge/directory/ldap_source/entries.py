"""Plain LDAP answers ``{attribute: [values]}`` (values ``bytes`` or ``str``, names in any
case) read as text: GUIDs, ``userAccountControl`` and other disabled flags, ranged
attributes (AD ``member;range=0-1499``) and DN normalisation. Pure.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

Attrs = Mapping[str, Sequence[Any]]

# -- pure helpers ------------------------------------------------------------------------


class EntryError(ValueError):
    """An entry that cannot become a person or group (skipped with a warning)."""


def lower_keys(attrs: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{attr: values}`` with lower-case names and list values (a scalar becomes [v])."""
    out: dict[str, list[Any]] = {}
    for k, v in attrs.items():
        vals = list(v) if isinstance(v, list | tuple) else [v]
        out.setdefault(k.lower(), []).extend(vals)
    return out


def as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def first_text(attrs: Mapping[str, Sequence[Any]], name: str | None) -> str | None:
    """The first non-empty value of ``name`` as stripped text (attrs keyed lower-case)."""
    if not name:
        return None
    for v in attrs.get(name.lower(), ()):
        t = as_text(v).strip()
        if t:
            return t
    return None


def decode_guid(value: bytes | str) -> str:
    """AD ``objectGUID`` (16 bytes, little-endian fields) -> canonical lower-case GUID.

    Text forms (``{…}`` or canonical, as some tools record them) are normalised too.
    """
    if isinstance(value, bytes | bytearray):
        if len(value) != 16:
            raise EntryError(f"objectGUID must be 16 bytes, got {len(value)}")
        return str(uuid.UUID(bytes_le=bytes(value)))
    try:
        return str(uuid.UUID(value.strip().strip("{}")))
    except ValueError as e:
        raise EntryError(f"not a GUID: {value!r}") from e


def uac_disabled(value: Any) -> bool:
    """``userAccountControl & 2`` (ACCOUNTDISABLE)."""
    try:
        return bool(int(as_text(value).strip()) & 2)
    except ValueError as e:
        raise EntryError(f"userAccountControl is not a number: {value!r}") from e


_FALSE = {"FALSE", "0", "NO", "N", "OFF"}


def flag_disabled(values: Sequence[Any]) -> bool:
    """OpenLDAP disabled flag: present (e.g. ``pwdAccountLockedTime``) or TRUE => disabled.

    An explicit false value (``FALSE``, ``0``, ``no``) is not disabled; absent is not.
    """
    for v in values:
        t = as_text(v).strip()
        if t:
            return t.upper() not in _FALSE
    return False


_RANGE_RE = re.compile(r"^(?P<base>[^;]+(?:;(?!range=)[^;]+)*);range=(?P<lo>\d+)-(?P<hi>\d+|\*)$",
                       re.IGNORECASE)


def parse_range(attr_name: str) -> tuple[str, int, int | None] | None:
    """``member;range=0-1499`` -> ("member", 0, 1499); ``…;range=1500-*`` -> (…, 1500, None).

    None for an attribute name without a range option.
    """
    m = _RANGE_RE.match(attr_name)
    if m is None:
        return None
    hi = m.group("hi")
    return m.group("base"), int(m.group("lo")), None if hi == "*" else int(hi)


def ranged_values(attrs: Mapping[str, Sequence[Any]], base: str) -> tuple[list[Any], int | None]:
    """All values of ``base`` in one answer (plain or ranged) and the next range start.

    The next start is None when the answer holds the last (or only) range. ``attrs`` may
    use any case for names.
    """
    base_l = base.lower()
    values: list[Any] = []
    nxt: int | None = None
    for name, vals in attrs.items():
        if name.lower() == base_l:
            values.extend(vals)
            continue
        r = parse_range(name)
        if r is None or r[0].lower() != base_l:
            continue
        values.extend(vals)
        _, lo, hi = r
        if hi is not None:
            if hi < lo:
                raise EntryError(f"bad range {name!r}")
            nxt = hi + 1
    return values, nxt


def normalize_dn(dn: str) -> str:
    """A DN in a form fit for comparison: RDN parts stripped and lower-cased.

    Escapes are kept as written (``\\,`` and ``\\2C`` are not unified); multi-valued RDNs
    keep their order. Good enough to match the DNs one server answers in ``member`` and
    ``manager`` values against the DNs of the entries it returns.
    """
    if "\\" not in dn and '"' not in dn:
        parts = dn.split(",")
    else:
        parts, cur, esc, quoted = [], [], False, False
        for ch in dn:
            if esc:
                cur.append(ch)
                esc = False
            elif ch == "\\":
                cur.append(ch)
                esc = True
            elif ch == '"':
                cur.append(ch)
                quoted = not quoted
            elif ch == "," and not quoted:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        parts.append("".join(cur))
    out = []
    for p in parts:
        a, sep, v = p.partition("=")
        out.append(f"{a.strip().lower()}{sep}{v.strip().lower()}")
    return ",".join(out)

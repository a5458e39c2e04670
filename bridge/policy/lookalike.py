"""Look-alike names: Unicode TR39 confusable skeletons, pure.

Two strings are confusable when their *skeletons* are equal (Unicode Technical Standard
#39, section 4): NFD, every character replaced by its prototype from the confusables data,
NFD again. The data (``confusables.txt``) is read by the caller
(:func:`bridge.directory.lookalike.confusables_table`) and passed in, so this module stays
free of I/O. Comparisons here are also case-folded: ``B0B`` and ``bob`` are the same name
to a reader.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping

__all__ = ["reserved_lookalike", "skeleton"]


def skeleton(text: str, table: Mapping[str, str]) -> str:
    """The TR39 skeleton of ``text`` with ``table`` (character -> prototype), case-folded."""
    s = unicodedata.normalize("NFD", text)
    s = "".join(table.get(c, c) for c in s)
    return unicodedata.normalize("NFD", s).casefold()


def reserved_lookalike(localpart: str, reserved: Iterable[str]) -> str | None:
    """The reserved localpart (Enclave's own users) that ``localpart`` is or extends with a
    separator or digit (``enclave-2``, ``enclave-admin.x``, ``enclave7``), else None."""
    for name in sorted(reserved, key=len, reverse=True):
        if localpart == name or re.match(re.escape(name) + r"[-._=/0-9]", localpart):
            return name
    return None

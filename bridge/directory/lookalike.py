"""The TR39 confusables table, read once from the ``confusable-homoglyphs`` package data
(Unicode's confusables.txt as JSON) for :mod:`bridge.policy.lookalike`."""

from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def confusables_table() -> dict[str, str]:
    """Character -> prototype for every character the confusables data names.

    The package stores each confusables.txt pair in both directions, so the direction is
    rebuilt: characters linked by the data form groups, and every member of a group maps
    to its prototype, which in confusables.txt is the multi-character sequence when there
    is one (``m`` -> ``rn``), else the ASCII member, a letter first (``а`` -> ``a``,
    ``1`` -> ``l``, ``0`` -> ``O``; small letters first), else the lowest code point.
    Built in about 0.03 s, once per process.
    """
    data = json.loads(resources.files("confusable_homoglyphs")
                      .joinpath("confusables.json").read_text(encoding="utf-8"))
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for key, entries in data.items():
        for e in entries:
            c = e["c"].strip("\u200e\u200f")
            if c and c != key:
                a, b = find(key.strip("\u200e\u200f")), find(c)
                if a != b:
                    parent[a] = b
    groups: dict[str, list[str]] = {}
    for x in list(parent):
        groups.setdefault(find(x), []).append(x)

    def rank(x: str) -> tuple[bool, bool, bool, bool, str]:
        # the sequence, else ASCII: a small letter, a letter, anything (l, not I or 1)
        return (len(x) == 1, not x.isascii(), not x.islower(), not x.isalpha(), x)

    table: dict[str, str] = {}
    for members in groups.values():
        proto = min(members, key=rank)
        for m in members:
            if len(m) == 1 and m != proto:
                table[m] = proto
    return table

"""The archive's format mapped onto immutable objects (S3), pure: key names and what a
listing means (the Object Lock decisions are :mod:`bridge.policy.archive_lock`).

Objects are written once and never changed, so the append-only files of the local layout
become one object per seal (a batch of staged entries; see :mod:`.s3`)::

    <prefix>rooms/<room dir>/manifest/<first entry:012d>.jsonl   the manifest lines of one seal
    <prefix>rooms/<room dir>/<segment>/<offset:012d>-<sha256>     one append's segment bytes
    <prefix>rooms/<room dir>/<segment>/<offset:012d>+<length:012d> the bytes of several appends
    <prefix>rooms/<room dir>/<segment>.prune                       a prune in progress
    <prefix>media/<aa>/<sha256>                                    media, by the hash of its bytes

The manifest is the manifest objects concatenated in key order; a segment is its parts
concatenated in offset order. The append entries of one manifest object that follow each
other in a segment share one part (:func:`object_parts`): a part of one entry is named by
the (offset, sha256) that entry records, a part of several by its offset and length (a
sealed batch of staged appends; its content is fixed by the chain, so two sealers that
both write it write the same bytes). Entries and the chain are byte for byte those of
the local archive, so the same verification checks both. A part whose entry never got
written (a writer killed between the two) is named by nothing and read by nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from .layout import SEGMENT_RE, room_dir_name

_MANIFEST_RE = re.compile(r"^(\d{12})\.jsonl$")
_PART_RE = re.compile(r"^(\d{12})-([0-9a-f]{64})$")


def room_prefix(prefix: str, room_id: str) -> str:
    """The key prefix of a room's objects."""
    return f"{prefix}rooms/{room_dir_name(room_id)}/"


def manifest_prefix(prefix: str, room_id: str) -> str:
    return room_prefix(prefix, room_id) + "manifest/"


def manifest_key(prefix: str, room_id: str, first_entry: int) -> str:
    """The object holding the manifest lines of one write, from entry ``first_entry`` on."""
    return f"{manifest_prefix(prefix, room_id)}{first_entry:012d}.jsonl"


def manifest_first_entry(prefix: str, room_id: str, key: str) -> int | None:
    """The first entry number of a manifest object's key, None for any other key."""
    base = manifest_prefix(prefix, room_id)
    if not key.startswith(base):
        return None
    m = _MANIFEST_RE.match(key[len(base):])
    return int(m.group(1)) if m else None


def part_key(prefix: str, room_id: str, segment: str, offset: int, sha256: str) -> str:
    """The object of the segment bytes an append entry records at ``offset``."""
    return f"{room_prefix(prefix, room_id)}{segment}/{offset:012d}-{sha256}"


def part_of(prefix: str, room_id: str, key: str) -> tuple[str, int, str] | None:
    """(segment, offset, sha256) of a part's key, None for any other key."""
    rest = key.removeprefix(room_prefix(prefix, room_id))
    if rest == key or rest.count("/") != 1:
        return None
    seg, name = rest.split("/")
    m = _PART_RE.match(name)
    if not SEGMENT_RE.match(seg) or m is None:
        return None
    return seg, int(m.group(1)), m.group(2)


def segment_prefix(prefix: str, room_id: str, segment: str) -> str:
    return f"{room_prefix(prefix, room_id)}{segment}/"


def prune_intent_key(prefix: str, room_id: str, segment: str) -> str:
    """Where a prune in progress keeps the sha256 of the whole segment it deletes: the
    manifest's prune entry is written after the delete, when the bytes are gone."""
    return f"{room_prefix(prefix, room_id)}{segment}.prune"


def media_key(prefix: str, sha256: str) -> str:
    return f"{prefix}media/{sha256[:2]}/{sha256}"


def contiguous(firsts: Sequence[int], start: int = 1) -> bool:
    """Whether manifest objects' first entries can follow each other from ``start``:
    ascending, the first one at ``start`` (the lines inside decide the rest)."""
    return not firsts or (firsts[0] == start and all(a < b for a, b in pairwise(firsts)))


def group_part_key(prefix: str, room_id: str, segment: str, offset: int, length: int) -> str:
    """The object of the segment bytes of several append entries, from ``offset`` on."""
    return f"{room_prefix(prefix, room_id)}{segment}/{offset:012d}+{length:012d}"


def object_parts(prefix: str, room_id: str,
                 entries: Sequence[Any]) -> list[tuple[str, int, int, str]]:
    """(segment, offset, length, key) of the part objects that hold the append entries of
    one manifest object: entries of a segment that follow each other share a part.

    Entries that are not well-formed appends are passed over (verification reports them).
    A write of the unstaged archive had one append entry per segment, so its parts keep
    the one-entry names."""
    groups: list[tuple[str, int, int, str, int]] = []  # segment, offset, length, sha, count
    for e in entries:
        if not isinstance(e, dict) or e.get("op") != "append":
            continue
        seg, off, length, sha = e.get("segment"), e.get("offset"), e.get("length"), \
            e.get("sha256")
        if not (isinstance(seg, str) and isinstance(off, int) and isinstance(length, int)
                and isinstance(sha, str)):
            continue
        if groups and groups[-1][0] == seg and groups[-1][1] + groups[-1][2] == off:
            g = groups[-1]
            groups[-1] = (seg, g[1], g[2] + length, g[3], g[4] + 1)
        else:
            groups.append((seg, off, length, sha, 1))
    return [(seg, off, length, part_key(prefix, room_id, seg, off, sha) if count == 1
             else group_part_key(prefix, room_id, seg, off, length))
            for seg, off, length, sha, count in groups]

"""Verification of one room's archive against its manifest and the store's head, through
an :class:`ArchiveSource` (the local files, or the objects of an S3 bucket): the same
checks for every archive writer, each problem a :class:`VerifyProblem`.

Memory stays bounded by one segment: the entries of a segment are contiguous (appends go
to the newest segment only), so a segment's bytes are dropped once the chain moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

import orjson

from ...store.base import ArchiveHead
from .files import read_or_none, sha256_file
from .layout import MANIFEST, media_file, parse_manifest, room_path, segment_number
from .writer import VerifyProblem


class ArchiveSource(Protocol):
    """What verification reads of one room's archive."""

    async def manifest(self) -> bytes | None:
        """The whole manifest, or None when the room has none."""

    async def segment(self, name: str, parts: Sequence[tuple[int, int, str]]) -> bytes | None:
        """A segment's bytes (None: missing); ``parts`` are the (offset, length, sha256) the
        manifest's entries name in it, for a store that keeps each append apart."""

    async def media_sha256(self, sha256: str) -> str | None:
        """The sha256 of the stored media file named ``sha256`` (None: missing)."""

    async def segment_names(self) -> list[str]:
        """The segments present, by name (to find ones no entry references)."""


class LocalSource:
    """A room of a :class:`~.local.LocalArchive` directory."""

    def __init__(self, root: Path, room_id: str):
        self.root = root
        self.rdir = room_path(root, room_id)

    async def manifest(self) -> bytes | None:
        return await asyncio.to_thread(read_or_none, self.rdir / MANIFEST)

    async def segment(self, name: str, parts: Sequence[tuple[int, int, str]]) -> bytes | None:
        return await asyncio.to_thread(read_or_none, self.rdir / name)

    async def media_sha256(self, sha256: str) -> str | None:
        return await asyncio.to_thread(sha256_file, media_file(self.root, sha256))

    async def segment_names(self) -> list[str]:
        def names() -> list[str]:
            if not self.rdir.is_dir():
                return []
            return sorted(p.name for p in self.rdir.iterdir() if segment_number(p.name))
        return await asyncio.to_thread(names)


def rooms_on_disk(root: Path) -> list[str]:
    """The rooms that have a directory under ``root``, by id."""
    base = root / "rooms"
    if not base.is_dir():
        return []
    out = []
    for d in base.iterdir():
        if not d.is_dir():
            continue
        first = b""
        with contextlib.suppress(OSError), (d / MANIFEST).open("rb") as f:
            first = f.readline()
        try:
            room = orjson.loads(first).get("room")
        except (orjson.JSONDecodeError, AttributeError):
            room = None
        if isinstance(room, str):
            out.append(room)
        elif not d.name.startswith("h-"):
            out.append(unquote(d.name))
    return out


async def verify_room(source: ArchiveSource, room_id: str, head: ArchiveHead | None,
                      indexed: int) -> tuple[list[VerifyProblem], int, int, int]:
    """(problems, entries, events, media files) of one room; reads only."""
    out: list[VerifyProblem] = []

    def problem(entry: int | None, kind: str, detail: str) -> None:
        out.append(VerifyProblem(room_id, entry, kind, detail))

    committed = head.entries if head is not None else 0
    data = await source.manifest()
    if data is None:
        if committed:
            problem(1, "manifest_missing",
                    f"{MANIFEST} is missing; the store head says {committed} entries")
        elif indexed:
            problem(None, "index", f"the store indexes {indexed} events of a room "
                                   "without archive files")
        return out, 0, 0, 0
    m = parse_manifest(data, room_id)
    del data
    if m.problem is not None:
        problem(*m.problem)
    pruned = {e["segment"] for e in m.entries if e["op"] == "prune"}
    parts: dict[str, list[tuple[int, int, str]]] = {}
    for e in m.entries:
        if e["op"] == "append" and e["segment"] not in pruned:
            parts.setdefault(e["segment"], []).append((e["offset"], e["length"], e["sha256"]))
    current: tuple[str, bytes | None] | None = None  # the one segment held in memory
    sizes: dict[str, int | None] = {}  # segment -> its length when it was read
    ends: dict[str, tuple[int, int]] = {}  # segment -> (bytes covered, last entry)
    media_ok: dict[str, str | None] = {}
    events = media = expected_index = 0
    for e in m.entries:
        n = e["n"]
        if e["op"] == "append" and e["segment"] not in pruned:
            seg, off, length = e["segment"], e["offset"], e["length"]
            if off != ends.get(seg, (0, 0))[0]:
                problem(n, "segment_gap", f"{seg}: entry starts at byte {off}, the "
                                          f"previous entry of it ends at "
                                          f"{ends.get(seg, (0, 0))[0]}")
            ends[seg] = (off + length, n)
            events += e["count"]
            if n <= committed:
                expected_index += e["count"]
            if current is None or current[0] != seg:
                current = (seg, await source.segment(seg, parts[seg]))
                sizes[seg] = None if current[1] is None else len(current[1])
            content = current[1]
            if content is None:
                problem(n, "segment_missing", f"{seg} is missing")
                continue
            chunk = content[off:off + length]
            if len(chunk) != length or hashlib.sha256(chunk).hexdigest() != e["sha256"] \
                    or chunk.count(b"\n") != e["count"]:
                problem(n, "segment_hash", f"{seg} bytes {off}..{off + length} do not "
                                           "match the manifest's sha256")
        elif e["op"] == "media":
            media += 1
            sha = e["sha256"]
            if sha not in media_ok:
                media_ok[sha] = await source.media_sha256(sha)
            if media_ok[sha] is None:
                problem(n, "media_missing", f"media file {sha} ({e['mxc']}) is missing")
            elif media_ok[sha] != sha:
                problem(n, "media_hash", f"media file {sha} ({e['mxc']}) was changed")
    current = None
    # past a broken link or a cut-off manifest the rest of the chain is unknown: bytes
    # and files it would cover are not reported as extra
    whole = m.problem is None and m.lines >= committed
    for seg, (end, last) in ends.items() if whole else ():
        size = sizes.get(seg)
        if size is not None and size > end:
            problem(last, "segment_tail", f"{seg} has {size - end} bytes after "
                                          "the last entry (an interrupted write, or "
                                          "added outside Enclave)")
    if whole:
        for name in await source.segment_names():
            if name not in ends and name not in pruned:
                problem(None, "segment_unreferenced", f"{name} is in no manifest entry")
    if m.lines < committed:
        problem(m.lines + 1, "manifest_short",
                f"the manifest has {m.lines} entries, the store head says {committed}: "
                f"entries {m.lines + 1}..{committed} were removed")
    elif committed and len(m.entries) >= committed \
            and m.entries[committed - 1]["hash"] != head.head:  # type: ignore[union-attr]
        problem(committed, "head_mismatch",
                f"entry {committed} differs from the store head: the manifest was "
                "rewritten")
    if m.lines > committed:
        problem(committed + 1, "uncommitted",
                f"{m.lines - committed} entries past the store head ({committed}): an "
                "interrupted write (reconciled on the next write to the room), or "
                "entries added outside Enclave")
    if m.partial_tail:
        problem(m.lines + 1, "manifest_tail",
                "a partial line at the end of the manifest (an interrupted write)")
    if whole and indexed != expected_index:
        problem(None, "index", f"the store indexes {indexed} events, the manifest's "
                               f"committed entries hold {expected_index}")
    return out, len(m.entries), events, media

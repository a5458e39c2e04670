"""Verification of one room's archive against its manifest and the store's head: reads
files only (run in a worker thread), reports every problem as a :class:`VerifyProblem`."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from urllib.parse import unquote

import orjson

from ...store.base import ArchiveHead
from .files import read_or_none, sha256_file
from .layout import MANIFEST, media_file, parse_manifest, room_path, segment_number
from .writer import VerifyProblem


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


def verify_room(root: Path, room_id: str, head: ArchiveHead | None,
                indexed: int) -> tuple[list[VerifyProblem], int, int, int]:
    """(problems, entries, events, media files) of one room; reads files only."""
    out: list[VerifyProblem] = []

    def problem(entry: int | None, kind: str, detail: str) -> None:
        out.append(VerifyProblem(room_id, entry, kind, detail))

    rdir = room_path(root, room_id)
    committed = head.entries if head is not None else 0
    data = read_or_none(rdir / MANIFEST)
    if data is None:
        if committed:
            problem(1, "manifest_missing",
                    f"{MANIFEST} is missing; the store head says {committed} entries")
        elif indexed:
            problem(None, "index", f"the store indexes {indexed} events of a room "
                                   "without archive files")
        return out, 0, 0, 0
    m = parse_manifest(data, room_id)
    if m.problem is not None:
        problem(*m.problem)
    pruned = {e["segment"] for e in m.entries if e["op"] == "prune"}
    contents: dict[str, bytes | None] = {}
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
            if seg not in contents:
                contents[seg] = read_or_none(rdir / seg)
            content = contents[seg]
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
                media_ok[sha] = sha256_file(media_file(root, sha))
            if media_ok[sha] is None:
                problem(n, "media_missing", f"media file {sha} ({e['mxc']}) is missing")
            elif media_ok[sha] != sha:
                problem(n, "media_hash", f"media file {sha} ({e['mxc']}) was changed")
    # past a broken link or a cut-off manifest the rest of the chain is unknown: bytes
    # and files it would cover are not reported as extra
    whole = m.problem is None and m.lines >= committed
    for seg, (end, last) in ends.items() if whole else ():
        content = contents.get(seg)
        if content is not None and len(content) > end:
            problem(last, "segment_tail", f"{seg} has {len(content) - end} bytes after "
                                          "the last entry (an interrupted write, or "
                                          "added outside Enclave)")
    if rdir.is_dir() and whole:
        for path in sorted(rdir.iterdir()):
            if segment_number(path.name) and path.name not in ends \
                    and path.name not in pruned:
                problem(None, "segment_unreferenced",
                        f"{path.name} is in no manifest entry")
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

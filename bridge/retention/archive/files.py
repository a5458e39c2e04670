"""The archive's file I/O, synchronous (callers run it in worker threads): durable
writes at a known offset, directories made durable, reads, hashes, cutting back what a
crash left past the last manifest entry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import orjson

from ...store.base import ArchivedEvent, ArchivedMedia
from .layout import (
    MANIFEST,
    Manifest,
    RoomState,
    index_fields,
    media_file,
    room_path,
    segment_number,
)
from .writer import ArchiveCorrupt


# -- file I/O (runs in worker threads) -----------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_at(path: Path, offset: int, data: bytes) -> bool:
    """Write ``data`` at ``offset`` (the file's current end) and fsync; True if created."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        size = os.fstat(fd).st_size
        if size != offset:
            raise ArchiveCorrupt(f"{path} is {size} bytes, expected {offset}: "
                                 "changed outside this archive writer")
        os.lseek(fd, offset, os.SEEK_SET)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
    return created


def ensure_dir(path: Path) -> None:
    """Create ``path`` and missing parents, each made durable in its parent directory."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def cut_tails(rdir: Path, m: Manifest, state: RoomState) -> None:
    """Cut what a crash left past the last valid entry: a torn manifest line, segment
    bytes never recorded, a segment file created but never recorded."""
    manifest = rdir / MANIFEST
    if manifest.exists() and manifest.stat().st_size > m.valid_bytes:
        truncate(manifest, m.valid_bytes)
    if not rdir.is_dir():
        return
    for path in rdir.iterdir():
        number = segment_number(path.name)
        if not number or path.name in state.pruned:
            continue
        if number > state.last_number:
            path.unlink()
            fsync_dir(rdir)
        elif path.name == state.segment and path.stat().st_size > state.ends[path.name]:
            truncate(path, state.ends[path.name])


def load_uncommitted(root: Path, room_id: str, pending: list[dict[str, Any]],
                     pruned: set[str]) -> tuple[list[ArchivedEvent], list[ArchivedMedia]]:
    """The index rows of manifest entries written but never committed to the store, read
    back from their files and checked against the manifest; a pending prune's segment is
    deleted (again)."""
    rdir = room_path(root, room_id)
    rows: list[ArchivedEvent] = []
    media: list[ArchivedMedia] = []
    for e in pending:
        if e["op"] == "append" and e["segment"] not in pruned:
            content = read_or_none(rdir / e["segment"]) or b""
            chunk = content[e["offset"]:e["offset"] + e["length"]]
            if len(chunk) != e["length"] or \
                    hashlib.sha256(chunk).hexdigest() != e["sha256"]:
                raise ArchiveCorrupt(
                    f"archive of {room_id}: entry {e['n']}: bytes of {e['segment']} "
                    "do not match the manifest")
            for i, line in enumerate(chunk.split(b"\n")[:-1]):
                f = index_fields(orjson.loads(line))
                if f is None:
                    raise ArchiveCorrupt(f"archive of {room_id}: entry {e['n']}: "
                                         "a line is not an archivable event")
                rows.append(ArchivedEvent(f[0], room_id, f[1], f[2], f[3], f[4],
                                          e["segment"], e["first_line"] + i, e["at"]))
        elif e["op"] == "media":
            if sha256_file(media_file(root, e["sha256"])) != e["sha256"]:
                raise ArchiveCorrupt(f"archive of {room_id}: entry {e['n']}: media "
                                     f"file {e['sha256']} is missing or changed")
            media.append(ArchivedMedia(
                e["mxc"], e["sha256"], e["size"], e.get("content_type"), room_id,
                e.get("event_id"), e.get("ts"), e["at"]))
        elif e["op"] == "prune":
            path = rdir / e["segment"]
            if path.exists():
                path.unlink()
                fsync_dir(rdir)
    return rows, media


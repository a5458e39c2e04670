"""The compliance archive: append-only JSON Lines segments, content-addressed media and a
hash-chained manifest per room, indexed in the store.

Layout under the archive root::

    rooms/<quoted room id>/seg-000001.jsonl   one event per line, canonical JSON, append-only
    rooms/<quoted room id>/manifest.jsonl     one entry per write, each chained to the last
    media/<aa>/<sha256>                       media files, named by the hash of their bytes

Every manifest entry carries ``prev`` (the previous entry's hash, 64 zeros for the first)
and ``hash = sha256(prev + canonical JSON of the entry without "hash")``. An append entry
names the segment bytes it added and their sha256, a media entry the file's sha256, a prune
entry the sha256 of the whole segment it deleted. The store keeps the head (entry count and
hash) of every room, so a manifest truncated, extended or rewritten as a whole is detected
as well as an edited line or changed segment bytes.

Crash safety: segment bytes are written and fsynced first, then the manifest line, then
the store commits the index rows and the new head. On the first touch of a room in a
process the files are reconciled with the store: manifest entries past the store head are
indexed (after checking their bytes), a torn manifest line or segment bytes past the last
entry are cut off, and a manifest shorter than the store head refuses further writes.

The package: :mod:`.writer` (the :class:`ArchiveWriter` interface, results, errors),
:mod:`.layout` (the formats and the chain, pure), :mod:`.files` (file I/O, run in worker
threads), :mod:`.verify` (checking a room) and :mod:`.local` (:class:`LocalArchive`).
"""

from .layout import (
    MANIFEST,
    ZERO_HASH,
    canonical,
    entry_hash,
    parse_manifest,
    room_dir_name,
    segment_name,
)
from .local import LocalArchive
from .writer import (
    AppendResult,
    ArchiveCorrupt,
    ArchivePruneDeferred,
    ArchiveWriteError,
    ArchiveWriter,
    SegmentInfo,
    VerifyProblem,
    VerifyReport,
)

__all__ = [
    "MANIFEST", "ZERO_HASH", "AppendResult", "ArchiveCorrupt", "ArchivePruneDeferred",
    "ArchiveWriteError",
    "ArchiveWriter", "LocalArchive", "SegmentInfo", "VerifyProblem", "VerifyReport",
    "canonical", "entry_hash", "parse_manifest", "room_dir_name", "segment_name",
]

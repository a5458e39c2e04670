"""What every directory source offers."""

from __future__ import annotations

from typing import Protocol

from ..model.people import DirectorySnapshot


class DirectorySource(Protocol):
    """Reads the whole directory. Raises :class:`~.model.DirectoryError` when it cannot
    give a complete, trustworthy answer (unreachable server, a page that failed, a bad
    file): a sync then changes nothing."""

    name: str

    async def read(self) -> DirectorySnapshot: ...

"""Run a directory sync once after a burst of changes (SCIM pushes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class Debouncer:
    """Calls ``fn`` once, ``delay`` seconds after the last of a burst of triggers."""

    def __init__(self, delay: float, fn: Callable[[], Awaitable[Any]]):
        self.delay = delay
        self.fn = fn
        self._task: asyncio.Task[Any] | None = None
        self._again = False

    def trigger(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            await asyncio.sleep(self.delay)
            if self._again:
                continue  # more changes arrived while waiting: wait for the burst to end
            try:
                await self.fn()
            except Exception:
                log.exception("directory sync after a SCIM change failed")
            if not self._again:
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

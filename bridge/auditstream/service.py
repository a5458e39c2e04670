"""The audit streamer: reads the audit table after each sink's cursor, in id order, sends
the rows to the sink, then stores the cursor, so a process killed between the send and
the cursor write sends those rows again (at least once) and none is ever skipped.

Runs on the leading replica only (``bridge/app.py``): one reader per sink keeps the order
simple. A successor resumes from the stored cursor; the batch a deposed leader was sending
may reach the sink twice, and the first copy of every record is still in id order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config.audit import AuditConfig, JsonlSinkConfig, SyslogSinkConfig
from ..kernel.retry import RECONNECT
from ..metrics import Metrics
from ..store.domains import AuditFeedStore, KVStore
from .feed import GapWatch
from .sinks import Sink, build_sink

log = logging.getLogger(__name__)

# store component of the cursors: key = the sink's name, value = the last audit id sent
COMPONENT = "audit-stream"
# while a hole in the ids is waited for, read this often
GAP_POLL_SECONDS = 0.25


class SinkStreamer:
    """One sink's loop: read after the cursor, send, store the cursor."""

    def __init__(self, cfg: SyslogSinkConfig | JsonlSinkConfig, sink: Sink,
                 feed: AuditFeedStore, kv: KVStore, metrics: Metrics,
                 clock_ms: Callable[[], int], poll_seconds: float):
        self.cfg = cfg
        self.sink = sink
        self.feed = feed
        self.kv = kv
        self.metrics = metrics
        self.clock_ms = clock_ms
        self.poll_seconds = poll_seconds
        self.wake = asyncio.Event()
        self.cursor: int | None = None
        self.sent = 0
        self.last_error: str | None = None

    async def load_cursor(self) -> int:
        raw = await self.kv.component_get(COMPONENT, self.cfg.name)
        if raw is not None:
            return int(raw)
        start = 0 if self.cfg.start == "beginning" else await self.feed.audit_last_id()
        # stored now: a sink that starts at the end must not move its start on restart
        await self.kv.component_put(COMPONENT, self.cfg.name, str(start), self.clock_ms())
        log.info("audit stream %s: no cursor yet, starting after audit id %d",
                 self.cfg.name, start)
        return start

    async def step(self, gaps: GapWatch) -> int:
        """Send what is ready after the cursor (one batch); return how many were sent."""
        assert self.cursor is not None
        page = await self.feed.audit_feed(self.cursor, self.cfg.batch_size)
        ready = gaps.ready(self.cursor, page, time.monotonic())
        lag = self.metrics.audit_stream_lag.labels(self.cfg.name)
        if not ready:
            lag.set(0 if not page.entries else
                    max(0.0, (self.clock_ms() - page.entries[0].record.ts) / 1000))
            return 0
        lag.set(max(0.0, (self.clock_ms() - ready[0].record.ts) / 1000))
        await self.sink.send(ready)
        self.cursor = ready[-1].id
        await self.kv.component_put(COMPONENT, self.cfg.name, str(self.cursor),
                                    self.clock_ms())
        self.sent += len(ready)
        self.metrics.audit_streamed.labels(self.cfg.name).inc(len(ready))
        self.metrics.audit_stream_cursor.labels(self.cfg.name).set(self.cursor)
        if len(ready) == len(page.entries) < self.cfg.batch_size:
            lag.set(0)  # caught up
        return len(ready)

    async def run(self) -> None:
        """Stream until cancelled; a failing sink or store is retried with backoff."""
        gaps = GapWatch()
        attempt = 0
        # read from the store at each start: another replica may have led meanwhile
        self.cursor = None
        try:
            while True:
                self.wake.clear()  # before the read: a write during it wakes us again
                try:
                    if self.cursor is None:
                        self.cursor = await self.load_cursor()
                    n = await self.step(gaps)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    attempt += 1
                    delay = RECONNECT.delay(attempt)
                    self.metrics.audit_stream_errors.labels(self.cfg.name).inc()
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.warning("audit stream %s: %s: %s; retry in %.0fs (from audit id %s)",
                                self.cfg.name, type(e).__name__, e, delay, self.cursor)
                    with contextlib.suppress(Exception):
                        await self.sink.close()
                    await asyncio.sleep(delay)
                    continue
                if attempt:
                    log.info("audit stream %s: sending again", self.cfg.name)
                attempt, self.last_error = 0, None
                if n == self.cfg.batch_size:
                    continue  # more may be waiting
                wait = GAP_POLL_SECONDS if gaps.waiting else self.poll_seconds
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=wait)
        finally:
            with contextlib.suppress(Exception):
                await self.sink.close()


class AuditStreamer:
    """Every configured sink's loop, woken by this process's audit writes."""

    def __init__(self, cfg: AuditConfig, feed: AuditFeedStore, kv: KVStore, metrics: Metrics,
                 clock_ms: Callable[[], int], base_dir: Path,
                 sinks: Sequence[Sink] | None = None):
        built = list(sinks) if sinks is not None else [build_sink(s, base_dir)
                                                       for s in cfg.stream]
        self.feed = feed
        self.streamers = [SinkStreamer(c, s, feed, kv, metrics, clock_ms, cfg.poll_seconds)
                          for c, s in zip(cfg.stream, built, strict=True)]

    def status(self) -> list[dict[str, object]]:
        """Each sink's cursor (None before this replica streamed), records sent by this
        process, and the error its last attempt failed with (None: working)."""
        return [{"sink": s.cfg.name, "cursor": s.cursor, "sent": s.sent,
                 "error": s.last_error} for s in self.streamers]

    def notify(self) -> None:
        """An audit record was written: read again now."""
        for s in self.streamers:
            s.wake.set()

    async def run(self) -> None:
        """Run every sink's loop until cancelled (leader-only work)."""
        stop = self.feed.watch_audit(self.notify)
        try:
            await asyncio.gather(*(s.run() for s in self.streamers))
        finally:
            stop()

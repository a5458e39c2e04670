"""The one retry policy: capped exponential backoff, and the server's ``retry_after_ms``.

Pure: the caller sleeps, and passes its own random number for jitter (the kernel reads no
clock and draws no randomness).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A homeserver asking for more than an hour is capped: it would stall a worker for good.
MAX_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True)
class Backoff:
    """Delay before retry number ``attempt`` (1 = the first retry): ``initial`` doubled each
    attempt, never above ``maximum``; with ``jitter`` spread over 75–125 % so replicas that
    failed together do not retry together."""

    initial: float  # seconds
    maximum: float  # seconds
    jitter: bool = False

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        """Seconds to wait before retry ``attempt`` (``rand`` in [0, 1) for the jitter)."""
        exponent = min(max(attempt, 1) - 1, 64)  # 2**64 is past any maximum already
        base = min(self.maximum, self.initial * 2 ** exponent)
        return base * (0.75 + rand / 2) if self.jitter else base

    def delay_ms(self, attempt: int, rand: float = 0.5) -> int:
        """The same delay in whole milliseconds."""
        return int(self.delay(attempt, rand) * 1000)


# Start-up and reconnect loops (bots, appservice start-up, E2EE sync): 1 s doubling to 60 s.
RECONNECT = Backoff(initial=1.0, maximum=60.0)


def retry_after_seconds(body: Any, header: str | None = None) -> float | None:
    """How long a rate-limited answer (``429`` / ``M_LIMIT_EXCEEDED``) asks us to wait:
    the body's ``retry_after_ms``, else a ``Retry-After`` header in whole seconds; capped
    at an hour. None when the server gave neither (use the backoff); 0 means "now"."""
    if isinstance(body, Mapping):
        ms = body.get("retry_after_ms")
        if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
            return min(ms / 1000.0, MAX_RETRY_AFTER_S)
    if header and header.isdigit():
        return min(float(header), MAX_RETRY_AFTER_S)
    return None

"""Per-client-IP token buckets (API.md §15), bounded in memory."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

IDLE_FORGET = 600.0
MAX_TRACKED = 100_000


class RateLimiter:
    """``allow(ip)`` takes one token from the IP's bucket. Idle IPs are forgotten after 10 minutes,
    and at most ``max_tracked`` IPs are kept (least recently seen evicted first)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_tracked = max_tracked
        self._clock = clock
        # ip -> (tokens, last refill time); order = least recently seen first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str) -> bool:
        now = self._clock()
        self._forget_idle(now)
        found = self._buckets.pop(ip, None)
        if found is None:
            tokens = self.burst
        else:
            tokens, last = found
            tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[ip] = (tokens, now)
        while len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)
        return allowed

    def _forget_idle(self, now: float) -> None:
        while self._buckets:
            ip, (_, last) = next(iter(self._buckets.items()))
            if now - last < IDLE_FORGET:
                return
            del self._buckets[ip]

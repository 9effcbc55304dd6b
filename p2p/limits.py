"""Per-peer limits that keep one peer from taking a node's whole attention.

* :class:`RateLimiter` — a token bucket per peer: ``rate`` requests per second sustained, bursts of up to
  ``burst``. :class:`~p2p.rpc.RPCServer` answers calls over a peer's rate with ``PeerBusy`` before any
  handler runs (so a refusal costs one small reply), and :class:`~p2p.node.Node` resets inbound streams
  over a peer's concurrent-stream cap before any protocol handler sees them.
* :class:`LogThrottle` — at most one log line per key and interval, so a flood of refusals does not
  become a flood of log lines.

Both keep bounded state: idle buckets (full again) and old keys are dropped once the tables grow.
"""
from __future__ import annotations

import time

MAX_TRACKED = 10_000


class RateLimiter:
    """Token bucket per peer: ``allow(peer)`` is True if ``peer`` may start one more request now."""

    def __init__(self, rate: float, burst: float | None = None):
        if not rate > 0:
            raise ValueError(f"rate must be > 0 requests per second, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, when)

    def allow(self, peer: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, when = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if peer not in self._buckets and len(self._buckets) >= MAX_TRACKED:
            self._drop_idle(now)
        self._buckets[peer] = (tokens, now)
        return allowed

    def _drop_idle(self, now: float) -> None:
        refill = self.burst / self.rate
        for peer in [p for p, (_, when) in self._buckets.items() if now - when >= refill]:
            del self._buckets[peer]
        while len(self._buckets) >= MAX_TRACKED:  # everyone is active: forget the least recent
            del self._buckets[min(self._buckets, key=lambda p: self._buckets[p][1])]


class LogThrottle:
    """``should_log(key)`` is True at most once per ``interval`` seconds for each key."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last: dict[object, float] = {}

    def should_log(self, key: object, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if len(self._last) >= MAX_TRACKED:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        self._last[key] = now
        return True

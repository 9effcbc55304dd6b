"""What a client saw of the experts it called: rows, latency and failures per expert and per host.

:class:`~peer.moe.remote.RemoteMixtureOfExperts` records every call here. Trainers publish the totals
(:mod:`peer.training.ledger`): the latency and failure figures of the swarm's expert grid, and the rows
each host served them, against which a host's own claim of served rows is checked.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class CallTotals:
    """Calls to one expert (or one host): forward and backward calls, rows sent, failures, seconds waited."""

    calls: int = 0
    rows: int = 0
    failures: int = 0
    seconds: float = 0.0

    def add(self, rows: int, seconds: float, ok: bool) -> None:
        self.calls += 1
        self.rows += rows if ok else 0
        self.failures += not ok
        self.seconds += seconds

    @property
    def mean_ms(self) -> float | None:
        return 1000 * self.seconds / self.calls if self.calls else None

    def as_list(self) -> list:
        """``[calls, rows, failures, mean_ms]``, the compact form published in DHT records."""
        return [self.calls, self.rows, self.failures, None if self.mean_ms is None else round(self.mean_ms, 2)]


class ExpertCallStats:
    """Totals per expert UID and per host peer ID (thread-safe: layers call from the node's loop)."""

    def __init__(self) -> None:
        self.by_uid: dict[str, CallTotals] = {}
        self.by_host: dict[str, CallTotals] = {}
        self._lock = threading.Lock()

    def record(self, uid: str, host: str, rows: int, seconds: float, ok: bool) -> None:
        """One call of ``uid`` on ``host`` with ``rows`` rows that took ``seconds`` (``ok``: it answered)."""
        with self._lock:
            self.by_uid.setdefault(uid, CallTotals()).add(rows, seconds, ok)
            self.by_host.setdefault(host, CallTotals()).add(rows, seconds, ok)

    def merge(self, other: "ExpertCallStats") -> None:
        """Add ``other``'s totals into ours (a model's layers into one table)."""
        with other._lock:
            tables = [(dict(other.by_uid), self.by_uid), (dict(other.by_host), self.by_host)]
        with self._lock:
            for source, target in tables:
                for key, t in source.items():
                    mine = target.setdefault(key, CallTotals())
                    mine.calls, mine.rows = mine.calls + t.calls, mine.rows + t.rows
                    mine.failures, mine.seconds = mine.failures + t.failures, mine.seconds + t.seconds

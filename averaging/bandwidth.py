"""Our upload rate, measured from our own averaging rounds rather than declared (``--bandwidth`` overrides it).

Each round that sent at least :data:`MIN_BYTES` gives ``bytes sent / seconds from the group forming to our
last part's send ending``: a lower bound on the uplink, since that phase also waits on receivers and on
compression. The estimate is the best of the last :data:`WINDOW` rounds, so one round that shared the link
or waited on a slow receiver does not drag it down, while a link that got slower shows within that many
rounds. Matchmaking announces it, so parts are sized by what each member's uplink has shown it can carry;
it is not used for pacing (pacing at a lower bound would keep a link below what it can do).
"""
from __future__ import annotations

from collections import deque

MIN_BYTES = 256 << 10   # smaller sends measure round trips, not the uplink
WINDOW = 8


class UploadEstimate:
    """The best upload rate (bytes/s) of our last :data:`WINDOW` rounds that sent enough to measure one."""

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=WINDOW)

    def add(self, bytes_sent: int, seconds: float) -> None:
        if bytes_sent >= MIN_BYTES and seconds > 0:
            self.samples.append(bytes_sent / seconds)

    @property
    def bytes_per_s(self) -> float | None:
        return max(self.samples) if self.samples else None

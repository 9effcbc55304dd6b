"""What the members of one averaging group agree on: who they are, and how every round of theirs runs.

:class:`Member` is one peer as matchmaking announced it. :class:`RoundConfig` is fixed when an
:class:`~averaging.averager.Averager` is made (from its :class:`~averaging.config.AveragerConfig` and its
tensors) and handed to every round; it also derives each deadline of a round from the one per-chunk
deadline, so no other module multiplies ``chunk_timeout`` on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import trio

from .compression import Compression

#: what an owner still reducing sends its senders now and then, so that they know it is alive
KEEPALIVE = "wait"


async def keep_alive_until(stream, event: trio.Event, interval: float) -> None:
    """Send :data:`KEEPALIVE` on ``stream`` every ``interval`` seconds until ``event`` is set."""
    while not event.is_set():
        with trio.move_on_after(interval):
            await event.wait()
        if not event.is_set():
            await stream.send_msg(KEEPALIVE)


@dataclass(frozen=True)
class Member:
    """One member of a group as agreed in matchmaking: its upload bytes/s, and whether it accepts connections."""

    peer_id: str
    bandwidth: float
    client: bool


@dataclass(frozen=True)
class RoundConfig:
    """How this averager's rounds move data; the same for every round.

    :param service: the RPC service the group's members serve (``averager.<prefix>``).
    :param compression: how chunks are encoded; ``chunk_elems`` elements a chunk.
    :param chunk_timeout: the longest wait for one chunk or keepalive; a member silent that long is dropped.
    :param max_frame: largest frame on a round's streams; ``window_bytes``: bytes in flight per stream.
    :param pacing: bytes/s our round's bulk uploads may use in all (None: not paced).
    :param clip_tau: CenteredClip radius for the parts we own ("auto": measured per part; None: the exact mean).
    :param max_abs_value: contributions and results beyond +-this are refused and their sender banned.
    """

    service: str
    compression: Compression
    chunk_elems: int
    chunk_timeout: float
    max_frame: int
    window_bytes: int
    pacing: float | None = None
    clip_tau: float | str | None = None
    max_abs_value: float | None = None

    @property
    def start_timeout(self) -> float:
        """How long a round waits for a stream to open and its first frame: a dial and a handshake on a busy
        machine may take longer than one chunk."""
        return 2 * self.chunk_timeout

    @property
    def status_timeout(self) -> float:
        """A repair's status call: the asked member may first wait ``start_timeout`` for its own phase 1."""
        return self.start_timeout + self.chunk_timeout

    @property
    def keepalive_interval(self) -> float:
        """An owner still reducing sends keepalives this often, well within its members' ``chunk_timeout``."""
        return self.chunk_timeout / 3

    @property
    def linger(self) -> float:
        """How long a finished round stays available to members that still repair from it: their repair
        asks for status (``status_timeout``), then fetches (``chunk_timeout``)."""
        return self.status_timeout + self.chunk_timeout

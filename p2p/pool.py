"""Idle streams kept for reuse: opening a stream costs a multistream negotiation (~6 ms here), a round trip
on an open one ~1.4 ms, so plain RPC calls (:func:`p2p.rpc.call`) take a pooled stream when there is one."""
from __future__ import annotations

import trio

from .framing import FramedStream


class StreamPool:
    """Idle RPC streams per (peer, protocol), reused by plain calls.

    A stream goes back to the pool only after a clean ``["ok"|"err", ...]`` reply; any failure or
    cancellation resets it instead. Streams idle longer than ``max_idle`` (well under the servers'
    ``idle_timeout``) are closed rather than reused, so a reused stream is almost never one the server
    has just dropped; if it is, the stream fails before the server saw anything and we retry once.
    """

    def __init__(self, max_idle: float = 20.0, max_per_peer: int = 8):
        self.max_idle, self.max_per_peer = max_idle, max_per_peer
        self._idle: dict[tuple[str, str, str], list[tuple[float, FramedStream]]] = {}
        #: whether an idle stream still rides the connection new streams would take (the host sets it: a
        #: stream opened over a relay is not reused once a hole punch gave a direct connection)
        self.usable = lambda stream: True

    def take(self, key: tuple[str, str, str]) -> FramedStream | None:
        streams, now = self._idle.get(key), trio.current_time()
        while streams:
            stamp, stream = streams.pop()
            if now - stamp < self.max_idle and self.usable(stream):
                return stream
        return None

    def give_back(self, key: tuple[str, str, str], stream: FramedStream) -> bool:
        streams = self._idle.setdefault(key, [])
        if len(streams) >= self.max_per_peer:
            return False
        streams.append((trio.current_time(), stream))
        return True

    def drop_peer(self, peer_id: str) -> None:
        for key in [k for k in self._idle if k[0] == peer_id]:
            del self._idle[key]

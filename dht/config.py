"""DHT settings, in one dataclass so a swarm can tune them together."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DHTConfig:
    """Parameters of our Kademlia.

    :param k: bucket size, and how many nearest peers a lookup converges on (Kademlia's k).
    :param alpha: lookup requests in flight at once (Kademlia's alpha).
    :param num_replicas: how many of the nearest nodes store each record.
    :param rpc_timeout: deadline of one DHT request. A lookup routes around a peer that misses it, so
        it only needs to exceed a busy peer's response time (a few ms on a LAN, ~1 s on a loaded laptop).
    :param refresh_interval: buckets not touched for this long are refreshed by a lookup of a random id in them.
    :param republish_interval: records this node wrote are re-stored to the then-nearest nodes this often,
        so they survive the death of the nodes that held them (until they expire; they are never extended).
    :param cache_on_get: after a get, also store the value at the nearest queried node that lacked it.
    :param max_ttl: records expiring further than this in the future are refused.
    :param max_records, max_bytes: what one node keeps at most (the soonest-expiring go first).
    :param max_batch: records per store request / keys per find request.
    """

    k: int = 20
    alpha: int = 3
    num_replicas: int = 5
    rpc_timeout: float = 3.0
    refresh_interval: float = 600.0
    republish_interval: float = 300.0
    cache_on_get: bool = True
    max_ttl: float = 7 * 24 * 3600.0
    max_records: int = 100_000
    max_bytes: int = 256 << 20
    max_batch: int = 256

    @property
    def dial_timeout(self) -> float:
        """Connecting to a peer, then its first request: a TCP and Noise handshake (a round trip or two) plus
        one ``rpc_timeout``; the server's handler deadline is the same (its storage work, then its answer)."""
        return 2 * self.rpc_timeout

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha < 1 or not 1 <= self.num_replicas <= self.k:
            raise ValueError("DHTConfig needs k >= 1, alpha >= 1 and 1 <= num_replicas <= k")
        if self.rpc_timeout <= 0 or self.refresh_interval <= 0 or self.republish_interval <= 0:
            raise ValueError("DHTConfig timeouts and intervals must be positive")

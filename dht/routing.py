"""The Kademlia routing table: which peers a node knows, organised by XOR distance.

Implements the routing-table rules of Maymounkov & Mazieres, "Kademlia" (2002):

* Section 2.2 -- k-buckets. The id space is partitioned into buckets of at most ``k`` peers, ordered
  least-recently-seen first. A contact from a known peer moves it to the tail. A new peer is inserted
  if its bucket has room. Otherwise the least-recently-seen peer is pinged by the caller: if it answers,
  the newcomer is dropped (kept only in a replacement cache); if not, it is evicted and the freshest
  replacement takes its place (section 4.1 describes the replacement cache).
* Section 2.4 / 4.2 -- bucket splitting. A full bucket is split in two if its range contains our own
  id, or (the relaxation of section 4.2 for b-bit digits) if its depth is not a multiple of
  ``depth_modulo``; otherwise the newcomer goes to the replacement cache.
* Section 2.3 -- refresh: buckets not touched for a while are refreshed by a lookup of a random id in
  their range (:meth:`RoutingTable.stale_bucket_ids`).

The table never sends anything itself: the caller pings and looks up, then reports back.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections import OrderedDict
from typing import Callable

from dht.records import DHTID, HASH_BITS

logger = logging.getLogger(__name__)

__all__ = ["KBucket", "PeerInfo", "RoutingTable"]


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """A contact in the routing table.

    Attributes:
        node_id: the peer's DHT id; must be ``DHTID.from_peer_id(peer_id)`` (derive it yourself, never
            trust an id a remote peer claims -- see :meth:`from_peer_id`).
        peer_id: the libp2p peer ID in base58.
        addrs: multiaddresses where the peer can be dialed, as strings.
    """

    node_id: DHTID
    peer_id: str
    addrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, DHTID):
            object.__setattr__(self, "node_id", DHTID(self.node_id))
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ValueError(f"PeerInfo.peer_id must be a non-empty str, got {self.peer_id!r}")
        addrs = tuple(self.addrs)
        if not all(isinstance(addr, str) for addr in addrs):
            raise ValueError(f"PeerInfo.addrs must be multiaddr strings, got {addrs!r}")
        object.__setattr__(self, "addrs", addrs)

    @classmethod
    def from_peer_id(cls, peer_id: str, addrs: tuple[str, ...] | list[str] = ()) -> "PeerInfo":
        """A PeerInfo whose node_id is derived from ``peer_id`` (the only trustworthy way)."""
        return cls(DHTID.from_peer_id(peer_id), peer_id, tuple(addrs))


class KBucket:
    """The peers of one aligned id range ``[lower, upper)`` (its size is a power of two).

    Attributes:
        peers: ``OrderedDict[node_id, PeerInfo]``, least-recently-seen first, at most ``k`` entries.
        replacements: candidates met while the bucket was full, freshest last, at most ``k`` entries.
        last_updated: ``time.monotonic()``-style time of the last contact with this range.
    """

    def __init__(self, lower: int, upper: int, k: int, last_updated: float | None = None) -> None:
        size = upper - lower
        if not 0 <= lower < upper <= DHTID.MAX:
            raise ValueError(f"bucket range must satisfy 0 <= lower < upper <= 2**{HASH_BITS}, got [{lower}, {upper})")
        if size & (size - 1) or lower % size:
            raise ValueError(f"bucket range [{lower}, {upper}) must be an aligned power-of-two block")
        if k < 1:
            raise ValueError(f"bucket size k must be >= 1, got {k}")
        self.lower, self.upper, self.k = lower, upper, k
        self.peers: OrderedDict[DHTID, PeerInfo] = OrderedDict()
        self.replacements: OrderedDict[DHTID, PeerInfo] = OrderedDict()
        self.last_updated = time.monotonic() if last_updated is None else last_updated

    @property
    def depth(self) -> int:
        """Number of leading id bits shared by the whole range (0 for the full id space)."""
        return HASH_BITS - ((self.upper - self.lower).bit_length() - 1)

    def covers(self, node_id: int) -> bool:
        """True iff ``node_id`` falls in this bucket's range."""
        return self.lower <= node_id < self.upper

    @property
    def is_full(self) -> bool:
        """True iff the bucket holds ``k`` active peers."""
        return len(self.peers) >= self.k

    def __len__(self) -> int:
        return len(self.peers)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.peers

    def least_recently_seen(self) -> PeerInfo | None:
        """The head of the bucket: the peer to ping when a newcomer wants its place."""
        return next(iter(self.peers.values()), None)

    def touch(self, peer: PeerInfo) -> bool:
        """Record a contact: move a known peer to the tail (updating its info) or insert it if there is
        room. Returns False, changing nothing, if the peer is new and the bucket is full."""
        if peer.node_id in self.peers:
            self.peers[peer.node_id] = peer
            self.peers.move_to_end(peer.node_id)
        elif self.is_full:
            return False
        else:
            self.replacements.pop(peer.node_id, None)
            self.peers[peer.node_id] = peer
        return True

    def add_replacement(self, peer: PeerInfo) -> None:
        """Remember ``peer`` as the freshest replacement candidate, dropping the stalest beyond ``k``."""
        self.replacements[peer.node_id] = peer
        self.replacements.move_to_end(peer.node_id)
        while len(self.replacements) > self.k:
            self.replacements.popitem(last=False)

    def remove(self, node_id: int) -> tuple[PeerInfo | None, PeerInfo | None]:
        """Forget ``node_id``; returns ``(removed peer or None, promoted replacement or None)``.

        Removing an active peer promotes the freshest replacement into the bucket (at the tail).
        Removing a replacement candidate just drops it (and reports nothing removed).
        """
        removed = self.peers.pop(node_id, None)  # type: ignore[call-overload]
        if removed is None:
            self.replacements.pop(node_id, None)  # type: ignore[call-overload]
            return None, None
        promoted = None
        if self.replacements:
            _, promoted = self.replacements.popitem(last=True)
            self.peers[promoted.node_id] = promoted
        return removed, promoted

    def split(self) -> tuple["KBucket", "KBucket"]:
        """Two buckets for the lower and upper halves of the range, keeping peer and replacement order."""
        if self.upper - self.lower < 2:
            raise ValueError("a bucket covering a single id cannot be split")
        middle = (self.lower + self.upper) // 2
        halves = (KBucket(self.lower, middle, self.k, self.last_updated),
                  KBucket(middle, self.upper, self.k, self.last_updated))
        for node_id, peer in self.peers.items():
            halves[node_id >= middle].peers[node_id] = peer
        for node_id, peer in self.replacements.items():
            halves[node_id >= middle].replacements[node_id] = peer
        return halves

    def random_id(self) -> DHTID:
        """A uniformly random id inside this bucket's range."""
        return DHTID.random(self.lower, self.upper)

    def __repr__(self) -> str:
        return f"KBucket(depth={self.depth}, lower={self.lower:#x}, peers={len(self.peers)}, k={self.k})"


class RoutingTable:
    """Kademlia routing table of the node ``node_id`` (see the module docstring for the rules).

    Args:
        node_id: our own DHT id; it is never added to the table.
        k: bucket size (peers per bucket, also the replication factor used by lookups).
        depth_modulo: the ``b`` of section 4.2 -- buckets far from our id are split only until their
            depth is a multiple of this, giving ``2**b``-ary routing with fewer hops.
        clock: monotonic clock for bucket freshness (injectable for tests).
    """

    def __init__(self, node_id: int, k: int = 20, depth_modulo: int = 5,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        if k < 1 or depth_modulo < 1:
            raise ValueError(f"k and depth_modulo must be >= 1, got k={k}, depth_modulo={depth_modulo}")
        self.node_id = node_id if isinstance(node_id, DHTID) else DHTID(node_id)
        self.k = k
        self.depth_modulo = depth_modulo
        self._clock = clock
        #: Buckets sorted by range; together they partition the whole id space.
        self.buckets: list[KBucket] = [KBucket(DHTID.MIN, DHTID.MAX, k, clock())]
        self._node_by_peer_id: dict[str, DHTID] = {}

    def bucket_index(self, node_id: int) -> int:
        """Index in :attr:`buckets` of the bucket whose range contains ``node_id``."""
        if not DHTID.MIN <= node_id < DHTID.MAX:
            raise ValueError(f"node id out of range: {node_id}")
        return bisect.bisect_right(self.buckets, node_id, key=lambda bucket: bucket.lower) - 1

    def bucket_for(self, node_id: int) -> KBucket:
        """The bucket whose range contains ``node_id``."""
        return self.buckets[self.bucket_index(node_id)]

    def add_or_update(self, peer: PeerInfo) -> PeerInfo | None:
        """Record that we heard from ``peer`` (section 2.2).

        Returns None if the peer is now in the table (moved to the tail or inserted, splitting buckets
        as needed) or is ourselves (ignored). If its bucket is full and may not split, the peer is kept
        as a replacement candidate and the bucket's least-recently-seen peer is returned: the caller
        should ping it and call :meth:`remove` with its node_id if it does not answer, which promotes
        the freshest candidate.
        """
        if not isinstance(peer, PeerInfo):
            raise TypeError(f"add_or_update expects a PeerInfo, got {type(peer).__name__}")
        if peer.node_id == self.node_id:
            return None
        previous_id = self._node_by_peer_id.get(peer.peer_id)
        if previous_id is not None and previous_id != peer.node_id:
            self.remove(previous_id)
        now = self._clock()
        while True:
            index = self.bucket_index(peer.node_id)
            bucket = self.buckets[index]
            known = bucket.peers.get(peer.node_id)
            if bucket.touch(peer):
                bucket.last_updated = now
                if known is not None and known.peer_id != peer.peer_id:
                    self._node_by_peer_id.pop(known.peer_id, None)
                self._node_by_peer_id[peer.peer_id] = peer.node_id
                return None
            if self._may_split(bucket):
                self.buckets[index:index + 1] = bucket.split()
                logger.debug("split bucket at depth %d into two", bucket.depth)
                continue
            bucket.add_replacement(peer)
            bucket.last_updated = now
            return bucket.least_recently_seen()

    def _may_split(self, bucket: KBucket) -> bool:
        if bucket.upper - bucket.lower < 2:
            return False
        return bucket.covers(self.node_id) or bucket.depth % self.depth_modulo != 0

    def remove(self, node_id: int) -> PeerInfo | None:
        """Forget ``node_id`` (e.g. it failed to answer a ping); the freshest replacement candidate of its
        bucket takes its place. Returns the removed peer, or None if it was not an active peer."""
        removed, promoted = self.bucket_for(node_id).remove(node_id)
        if removed is not None:
            self._node_by_peer_id.pop(removed.peer_id, None)
        if promoted is not None:
            self._node_by_peer_id[promoted.peer_id] = promoted.node_id
        return removed

    def get(self, node_id: int | None = None, peer_id: str | None = None) -> PeerInfo | None:
        """The active peer with this node_id or this peer_id (give exactly one), or None."""
        if (node_id is None) == (peer_id is None):
            raise ValueError("RoutingTable.get takes exactly one of node_id or peer_id")
        if peer_id is not None:
            node_id = self._node_by_peer_id.get(peer_id)
            if node_id is None:
                return None
        if not isinstance(node_id, int) or not DHTID.MIN <= node_id < DHTID.MAX:
            return None
        return self.bucket_for(node_id).peers.get(node_id)  # type: ignore[call-overload]

    def nearest(self, target: int, count: int, exclude: int | None = None) -> list[PeerInfo]:
        """Up to ``count`` active peers closest to ``target`` by XOR distance, closest first, skipping
        ``exclude`` (typically the id of the peer asking).

        Each bucket is an aligned block of ``2**m`` ids, so its XOR distances to ``target`` form another
        aligned block starting at ``(lower ^ target)`` with the low ``m`` bits cleared; these blocks do
        not overlap, so visiting buckets in order of that start yields peers in exact distance order.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        target = int(target)

        def block_start(bucket: KBucket) -> int:
            return (bucket.lower ^ target) & ~(bucket.upper - bucket.lower - 1)

        result: list[PeerInfo] = []
        for bucket in sorted(self.buckets, key=block_start):
            if len(result) >= count:
                break
            candidates = sorted(
                (peer for node_id, peer in bucket.peers.items() if node_id != exclude),
                key=lambda peer: peer.node_id ^ target,
            )
            result.extend(candidates[: count - len(result)])
        return result

    def touch_bucket(self, node_id: int, now: float | None = None) -> None:
        """Mark the bucket containing ``node_id`` as fresh (call after a lookup into its range)."""
        self.bucket_for(node_id).last_updated = self._clock() if now is None else now

    def stale_bucket_ids(self, older_than: float, now: float | None = None) -> list[DHTID]:
        """A random id inside each bucket not updated for ``older_than`` seconds (section 2.3): look each
        one up to refresh that bucket. ``now`` defaults to the table's monotonic clock."""
        now = self._clock() if now is None else now
        return [bucket.random_id() for bucket in self.buckets if now - bucket.last_updated >= older_than]

    def all_peers(self) -> list[PeerInfo]:
        """Every active peer (not replacement candidates), bucket by bucket."""
        return [peer for bucket in self.buckets for peer in bucket.peers.values()]

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    def __contains__(self, item: object) -> bool:
        """``node_id in table`` (or a peer_id str) for active peers."""
        if isinstance(item, str):
            return item in self._node_by_peer_id
        return isinstance(item, int) and self.get(node_id=item) is not None

    def __repr__(self) -> str:
        return f"RoutingTable(node_id={self.node_id!r}, peers={len(self)}, buckets={len(self.buckets)})"

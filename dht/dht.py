"""``DHT``: the user-facing Kademlia node — store/get with expirations and sub-keys, from sync or trio code.

Records live on the ``num_replicas`` nodes nearest to sha1(key). Per key (and per sub-key) the value
with the latest expiration wins on every node, and a get merges what it finds the same way, so the
answer does not depend on which node is asked. Expired values are never returned. A node republishes
the records it wrote (to the then-nearest nodes, same expiration) so they outlive the nodes that held
them, refreshes idle buckets, and purges expired records.

Example::

    dht = DHT(initial_peers=["/ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."])
    dht.store("experts", {"host": "a"}, get_dht_time() + 60, subkey=dht.peer_id)
    dht.get("experts", latest=True)   # ValueWithExpiration({peer_id: ValueWithExpiration(...)}, exp)
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import trio

from p2p import Node, P2PError
from p2p.config import NodeConfig

from .config import DHTConfig
from .crawl import crawl_peers
from .protocol import DHTProtocol
from .records import DHTID, Record, ValueWithExpiration, deserialize, get_dht_time, serialize
from .routing import PeerInfo, RoutingTable
from .storage import RecordStore
from .traverse import lookup
from .validation import CompositeValidator, OwnerSignatureValidator, RecordValidator, SchemaValidator, \
    ValidationError

logger = logging.getLogger(__name__)

#: Key lookups one store_many/republish call runs at once. Each keeps up to num_replicas requests in flight;
#: unbounded, a node republishing hundreds of records floods its peers until their answers time out and
#: records land on fewer replicas.
MAX_PARALLEL_LOOKUPS = 4


class DHTBootstrapError(P2PError):
    """None of the initial peers could be reached."""


class DHT:
    """A Kademlia DHT node with hivemind-style records (expiration, sub-keys, owner signatures).

    :param initial_peers: full multiaddrs (``/ip4/.../tcp/.../p2p/<id>``) of peers already in the swarm;
        empty to start a new swarm.
    :param node: an existing :class:`p2p.Node` to run on; otherwise one is created from ``node_config``
        (:class:`p2p.NodeConfig`: swarm, addresses, identity, client mode — only ask, never answer or enter
        other nodes' routing tables —, pre-shared key, allowlist, bulk port) and stopped by :meth:`shutdown`.
    :param validators: extra record validators (e.g. a :class:`SchemaValidator`); owner signatures are
        always checked. Every node of a swarm should use the same validators.
    :param config: :class:`DHTConfig` (bucket size, replicas, timeouts, intervals).
    """

    def __init__(self, initial_peers: Sequence[str] = (), *, node: Node | None = None,
                 node_config: NodeConfig | None = None, validators: Sequence[RecordValidator] = (),
                 config: DHTConfig | None = None, start: bool = True):
        if node is not None and node_config is not None:
            raise ValueError("give a DHT either a running node or the config of its own, not both")
        self.config = config or DHTConfig()
        self.initial_peers = list(initial_peers)
        self._owns_node = node is None
        self.node = node or Node(node_config, start=False)
        self.client_mode = self.node.client_mode
        self.node_id = DHTID.from_peer_id(self.node.peer_id)
        self.routing = RoutingTable(self.node_id, k=self.config.k)
        self.storage = RecordStore(max_records=self.config.max_records, max_bytes=self.config.max_bytes)
        self.validator = CompositeValidator([OwnerSignatureValidator(), SchemaValidator(), *validators])
        self._owned: dict[tuple[DHTID, bytes | None], Record] = {}
        self.protocol: DHTProtocol | None = None
        self.tasks = None   # our background tasks (maintenance, replica stores), in a nursery of their own
        self._rejoin_lock = trio.Lock()
        self._rejoined_at = -math.inf
        if start:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "DHT":
        """Start the node, join through the initial peers and begin maintenance. Idempotent."""
        if self.tasks is not None and not self.tasks.closed:
            return self
        self.node.start()
        try:
            # behind a NAT the node turns private (reachable through relays, a DHT client) before we serve
            self.node.run(self.node.settle_reachability, self.initial_peers)
        except BaseException:
            if self._owns_node:
                self.node.stop()
            raise
        self.client_mode = self.node.client_mode
        self.node.relay_candidates = self._relay_candidates
        self.tasks = self.node.task_group(f"dht {self.peer_id[-8:]}")
        self.protocol = DHTProtocol(self.node, self.routing, self.storage, self.validator, self.config,
                                    self.client_mode, self.tasks)
        try:
            self.node.run(self.bootstrap)
        except BaseException:
            if self._owns_node:
                self.node.stop()
            raise
        self.tasks.spawn(self._maintain)
        return self

    def _relay_candidates(self) -> list[tuple[str, list[str]]]:
        """Public peers a private node may reserve relay slots on: those of our routing table (only public
        peers enter routing tables), nearest first."""
        return [(p.peer_id, list(p.addrs)) for p in self.routing.nearest(self.node_id, 20)]

    async def bootstrap(self, initial_peers: Sequence[str] | None = None) -> int:
        """Ping the initial peers, then look up our own id to fill the routing table; returns peers known."""
        maddrs = self.initial_peers if initial_peers is None else list(initial_peers)
        reached: list[str] = []

        async def join(maddr: str) -> None:
            try:
                peer_id = await self.node.connect(maddr, timeout=self.config.dial_timeout)
                peer = PeerInfo(DHTID.from_peer_id(peer_id), peer_id, (maddr,))
                for _attempt in range(2):  # a busy initial peer (a swarm starting at once) may miss one deadline
                    if await self.protocol.ping(peer) is not None:
                        self.protocol.observe(peer)
                        reached.append(maddr)
                        return
                logger.warning("Initial peer %s did not answer a ping", maddr)
            except (P2PError, ValueError) as e:
                logger.warning("Initial peer %s is unreachable: %s", maddr, e)

        async with trio.open_nursery() as nursery:
            for maddr in maddrs:
                nursery.start_soon(join, maddr)
        if maddrs and not reached:
            raise DHTBootstrapError(f"none of the {len(maddrs)} initial peers answered: {', '.join(maddrs)}")
        if reached:
            await lookup(self.protocol, self.node_id, want_values=False)
        logger.info("DHT %s joined: %d initial peers answered, %d peers known", self.peer_id[-8:], len(reached),
                    len(self.routing))
        return len(self.routing)

    async def rejoin_if_alone(self) -> bool:
        """Join again through the initial peers if the routing table has emptied; True if it did.

        Kademlia forgets a peer that fails a request. A node that was asleep (a laptop lid, SIGSTOP) or cut off
        finds on waking that all its requests failed, forgets everybody, and the others have forgotten it:
        it would stay alone, its lookups answered by nobody. So before a lookup, a node that knows no peer
        joins again (:meth:`bootstrap`), at most once per ``rpc_timeout`` (what one failed attempt costs),
        and first forgives every suspect (:meth:`~dht.protocol.DHTProtocol.forgive_all`): when all peers failed
        at once, the fault was ours.
        """
        if len(self.routing) or not self.initial_peers:
            return False
        async with self._rejoin_lock:  # concurrent lookups wait for one join instead of each starting one
            if len(self.routing) or trio.current_time() - self._rejoined_at < self.config.rpc_timeout:
                return False
            self._rejoined_at = trio.current_time()
            logger.info("DHT %s knows no peer any more: joining again through its %d initial peers",
                        self.peer_id[-8:], len(self.initial_peers))
            self.protocol.forgive_all()
            try:
                await self.bootstrap()
            except DHTBootstrapError as e:
                logger.info("DHT %s could not join again: %s", self.peer_id[-8:], e)
                return False
            return True

    def shutdown(self) -> None:
        """Stop maintenance (our tasks are cancelled) and, if this DHT created its node, stop the node."""
        if self.tasks is not None:
            self.tasks.close()
        if self._owns_node:
            self.node.stop()

    def __enter__(self) -> "DHT":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.node.addrs

    # ------------------------------------------------------------------ trio API
    def make_record(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> Record:
        """Serialize, sign (when we own the key/sub-key) and validate a record; raises ValidationError."""
        record = Record.create(key, value, expiration_time, subkey)
        record = self.validator.sign(record, self.node.key_pair.private_key)
        self.validator.validate(record)
        return record

    async def astore_many(self, records: Sequence[Record], *, republish: bool = True) -> list[bool]:
        """Store records on the nodes nearest to their keys; True where at least one node accepted it."""
        await self.rejoin_if_alone()
        now = get_dht_time()
        accepted = [False] * len(records)
        by_key: dict[DHTID, list[int]] = {}
        for i, record in enumerate(records):
            if record.expiration_time > now:
                by_key.setdefault(record.key_id, []).append(i)
                if republish:
                    self._owned[(record.key_id, record.subkey)] = record
        batches: dict[str, tuple[PeerInfo, list[int]]] = {}
        spares: dict[DHTID, list[PeerInfo]] = {}  # answered the lookup but are not among the nearest
        missing: dict[DHTID, int] = {}  # replicas of a key that a target failed to take
        late: dict[str, tuple[PeerInfo, list[int]]] = {}   # peers too slow to wait for in the lookups

        lookups = trio.CapacityLimiter(MAX_PARALLEL_LOOKUPS)

        async def locate(key_id: DHTID, indices: list[int]) -> None:
            async with lookups:
                found = await lookup(self.protocol, key_id, want_values=False, count=self.config.num_replicas)
            targets = found.nearest[: self.config.num_replicas]
            spares[key_id] = found.nearest[self.config.num_replicas:]
            for peer in found.slow:   # maybe replicas too: they get the records without the caller waiting on them
                late.setdefault(peer.peer_id, (peer, []))[1].extend(indices)
            if self._is_replica(key_id, targets):
                for i in indices:
                    accepted[i] |= self.protocol.accept(records[i])[0]
                # we are one of the num_replicas nearest nodes: the replica set is the same whoever writes,
                # so a write from inside it must not spill onto the next-nearest node (where an older value
                # could then win a get)
                targets = targets[: self.config.num_replicas - 1]
            for peer in targets:
                batches.setdefault(peer.peer_id, (peer, []))[1].extend(indices)

        async def send(peer: PeerInfo, indices: list[int], note_failures: bool) -> None:
            for start in range(0, len(indices), self.config.max_batch):
                part = indices[start:start + self.config.max_batch]
                reply = await self.protocol.store(peer, [records[i] for i in part])
                if reply is None and note_failures:
                    for key_id in {records[i].key_id for i in part}:
                        missing[key_id] = missing.get(key_id, 0) + 1
                for i, item in zip(part, reply or []):
                    ok = isinstance(item, list) and len(item) == 2 and item[0] is True
                    accepted[i] |= ok
                    if isinstance(item, list) and len(item) == 2 and item[1]:
                        logger.warning("Peer %s refused a record: %s", peer.peer_id[-8:], item[1])

        async with trio.open_nursery() as nursery:
            for key_id, indices in by_key.items():
                nursery.start_soon(locate, key_id, indices)
        for peer, indices in late.values():
            if peer.peer_id not in batches:
                self.tasks.spawn(send, peer, indices, False)
        async with trio.open_nursery() as nursery:
            for peer, indices in batches.values():
                nursery.start_soon(send, peer, indices, True)
        # A target that did not answer (dead since the lookup, or overloaded) would leave its keys one replica
        # short until the next republish: give those replicas to the next-nearest peers that answered.
        retries: dict[str, tuple[PeerInfo, list[int]]] = {}
        for key_id, count in missing.items():
            for peer in spares.get(key_id, [])[:count]:
                retries.setdefault(peer.peer_id, (peer, []))[1].extend(by_key[key_id])
        async with trio.open_nursery() as nursery:
            for peer, indices in retries.values():
                nursery.start_soon(send, peer, indices, False)
        return accepted

    def _is_replica(self, key_id: DHTID, nearest: list[PeerInfo]) -> bool:
        """We store a record ourselves when we are among the num_replicas nearest nodes we know of."""
        if self.client_mode:
            return False
        if len(nearest) < self.config.num_replicas:
            return True
        return (self.node_id ^ key_id) < (nearest[-1].node_id ^ key_id)

    async def aget_many(self, keys: Sequence[Any], latest: bool = False) -> dict[Any, ValueWithExpiration | None]:
        """Look up several keys at once; see :meth:`get`."""
        out: dict[Any, ValueWithExpiration | None] = {}

        async def one(key: Any) -> None:
            out[key] = await self._aget(key, latest)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
        return out

    async def aget(self, key: Any, latest: bool = False) -> ValueWithExpiration | None:
        return await self._aget(key, latest)

    async def _aget(self, key: Any, latest: bool) -> ValueWithExpiration | None:
        await self.rejoin_if_alone()
        key_id = DHTID.from_key_bytes(serialize(key))
        merged = RecordStore()
        local = self.storage.get(key_id)
        for record in (local.values() if isinstance(local, dict) else [local] if local else []):
            merged.store(record)
        if local is None or latest:
            found = await lookup(self.protocol, key_id, want_values=True, stop_on_value=not latest,
                                 count=self.config.num_replicas)
            for record in found.records:
                merged.store(record)
            if self.config.cache_on_get and found.records:
                self._cache(found, merged.get(key_id))
        return _to_user_value(merged.get(key_id))

    def _cache(self, found, value: Record | dict | None) -> None:
        """Kademlia caching: store the value at the nearest queried node that did not return it."""
        records = list(value.values()) if isinstance(value, dict) else [value] if value else []
        for peer in found.nearest:
            if peer.peer_id not in found.holders:
                self.tasks.spawn(self.protocol.store, peer, records)
                return

    # ------------------------------------------------------------------ sync API
    def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        """Store ``value`` under ``key`` (and ``subkey``) until ``expiration_time`` (unix time).

        Returns True if at least one node accepted it (False: every node already had a newer value).
        Raises :class:`~dht.validation.ValidationError` before sending anything if the record is invalid.
        """
        record = self.make_record(key, value, expiration_time, subkey)
        return self.node.run(self.astore_many, [record])[0]

    def store_many(self, items: Sequence[tuple]) -> list[bool]:
        """Batch :meth:`store`: ``items`` are ``(key, value, expiration_time[, subkey])`` tuples."""
        records = [self.make_record(*item) for item in items]
        return self.node.run(self.astore_many, records)

    def get(self, key: Any, latest: bool = False) -> ValueWithExpiration | None:
        """The value under ``key`` with its expiration, or None.

        Sub-keyed values come back as ``ValueWithExpiration({subkey: ValueWithExpiration}, max expiration)``.
        ``latest=False`` returns as soon as some node has a value; ``latest=True`` asks all the nearest
        nodes and merges their answers (use it when the value changes often).
        """
        return self.node.run(self.aget, key, latest)

    def get_many(self, keys: Sequence[Any], latest: bool = False) -> dict[Any, ValueWithExpiration | None]:
        """Batch :meth:`get`."""
        return self.node.run(self.aget_many, keys, latest)

    def crawl(self, max_peers: int = 1000, timeout: float = 10.0) -> list[dict]:
        """Every reachable peer: ``{"peer_id", "addrs", "version"}``, walking routing tables from ours."""
        return self.node.run(crawl_peers, self.protocol, max_peers, timeout)

    # ------------------------------------------------------------------ maintenance
    async def _maintain(self) -> None:
        """Periodically purge expired records, refresh idle buckets and republish our own records."""
        period = min(self.config.refresh_interval, self.config.republish_interval) / 2
        last_republish = trio.current_time()
        while True:
            await trio.sleep(period)
            try:
                await self.rejoin_if_alone()
                self.storage.purge_expired()
                for random_id in self.routing.stale_bucket_ids(self.config.refresh_interval):
                    await lookup(self.protocol, random_id, want_values=False)
                if trio.current_time() - last_republish >= self.config.republish_interval:
                    last_republish = trio.current_time()
                    await self.republish()
            except Exception:  # maintenance must never die; it retries next period
                logger.exception("DHT maintenance step failed")

    async def republish(self) -> int:
        """Re-store the live records we wrote to the currently nearest nodes; returns how many."""
        now = get_dht_time()
        for key in [k for k, r in self._owned.items() if r.expiration_time <= now]:
            del self._owned[key]
        records = list(self._owned.values())
        if records:
            await self.astore_many(records, republish=False)
            logger.debug("Republished %d records", len(records))
        return len(records)


def _to_user_value(value: Record | dict | None) -> ValueWithExpiration | None:
    if value is None:
        return None
    if isinstance(value, Record):
        return ValueWithExpiration(deserialize(value.value), value.expiration_time)
    items = {deserialize(sub): ValueWithExpiration(deserialize(r.value), r.expiration_time) for sub, r in value.items()}
    return ValueWithExpiration(items, max(v.expiration_time for v in items.values()))


__all__ = ["DHT", "DHTBootstrapError", "DHTConfig", "ValidationError", "SchemaValidator"]

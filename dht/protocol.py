"""The DHT's wire protocol: ping, store, find and peers RPCs, plus routing-table upkeep.

Every request carries the sender's announce addresses and whether it is a client. A server adds a
non-client sender to its routing table (Kademlia: every message received updates the bucket of its
sender); a client-mode sender is answered but never added, so peers behind NAT never end up in
others' tables. Records are validated on every node; a rejected record comes back with the reason.

Requests (``args``) and replies:

* ``ping {sender}`` -> ``{"v": version, "addrs": [...]}``
* ``store {sender, records: [wire record]}`` -> ``[[accepted: bool, error: str | None], ...]``
* ``find {sender, keys: [20-byte id], values: bool}`` -> ``[[records or None, [[peer_id, addrs], ...]], ...]``
* ``peers {sender}`` -> ``{"v": version, "peers": [[peer_id, addrs], ...]}`` (for crawling)
"""
from __future__ import annotations

import logging
from typing import Any

import trio

from p2p import Node, P2PError, ServiceLimits
from p2p.errors import RemoteError
from p2p.host import ADDR_TTL
from p2p.rpc import CallContext
from p2p.tasks import TaskGroup

from .config import DHTConfig
from .records import DHTID, MalformedRecord, Record, get_dht_time
from .routing import PeerInfo, RoutingTable
from .storage import RecordStore
from .validation import RecordValidator, ValidationError

logger = logging.getLogger(__name__)

SERVICE = "dht"
PROTOCOL_VERSION = "swarmtrain-dht/1"
MAX_ADDRS = 8
MAX_REMEMBERED_ADDRS = 10_000  # peers whose addresses we skip re-parsing (cleared past this)
#: A peer that missed a request is not asked again (find/store) for this long, however many other peers
#: still name it in their replies, unless it contacts us first. Without this, one frozen peer (SIGSTOP, a
#: cut cable: TCP stays open, nothing answers) cost every lookup a full rpc_timeout: storing an expert host's
#: 26 declarations took 18 s instead of 0.1 s, longer than the records live.
SUSPECT_SECONDS = 30.0


def parse_peer(item: Any) -> PeerInfo | None:
    """``[peer_id, [addrs]]`` from the wire -> PeerInfo, or None if malformed (never raises)."""
    try:
        peer_id, addrs = item
        if not isinstance(peer_id, str) or not isinstance(addrs, list):
            return None
        addrs = tuple(a for a in addrs[:MAX_ADDRS] if isinstance(a, str) and len(a) < 256)
        return PeerInfo(DHTID.from_peer_id(peer_id), peer_id, addrs)
    except Exception:
        return None


def peer_to_wire(peer: PeerInfo) -> list:
    return [peer.peer_id, list(peer.addrs)]


class DHTProtocol:
    """Serves the DHT RPCs of one node and calls those of others, keeping the routing table fresh."""

    def __init__(self, node: Node, routing: RoutingTable, storage: RecordStore, validator: RecordValidator,
                 config: DHTConfig, client_mode: bool, tasks: TaskGroup):
        self.node, self.routing, self.storage, self.validator = node, routing, storage, validator
        self.tasks = tasks  # the owning DHT's background tasks (stale-peer checks)
        self.config, self.client_mode = config, client_mode
        self.node_id = routing.node_id
        self._checking: set[int] = set()
        # peer_id -> (addrs, trio time) last given to the peerstore: parsing multiaddrs costs ~0.1 ms each,
        # so unchanged addresses are re-added only when half their peerstore TTL has passed.
        self._addrs_given: dict[str, tuple[tuple[str, ...], float]] = {}
        self._failed_at: dict[int, float] = {}  # node id -> when it last missed a request
        self._sender_info: dict | None = None
        if not client_mode:
            node.serve(SERVICE, {"ping": self._rpc_ping, "store": self._rpc_store, "find": self._rpc_find,
                                 "peers": self._rpc_peers},
                       limits=ServiceLimits(max_message_bytes=16 << 20, max_concurrent_per_peer=32,
                                            handler_timeout=config.dial_timeout))

    # ------------------------------------------------------------------ server side
    def _sender(self, ctx: CallContext, args: Any) -> dict:
        if not isinstance(args, dict) or not isinstance(args.get("sender"), dict):
            raise MalformedRecord("DHT request must be a dict with a 'sender' dict")
        sender = args["sender"]
        if not sender.get("client", False):
            addrs = sender.get("addrs")
            peer = parse_peer([ctx.peer_id, addrs if isinstance(addrs, list) else []])
            if peer is not None and peer.addrs:
                self.observe(peer)
        return sender

    async def _rpc_ping(self, ctx: CallContext, args: Any) -> dict:
        self._sender(ctx, args)
        return {"v": PROTOCOL_VERSION, "addrs": self.node.addrs}

    async def _rpc_peers(self, ctx: CallContext, args: Any) -> dict:
        self._sender(ctx, args)
        return {"v": PROTOCOL_VERSION, "peers": [peer_to_wire(p) for p in self.routing.all_peers()[:1000]]}

    async def _rpc_store(self, ctx: CallContext, args: Any) -> list:
        self._sender(ctx, args)
        records = args.get("records")
        if not isinstance(records, list) or len(records) > self.config.max_batch:
            raise MalformedRecord(f"'records' must be a list of at most {self.config.max_batch} records")
        return [self.accept(wire) for wire in records]

    def accept(self, wire: Any) -> list:
        """Validate and store one wire record; ``[accepted, error-or-None]``."""
        try:
            record = wire if isinstance(wire, Record) else Record.from_wire(wire)
            now = get_dht_time()
            if record.expiration_time > now + self.config.max_ttl:
                raise ValidationError(f"expiration is more than {self.config.max_ttl:.0f}s in the future")
            self.validator.validate(record)
            return [self.storage.store(record, now=now), None]
        except (MalformedRecord, ValidationError) as e:
            logger.info("Refused a DHT record: %s", e)
            return [False, str(e)]

    async def _rpc_find(self, ctx: CallContext, args: Any) -> list:
        sender = self._sender(ctx, args)
        keys = args.get("keys")
        if not isinstance(keys, list) or len(keys) > self.config.max_batch or \
                not all(isinstance(k, bytes) and len(k) == 20 for k in keys):
            raise MalformedRecord(f"'keys' must be a list of at most {self.config.max_batch} 20-byte ids")
        want_values = bool(args.get("values", True))
        requester = None if sender.get("client") else DHTID.from_peer_id(ctx.peer_id)
        out = []
        for raw in keys:
            key_id = DHTID.from_bytes(raw)
            found = self.storage.get(key_id) if want_values else None
            if isinstance(found, Record):
                found = [found.to_wire()]
            elif isinstance(found, dict):
                found = [r.to_wire() for r in found.values()]
            nearest = self.routing.nearest(key_id, self.config.k, exclude=requester)
            out.append([found, [peer_to_wire(p) for p in nearest]])
        return out

    # ------------------------------------------------------------------ routing upkeep
    def observe(self, peer: PeerInfo) -> None:
        """Kademlia's bucket update on contact; if the bucket is full, ping its least-recently-seen peer."""
        if peer.node_id == self.node_id or not self.node.is_allowed(peer.peer_id):
            return
        self._failed_at.pop(peer.node_id, None)  # it is alive: ask it again
        self._give_addrs(peer)
        stale = self.routing.add_or_update(peer)
        if stale is not None and stale.node_id not in self._checking:
            self._checking.add(stale.node_id)
            self.tasks.spawn(self._check_stale, stale, peer)

    async def _check_stale(self, stale: PeerInfo, newcomer: PeerInfo) -> None:
        try:
            if not await self.ping(stale):
                self.routing.add_or_update(newcomer)
        finally:
            self._checking.discard(stale.node_id)

    def _give_addrs(self, peer: PeerInfo) -> None:
        """Tell the peerstore where ``peer`` is, unless it was told the same addresses recently."""
        if not peer.addrs:
            return
        now = trio.current_time()
        given = self._addrs_given.get(peer.peer_id)
        if given is not None and given[0] == peer.addrs and now - given[1] < ADDR_TTL / 2:
            return
        if len(self._addrs_given) >= MAX_REMEMBERED_ADDRS:
            self._addrs_given.clear()
        self.node.add_addrs(peer.peer_id, peer.addrs)
        self._addrs_given[peer.peer_id] = (peer.addrs, now)

    def forget(self, peer: PeerInfo, error: BaseException) -> None:
        logger.debug("DHT peer %s failed (%s); removing it from the routing table", peer.peer_id[-8:], error)
        self.routing.remove(peer.node_id)
        if len(self._failed_at) >= MAX_REMEMBERED_ADDRS:
            self._failed_at.clear()
        self._failed_at[peer.node_id] = trio.current_time()
        self.node.stream_pool.drop_peer(peer.peer_id)
        self._addrs_given.pop(peer.peer_id, None)

    def forgive_all(self) -> None:
        """Ask every peer again, the suspects too: when all of them failed us at once, the fault was ours
        (we slept, or our link was down), not theirs."""
        self._failed_at.clear()

    # ------------------------------------------------------------------ client side
    def sender_info(self) -> dict:
        """What every request says about us: our addresses (listen addresses do not change once the node
        runs, so they are computed once) and whether we are a client."""
        if self._sender_info is None or not self._sender_info["addrs"] and not self.client_mode:
            self._sender_info = {"addrs": self.node.addrs, "client": self.client_mode}
        return self._sender_info

    async def _call(self, peer: PeerInfo, method: str, args: dict) -> Any:
        """One request; None if it failed. A peer that did not answer leaves the routing table; one that
        answered with an error (busy, refused the request) is alive and stays."""
        failed = self._failed_at.get(peer.node_id)
        if method != "ping" and failed is not None:  # pings are how a suspect gets a second chance
            if trio.current_time() - failed < SUSPECT_SECONDS:
                return None
            del self._failed_at[peer.node_id]
        args["sender"] = self.sender_info()
        try:
            self._give_addrs(peer)
            result = await self.node.call(peer.peer_id, SERVICE, method, args, timeout=self.config.rpc_timeout,
                                          max_message_bytes=16 << 20)
        except RemoteError as e:
            logger.debug("DHT peer %s answered %s with an error: %s", peer.peer_id[-8:], method, e)
            return None
        except P2PError as e:
            self.forget(peer, e)
            return None
        if peer.addrs:
            self.observe(peer)
        return result

    async def ping(self, peer: PeerInfo) -> dict | None:
        """Ping ``peer``; returns its ``{"v", "addrs"}`` or None if it did not answer."""
        reply = await self._call(peer, "ping", {})
        return reply if isinstance(reply, dict) else None

    async def find(self, peer: PeerInfo, key_ids: list[DHTID], want_values: bool
                   ) -> list[tuple[list[Record], list[PeerInfo]]] | None:
        """Ask ``peer`` for values and nearest peers of each key; malformed parts of the reply are dropped."""
        reply = await self._call(peer, "find", {"keys": [k.to_bytes() for k in key_ids], "values": want_values})
        if not isinstance(reply, list) or len(reply) != len(key_ids):
            return None
        out = []
        for item in reply:
            records, peers = [], []
            if isinstance(item, list) and len(item) == 2:
                for wire in item[0] or []:
                    try:
                        record = Record.from_wire(wire)
                        self.validator.validate(record)
                        records.append(record)
                    except (MalformedRecord, ValidationError) as e:
                        logger.info("Dropped an invalid record from %s: %s", peer.peer_id[-8:], e)
                peers = [p for p in map(parse_peer, item[1] if isinstance(item[1], list) else []) if p is not None]
            out.append((records, peers[: self.config.k * 2]))
        return out

    async def store(self, peer: PeerInfo, records: list[Record]) -> list[list] | None:
        """Send ``records`` to ``peer``; returns ``[[accepted, error], ...]`` or None if it did not answer."""
        reply = await self._call(peer, "store", {"records": [r.to_wire() for r in records]})
        if not isinstance(reply, list) or len(reply) != len(records):
            return None
        return reply

    async def peers(self, peer: PeerInfo) -> dict | None:
        reply = await self._call(peer, "peers", {})
        return reply if isinstance(reply, dict) else None

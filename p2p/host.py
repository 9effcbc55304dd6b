"""The libp2p layer of one peer: the py-libp2p host, our protocol handlers, the inbound gate, plain streams.

:class:`Host` configures py-libp2p as TCP + Noise + yamux (the fastest reliable stack we measured),
listens and announces multiaddrs, dials, and serves our protocols ``/swarmtrain/<swarm>/<service>/<version>``
(the swarm name is part of every protocol id, so a peer of another swarm cannot call ours). Every inbound
stream, from libp2p or from the bulk plane (:mod:`p2p.bulk`), passes the same gate
(:meth:`Host.serve_inbound`): the allowlist, then the per-peer stream cap, then the handler.

It runs inside a trio loop that someone else owns (:class:`~p2p.node.Node` runs it on a thread):
``async with host.running(): ...``. RPC (:mod:`p2p.rpc`) and the bulk plane build on it; it imports neither.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from .addresses import local_ipv4s, parse_maddr
from .errors import P2PTimeout, PeerUnreachable
from .framing import MAX_FRAME_BYTES, STREAM_TIMEOUT, FramedStream
from .identity import peer_id_of
from .limits import LogThrottle
from .pool import StreamPool
from .relay import dial_circuit, is_circuit, open_connections, split_circuit

logger = logging.getLogger(__name__)

ADDR_TTL = 3600  # seconds an address learned from the DHT stays in the peerstore
NEGATIVE_DIAL_CACHE_S = 5.0  # seconds a peer whose every address failed is not redialed
DIAL_TIMEOUT = STREAM_TIMEOUT
#: Opening a stream on a connection we already hold takes a couple of round trips (yamux, then protocol
#: negotiation). One that has not opened in this long is stuck on a dead session (the peer froze or its link
#: went down long enough for its yamux to give up on us, and nobody told us), so the connection is dropped
#: and the next open dials afresh, instead of every later open waiting out its deadline on it.
STUCK_OPEN_S = 2.0

StreamHandler = Callable[[FramedStream], Awaitable[None]]


class Host:
    """One peer's libp2p host: addresses, dialing, protocol handlers, the inbound gate and plain streams.

    :param swarm: swarm name; part of every protocol id so swarms cannot call each other.
    :param key_pair: the peer's ed25519 identity (:mod:`p2p.identity`).
    :param listen, announce: parsed multiaddrs to listen on (none: client mode) and to tell others instead.
    :param psk: pre-shared key of a private swarm (64 hex characters, checked by the node).
    :param allowed_peers: peer IDs allowed to talk to us (None: everyone); others' streams are reset
        before any handler runs, and we open none to them.
    :param max_streams_per_peer: inbound streams one peer may hold open at once, over all services.
    """

    def __init__(self, *, swarm: str, key_pair, listen: Sequence[multiaddr.Multiaddr],
                 announce: Sequence[multiaddr.Multiaddr], client_mode: bool, psk: str | None,
                 allowed_peers: frozenset[str] | None, max_streams_per_peer: int):
        self.swarm, self.key_pair, self.client_mode = swarm, key_pair, client_mode
        self.peer_id = peer_id_of(key_pair)
        self.listen, self.announce, self.psk = list(listen), list(announce), psk
        self.allowed_peers = allowed_peers
        self.max_streams_per_peer = max_streams_per_peer
        self.stream_pool = StreamPool()
        self.stream_pool.usable = self._on_current_route
        self.libp2p = None
        #: set by the node once it knows it is behind a NAT: it then announces these circuit addresses
        #: (:class:`~p2p.relay_client.RelayClient`) instead of its listen addresses
        self.private = False
        self.circuit_addrs: list[str] = []
        self._circuit_dials: dict[str, trio.Lock] = {}
        #: called with the peer ID after we opened a circuit to it (the node starts a hole punch)
        self.on_circuit: Callable[[ID], None] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._handlers: dict[TProtocol, StreamHandler] = {}
        self._refused: set[str] = set()  # peers whose refusal was logged already
        self._inbound: Counter[str] = Counter()  # open inbound streams per peer
        self._stream_refusals = LogThrottle(10.0)

    @asynccontextmanager
    async def running(self) -> AsyncIterator["Host"]:
        """Build the libp2p host, listen, and serve the registered handlers while the block runs."""
        noise_key = new_x25519_key_pair().private_key
        self.libp2p = new_host(
            key_pair=self.key_pair, listen_addrs=self.listen or None, muxer_preference="YAMUX",
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(self.key_pair, noise_privkey=noise_key)},
            connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=DIAL_TIMEOUT),
            announce_addrs=self.announce or None, psk=self.psk, enable_mDNS=False, enable_upnp=False,
        )
        network = self.libp2p.get_network()
        # A refused or timed-out TCP dial is an answer: libp2p's default retries with backoff (0.1+0.2+0.4 s)
        # made every lookup through a routing table with departed peers ~0.75 s per dead peer slower.
        network.retry_config = RetryConfig(max_retries=0)
        # libp2p refuses to redial a peer whose dial failed for 60 s; a peer restarted or back from a cut
        # link must be reachable again sooner than that
        negative_cache = getattr(network, "_negative_peer_cache", None)
        if negative_cache is not None and hasattr(negative_cache, "_ttl"):
            negative_cache._ttl = NEGATIVE_DIAL_CACHE_S
        for proto, handler in self._handlers.items():
            self.libp2p.set_stream_handler(proto, self._on_libp2p_stream(handler))
        async with self.libp2p.run(listen_addrs=self.listen):
            self._token = trio.lowlevel.current_trio_token()
            try:
                yield self
            finally:
                self._token = None

    # ---------------------------------------------------------------- addresses and dialing
    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs others can join with: ``/ip4/.../tcp/.../p2p/<peer-id>``."""
        if self.libp2p is None or self.client_mode:
            return []
        if self.private:
            return list(self.circuit_addrs)
        return self.listen_addrs()

    def listen_addrs(self) -> list[str]:
        """Our direct addresses (the wildcard expanded), whether or not anyone outside can dial them."""
        out: list[str] = []
        for addr in map(str, self.libp2p.get_addrs()):
            if addr.startswith("/ip4/0.0.0.0/"):
                out.extend(addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in local_ipv4s())
            else:
                out.append(addr)
        return out

    def add_addrs(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Remember where ``peer_id`` can be reached (addresses with or without the /p2p suffix)."""
        parsed = []
        for a in addrs:
            try:
                m = multiaddr.Multiaddr(a)
                if "p2p" in [p.name for p in m.protocols()]:
                    m = m.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}"))
                parsed.append(m)
            except Exception:
                logger.debug("ignoring malformed address %r for %s", a, peer_id)
        if parsed and self.libp2p is not None:
            self.libp2p.get_peerstore().add_addrs(ID.from_base58(peer_id), parsed, ADDR_TTL)

    async def connect(self, maddr: str, timeout: float = DIAL_TIMEOUT) -> str:
        """Dial a full multiaddr (``.../p2p/<peer-id>``) and return the peer ID we reached."""
        try:
            info = info_from_p2p_addr(parse_maddr(maddr))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{maddr!r} has no /p2p/<peer-id> part: {e}") from None
        with trio.move_on_after(timeout) as scope:
            try:
                if is_circuit(maddr):
                    await dial_circuit(self.libp2p, maddr, timeout)
                else:
                    await self.libp2p.connect(info)
            except Exception as e:
                raise PeerUnreachable(f"cannot connect to {maddr}: {e}") from None
        if scope.cancelled_caught:
            raise P2PTimeout(f"connecting to {maddr} took longer than {timeout}s")
        return info.peer_id.to_base58()

    def is_connected(self, peer_id: str) -> bool:
        return bool(self.libp2p and open_connections(self.libp2p, ID.from_base58(peer_id)))

    def _direct_connections(self, peer_id: str) -> list:
        out = []
        for conn in open_connections(self.libp2p, ID.from_base58(peer_id)):
            try:
                if not any(is_circuit(a) for a in conn.get_transport_addresses()):
                    out.append(conn)
            except Exception:
                continue
        return out

    def _on_current_route(self, stream: FramedStream) -> bool:
        """False for a stream over a relay to a peer we now also reach directly (see :class:`StreamPool`)."""
        conn = getattr(stream.raw, "muxed_conn", None)
        try:
            relayed = conn is not None and any(is_circuit(a) for a in conn.get_transport_addresses())
        except Exception:
            return True
        return not (relayed and self._direct_connections(stream.peer_id))

    def is_relayed(self, peer_id: str) -> bool:
        """Whether we reach ``peer_id`` only through a relay (:mod:`p2p.relay`): connected, but not directly
        (a punched connection counts as direct, and new streams take it)."""
        return self.is_connected(peer_id) and not self._direct_connections(peer_id)

    def behind_nat(self, peer_id: str) -> bool:
        """Whether ``peer_id`` announced circuit addresses (it is behind a NAT: of its ports, only what a hole
        punch opened can be dialed)."""
        try:
            return any(is_circuit(a) for a in self.libp2p.get_peerstore().addrs(ID.from_base58(peer_id)))
        except Exception:
            return False

    def remote_ip(self, peer_id: str) -> str | None:
        """The IP address of our current direct libp2p connection to ``peer_id`` (None if not connected, or
        only through a relay: the address there is the relay's)."""
        for conn in self._direct_connections(peer_id):
            try:
                address = conn.muxed_conn.get_remote_address()
            except Exception:
                continue
            if address:
                return address[0]
        return None

    # ---------------------------------------------------------------- handlers and the inbound gate
    def is_allowed(self, peer_id: str) -> bool:
        """Whether ``peer_id`` may exchange streams with us (always, unless ``allowed_peers`` was given)."""
        return self.allowed_peers is None or peer_id in self.allowed_peers

    def protocol_id(self, service: str, version: str = "1") -> TProtocol:
        """``/swarmtrain/<swarm>/<service>/<version>``."""
        return TProtocol(f"/swarmtrain/{self.swarm}/{service}/{version}")

    def set_stream_handler(self, service: str, handler: StreamHandler, *, version: str = "1",
                           max_frame_bytes: int = MAX_FRAME_BYTES, timeout: float = STREAM_TIMEOUT) -> None:
        """Serve ``service``: ``handler(stream)`` runs for every inbound stream; the stream is reset if it raises.
        Safe from any thread, before or after the host runs."""
        async def wrapped(stream: FramedStream) -> None:
            await handler(stream)
        wrapped.limits = (max_frame_bytes, timeout)  # type: ignore[attr-defined]
        proto = self.protocol_id(service, version)
        self._handlers[proto] = wrapped
        if self._token is not None:
            self._token.run_sync_soon(self.libp2p.set_stream_handler, proto, self._on_libp2p_stream(wrapped))

    def stream_handler(self, service: str, version: str = "1") -> StreamHandler | None:
        """The handler registered for ``service``/``version``, or None."""
        return self._handlers.get(self.protocol_id(service, version))

    def _on_libp2p_stream(self, handler: StreamHandler):
        async def on_stream(raw) -> None:
            await self.serve_inbound(raw, raw.muxed_conn.peer_id.to_base58(), handler)
        return on_stream

    async def serve_inbound(self, raw, peer: str, handler: StreamHandler) -> None:
        """Run ``handler`` on an inbound stream (libp2p or bulk) from ``peer``, within the allowlist and stream cap."""
        max_frame_bytes, timeout = handler.limits  # type: ignore[attr-defined]
        if not self.is_allowed(peer):
            if peer not in self._refused and len(self._refused) < 10_000:
                self._refused.add(peer)
                logger.info("Refused streams from %s: not in this swarm's allowlist", peer)
            await raw.reset()
            return
        if self._inbound[peer] >= self.max_streams_per_peer:
            if self._stream_refusals.should_log(peer):
                logger.info("Peer %s holds %d open streams (the cap); resetting its new ones", peer[-8:],
                            self._inbound[peer])
            await raw.reset()
            return
        self._inbound[peer] += 1
        stream = FramedStream(raw, peer, max_frame_bytes=max_frame_bytes, timeout=timeout)
        try:
            await handler(stream)
        except Exception as e:
            logger.debug("handler for %s from %s failed: %s: %s", getattr(raw, "get_protocol", lambda: "bulk")(),
                         peer[-8:], type(e).__name__, e)
            await stream.reset()
        else:
            await stream.close()
        finally:
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]

    # ---------------------------------------------------------------- outbound streams
    def check_peer(self, peer_id: str) -> ID:
        """``peer_id`` parsed, if we may open a stream to it; ValueError or PeerUnreachable otherwise."""
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            raise ValueError(f"not a peer ID: {peer_id!r}") from None
        if pid == self.libp2p.get_id():
            raise ValueError("cannot open a stream to ourselves")
        if not self.is_allowed(peer_id):
            raise PeerUnreachable(f"{peer_id[-8:]} is not in this swarm's allowlist")
        return pid

    async def open_stream(self, peer_id: str, service: str, *, version: str = "1",
                          max_frame_bytes: int = MAX_FRAME_BYTES, timeout: float = STREAM_TIMEOUT,
                          bulk: bool = False) -> FramedStream:
        """Open a libp2p stream to ``peer_id`` speaking ``service`` (dials if not connected), within ``timeout``.
        ``bulk`` is ignored: a host has only libp2p streams (the node adds the bulk plane)."""
        pid = self.check_peer(peer_id)
        was_connected, started = self.is_connected(peer_id), trio.current_time()
        with trio.move_on_after(timeout) as scope:
            try:
                if not was_connected:
                    await self._dial_circuits(pid, timeout)
                raw = await self.libp2p.new_stream(pid, [self.protocol_id(service, version)])
            except Exception as e:
                raise PeerUnreachable(f"cannot open {service} stream to {peer_id[-8:]}: {type(e).__name__}: {e}") from None
        if scope.cancelled_caught:
            if was_connected and trio.current_time() - started >= STUCK_OPEN_S:
                await self.drop_connection(peer_id, f"opening a {service} stream took {timeout:.1f}s")
            raise P2PTimeout(f"opening a {service} stream to {peer_id[-8:]} took longer than {timeout}s")
        return FramedStream(raw, peer_id, max_frame_bytes=max_frame_bytes, timeout=timeout)

    async def _dial_circuits(self, pid: ID, timeout: float) -> None:
        """Dial ``pid`` through a relay when it has circuit addresses (py-libp2p's swarm skips them); the first
        relay that gives a circuit wins."""
        try:
            known = [str(a) for a in self.libp2p.get_peerstore().addrs(pid)]
        except Exception:
            return
        target = pid.to_base58()
        circuits = [a if a.endswith(f"/p2p/{target}") else f"{a}/p2p/{target}" for a in known if is_circuit(a)]
        if not circuits:
            return      # a direct address: the swarm dials it
        # A peer with circuit addresses is behind a NAT: the direct addresses we also know of it (identify tells
        # us its listen addresses, in its home network) cannot be dialed from here, and trying them first costs
        # a dial timeout per call.
        lock = self._circuit_dials.setdefault(pid.to_base58(), trio.Lock())
        try:
            async with lock:        # concurrent opens share one circuit instead of racing for several
                if not open_connections(self.libp2p, pid):
                    await self._dial_first_circuit(pid, circuits, timeout)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._circuit_dials.pop(pid.to_base58(), None)

    async def _dial_first_circuit(self, pid: ID, circuits: list[str], timeout: float) -> None:
        # relays we hold a connection to first: the peerstore keeps the circuits of a relay that died for hours
        circuits.sort(key=lambda a: not open_connections(self.libp2p, ID.from_base58(split_circuit(a)[1])))
        errors = []
        for addr in circuits:
            try:
                await dial_circuit(self.libp2p, addr, timeout)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if self.on_circuit is not None:
                self.on_circuit(pid)
            return
        raise PeerUnreachable(f"no relay gave a circuit to {pid.to_base58()[-8:]}: {'; '.join(errors)}")

    async def drop_connection(self, peer_id: str, why: str) -> None:
        """Close our connections to ``peer_id`` (see :data:`STUCK_OPEN_S`); the next stream to it dials again."""
        logger.info("Dropping our connection to %s: %s", peer_id[-8:], why)
        self.stream_pool.drop_peer(peer_id)   # its idle streams ride on that connection
        with trio.CancelScope(shield=True), trio.move_on_after(DIAL_TIMEOUT):
            try:
                await self.libp2p.get_network().close_peer(ID.from_base58(peer_id))
            except Exception as e:  # closing a dead session may fail in any way; it is gone either way
                logger.debug("Closing the connection to %s failed: %s", peer_id[-8:], e)

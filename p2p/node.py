"""The libp2p host of one swarmtrain peer, running in a trio loop on a background thread.

``Node`` owns a py-libp2p host configured as TCP + Noise + yamux (the fastest reliable stack we
measured), listens and announces multiaddrs, opens framed streams to other peers and serves our own
protocols ``/swarmtrain/<swarm>/<service>/<version>``. The swarm name is part of every protocol id,
so a peer of another swarm cannot call ours.

Two ways to use it:

* trio code runs *inside* the node's loop (``node.spawn(fn)`` or the ``async`` methods);
* blocking code (a training loop) calls ``node.run(async_fn, *args)`` which executes ``async_fn`` in the
  node's loop and returns its result, or ``node.call_sync(...)`` for a single RPC.

Every task started through the node lives in the node's nursery; ``stop()`` cancels that nursery, so
shutdown is prompt (well under 2 s) and idempotent.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair

from . import rpc
from .limits import LogThrottle
from .errors import P2PError, P2PTimeout, PeerUnreachable
from .addresses import host_of, local_ipv4s, parse_maddr
from .bulk import BulkPlane
from .framing import FramedStream
from .identity import load_or_create_identity, peer_id_of

logger = logging.getLogger(__name__)

DEFAULT_HOST_MADDRS = ("/ip4/127.0.0.1/tcp/0",)
ADDR_TTL = 3600  # seconds an address learned from the DHT stays in the peerstore
NEGATIVE_DIAL_CACHE_S = 5.0  # seconds a peer whose every address failed is not redialed


class Node:
    """One peer's libp2p host: identity, listen/announce addresses, streams, and a trio loop thread.

    :param swarm: swarm name; part of every protocol id so swarms cannot call each other.
    :param host_maddrs: multiaddrs to listen on, e.g. ``/ip4/0.0.0.0/tcp/31337``. Port 0 picks a free one.
    :param announce_maddrs: addresses to tell others instead of the listen addresses (NAT, docker).
    :param identity_path: file holding the ed25519 key; created on first run, so the peer ID persists.
    :param client_mode: listen on nothing; the node can only call out (for peers behind NAT).
    :param psk: pre-shared key of a private swarm (libp2p pnet), 64 hex characters (32 bytes): every
        connection is encrypted with it before the handshake, so peers without it cannot connect at all.
    :param allowed_peers: peer IDs allowed to talk to us (None: everyone). Streams from other peers are
        reset before any handler runs (so they can call no RPC: no DHT store, no averaging, no expert),
        and we open no stream to them. Our own ID is always allowed.
    :param max_streams_per_peer: inbound streams one peer may hold open at once, over all services; more
        are reset before any handler runs (calls reuse pooled streams, so honest peers use a handful).
    :param bulk_port: TCP port of the bulk data plane (:mod:`p2p.bulk`: big payloads beside libp2p, ~10x
        less CPU per byte), on the listen addresses' IPs; 0 picks a free port, None turns it off. Behind a
        NAT, fix it and forward it too (without it, peers fall back to slower libp2p streams).
    :param start: start the loop thread right away.
    """

    def __init__(self, *, swarm: str = "default", host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS,
                 announce_maddrs: Sequence[str] = (), identity_path: str | None = None,
                 client_mode: bool = False, psk: str | None = None, allowed_peers: Sequence[str] | None = None,
                 max_streams_per_peer: int = 128, bulk_port: int | None = 0, start: bool = True):
        if not swarm or "/" in swarm:
            raise ValueError(f"swarm name must be non-empty and contain no '/': {swarm!r}")
        self.swarm, self.client_mode = swarm, client_mode
        self.key_pair = load_or_create_identity(identity_path)
        self.peer_id = peer_id_of(self.key_pair)
        self._listen = [] if client_mode else [parse_maddr(a) for a in host_maddrs]
        self._announce = [parse_maddr(a) for a in announce_maddrs]
        if psk is not None:
            psk = psk.strip().lower()
            if len(psk) != 64 or any(c not in "0123456789abcdef" for c in psk):
                raise ValueError("the swarm key (psk) must be 64 hex characters (32 random bytes)")
        self._psk = psk
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers) | {self.peer_id}
        self._refused: set[str] = set()  # peers whose refusal was logged already
        self.max_streams_per_peer = max_streams_per_peer
        self._inbound: Counter[str] = Counter()  # open inbound streams per peer
        self._stream_refusals = LogThrottle(10.0)
        self._handlers: dict[TProtocol, Callable[[FramedStream], Awaitable[None]]] = {}
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_requested: trio.Event | None = None
        self.host = None
        self.rpc_pool = rpc.StreamPool()
        self.bulk = BulkPlane(self, bulk_port) if bulk_port is not None else None
        if start:
            self.start()

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0) -> "Node":
        """Start the loop thread and listen; returns when the node is ready. Calling it twice is harmless."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name=f"p2p-{self.peer_id[-6:]}",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise P2PTimeout(f"p2p node did not start within {timeout}s")
        if self._start_error is not None:
            raise P2PError(f"p2p node failed to start: {self._start_error}") from self._start_error
        logger.info("Node %s listening on %s", self.peer_id, ", ".join(self.addrs) or "nothing (client mode)")
        return self

    async def _main(self) -> None:
        try:
            noise_key = new_x25519_key_pair().private_key
            self.host = new_host(
                key_pair=self.key_pair, listen_addrs=self._listen or None, muxer_preference="YAMUX",
                sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(self.key_pair, noise_privkey=noise_key)},
                connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=10.0),
                announce_addrs=self._announce or None, psk=self._psk, enable_mDNS=False, enable_upnp=False,
            )
            network = self.host.get_network()
            # A refused or timed-out TCP dial is an answer: libp2p's default retries with backoff (0.1+0.2+0.4 s)
            # made every lookup through a routing table with departed peers ~0.75 s per dead peer slower.
            network.retry_config = RetryConfig(max_retries=0)
            # libp2p refuses to redial a peer whose dial failed for 60 s; a peer restarted or back from a cut
            # link must be reachable again sooner than that
            negative_cache = getattr(network, "_negative_peer_cache", None)
            if negative_cache is not None and hasattr(negative_cache, "_ttl"):
                negative_cache._ttl = NEGATIVE_DIAL_CACHE_S
            for proto, handler in self._handlers.items():
                self.host.set_stream_handler(proto, self._wrap_handler(handler))
            async with self.host.run(listen_addrs=self._listen):
                async with trio.open_nursery() as nursery:
                    self._token, self._nursery = trio.lowlevel.current_trio_token(), nursery
                    self._stop_requested = trio.Event()
                    if self.bulk is not None and self._listen:
                        await nursery.start(self.bulk.listen, [host_of(m) for m in self._listen])
                    self._started.set()
                    await self._stop_requested.wait()
                    nursery.cancel_scope.cancel()
        except BaseException as e:  # reported to start(); the thread must not die silently
            if not self._started.is_set():
                self._start_error = e
            else:
                logger.exception("p2p node loop crashed")
        finally:
            self._nursery = None
            self._started.set()
            self._stopped.set()

    def stop(self, timeout: float = 2.0) -> None:
        """Cancel every task of this node, close all connections and join the thread (idempotent)."""
        if self._thread is None or self._stopped.is_set():
            return
        if threading.current_thread() is self._thread:  # from a task of this node: ask the loop to stop, do not join
            self._stop_requested.set()
            return
        try:
            trio.from_thread.run_sync(self._stop_requested.set, trio_token=self._token)
        except (trio.RunFinishedError, RuntimeError):
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("p2p node thread did not stop within %.1fs", timeout)
        else:
            logger.info("Node %s stopped", self.peer_id)

    shutdown = stop

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        return self._started.is_set() and not self._stopped.is_set()

    # ---------------------------------------------------------------- addresses
    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs others can join with: ``/ip4/.../tcp/.../p2p/<peer-id>``."""
        if self.host is None or self.client_mode:
            return []
        out: list[str] = []
        for addr in map(str, self.host.get_addrs()):
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
        if parsed and self.host is not None:
            self.host.get_peerstore().add_addrs(ID.from_base58(peer_id), parsed, ADDR_TTL)

    async def connect(self, maddr: str, timeout: float = 10.0) -> str:
        """Dial a full multiaddr (``.../p2p/<peer-id>``) and return the peer ID we reached."""
        try:
            info = info_from_p2p_addr(parse_maddr(maddr))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{maddr!r} has no /p2p/<peer-id> part: {e}") from None
        with trio.move_on_after(timeout) as scope:
            try:
                await self.host.connect(info)
            except Exception as e:
                raise PeerUnreachable(f"cannot connect to {maddr}: {e}") from None
        if scope.cancelled_caught:
            raise P2PTimeout(f"connecting to {maddr} took longer than {timeout}s")
        return info.peer_id.to_base58()

    def is_connected(self, peer_id: str) -> bool:
        return bool(self.host and self.host.get_network().get_connections(ID.from_base58(peer_id)))

    # ---------------------------------------------------------------- protocols and streams
    def is_allowed(self, peer_id: str) -> bool:
        """Whether ``peer_id`` may exchange streams with us (always, unless ``allowed_peers`` was given)."""
        return self.allowed_peers is None or peer_id in self.allowed_peers

    def protocol_id(self, service: str, version: str = "1") -> TProtocol:
        """``/swarmtrain/<swarm>/<service>/<version>``."""
        return TProtocol(f"/swarmtrain/{self.swarm}/{service}/{version}")

    def set_stream_handler(self, service: str, handler: Callable[[FramedStream], Awaitable[None]], *,
                           version: str = "1", max_frame_bytes: int = 4 << 20, timeout: float = 10.0) -> None:
        """Serve ``service``: ``handler(stream)`` runs for every inbound stream; the stream is reset if it raises."""
        async def wrapped(stream: FramedStream) -> None:
            await handler(stream)
        wrapped.limits = (max_frame_bytes, timeout)  # type: ignore[attr-defined]
        proto = self.protocol_id(service, version)
        self._handlers[proto] = wrapped
        if self.host is not None:
            self.run_sync_soon(self.host.set_stream_handler, proto, self._wrap_handler(wrapped))

    def stream_handler(self, service: str, version: str = "1"):
        """The handler registered for ``service``/``version``, or None."""
        return self._handlers.get(self.protocol_id(service, version))

    def _wrap_handler(self, handler):
        async def on_stream(raw) -> None:
            await self.serve_inbound(raw, raw.muxed_conn.peer_id.to_base58(), handler)
        return on_stream

    async def serve_inbound(self, raw, peer: str, handler) -> None:
        """Run ``handler`` on an inbound stream (libp2p or bulk) from ``peer``, within the allowlist and stream cap."""
        max_frame_bytes, timeout = handler.limits
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

    def remote_ip(self, peer_id: str) -> str | None:
        """The IP address of our current libp2p connection to ``peer_id`` (None if not connected)."""
        for conn in self.host.get_network().get_connections(ID.from_base58(peer_id)):
            try:
                address = conn.muxed_conn.get_remote_address()
            except Exception:
                continue
            if address:
                return address[0]
        return None

    async def open_stream(self, peer_id: str, service: str, *, version: str = "1",
                          max_frame_bytes: int = 4 << 20, timeout: float = 10.0, bulk: bool = False) -> FramedStream:
        """Open a framed stream to ``peer_id`` speaking ``service`` (dials if not connected).

        ``bulk=True`` asks for a stream of the bulk data plane (:mod:`p2p.bulk`), for big payloads; it falls
        back to a libp2p stream where that is not possible."""
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            raise ValueError(f"not a peer ID: {peer_id!r}") from None
        if pid == self.host.get_id():
            raise ValueError("cannot open a stream to ourselves")
        if not self.is_allowed(peer_id):
            raise PeerUnreachable(f"{peer_id[-8:]} is not in this swarm's allowlist")
        deadline = trio.current_time() + timeout     # one budget for a bulk attempt and its fallback
        if bulk and self.bulk is not None:
            with trio.move_on_at(deadline) as scope:
                raw = await self.bulk.open(peer_id, service, version, timeout)
            if raw is not None:
                return FramedStream(raw, peer_id, max_frame_bytes=max_frame_bytes, timeout=timeout)
            if scope.cancelled_caught:
                raise P2PTimeout(f"opening a bulk {service} stream to {peer_id[-8:]} took longer than {timeout}s")
        with trio.move_on_at(deadline) as scope:
            try:
                raw = await self.host.new_stream(pid, [self.protocol_id(service, version)])
            except Exception as e:
                raise PeerUnreachable(f"cannot open {service} stream to {peer_id[-8:]}: {type(e).__name__}: {e}") from None
        if scope.cancelled_caught:
            raise P2PTimeout(f"opening a {service} stream to {peer_id[-8:]} took longer than {timeout}s")
        return FramedStream(raw, peer_id, max_frame_bytes=max_frame_bytes, timeout=timeout)

    # ---------------------------------------------------------------- thread facade
    def run(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float | None = None) -> Any:
        """Run ``async_fn(*args)`` in the node's loop from blocking code and return its result."""
        if not self.is_running:
            raise P2PError("node is not running")
        if timeout is not None:
            inner = async_fn

            async def async_fn(*a):  # noqa: F811 - deadline wrapper
                with trio.fail_after(timeout):
                    return await inner(*a)
        try:
            return trio.from_thread.run(async_fn, *args, trio_token=self._token)
        except trio.TooSlowError:
            raise P2PTimeout(f"{getattr(inner, '__name__', 'call')} took longer than {timeout}s") from None
        except (trio.RunFinishedError, trio.Cancelled):  # Cancelled: stop() cancelled the call in the loop
            raise P2PError("node stopped while the call was running") from None

    def run_sync_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function in the node's loop (safe from any thread, including the loop's)."""
        self._token.run_sync_soon(fn, *args)

    def spawn(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background task in the node's nursery; it is cancelled when the node stops.

        A task that raises is logged and ends alone: one broken background task (a batcher, a heartbeat)
        must not take down the node and every service on it."""
        if self._nursery is None:
            raise P2PError("node is not running")

        async def guarded() -> None:
            try:
                await async_fn(*args)
            except Exception:
                logger.exception("Background task %s failed", getattr(async_fn, "__qualname__", async_fn))
        self.run_sync_soon(self._nursery.start_soon, guarded)

    # ---------------------------------------------------------------- RPC
    def serve(self, service: str, methods: dict[str, rpc.Handler], *, version: str = "1",
              limits: rpc.ServiceLimits | None = None) -> rpc.RPCServer:
        """Serve ``methods`` (name -> ``async handler(ctx, args)``) as ``service``; see :class:`p2p.rpc.RPCServer`."""
        return rpc.RPCServer(self, service, methods, version=version, limits=limits)

    async def call(self, peer_id: str, service: str, method: str, args: Any = None, *, timeout: float = 10.0,
                   version: str = "1", max_message_bytes: int = 4 << 20) -> Any:
        """Call ``service.method(args)`` on ``peer_id`` (trio); see :func:`p2p.rpc.call`."""
        return await rpc.call(self, peer_id, service, method, args, timeout=timeout, version=version,
                              max_message_bytes=max_message_bytes)

    def call_sync(self, peer_id: str, service: str, method: str, args: Any = None, *, timeout: float = 10.0,
                  version: str = "1", max_message_bytes: int = 4 << 20) -> Any:
        """Blocking :meth:`call` for training code."""
        async def one_call():
            return await self.call(peer_id, service, method, args, timeout=timeout, version=version,
                                   max_message_bytes=max_message_bytes)
        return self.run(one_call)

    def __repr__(self) -> str:
        return f"Node({self.peer_id}, swarm={self.swarm!r}, running={self.is_running})"


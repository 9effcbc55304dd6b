"""``Node``: one swarmtrain peer's networking, in a trio loop on a background thread.

The facade over the p2p layers: a :class:`~p2p.host.Host` (the libp2p host, our protocol handlers, the
inbound gate, plain streams), the bulk data plane on top of it (:mod:`p2p.bulk`: big payloads beside libp2p),
and RPC (:mod:`p2p.rpc`). Two ways to use it:

* trio code runs *inside* the node's loop (``node.spawn(fn)`` or the ``async`` methods);
* blocking code (a training loop) calls ``node.run(async_fn, *args)`` which executes ``async_fn`` in the
  node's loop and returns its result, or ``node.call_sync(...)`` for a single RPC.

Every task started through the node lives in the node's nursery; ``stop()`` cancels that nursery, so
shutdown is prompt (well under 2 s) and idempotent.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .addresses import host_of, parse_maddr
from .bulk import BulkPlane
from .config import NodeConfig
from .errors import P2PError, P2PTimeout
from .framing import MAX_FRAME_BYTES, STREAM_TIMEOUT, FramedStream
from .host import DIAL_TIMEOUT, STUCK_OPEN_S, Host
from .identity import load_or_create_identity, peer_id_of
from .reachability import AUTONAT_PROTOCOL_ID, PRIVATE, PROBE_TIMEOUT, PUBLIC, AutoNATServer
from .reachability import check as check_reachability
from .relay import make_hop, make_stop
from .relay_client import RelayClient
from .rpc import Handler, RPCServer, ServiceLimits, call
from .tasks import TaskGroup

logger = logging.getLogger(__name__)

__all__ = ["Node", "parse_maddr"]


class Node:
    """One peer's libp2p host: identity, listen/announce addresses, streams, and a trio loop thread.

    :param config: identity, addresses, swarm, privacy and limits (:class:`~p2p.config.NodeConfig`).
    :param start: start the loop thread right away.
    """

    def __init__(self, config: NodeConfig | None = None, *, start: bool = True):
        self.config = c = config or NodeConfig()
        self.swarm, self.client_mode = c.swarm, c.client_mode
        self.key_pair = load_or_create_identity(c.identity_path)
        self.peer_id = peer_id_of(self.key_pair)
        self.host = Host(swarm=c.swarm, key_pair=self.key_pair,
                         listen=[] if c.client_mode else [parse_maddr(a) for a in c.host_maddrs],
                         announce=[parse_maddr(a) for a in c.announce_maddrs], client_mode=c.client_mode, psk=c.psk,
                         allowed_peers=None if c.allowed_peers is None else frozenset(c.allowed_peers) | {self.peer_id},
                         max_streams_per_peer=c.max_streams_per_peer)
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_requested: trio.Event | None = None
        self.bulk = BulkPlane(self.host, c.bulk_port) if c.bulk_port is not None else None
        #: "client" (listens on nothing), then, once :meth:`settle_reachability` ran, "public" or "private"
        #: (behind a NAT: reachable only through relays, and a client of the DHT and of averaging)
        self.reachability = "client" if c.client_mode else "unknown"
        self.relay_protocol = None           # py-libp2p's circuit relay service: hop (public) or stop only
        self.relay_client: RelayClient | None = None
        self.dcutr = None                    # hole punching over relayed connections (private peers)
        self.punches: list[tuple[bool, float]] = []   # (direct?, seconds) of the punches we started
        #: public peers to reserve relay slots on, ``[(peer_id, [addr, ...])]``; the DHT replaces it with
        #: its routing table
        self.relay_candidates: Callable[[], Sequence[tuple[str, Sequence[str]]]] = lambda: []
        self.on_addrs_changed: list[Callable[[list[str]], None]] = []
        self.autonat = AutoNATServer(probe_timeout=PROBE_TIMEOUT, psk=c.psk)
        self._tasks = self.task_group("node")
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
            async with self.host.running():
                async with trio.open_nursery() as nursery:
                    self._token, self._nursery = trio.lowlevel.current_trio_token(), nursery
                    self._stop_requested = trio.Event()
                    if self.bulk is not None and self.host.listen:
                        await nursery.start(self.bulk.listen, [host_of(m) for m in self.host.listen])
                    if self.host.listen:
                        self.host.libp2p.set_stream_handler(AUTONAT_PROTOCOL_ID, self._on_autonat)
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

    # ---------------------------------------------------------------- addresses, handlers, streams (the host's)
    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs others can join with: ``/ip4/.../tcp/.../p2p/<peer-id>``."""
        return self.host.addrs

    def add_addrs(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Remember where ``peer_id`` can be reached (addresses with or without the /p2p suffix)."""
        self.host.add_addrs(peer_id, addrs)

    async def connect(self, maddr: str, timeout: float = DIAL_TIMEOUT) -> str:
        """Dial a full multiaddr (``.../p2p/<peer-id>``) and return the peer ID we reached."""
        return await self.host.connect(maddr, timeout)

    def is_connected(self, peer_id: str) -> bool:
        return self.host.is_connected(peer_id)

    def is_allowed(self, peer_id: str) -> bool:
        """Whether ``peer_id`` may exchange streams with us (always, unless ``allowed_peers`` was given)."""
        return self.host.is_allowed(peer_id)

    @property
    def allowed_peers(self) -> frozenset[str] | None:
        return self.host.allowed_peers

    @property
    def stream_pool(self):
        """Idle RPC streams for reuse (:class:`~p2p.pool.StreamPool`), shared with the host's own calls."""
        return self.host.stream_pool

    def set_stream_handler(self, service: str, handler: Callable[[FramedStream], Awaitable[None]], *,
                           version: str = "1", max_frame_bytes: int = MAX_FRAME_BYTES,
                           timeout: float = STREAM_TIMEOUT) -> None:
        """Serve ``service``: ``handler(stream)`` runs for every inbound stream; the stream is reset if it raises."""
        self.host.set_stream_handler(service, handler, version=version, max_frame_bytes=max_frame_bytes,
                                     timeout=timeout)

    async def open_stream(self, peer_id: str, service: str, *, version: str = "1",
                          max_frame_bytes: int = MAX_FRAME_BYTES, timeout: float = STREAM_TIMEOUT,
                          bulk: bool = False) -> FramedStream:
        """Open a framed stream to ``peer_id`` speaking ``service`` (dials if not connected), within ``timeout``.

        ``bulk=True`` asks for a stream of the bulk data plane (:mod:`p2p.bulk`), for big payloads; it falls
        back to a libp2p stream where that is not possible. A bulk attempt cut short by the deadline raises
        :class:`~p2p.errors.P2PTimeout` like any other open that runs out of time."""
        self.host.check_peer(peer_id)
        started = trio.current_time()
        deadline = started + timeout     # one budget for a bulk attempt and its fallback
        if bulk and self.bulk is not None:
            raw = None
            was_connected = self.host.is_connected(peer_id)
            with trio.move_on_at(deadline):
                raw = await self.bulk.open(peer_id, service, version, timeout)
            if raw is not None:
                return FramedStream(raw, peer_id, max_frame_bytes=max_frame_bytes, timeout=timeout)
            if trio.current_time() >= deadline:
                if was_connected and timeout >= STUCK_OPEN_S:   # its handshake call is stuck (see STUCK_OPEN_S)
                    await self.host.drop_connection(peer_id, f"a bulk {service} stream's handshake took {timeout:.1f}s")
                raise P2PTimeout(f"opening a bulk {service} stream to {peer_id[-8:]} took longer than {timeout}s")
        return await self.host.open_stream(peer_id, service, version=version, max_frame_bytes=max_frame_bytes,
                                           timeout=max(deadline - trio.current_time(), 0.0))

    # ---------------------------------------------------------------- reachability and relays
    async def _on_autonat(self, stream) -> None:
        if self.is_allowed(stream.muxed_conn.peer_id.to_base58()):
            await self.autonat.handle(stream)
        else:
            await stream.reset()

    async def settle_reachability(self, initial_peers: Sequence[str] = (), timeout: float = DIAL_TIMEOUT) -> str:
        """Find out whether others can dial us, and act on it; returns :attr:`reachability`.

        Connects to ``initial_peers`` and asks them to dial us back (:mod:`p2p.reachability`). Public (or
        nobody to ask: the first peer of a swarm): relay for others (``relay_service``). Private: accept
        circuits, reserve slots on relays (:class:`~p2p.relay_client.RelayClient`; the initial peers first,
        then :attr:`relay_candidates`) and announce the circuit addresses; from here on
        :attr:`client_mode` is True (we only ask the DHT and own no averaging parts). A client-mode node
        does nothing here."""
        if self.reachability != "unknown":
            return self.reachability
        servers: dict[str, list[str]] = {}

        async def reach(maddr: str) -> None:
            try:
                servers[await self.connect(maddr, timeout)] = [maddr]
            except (P2PError, ValueError) as e:
                logger.debug("Reachability: initial peer %s is unreachable: %s", maddr, e)

        async with trio.open_nursery() as nursery:
            for maddr in initial_peers:
                nursery.start_soon(reach, maddr)
        verdict, answers = await check_reachability(self.host.libp2p, list(servers), self.host.listen_addrs(),
                                                    timeout)
        if verdict == PRIVATE:
            await self.become_private(servers, timeout)
        else:
            self.reachability = PUBLIC
            self.relay_protocol = make_hop(self.host.libp2p, self.config.relay_limits, self.is_allowed) \
                if self.config.relay_service else make_stop(self.host.libp2p)
            await self._nursery.start(self._run_service, self.relay_protocol)
        said = sum(a != "unknown" for a in answers.values())
        logger.info("Reachability: %s (%d of %d peers checked%s)", self.reachability, said, len(answers),
                    "; relaying for others" if self.reachability == PUBLIC and self.config.relay_service else "")
        return self.reachability

    async def become_private(self, initial: dict[str, list[str]], timeout: float) -> None:
        """Act on a private verdict: accept circuits, punch holes, hold relay slots (on ``initial``,
        ``{peer_id: [addr]}``, first) and announce the circuit addresses. :meth:`settle_reachability` calls
        it; tests and tools that know the peer is behind a NAT call it directly."""
        self.reachability, self.client_mode, self.host.private = PRIVATE, True, True
        self.relay_protocol = make_stop(self.host.libp2p)
        await self._nursery.start(self._run_service, self.relay_protocol)
        from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
        self.dcutr = DCUtRProtocol(self.host.libp2p, dial_timeout=int(timeout))
        await self._nursery.start(self._run_service, self.dcutr)
        self.host.on_circuit = lambda pid: self._tasks.spawn(self._punch, pid)

        def candidates():
            return list(initial.items()) + [c for c in self.relay_candidates() if c[0] not in initial]

        def changed(addrs: list[str]) -> None:
            self.host.circuit_addrs = addrs
            for listener in list(self.on_addrs_changed):
                listener(addrs)

        self.relay_client = RelayClient(self.host.libp2p, candidates, timeout=timeout, on_change=changed)
        await self._nursery.start(self.relay_client.run)
        with trio.move_on_after(timeout):
            await self.relay_client.has_slot.wait()
        self.host.circuit_addrs = self.relay_client.addrs
        if not self.host.circuit_addrs:
            logger.warning("Behind a NAT and no relay gave us a slot yet: we can call others, but nobody can "
                           "call us until one does (forward a port and use --announce-maddrs to skip relays)")

    async def _punch(self, pid) -> None:
        """Hole punching (DCUtR, py-libp2p's) right after we opened a circuit: both peers learn each other's
        public address over the circuit, measure its round trip and dial at once from their listen ports
        (a TCP simultaneous open through both NATs); the swarm then prefers the direct connection for new
        streams and closes the circuit a minute later. Behind a port-randomising NAT it fails and traffic
        stays on the circuit. Its own loop also drives punches for circuits others opened to us."""
        started = trio.current_time()
        try:
            ok = await self.dcutr.initiate_hole_punch(pid)
        except Exception as e:
            logger.debug("Hole punch to %s failed: %s: %s", pid.to_base58()[-8:], type(e).__name__, e)
            ok = False
        ok = ok and not self.host.is_relayed(pid.to_base58())
        self.punches.append((ok, trio.current_time() - started))
        del self.punches[:-1000]
        logger.info("Hole punch to %s: %s in %.2fs", pid.to_base58()[-8:], "direct" if ok else "failed, relayed",
                    trio.current_time() - started)

    @staticmethod
    async def _run_service(service, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.tools.anyio_service import background_trio_service
        async with background_trio_service(service):
            task_status.started()
            await trio.sleep_forever()

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
        except BaseExceptionGroup as group:  # the same, from a nursery inside the call that stop() cancelled
            if group.split((trio.RunFinishedError, trio.Cancelled))[1] is None:
                raise P2PError("node stopped while the call was running") from None
            raise

    def run_sync_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function in the node's loop (safe from any thread, including the loop's)."""
        self._token.run_sync_soon(fn, *args)

    def spawn(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background task of the node itself; it is cancelled when the node stops. Components start
        theirs in a :meth:`task_group` of their own, so that stopping one cancels just its tasks.

        A task that raises is logged and ends alone: one broken background task (a batcher, a heartbeat)
        must not take down the node and every service on it."""
        self._tasks.spawn(async_fn, *args)

    def task_group(self, name: str) -> TaskGroup:
        """A nursery of its own, inside the node's, for one component's background tasks (:mod:`p2p.tasks`)."""
        return TaskGroup(self._schedule, lambda fn: self._nursery.start_soon(fn), name)

    def _schedule(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None or self._token is None:
            raise P2PError("node is not running")
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise P2PError("node is not running") from None

    # ---------------------------------------------------------------- RPC
    def serve(self, service: str, methods: dict[str, Handler], *, version: str = "1",
              limits: ServiceLimits | None = None) -> RPCServer:
        """Serve ``methods`` (name -> ``async handler(ctx, args)``) as ``service``; see :class:`p2p.rpc.RPCServer`."""
        return RPCServer(self, service, methods, version=version, limits=limits)

    async def call(self, peer_id: str, service: str, method: str, args: Any = None, *,
                   timeout: float = STREAM_TIMEOUT, version: str = "1", max_message_bytes: int = MAX_FRAME_BYTES) -> Any:
        """Call ``service.method(args)`` on ``peer_id`` (trio); see :func:`p2p.rpc.call`."""
        return await call(self, peer_id, service, method, args, timeout=timeout, version=version,
                              max_message_bytes=max_message_bytes)

    def call_sync(self, peer_id: str, service: str, method: str, args: Any = None, *,
                  timeout: float = STREAM_TIMEOUT, version: str = "1", max_message_bytes: int = MAX_FRAME_BYTES) -> Any:
        """Blocking :meth:`call` for training code."""
        async def one_call():
            return await self.call(peer_id, service, method, args, timeout=timeout, version=version,
                                   max_message_bytes=max_message_bytes)
        return self.run(one_call)

    def __repr__(self) -> str:
        return f"Node({self.peer_id}, swarm={self.swarm!r}, running={self.is_running})"


"""Circuit relay v2 (libp2p's standard relay protocol): how a peer behind a NAT gets callers.

A home peer cannot be dialed: its router drops unsolicited inbound connections. It can dial out, though,
so it keeps a connection to a public peer (the *relay*) and tells everyone to reach it *through* that
peer, at a circuit address ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<home peer>``. The protocol
(https://github.com/libp2p/specs/blob/master/relay/circuit-v2.md), as run here:

1. **Reserve** (``/libp2p/circuit/relay/0.2.0/hop``, message RESERVE): the home peer asks the relay to hold a
   slot for it. The relay answers OK with the reservation's expiry, or RESOURCE_LIMIT_EXCEEDED when full.
   The home peer renews at half the time to expiry and, when its connection to a relay drops, reserves on
   another one (:class:`RelayClient`).
2. **Connect** (hop, message CONNECT naming the home peer): a caller asks the relay for a circuit. The relay
   checks the home peer's reservation and its limits, opens a ``/libp2p/circuit/relay/0.2.0/stop`` stream to
   the home peer, and from then on copies bytes both ways.
3. **Upgrade**: both ends treat the circuit as a raw connection and run the usual Noise + yamux upgrade over
   it, end to end: the relay sees only ciphertext, and the connection sits in the swarm like any other, so
   every protocol of ours (RPC, expert calls, averaging) runs over it unchanged.

What we take from py-libp2p 0.8.1 and what we replace (measured in ``tests/test_relay.py``):

* its message formats, reservation bookkeeping and stop-side upgrade (:class:`CircuitV2Protocol`) work with
  our host and with js-libp2p's relay;
* its data copy keys circuits by peer, so when one of two circuits to the same home peer ends it closes the
  other too: :class:`_Hop` copies each circuit on its own, and adds the limits it lacks (circuits in all,
  total relay bandwidth);
* its swarm skips circuit addresses when it dials, and its transport reserves a slot on the relay before
  every outbound circuit (filling the relay with reservations of peers that only dial): we dial circuits
  ourselves (:func:`dial_circuit`) and reserve only for peers that need callers.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits as LibRelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from .errors import PeerUnreachable
from .framing import end_raw
from .limits import LogThrottle

logger = logging.getLogger(__name__)

__all__ = ["RelayLimits", "HOP_PROTOCOL_ID", "dial_circuit", "circuit_addr", "split_circuit", "is_circuit", "reserve",
           "make_hop", "make_stop", "open_connections"]

COPY_CHUNK = 64 << 10


@dataclass(frozen=True)
class RelayLimits:
    """What a public peer gives the home peers it relays for (go-libp2p's relay service has similar defaults).

    :param reservations: home peers holding a slot at once (one slot per peer; a peer renewing keeps its slot).
    :param circuits_per_peer: open circuits to one home peer at once.
    :param circuits: open circuits in all.
    :param circuit_bytes: bytes one circuit may carry (both directions together) before the relay resets it.
    :param circuit_seconds: how long one circuit may stay open.
    :param total_mbit: relayed bandwidth of all circuits together, Mbit/s (each direction); 0: no cap.
    :param reservation_ttl: seconds a slot lasts unless renewed.
    """

    reservations: int = 128
    circuits_per_peer: int = 16
    circuits: int = 64
    circuit_bytes: int = 4 << 30
    circuit_seconds: int = 1800
    total_mbit: float = 100.0
    reservation_ttl: int = 3600

    def __post_init__(self) -> None:
        for name in ("reservations", "circuits_per_peer", "circuits", "circuit_bytes", "circuit_seconds",
                     "reservation_ttl"):
            if getattr(self, name) < 1:
                raise ValueError(f"relay limit {name} must be >= 1, got {getattr(self, name)}")
        if self.total_mbit < 0:
            raise ValueError("relay limit total_mbit must be >= 0 (0: no cap)")

    def for_libp2p(self) -> LibRelayLimits:
        return LibRelayLimits(duration=self.circuit_seconds, data=self.circuit_bytes,
                              max_circuit_conns=self.circuits_per_peer, max_reservations=self.reservations,
                              reservation_ttl=self.reservation_ttl)


class TokenBucket:
    """Bytes per second shared by every circuit of a relay (one bucket per direction is not needed: each
    relayed byte is read once and written once, and the write is what we pace)."""

    def __init__(self, bytes_per_s: float):
        self.rate, self.capacity = bytes_per_s, max(bytes_per_s / 10, COPY_CHUNK)
        self.tokens, self.stamp = self.capacity, trio.current_time()

    async def take(self, n: int) -> None:
        while True:
            now = trio.current_time()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n or self.tokens >= self.capacity:
                self.tokens -= n
                return
            await trio.sleep((min(n, self.capacity) - self.tokens) / self.rate)


class _Hop(CircuitV2Protocol):
    """py-libp2p's relay protocol with per-circuit copying, a cap on circuits in all, a bandwidth cap and the
    swarm's allowlist (a peer outside it gets PERMISSION_DENIED)."""

    def __init__(self, host, limits: RelayLimits, is_allowed):
        super().__init__(host, limits=limits.for_libp2p(), allow_hop=True)
        self.our_limits, self.is_allowed = limits, is_allowed
        self.open_circuits = 0
        self._directions: dict[frozenset, list[trio.CancelScope]] = {}   # a circuit's two copy loops
        self.refused = 0
        self._full_log = LogThrottle(60.0)
        self.bucket = TokenBucket(limits.total_mbit * 1e6 / 8) if limits.total_mbit else None

    async def _handle_hop_stream(self, stream) -> None:
        if not self.is_allowed(stream.muxed_conn.peer_id.to_base58()):
            await self._send_status(stream, StatusCode.PERMISSION_DENIED, "not in this swarm's allowlist")
            await self._close_stream(stream)
            return
        await super()._handle_hop_stream(stream)

    async def _handle_reserve(self, stream, msg) -> None:
        # the relay accepts a reservation only for the peer on the other end of the stream: a reservation
        # for somebody else would let a caller hold slots in other peers' names
        msg.ClearField("peer")
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream, msg) -> None:
        if self.open_circuits >= self.our_limits.circuits:
            self.refused += 1
            if self._full_log.should_log("circuits"):
                logger.info("Relay full: refusing circuits (%d open, the cap; %d refused so far)", self.open_circuits,
                            self.refused)
            await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED,
                                    f"relay full: {self.open_circuits} circuits open")
            await self._close_stream(stream)     # a close, not a reset: the status must reach the caller
            return
        self.open_circuits += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.open_circuits -= 1

    async def _relay_data(self, src_stream, dst_stream, peer_id, deadline=None, circuit_data_limit=None) -> None:
        """Copy one direction of one circuit until either side ends, its time or bytes run out; then reset
        both of *its* streams and stop the other direction (the library's version closes the last circuit of
        that peer instead, and a read pending on a reset stream is not woken: the circuit's slot stayed taken)."""
        key = frozenset((id(src_stream), id(dst_stream)))
        scope = trio.CancelScope()
        self._directions.setdefault(key, []).append(scope)
        try:
            # the circuit's time limit also ends a circuit nobody sends on (a caller that vanished silently)
            with scope, trio.move_on_after(max(0.0, deadline - time.monotonic()) if deadline else math.inf):
                await self._copy(src_stream, dst_stream, peer_id, deadline, circuit_data_limit)
        finally:
            for other in self._directions.pop(key, []):
                other.cancel()
            for s in (src_stream, dst_stream):
                await end_raw(s, reset=True)

    async def _copy(self, src_stream, dst_stream, peer_id, deadline, circuit_data_limit) -> None:
        try:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    logger.info("Relayed circuit of %s reached its %ds limit", peer_id, self.our_limits.circuit_seconds)
                    break
                try:
                    data = await src_stream.read(COPY_CHUNK)
                except Exception:
                    break
                if not data:
                    break
                if circuit_data_limit is not None:
                    if len(data) > circuit_data_limit[0]:
                        logger.info("Relayed circuit of %s reached its %d-byte limit", peer_id,
                                    self.our_limits.circuit_bytes)
                        break
                    circuit_data_limit[0] -= len(data)
                if self.bucket is not None:
                    await self.bucket.take(len(data))
                with trio.fail_after(self.write_timeout):
                    await dst_stream.write(data)
        except Exception as e:
            logger.debug("Relaying for %s stopped: %s: %s", peer_id, type(e).__name__, e)


def make_hop(libp2p_host, limits: RelayLimits, is_allowed) -> CircuitV2Protocol:
    """The relay service of a public peer (also accepts circuits to itself, as any peer does)."""
    return _Hop(libp2p_host, limits, is_allowed)


def make_stop(libp2p_host) -> CircuitV2Protocol:
    """Accepts circuits that relays open to us; relays nothing."""
    return CircuitV2Protocol(libp2p_host, allow_hop=False)


def open_connections(libp2p_host, peer: ID) -> list:
    """Our connections to ``peer`` that are still open (the swarm keeps a closed one listed for a while, e.g.
    a circuit whose relay died)."""
    return [c for c in libp2p_host.get_network().get_connections(peer) if not getattr(c, "is_closed", False)]


# ---------------------------------------------------------------------------------------------- addresses
def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


def circuit_addr(relay_addr: str, relay_id: str, peer_id: str) -> str:
    """``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>`` (``relay_addr`` with or without its /p2p part)."""
    base = relay_addr.split("/p2p/")[0]
    return f"{base}/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}"


def split_circuit(addr: str) -> tuple[str, str, str]:
    """``(relay addr with /p2p, relay id, target id)`` of a circuit address; ValueError if it is not one."""
    head, sep, tail = str(addr).partition("/p2p-circuit")
    if not sep or "/p2p/" not in head or not tail.startswith("/p2p/"):
        raise ValueError(f"not a circuit address: {addr!r}")
    return head, head.rsplit("/p2p/", 1)[1], tail[len("/p2p/"):].split("/")[0]


# ---------------------------------------------------------------------------------------------- client side
async def reserve(libp2p_host, relay_id: str, timeout: float) -> float:
    """Reserve a slot on ``relay_id`` (connected already); returns the slot's expiry (unix time).
    :class:`PeerUnreachable` with the relay's status when it refuses (full, not a relay)."""
    with trio.fail_after(timeout):
        stream = await libp2p_host.new_stream(ID.from_base58(relay_id), [HOP_PROTOCOL_ID])
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            resp = await read_delimited_msg(stream, HopMessage)
        finally:
            await end_raw(stream)
    status = StatusCode(resp.status) if resp.HasField("status") else StatusCode.OK
    if status != StatusCode.OK:
        raise PeerUnreachable(f"relay {relay_id[-8:]} refused a reservation: {status.name}")
    return float(resp.reservation.expire) if resp.HasField("reservation") else time.time() + 60


async def dial_circuit(libp2p_host, addr: str, timeout: float):
    """Open a relayed connection to the target of circuit address ``addr`` and add it to the swarm.

    Steps 2 and 3 of the module docstring: connect to the relay (if not connected), CONNECT, then the Noise +
    yamux upgrade over the circuit. Raises :class:`PeerUnreachable` with the relay's status on refusal."""
    relay_addr, relay_id, target = split_circuit(addr)
    relay_pid, target_pid = ID.from_base58(relay_id), ID.from_base58(target)
    with trio.fail_after(timeout):
        if not open_connections(libp2p_host, relay_pid):
            await libp2p_host.connect(info_from_p2p_addr(multiaddr.Multiaddr(relay_addr)))
        stream = await libp2p_host.new_stream(relay_pid, [HOP_PROTOCOL_ID])
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT,
                                                         peer=CircuitPeerId(id=target_pid.to_bytes())))
            resp = await read_delimited_msg(stream, HopMessage)
            status = StatusCode(resp.status) if resp.HasField("status") else StatusCode.OK
            if status != StatusCode.OK:
                raise PeerUnreachable(f"relay {relay_id[-8:]} refused a circuit to {target[-8:]}: {status.name}")
            circuit = multiaddr.Multiaddr(f"/p2p/{relay_id}/p2p-circuit/p2p/{target}")
            raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                                addresses=[circuit])
            conn = await libp2p_host.upgrade_outbound_connection(raw, target_pid)
        except BaseException:
            await end_raw(stream, reset=True)
            raise
    try:
        conn.set_transport_info([circuit], ConnectionType.RELAYED)
    except Exception:
        pass
    return conn


"""Is this peer publicly reachable? AutoNAT v1 (``/libp2p/autonat/1.0.0``), libp2p's standard dial-back.

The client side (:func:`check`) — a peer that listens asks a few peers it is connected to:

1. send DIAL with its peer ID and the addresses it would announce;
2. the server dials back *only* the IP it observes the request from (anything else would let a peer aim
   our dials at a third party), at the ports of those addresses, on a fresh connection, and answers OK (with
   the address that worked) or E_DIAL_ERROR;
3. the client counts the answers: one OK makes it public (some address of it can be dialed from outside);
   dial errors from every server that answered make it private; no answer at all (the first peer of a
   swarm, or servers that refuse) leaves it as it assumed — public, since a peer nobody can check is
   usually the swarm's bootstrap.

The spec asks for more than three agreeing servers before flipping; a swarm of home peers starts with one
bootstrap, so we take what answers, re-check when the set of peers changes (the node does), and say in the
log which verdict came from how many servers.

The server side (:class:`AutoNATServer`) replaces py-libp2p 0.8.1's, which dials back with the host's own
``connect``: that call returns the connection the request came in on, so it answers OK to every peer, NAT or
not (measured: a peer behind a port-dropping NAT router got OK). Ours opens a fresh TCP connection to each
candidate address and checks that a libp2p listener answers there (multistream-select's greeting; in a
private swarm, where the swarm key wraps every byte, the TCP handshake itself).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from .framing import end_raw
from .limits import LogThrottle

logger = logging.getLogger(__name__)

AUTONAT_PROTOCOL_ID = TProtocol("/libp2p/autonat/1.0.0")
MAX_MESSAGE = 64 << 10
MAX_DIALED_ADDRS = 4          # candidate addresses a server tries per request
MAX_CONCURRENT_PROBES = 16    # dial-backs a server runs at once (more requests are refused, not queued)
MULTISTREAM = b"/multistream/1.0.0\n"
#: TCP resends an unanswered SYN after 1 s (RFC 6298's initial retransmission timeout): a dial-back waits for
#: the first SYN, one resend and its answer on a link of up to ~1 s round trip, then calls the address closed.
#: A NAT that drops the SYN costs a private peer this long to learn that it is private.
PROBE_TIMEOUT = 2.5
#: Once the connection is open the address is reachable; what is left is the identity check, answered by the
#: requester's own listener. That process may be busy (starting up, or a laptop training at full load), so it
#: gets longer than a round trip; the requester waits STREAM_TIMEOUT (10 s) for our answer, more than both.
GREETING_TIMEOUT = 5.0

PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"


def _ip_port(addr: multiaddr.Multiaddr) -> tuple[str, int] | None:
    try:
        return addr.value_for_protocol("ip4"), int(addr.value_for_protocol("tcp"))
    except Exception:
        return None


class AutoNATServer:
    """Answers AutoNAT dial-back requests (see the module docstring); every public peer runs one.

    :param probe_timeout: seconds a dial-back's TCP handshake may take (a NAT that drops the SYN is what
        makes us wait it out); the greeting that follows gets :data:`GREETING_TIMEOUT`.
    :param psk: the swarm key, if any (then the greeting is encrypted and only the TCP handshake is checked).
    """

    def __init__(self, probe_timeout: float, psk: str | None):
        self.probe_timeout, self.psk = probe_timeout, psk
        self.running = 0
        self.answered = {"ok": 0, "error": 0, "refused": 0}
        self._log = LogThrottle(30.0)

    async def handle(self, stream) -> None:
        try:
            with trio.fail_after((self.probe_timeout + GREETING_TIMEOUT) * MAX_DIALED_ADDRS + 5):
                request = Message()
                request.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE))
                response = await self._answer(request, stream)
                await stream.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as e:
            logger.debug("AutoNAT request failed: %s: %s", type(e).__name__, e)
        finally:
            await end_raw(stream)

    async def _answer(self, request: Message, stream) -> Message:
        response = Message(type=Message.DIAL_RESPONSE)

        def refuse(status, text: str) -> Message:
            self.answered["refused"] += 1
            response.dialResponse.status, response.dialResponse.statusText = status, text
            return response

        if request.type != Message.DIAL:
            return refuse(Message.E_BAD_REQUEST, "expected a DIAL message")
        conn = stream.muxed_conn
        if "p2p-circuit" in str(getattr(conn, "get_transport_addresses", lambda: [])()):
            return refuse(Message.E_DIAL_REFUSED, "no dial-backs over relayed connections")
        try:
            observed = stream.get_remote_address()[0]
        except Exception:
            observed = None
        if request.dial.peer.id and request.dial.peer.id != conn.peer_id.to_bytes():
            return refuse(Message.E_BAD_REQUEST, "the DIAL names another peer")
        candidates = []
        for raw in list(request.dial.peer.addrs)[:32]:
            try:
                ip_port = _ip_port(multiaddr.Multiaddr(bytes(raw)))
            except Exception:
                continue
            # only the IP the request came from is dialed (whatever IP the address names: behind a NAT it
            # names the home network's), on the ports the requester listens on
            if ip_port is not None and observed and (observed, ip_port[1]) not in candidates:
                candidates.append((observed, ip_port[1]))
        if not candidates:
            return refuse(Message.E_DIAL_REFUSED, "no TCP address to dial back")
        if self.running >= MAX_CONCURRENT_PROBES:
            return refuse(Message.E_INTERNAL_ERROR, "busy")
        self.running += 1
        try:
            for ip, port in candidates[:MAX_DIALED_ADDRS]:
                if await self._probe(ip, port):
                    self.answered["ok"] += 1
                    response.dialResponse.status = Message.OK
                    response.dialResponse.addr = multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}").to_bytes()
                    return response
        finally:
            self.running -= 1
        self.answered["error"] += 1
        response.dialResponse.status, response.dialResponse.statusText = Message.E_DIAL_ERROR, "all dials failed"
        return response

    async def _probe(self, ip: str, port: int) -> bool:
        """A fresh TCP connection to ``ip:port`` (opened within ``probe_timeout``: a NAT that drops the SYN is
        what that waits out) that a libp2p listener answers (within :data:`GREETING_TIMEOUT`)."""
        sock = None
        with trio.move_on_after(self.probe_timeout):
            try:
                sock = await trio.open_tcp_stream(ip, port)
            except OSError:
                return False
        if sock is None:
            return False
        async with sock:
            if self.psk:
                return True
            with trio.move_on_after(GREETING_TIMEOUT):
                try:
                    await sock.send_all(bytes([len(MULTISTREAM)]) + MULTISTREAM)
                    got = b""
                    while len(got) < len(MULTISTREAM) + 1:
                        chunk = await sock.receive_some(64)
                        if not chunk:
                            break
                        got += chunk
                except (OSError, trio.BrokenResourceError):
                    return False
                return MULTISTREAM in got
        return False


async def query(libp2p_host, server: str, addrs: Sequence[str], timeout: float) -> str:
    """Ask ``server`` to dial us back on ``addrs``: :data:`PUBLIC` (it reached us), :data:`PRIVATE` (it
    tried and failed) or :data:`UNKNOWN` (it refused, is not a server, or did not answer in time)."""
    request = Message(type=Message.DIAL)
    request.dial.peer.id = libp2p_host.get_id().to_bytes()
    for a in addrs:
        try:
            request.dial.peer.addrs.append(multiaddr.Multiaddr(a.split("/p2p/")[0]).to_bytes())
        except Exception:
            continue
    stream = None
    try:
        with trio.fail_after(timeout):
            stream = await libp2p_host.new_stream(ID.from_base58(server), [AUTONAT_PROTOCOL_ID])
            await stream.write(encode_varint_prefixed(request.SerializeToString()))
            response = Message()
            response.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE))
    except Exception as e:
        logger.debug("AutoNAT query to %s failed: %s: %s", server[-8:], type(e).__name__, e)
        return UNKNOWN
    finally:
        if stream is not None:
            await end_raw(stream)
    status = response.dialResponse.status
    if status == Message.OK:
        return PUBLIC
    if status == Message.E_DIAL_ERROR:
        return PRIVATE
    logger.debug("AutoNAT server %s refused: %s", server[-8:], response.dialResponse.statusText)
    return UNKNOWN


async def check(libp2p_host, servers: Sequence[str], addrs: Sequence[str], timeout: float) -> tuple[str, dict]:
    """Step 3 of the module docstring: ask ``servers`` at once and combine their answers.
    Returns the verdict and the answers by server."""
    answers: dict[str, str] = {}

    async def ask(server: str) -> None:
        answers[server] = await query(libp2p_host, server, addrs, timeout)

    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(ask, server)
    said = [a for a in answers.values() if a != UNKNOWN]
    if PUBLIC in said:
        return PUBLIC, answers
    if said:
        return PRIVATE, answers
    return UNKNOWN, answers

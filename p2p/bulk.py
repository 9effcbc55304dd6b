"""The bulk data plane: big payloads on a plain TCP socket beside libp2p, sealed with AES-GCM.

Why: py-libp2p's Noise + yamux stack spends ~4.4 core-seconds per GB on each side here, nearly all of it
per-message Python work (Noise message framing, yamux frames and window updates, trio locks), so an
all-reduce of a large model is bound by it. AES-GCM in OpenSSL seals 5 GB/s on one core and releases the
GIL; a socket moves a 1 MiB record in one system call. Same payload, ~10x less CPU.

How a bulk stream opens (the caller is ``A``, the server ``B``):

1. ``A`` calls ``bulk.open {service, version}`` on ``B`` over an ordinary libp2p RPC stream: Noise has
   authenticated both peer IDs (and in a private swarm the connection is wrapped by the swarm key), and
   ``B`` applies its allowlist and rate limits as to any call.
2. ``B`` checks that it serves that protocol, draws a fresh 32-byte key and a 16-byte token, remembers
   ``token -> (A's peer ID, key, protocol)`` for :data:`TOKEN_TTL_S` and answers ``{port, token, key}``.
   The key only ever travels inside the Noise channel.
3. ``A`` connects to the IP of its libp2p connection to ``B`` at ``port`` and sends the token. ``B`` pops
   it (one use; unknown, expired or late tokens close the socket) and both sides speak *records*.
4. A record is a 4-byte big-endian length ``L`` and ``L`` bytes of AES-GCM ciphertext and tag. Nonces are
   a direction byte and a 64-bit counter, so records cannot be replayed, reordered, dropped or moved to
   the other direction without the next decryption failing. An empty record is the authenticated end of
   stream; a TCP EOF without it is a reset (a truncated payload is never taken for a whole one).
5. On top runs the usual :class:`~p2p.framing.FramedStream`: ``B`` hands the socket to the service's
   stream handler exactly like a libp2p stream, with ``A``'s authenticated peer ID, and the same
   per-peer stream cap. Flow control and deadlines are those of :mod:`p2p.streams`.

If any step fails (the peer runs in client mode, a firewall blocks the port, an old version), the caller
falls back to a libp2p stream and does not try bulk with that peer again for :data:`UNREACHABLE_S`.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import P2PError, PeerUnreachable, ProtocolViolation, RemoteError
from .limits import LogThrottle
from .rpc import RPCServer, call

if TYPE_CHECKING:
    from .host import Host

logger = logging.getLogger(__name__)

SERVICE = "bulk"
MAX_RECORD = 1 << 20            # plaintext bytes per record; bigger writes are split
TAG = 16
TOKEN_BYTES = 16
TOKEN_TTL_S = 10.0              # a token must be presented this soon after it was issued
MAX_TOKENS_PER_PEER = 64        # outstanding tokens per peer (bounds what a caller can make us remember)
MAX_TOKENS = 4096               # outstanding tokens in all
MAX_PENDING_SOCKETS = 64        # accepted sockets that have not presented a token yet
UNREACHABLE_S = 60.0            # after a failed bulk open, use libp2p streams with that peer this long
# Linux only; Python names it from 3.12 on, and 47 is its number on the common architectures
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", None) or (
    47 if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64", "riscv64", "ppc64le") else None)
_LEN = struct.Struct(">I")


class SecureSocket:
    """An AES-GCM record channel on a connected trio socket, with the read/write/close/reset of a libp2p stream.

    :param sock: a connected ``trio.socket`` TCP socket (this object owns it).
    :param key: the 32-byte key both sides got from the handshake.
    :param initiator: True on the side that connected; it seals with direction byte 0, the other with 1.
    """

    def __init__(self, sock, key: bytes, *, initiator: bool, remote: str = "?"):
        self.sock, self.remote = sock, remote
        self._aead = AESGCM(key)
        self._send_dir, self._recv_dir = (b"\x00", b"\x01") if initiator else (b"\x01", b"\x00")
        self._send_seq = self._recv_seq = 0
        self._rbuf = bytearray(64 << 10)        # grows to a whole record when a big one arrives
        self._rstart = self._rend = 0
        self._pending = memoryview(b"")        # decrypted bytes not yet returned by read()
        self._eof = self._closed = self._fd_closed = False
        self._write_lock = trio.Lock()

    # ---------------------------------------------------------------- records
    def _nonce(self, direction: bytes, seq: int) -> bytes:
        return direction + b"\x00\x00\x00" + seq.to_bytes(8, "big")

    async def _send_record(self, plaintext) -> None:
        sealed = self._aead.encrypt(self._nonce(self._send_dir, self._send_seq), plaintext, None)
        self._send_seq += 1
        header = _LEN.pack(len(sealed))
        # small records go out in one system call; big ones in two rather than copied into one buffer
        for view in ([memoryview(header + sealed)] if len(sealed) < 65536 else [memoryview(header), memoryview(sealed)]):
            while view:
                view = view[await self.sock.send(view):]

    async def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available in the receive buffer (compacting or growing it first)."""
        if self._rstart + need > len(self._rbuf):
            have = self._rend - self._rstart
            buf = self._rbuf if need <= len(self._rbuf) else bytearray(max(need, 2 * len(self._rbuf)))
            buf[:have] = self._rbuf[self._rstart:self._rend]
            self._rbuf, self._rstart, self._rend = buf, 0, have
        view = memoryview(self._rbuf)
        while self._rend - self._rstart < need:
            n = await self.sock.recv_into(view[self._rend:], len(self._rbuf) - self._rend)
            if n == 0:
                raise trio.BrokenResourceError(f"bulk stream from {self.remote} was cut (no end-of-stream record)")
            self._rend += n

    async def _recv_record(self) -> bytes:
        # nothing is consumed until the whole record is in: a read cancelled by a deadline loses no bytes
        await self._fill(_LEN.size)
        (length,) = _LEN.unpack_from(self._rbuf, self._rstart)
        if not TAG <= length <= MAX_RECORD + TAG:
            raise ProtocolViolation(f"bulk record of {length} bytes from {self.remote}")
        await self._fill(_LEN.size + length)
        first = self._rstart + _LEN.size
        sealed = memoryview(self._rbuf)[first:first + length]
        try:
            plain = self._aead.decrypt(self._nonce(self._recv_dir, self._recv_seq), sealed, None)
        except InvalidTag:
            raise ProtocolViolation(f"bulk record from {self.remote} failed authentication") from None
        finally:
            sealed.release()
        self._rstart = first + length
        self._recv_seq += 1
        return plain

    # ---------------------------------------------------------------- stream interface
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` plaintext bytes (all of the next record if ``n < 0``); ``b""`` after the end of stream."""
        if not self._pending:
            if self._eof:
                return b""
            plain = await self._recv_record()
            if not plain:
                self._eof = True
                if self._closed:
                    self._close_fd()
                return b""
            if n < 0 or len(plain) <= n:
                return plain
            self._pending = memoryview(plain)
        n = len(self._pending) if n < 0 else n
        out, self._pending = bytes(self._pending[:n]), self._pending[n:]
        return out

    async def write(self, data) -> None:
        """Seal and send ``data`` (records of at most :data:`MAX_RECORD` bytes)."""
        if self._closed:
            raise trio.ClosedResourceError("bulk stream is closed for writing")
        view = memoryview(data).cast("B")
        async with self._write_lock:
            for start in range(0, len(view), MAX_RECORD):
                await self._send_record(view[start:start + MAX_RECORD])

    async def close(self) -> None:
        """Send the end-of-stream record; the socket closes once the other side ended too (or after 1 s)."""
        if self._closed:
            return
        try:
            with trio.move_on_after(1.0):       # a peer that reads nothing cannot hold us here
                async with self._write_lock:
                    await self._send_record(b"")
                self._closed = True
                while not self._eof:
                    await self.read()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, P2PError):
            pass
        finally:
            self._closed = True
            self._close_fd()

    def pace(self, bytes_per_s: float) -> bool:
        """Cap what this socket sends at ``bytes_per_s``; False where the OS cannot.

        The kernel spaces the socket's packets evenly (Linux TCP pacing, ``SO_MAX_PACING_RATE``), so
        flows that share a capped uplink each get the rate they were given instead of fighting over
        the bottleneck's queue.
        """
        if SO_MAX_PACING_RATE is None:
            return False
        rate = max(1, min(int(bytes_per_s), 0xFFFFFFFE))   # a u32; all ones would mean "no cap"
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("=I", rate))
            return True
        except OSError as e:
            logger.debug("cannot pace a bulk socket: %s", e)
            return False

    async def reset(self) -> None:
        """Drop the connection at once (an RST): the other side's next read fails."""
        self._closed = True
        if not self._fd_closed:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self._close_fd()

    def _close_fd(self) -> None:
        if not self._fd_closed:
            self._fd_closed = True
            self.sock.close()


class BulkPlane:
    """One node's bulk listener, token table and dialer (see the module docstring).

    :param host: the :class:`~p2p.host.Host` whose handlers and inbound gate bulk streams use, and over whose
        libp2p streams the ``bulk.open`` handshake runs (:mod:`p2p.rpc`).
    :param port: TCP port to listen on (0: any free port; fix it to forward it through a NAT).
    """

    def __init__(self, host: "Host", port: int = 0):
        self.host, self.port = host, port
        self.listen_port: int | None = None
        self._tokens: dict[bytes, tuple[str, bytes, Any, float]] = {}
        self._unreachable: dict[str, float] = {}
        self._pending = 0
        self._rejects = LogThrottle(10.0)
        self.opened = self.fallbacks = 0

    # ---------------------------------------------------------------- server side
    async def listen(self, hosts: list[str], task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept bulk sockets on ``hosts`` (run in the node's nursery)."""
        listeners = []
        for host in dict.fromkeys(hosts):
            listeners += await trio.open_tcp_listeners(self.port, host=host)
        self.listen_port = listeners[0].socket.getsockname()[1]
        RPCServer(self.host, SERVICE, {"open": self._rpc_open})
        task_status.started()
        await trio.serve_listeners(self._accepted, listeners)

    async def _rpc_open(self, ctx, args) -> dict:
        if not isinstance(args, dict) or not isinstance(args.get("service"), str) or not isinstance(args.get("version"), str):
            raise ValueError("bulk.open takes {service: str, version: str}")
        handler = self.host.stream_handler(args["service"], args["version"])
        if handler is None:
            raise ValueError(f"we do not serve {args['service']}/{args['version']}")
        now = trio.current_time()
        self._expire(now)
        if sum(1 for peer, *_ in self._tokens.values() if peer == ctx.peer_id) >= MAX_TOKENS_PER_PEER:
            raise ValueError(f"over {MAX_TOKENS_PER_PEER} bulk streams opening at once")
        if len(self._tokens) >= MAX_TOKENS:
            raise ValueError("too many bulk streams opening at once; use a libp2p stream")
        token, key = os.urandom(TOKEN_BYTES), AESGCM.generate_key(bit_length=256)
        self._tokens[token] = (ctx.peer_id, key, handler, now + TOKEN_TTL_S)
        return {"port": self.listen_port, "token": token, "key": key}

    def _expire(self, now: float) -> None:
        for token in [t for t, (*_, deadline) in self._tokens.items() if deadline < now]:
            del self._tokens[token]

    async def _accepted(self, stream: trio.SocketStream) -> None:
        sock = stream.socket
        remote = _addr(sock)
        if self._pending >= MAX_PENDING_SOCKETS:
            if self._rejects.should_log("pending"):
                logger.info("Closed a bulk socket from %s: %d sockets are already waiting to show a token",
                            remote, MAX_PENDING_SOCKETS)
            sock.close()
            return
        self._pending += 1
        try:
            token = b""
            with trio.move_on_after(TOKEN_TTL_S):
                while len(token) < TOKEN_BYTES:
                    chunk = await sock.recv(TOKEN_BYTES - len(token))
                    if not chunk:
                        break
                    token += chunk
        except OSError:
            token = b""
        finally:
            self._pending -= 1
        self._expire(trio.current_time())
        entry = self._tokens.pop(token, None)
        if entry is None:
            if self._rejects.should_log(remote.split(":")[0]):
                logger.info("Closed a bulk socket from %s: no valid token", remote)
            sock.close()
            return
        peer, key, handler, _ = entry
        await self.host.serve_inbound(SecureSocket(sock, key, initiator=False, remote=peer[-8:]), peer, handler)

    # ---------------------------------------------------------------- caller side
    async def open(self, peer_id: str, service: str, version: str, timeout: float) -> SecureSocket | None:
        """A bulk socket to ``peer_id`` for ``service``, or None (then use a libp2p stream)."""
        if self._unreachable.get(peer_id, 0.0) > trio.current_time():
            return None
        if self.host.behind_nat(peer_id):   # its bulk port sits behind its router: use the libp2p connection
            return None
        started = trio.current_time()
        try:
            reply = await call(self.host, peer_id, SERVICE, "open", {"service": service, "version": version},
                                   timeout=timeout)
        except RemoteError as e:      # it refused this bulk stream: fall back
            return self._fall_back(peer_id, e)
        except PeerUnreachable as e:  # connected, yet no bulk stream: it does not speak bulk (client mode, old)
            if self.host.is_connected(peer_id):
                return self._fall_back(peer_id, e)
            raise
        rtt = trio.current_time() - started
        sock = None
        try:
            port, token, key = reply["port"], reply["token"], reply["key"]
            if not (isinstance(port, int) and isinstance(token, bytes) and isinstance(key, bytes) and len(key) == 32):
                raise ProtocolViolation("malformed bulk.open reply")
            ip = self.host.remote_ip(peer_id)
            if ip is None:
                raise ProtocolViolation("no connection to take the peer's IP from")
            # the handshake's round trip bounds the connect: a silently dropped SYN must not eat the call's budget
            with trio.fail_after(max(1.0, 20 * rtt)):
                sock = (await trio.open_tcp_stream(ip, port)).socket
                view = memoryview(token)
                while view:
                    view = view[await sock.send(view):]
        except (P2PError, OSError, KeyError, TypeError, trio.TooSlowError) as e:
            if sock is not None:
                sock.close()
            return self._fall_back(peer_id, e)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self.opened += 1
        return SecureSocket(sock, key, initiator=True, remote=peer_id[-8:])

    def _fall_back(self, peer_id: str, error: Exception) -> None:
        now = trio.current_time()
        for peer in [p for p, until in self._unreachable.items() if until <= now]:
            del self._unreachable[peer]
        self._unreachable[peer_id] = now + UNREACHABLE_S
        self.fallbacks += 1
        logger.info("No bulk stream to %s (%s: %s); using libp2p streams with it for %.0fs", peer_id[-8:],
                    type(error).__name__, error, UNREACHABLE_S)
        return None


def _addr(sock) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"

"""Length-prefixed frames over a libp2p stream.

Wire format of one frame: a 4-byte big-endian length ``L``, then one tag byte, then ``L - 1`` body
bytes. Tags: ``M`` a msgpack message, ``D`` a raw data chunk, ``C`` flow-control credit, ``E`` end of a
payload, ``X`` an abort carrying a msgpack error. Every read is bounded by ``max_frame_bytes`` so a
peer cannot make us allocate more than the protocol allows.
"""
from __future__ import annotations

import struct
from typing import Any

import msgpack
import trio
from libp2p.exceptions import BaseLibp2pError

from .errors import MessageTooLarge, P2PTimeout, ProtocolViolation, StreamAborted

MSG, DATA, CREDIT, END, ABORT = b"M", b"D", b"C", b"E", b"X"
_TAGS = frozenset((MSG, DATA, CREDIT, END, ABORT))
_HEADER = struct.Struct(">IB")
READ_SIZE = 1 << 20
#: default cap on one frame of a stream and one RPC message (services that move more say so)
MAX_FRAME_BYTES = 4 << 20
#: default deadline of one stream open, frame or call, in seconds (a dial plus a few round trips)
STREAM_TIMEOUT = 10.0


def pack(obj: Any) -> bytes:
    """Serialize ``obj`` with msgpack (bytes stay bytes, str stays str)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, max_bytes: int = 64 << 20) -> Any:
    """Deserialize msgpack ``data``; garbage raises :class:`ProtocolViolation`, never anything else."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True,
            max_bin_len=max_bytes, max_str_len=max_bytes, max_array_len=1 << 20, max_map_len=1 << 20,
        )
    except Exception as e:  # msgpack raises many unrelated types on garbage
        raise ProtocolViolation(f"malformed msgpack message ({type(e).__name__}: {e})") from None


async def end_raw(raw, *, reset: bool = False) -> None:
    """Close (or reset) a raw libp2p stream within 1 s, also while our task is being cancelled; errors are
    ignored: the exchange is over either way. :meth:`FramedStream.close` and ``reset`` end theirs with it."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await (raw.reset() if reset else raw.close())
        except Exception:
            pass


class FramedStream:
    """A libp2p stream that speaks frames; every wait is bounded by a deadline.

    ``peer_id`` is the authenticated (Noise) peer ID of the other side. ``timeout`` bounds each single
    read or write; callers add an overall deadline around whole exchanges with ``trio.fail_after``.
    """

    def __init__(self, stream, peer_id: str, *, max_frame_bytes: int, timeout: float):
        self.raw, self.peer_id = stream, peer_id
        self.max_frame_bytes, self.timeout = max_frame_bytes, timeout
        self._buf = bytearray()
        self.bytes_sent = self.bytes_received = 0

    async def write_frame(self, tag: bytes, body: bytes | memoryview = b"") -> None:
        """Send one frame. Large bodies are written without being copied into a new buffer."""
        if len(body) + 1 > self.max_frame_bytes:
            raise MessageTooLarge(f"frame of {len(body)} bytes exceeds the limit of {self.max_frame_bytes}")
        header = _HEADER.pack(len(body) + 1, tag[0])
        with self._deadline("write"):
            try:
                if len(body) <= 65536:
                    await self.raw.write(header + bytes(body))
                else:
                    await self.raw.write(header)
                    await self.raw.write(body)
            except (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise StreamAborted(f"stream to {self.peer_id[-8:]} broke while writing: {e}") from None
        self.bytes_sent += len(body) + _HEADER.size

    async def read_frame(self) -> tuple[bytes, bytes]:
        """Receive one frame and return ``(tag, body)``; raises on EOF, reset, timeout or bad framing."""
        with self._deadline("read"):
            header = await self._read_exact(_HEADER.size)
            length, tag = _HEADER.unpack(header)
            tag = bytes((tag,))
            if tag not in _TAGS or length < 1:
                raise ProtocolViolation(f"bad frame header from {self.peer_id[-8:]} (tag {tag!r}, length {length})")
            if length > self.max_frame_bytes:
                raise MessageTooLarge(f"peer {self.peer_id[-8:]} sent a {length}-byte frame; limit {self.max_frame_bytes}")
            body = await self._read_exact(length - 1)
        self.bytes_received += length + 4
        return tag, body

    async def send_msg(self, obj: Any) -> None:
        """Send a msgpack message frame."""
        await self.write_frame(MSG, pack(obj))

    async def recv_msg(self) -> Any:
        """Receive a frame that must be a msgpack message; an ABORT frame raises :class:`StreamAborted`."""
        tag, body = await self.read_frame()
        if tag == ABORT:
            raise StreamAborted(f"peer {self.peer_id[-8:]} aborted: {unpack(body)}")
        if tag != MSG:
            raise ProtocolViolation(f"expected a message frame, got {tag!r}")
        return unpack(body, self.max_frame_bytes)

    async def _read_exact(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            try:
                chunk = await self.raw.read(max(n - len(buf), READ_SIZE) if n - len(buf) > 65536 else READ_SIZE)
            except (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise StreamAborted(f"stream from {self.peer_id[-8:]} ended: {type(e).__name__}: {e}") from None
            if not chunk:
                raise StreamAborted(f"stream from {self.peer_id[-8:]} ended early")
            if not buf and len(chunk) == n:
                return chunk
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _deadline(self, what: str):
        return _Deadline(self.timeout, f"{what} on stream with {self.peer_id[-8:]} took longer than {self.timeout:.1f}s")

    def pace(self, bytes_per_s: float) -> bool:
        """Cap this stream's send rate. Only bulk streams can be paced: libp2p streams share one
        connection with others, so this returns False for them and changes nothing."""
        pace = getattr(self.raw, "pace", None)
        return bool(pace(bytes_per_s)) if pace is not None else False

    async def close(self) -> None:
        """Half-close our side politely (bounded); errors are ignored because the exchange is over."""
        await end_raw(self.raw)

    async def reset(self) -> None:
        """Abort the stream: the other side's next read fails at once instead of waiting."""
        await end_raw(self.raw, reset=True)


class _Deadline:
    """``trio.fail_after`` that raises :class:`P2PTimeout` with a message saying what timed out."""

    def __init__(self, seconds: float, message: str):
        self.seconds, self.message = seconds, message

    def __enter__(self):
        self._scope = trio.move_on_after(self.seconds)
        self._scope.__enter__()
        return self._scope

    def __exit__(self, *exc):
        suppressed = self._scope.__exit__(*exc)
        if self._scope.cancelled_caught:
            raise P2PTimeout(self.message)
        return suppressed

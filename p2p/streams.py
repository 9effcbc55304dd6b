"""Large payloads over a framed stream, with credit-based flow control and deadlines on both sides.

Why not just write to the yamux stream? py-libp2p's yamux fails a writer whose reader has not read
for 5 s and never tells the reader, which then blocks. We never let yamux's window run dry:

* the receiver runs a *pump* task that reads frames as soon as they arrive, into a queue;
* the sender may have at most ``window_bytes`` sent but not yet *consumed* by the receiver's code;
* the receiver grants credit (a ``C`` frame) only as its consumer takes chunks from the queue.

So the pump never waits for space (the sender cannot overrun the window) and yamux always drains.
A slow or stalled consumer shows up where we control it: the sender's wait for credit, bounded by
``timeout``. On any failure the failing side resets the stream, so the other side's next read fails at
once. Result: a stalled or slow receiver gives a clean :class:`~p2p.errors.P2PTimeout` on the sender
and :class:`~p2p.errors.StreamAborted` on the receiver within the deadline — never a silent hang.

Neither side copies the payload as a whole: the sender writes slices of a memoryview and the
receiver hands each chunk to its consumer, which writes it where it belongs.
"""
from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .errors import P2PTimeout, ProtocolViolation, RemoteError, StreamAborted, single_errors
from .framing import ABORT, CREDIT, DATA, END, MSG, FramedStream, unpack

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_WINDOW_BYTES = 8 << 20
_CREDIT = struct.Struct(">Q")


class PayloadSender:
    """Sends chunks on ``stream`` without ever exceeding ``window_bytes`` of unconsumed data."""

    def __init__(self, stream: FramedStream, *, window_bytes: int = DEFAULT_WINDOW_BYTES, timeout: float = 10.0):
        self.stream, self.window_bytes, self.timeout = stream, window_bytes, timeout
        self.sent = self.credited = 0

    async def send(self, chunk: bytes | memoryview) -> None:
        """Send one chunk, first waiting (at most ``timeout``) for the receiver to consume enough."""
        n = len(chunk)
        while self.sent - self.credited > 0 and self.sent - self.credited + n > self.window_bytes:
            await self._wait_credit()
        await self.stream.write_frame(DATA, chunk)
        self.sent += n

    async def send_buffer(self, data: bytes | memoryview, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        """Send a whole buffer as chunks of ``chunk_bytes`` (slices, no copy of the buffer)."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), chunk_bytes):
            await self.send(view[start:start + chunk_bytes])

    async def finish(self) -> None:
        """Tell the receiver the payload is complete and wait until it consumed everything."""
        await self.stream.write_frame(END)
        while self.credited < self.sent:
            await self._wait_credit()

    async def _wait_credit(self) -> None:
        with trio.move_on_after(self.timeout) as scope:
            tag, body = await self.stream.read_frame()
        if scope.cancelled_caught:
            raise P2PTimeout(f"receiver {self.stream.peer_id[-8:]} consumed nothing for {self.timeout:.1f}s "
                             f"({self.sent - self.credited} bytes outstanding)")
        if tag == ABORT:
            raise StreamAborted(f"receiver {self.stream.peer_id[-8:]} aborted: {unpack(body)}")
        if tag == MSG:
            reply = unpack(body)
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == "err":
                raise RemoteError(self.stream.peer_id, "payload", str(reply[1]), str(reply[2]))
        if tag != CREDIT or len(body) != _CREDIT.size:
            raise ProtocolViolation(f"expected a credit frame from {self.stream.peer_id[-8:]}, got {tag!r}")
        self.credited += _CREDIT.unpack(body)[0]
        if self.credited > self.sent:
            raise ProtocolViolation("receiver granted credit for bytes we never sent")


class PayloadReceiver:
    """Async iterator over the chunks of a payload; grants credit as chunks are consumed.

    Use through :func:`receive_payload`, which runs the pump task in its own nursery.
    """

    def __init__(self, stream: FramedStream, *, window_bytes: int, timeout: float, max_bytes: int | None):
        self.stream, self.window_bytes, self.timeout, self.max_bytes = stream, window_bytes, timeout, max_bytes
        self._send, self._recv = trio.open_memory_channel(math.inf)
        self.received = self._uncredited = 0
        self.done = False
        self._failure: Exception | None = None

    async def _pump(self) -> None:
        """Read frames as they arrive (so yamux never stalls) and queue them for the consumer."""
        try:
            while True:
                with trio.move_on_after(self.timeout) as scope:
                    tag, body = await self.stream.read_frame()
                if scope.cancelled_caught:
                    raise P2PTimeout(f"sender {self.stream.peer_id[-8:]} sent nothing for {self.timeout:.1f}s")
                if tag == END:
                    await self._send.send(None)
                    return
                if tag == ABORT:
                    raise StreamAborted(f"sender {self.stream.peer_id[-8:]} aborted: {unpack(body)}")
                if tag != DATA:
                    raise ProtocolViolation(f"expected a data frame, got {tag!r}")
                self.received += len(body)
                if self.max_bytes is not None and self.received > self.max_bytes:
                    raise ProtocolViolation(f"payload exceeds the announced {self.max_bytes} bytes")
                await self._send.send(body)
        except Exception as e:
            self._failure = e  # seen by the consumer's next read, ahead of chunks still queued
            await self._send.send(e)

    def __aiter__(self) -> "PayloadReceiver":
        return self

    async def __anext__(self) -> bytes:
        if self.done:
            raise StopAsyncIteration
        if self._failure is not None:  # the payload cannot complete: fail now, not after the queued chunks
            self.done = True
            raise self._failure
        item = await self._recv.receive()  # the pump always delivers or fails within its deadline
        if isinstance(item, Exception):
            self.done = True
            raise item
        if item is None:
            self.done = True
            await self._grant(force=True)
            raise StopAsyncIteration
        self._uncredited += len(item)
        await self._grant()
        return item

    async def _grant(self, force: bool = False) -> None:
        if self._uncredited and (force or self._uncredited >= self.window_bytes // 4):
            n, self._uncredited = self._uncredited, 0
            await self.stream.write_frame(CREDIT, _CREDIT.pack(n))


@asynccontextmanager
async def receive_payload(stream: FramedStream, *, window_bytes: int = DEFAULT_WINDOW_BYTES,
                          timeout: float = 10.0, max_bytes: int | None = None) -> AsyncIterator[PayloadReceiver]:
    """``async with receive_payload(stream) as chunks: async for chunk in chunks: ...``

    Leaving the block early (or on error) resets the stream so the sender stops at once.
    """
    receiver = PayloadReceiver(stream, window_bytes=window_bytes, timeout=timeout, max_bytes=max_bytes)
    with single_errors():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver._pump)
            try:
                yield receiver
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.reset()
                raise
            finally:
                nursery.cancel_scope.cancel()
            if not receiver.done:
                with trio.CancelScope(shield=True):
                    await stream.reset()


async def send_bytes(stream: FramedStream, data: bytes | memoryview, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                     window_bytes: int = DEFAULT_WINDOW_BYTES, timeout: float = 10.0) -> None:
    """Send ``data`` as one payload: a size header, chunks, an end mark; returns once all was consumed."""
    await stream.send_msg({"size": len(memoryview(data).cast("B"))})
    sender = PayloadSender(stream, window_bytes=window_bytes, timeout=timeout)
    await sender.send_buffer(data, chunk_bytes)
    await sender.finish()


async def recv_bytes(stream: FramedStream, *, into: bytearray | memoryview | None = None, max_bytes: int,
                     window_bytes: int = DEFAULT_WINDOW_BYTES, timeout: float = 10.0) -> memoryview:
    """Receive a payload sent by :func:`send_bytes` into ``into`` (or a new buffer) and return a view of it."""
    header = await stream.recv_msg()
    size = header.get("size") if isinstance(header, dict) else None
    if not isinstance(size, int) or size < 0 or size > max_bytes:
        await stream.reset()
        raise ProtocolViolation(f"payload size {size!r} from {stream.peer_id[-8:]} is not within 0..{max_bytes}")
    target = memoryview(into if into is not None else bytearray(size)).cast("B")
    if len(target) < size:
        raise ValueError(f"buffer of {len(target)} bytes cannot hold a {size}-byte payload")
    offset = 0
    async with receive_payload(stream, window_bytes=window_bytes, timeout=timeout, max_bytes=size) as chunks:
        async for chunk in chunks:
            target[offset:offset + len(chunk)] = chunk
            offset += len(chunk)
    if offset != size:
        raise StreamAborted(f"payload from {stream.peer_id[-8:]} ended after {offset} of {size} bytes")
    return target[:size]

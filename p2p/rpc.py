"""Named-method RPC over our own protocols: msgpack frames, deadlines, size caps, typed remote errors.

Calls travel on streams of ``/swarmtrain/<swarm>/<service>/<version>``. Opening a stream costs a
multistream negotiation (~6 ms here) while a round trip on an open stream costs ~1.4 ms, so plain calls
reuse idle streams from a per-peer pool (:class:`StreamPool`); streaming calls get a fresh stream.
On a stream the server loops over calls:

1. the caller sends a message frame ``[method, args]``;
2. the server checks the per-peer rate and concurrency limits, finds the method and runs it under the
   service's handler deadline; a streaming method may exchange more frames on ``ctx.stream``;
3. the server answers ``["ok", result]`` or ``["err", exception type, message]`` and waits for the
   next request on the same stream (closing it after ``idle_timeout`` without one).

The caller's whole call is bounded by ``timeout``; a remote failure is raised as
:class:`~p2p.errors.RemoteError` naming the remote exception type, so callers never see a bare reset.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .errors import MessageTooLarge, P2PError, P2PTimeout, PeerBusy, ProtocolViolation, RemoteError, StreamAborted
from .framing import MAX_FRAME_BYTES, MSG, STREAM_TIMEOUT, FramedStream, pack, unpack
from .limits import LogThrottle, RateLimiter
from .pool import StreamPool

logger = logging.getLogger(__name__)


@dataclass
class ServiceLimits:
    """Limits a server enforces on every call of one service.

    :param max_message_bytes: largest request/response frame accepted (bigger is refused before it is read).
    :param max_concurrent_per_peer: calls one peer may have in flight; more are answered with PeerBusy.
    :param max_calls_per_second: calls one peer may start per second, sustained (bursts of up to one
        second's worth); more are answered with PeerBusy before any handler runs.
    :param handler_timeout: a handler running longer than this is cancelled and the caller told so.
    :param read_timeout: how long the server waits for each frame of a call (stalled callers are dropped).
    :param idle_timeout: an open stream with no new request for this long is closed by the server.
    """

    max_message_bytes: int = MAX_FRAME_BYTES
    max_concurrent_per_peer: int = 32
    max_calls_per_second: float = 500.0
    handler_timeout: float = 30.0
    read_timeout: float = STREAM_TIMEOUT
    idle_timeout: float = 60.0


class Endpoint(Protocol):
    """What RPC needs of the peer it runs on: a :class:`~p2p.host.Host` (plain libp2p streams) or a
    :class:`~p2p.node.Node` (which may carry a call on the bulk data plane)."""

    stream_pool: StreamPool

    def set_stream_handler(self, service: str, handler: Callable[[FramedStream], Awaitable[None]], *,
                           version: str = ..., max_frame_bytes: int = ..., timeout: float = ...) -> None: ...

    async def open_stream(self, peer_id: str, service: str, *, version: str = ..., max_frame_bytes: int = ...,
                          timeout: float = ..., bulk: bool = ...) -> FramedStream: ...


@dataclass
class CallContext:
    """What a handler knows about the call: the authenticated caller and the open stream."""

    peer_id: str
    method: str
    stream: FramedStream


Handler = Callable[[CallContext, Any], Awaitable[Any]]


class RPCServer:
    """Dispatches the calls of one service to its handler coroutines ``handler(ctx, args) -> result``."""

    def __init__(self, endpoint: Endpoint, service: str, methods: dict[str, Handler], *, version: str = "1",
                 limits: ServiceLimits | None = None):
        self.service, self.methods = service, dict(methods)
        self.limits = limits or ServiceLimits()
        self.in_flight: Counter[str] = Counter()
        self.rate = RateLimiter(self.limits.max_calls_per_second)
        self._refusals = LogThrottle(10.0)
        self.calls_served = self.calls_failed = self.calls_refused = 0
        endpoint.set_stream_handler(service, self._serve, version=version,
                                max_frame_bytes=self.limits.max_message_bytes, timeout=self.limits.read_timeout)

    async def _serve(self, stream: FramedStream) -> None:
        """Answer calls on one stream until the caller closes it or it stays idle too long."""
        first = True
        while True:
            # The stream's own per-frame deadline must not cut an idle pooled stream short: between calls
            # the caller may stay silent for idle_timeout (its pool reuses streams idle < its max_idle).
            stream.timeout = self.limits.read_timeout if first else self.limits.idle_timeout
            try:
                tag, body = await stream.read_frame()
            except StreamAborted:
                return  # the caller closed or reset the stream: normal end of a pooled stream
            except P2PTimeout:
                if first:
                    logger.info("Dropped %s stream from %s: no complete request within %.1fs", self.service,
                                stream.peer_id[-8:], stream.timeout)
                else:
                    logger.debug("Closing idle %s stream from %s", self.service, stream.peer_id[-8:])
                return
            except P2PError as e:
                logger.warning("Bad %s request from %s: %s", self.service, stream.peer_id[-8:], e)
                await self._reply_error(stream, e)
                if isinstance(e, MessageTooLarge):
                    await self._discard_rest(stream)
                return
            finally:
                stream.timeout = self.limits.read_timeout
            first = False
            if not await self._serve_one(stream, tag, body):
                return

    async def _serve_one(self, stream: FramedStream, tag: bytes, body: bytes) -> bool:
        """Run one call; returns False when the stream must not be used again."""
        peer = stream.peer_id
        try:
            if tag != MSG:
                raise ProtocolViolation(f"expected a request message, got frame tag {tag!r}")
            request = unpack(body, self.limits.max_message_bytes)
            if not (isinstance(request, list) and len(request) == 2 and isinstance(request[0], str)):
                raise ProtocolViolation("request must be [method: str, args]")
        except P2PError as e:
            logger.warning("Bad %s request from %s: %s", self.service, peer[-8:], e)
            await self._reply_error(stream, e)
            return False
        method, args = request
        handler = self.methods.get(method)
        if handler is None:
            logger.info("Peer %s called unknown method %s.%s", peer[-8:], self.service, method)
            await self._reply_error(stream, ProtocolViolation(f"unknown method {self.service}.{method!r}"), "UnknownMethod")
            return True
        if not self.rate.allow(peer):
            return await self._refuse(stream, peer, method, f"over {self.limits.max_calls_per_second:g} calls/s")
        if self.in_flight[peer] >= self.limits.max_concurrent_per_peer:
            return await self._refuse(stream, peer, method,
                                      f"over {self.limits.max_concurrent_per_peer} calls in flight")
        self.in_flight[peer] += 1
        try:
            with trio.fail_after(self.limits.handler_timeout):
                result = await handler(CallContext(peer, method, stream), args)
            await stream.send_msg(["ok", result])
            self.calls_served += 1
            return True
        except trio.TooSlowError:
            self.calls_failed += 1
            logger.warning("%s.%s from %s exceeded the %.1fs handler deadline", self.service, method, peer[-8:],
                           self.limits.handler_timeout)
            await self._reply_error(stream, P2PTimeout(f"handler exceeded {self.limits.handler_timeout}s"))
            return False
        except StreamAborted as e:
            self.calls_failed += 1
            logger.info("%s.%s from %s: stream aborted: %s", self.service, method, peer[-8:], e)
            await self._reply_error(stream, e)  # maybe another stream of the handler's broke; a no-op if ours did
            return False
        except Exception as e:
            self.calls_failed += 1
            # the caller receives the error; here one INFO line (with the traceback at DEBUG)
            logger.info("%s.%s from %s failed: %s: %s", self.service, method, peer[-8:], type(e).__name__, e,
                        exc_info=logger.isEnabledFor(logging.DEBUG))
            await self._reply_error(stream, e)
            return False  # a failed handler may have left frames unread: never reuse its stream
        finally:
            self.in_flight[peer] -= 1
            if not self.in_flight[peer]:
                del self.in_flight[peer]

    async def _refuse(self, stream: FramedStream, peer: str, method: str, why: str) -> bool:
        """Answer PeerBusy (the stream stays usable); one log line per peer and 10 s however many refusals."""
        self.calls_refused += 1
        if self._refusals.should_log(peer):
            logger.info("Peer %s is %s on %s; refusing its calls for now", peer[-8:], why, self.service)
        await self._reply_error(stream, PeerBusy(peer, method, "PeerBusy", why), "PeerBusy")
        return True

    async def _discard_rest(self, stream: FramedStream) -> None:
        """Drop the rest of a refused oversized request unread, for at most ``read_timeout``.

        The caller is still writing that request and reads our refusal only once its write is done;
        without this its write would stall on the transport window until its own deadline.
        """
        await stream.close()
        with trio.move_on_after(self.limits.read_timeout):
            try:
                while await stream.raw.read(1 << 20):
                    pass
            except Exception:
                pass  # the caller closed or reset the stream: done
            return
        await stream.reset()

    @staticmethod
    async def _reply_error(stream: FramedStream, error: BaseException, type_name: str | None = None) -> None:
        try:
            await stream.send_msg(["err", type_name or type(error).__name__, str(error)[:2000]])
        except P2PError:
            pass  # the caller is gone; nothing more to tell


@asynccontextmanager
async def open_call(endpoint: Endpoint, peer_id: str, service: str, method: str, args: Any = None, *,
                    timeout: float = STREAM_TIMEOUT, version: str = "1", max_message_bytes: int = MAX_FRAME_BYTES,
                    bulk: bool = False) -> AsyncIterator[FramedStream]:
    """Start a streaming call: sends the request and yields the stream for further frames.

    ``bulk=True`` carries the call on the bulk data plane (:mod:`p2p.bulk`) when the peer offers it: for
    calls that move megabytes.

    Read the final ``["ok", ...]`` / ``["err", ...]`` with :func:`read_reply`. The stream is reset if the
    block raises, so the server never waits on a caller that gave up.
    """
    stream = await endpoint.open_stream(peer_id, service, version=version, max_frame_bytes=max_message_bytes,
                                        timeout=timeout, bulk=bulk)
    try:
        await stream.send_msg([method, args])
        yield stream
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.reset()
        raise
    else:
        await stream.close()


async def read_reply(stream: FramedStream, method: str) -> Any:
    """Read a call's final reply; raises :class:`RemoteError` (or :class:`PeerBusy`) for remote failures."""
    reply = await stream.recv_msg()
    if isinstance(reply, list) and len(reply) == 2 and reply[0] == "ok":
        return reply[1]
    if isinstance(reply, list) and len(reply) == 3 and reply[0] == "err":
        cls = PeerBusy if reply[1] == "PeerBusy" else RemoteError
        raise cls(stream.peer_id, method, str(reply[1]), str(reply[2]))
    raise ProtocolViolation(f"malformed reply to {method} from {stream.peer_id[-8:]}")


async def call(endpoint: Endpoint, peer_id: str, service: str, method: str, args: Any = None, *,
               timeout: float = STREAM_TIMEOUT, version: str = "1", max_message_bytes: int = MAX_FRAME_BYTES) -> Any:
    """Call ``service.method(args)`` on ``peer_id`` and return the result, all within ``timeout`` seconds.

    Reuses an idle pooled stream when there is one. Raises :class:`RemoteError` if the remote handler
    failed, :class:`P2PTimeout` past the deadline, :class:`PeerUnreachable` if no stream could be opened.
    """
    key, pool = (peer_id, service, version), endpoint.stream_pool
    request = pack([method, args])
    if len(request) + 1 > max_message_bytes:
        raise MessageTooLarge(f"{service}.{method} request of {len(request)} bytes exceeds {max_message_bytes}")
    with trio.move_on_after(timeout) as scope:
        for attempt in (0, 1):
            stream = pool.take(key) if attempt == 0 else None
            reused = stream is not None
            if stream is None:
                stream = await endpoint.open_stream(peer_id, service, version=version,
                                                    max_frame_bytes=max_message_bytes, timeout=timeout)
            stream.timeout, stream.max_frame_bytes = timeout, max_message_bytes  # this call's limits, even if reused
            try:
                try:
                    await stream.write_frame(MSG, request)
                    reply = await read_reply(stream, method)
                except StreamAborted:
                    if reused:  # the server had ended this pooled stream (idle, restarted) before reading our request
                        with trio.CancelScope(shield=True):
                            await stream.reset()
                        continue
                    raise
            except RemoteError:
                await stream.close()  # the server may have ended this stream after the error; do not reuse it
                raise
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.reset()
                raise
            if not pool.give_back(key, stream):
                await stream.close()
            return reply
    raise P2PTimeout(f"{service}.{method} on {peer_id[-8:]} took longer than {timeout}s")

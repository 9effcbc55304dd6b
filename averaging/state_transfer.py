"""One state download's data phase: donors pull byte ranges of one blob from a shared queue, each piece
verified against its SHA-256 on arrival (see :func:`averaging.state.adownload_state` for the whole download).

1. :func:`fetch_hashes`: the piece hashes from the first donor whose list matches the announced sha256;
2. :class:`Transfer`: up to ``max_donors`` donors, one stream each, pull ranges until every piece is verified;
   a range that fails (dead donor, stall, error, piece hash mismatch) goes back to the queue, its donor is
   dropped and a spare donor, if any, takes its place.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter

import trio

from p2p import P2PError, ProtocolViolation, RemoteError, StreamAborted
from p2p.framing import FramedStream
from p2p.rpc import read_reply
from p2p.streams import receive_payload

from .state_format import StateFormatError, state_digest
from .state_offers import MAX_PIECES, Offer

logger = logging.getLogger(__name__)


class StateDownloadError(P2PError):
    """State was announced, but no donor delivered a complete, verified copy in time."""


class StateUnconfirmed(StateDownloadError):
    """State was announced, but no offer had the confirmations asked for (none was downloaded)."""


class Transfer:
    """One download of one offer: donors pull ranges from a shared queue until every piece is verified."""

    def __init__(self, node, service: str, offer: Offer, hashes: bytes, donors: list[str], max_donors: int,
                 range_bytes: int, stall_timeout: float):
        self.node, self.service, self.offer, self.hashes = node, service, offer, hashes
        self.donors, self.spare = donors[:max_donors], donors[max_donors:]
        self.stall_timeout = stall_timeout
        self.buffer = bytearray(offer.nbytes)
        self.pending = [(s, min(s + range_bytes, offer.nbytes)) for s in range(0, offer.nbytes, range_bytes)][::-1]
        self.remaining = len(self.pending)
        self.served: Counter[str] = Counter()
        self.failures: dict[str, str] = {}
        self._changed = trio.Event()

    async def run(self) -> bytearray:
        async with trio.open_nursery() as self.nursery:
            for donor in self.donors:
                self.nursery.start_soon(self._worker, donor)
        if self.remaining:
            raise StateDownloadError(f"every donor of state {self.offer.sha256[:12]} failed: {self.failures}")
        return self.buffer

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _worker(self, donor: str) -> None:
        stream, clean = None, False
        try:
            while self.remaining:
                if not self.pending:  # others hold the last ranges; wait in case one of them fails
                    await self._changed.wait()
                    continue
                start, end = self.pending.pop()
                try:
                    if stream is None:
                        stream = await self.node.open_stream(donor, self.service, timeout=self.stall_timeout, bulk=True)
                    await self._fetch(stream, start, end)
                except BaseException:
                    self.pending.append((start, end))
                    raise
                finally:
                    self._notify()
                self.remaining -= 1
                self.served[donor] += end - start
            clean = True
        except (P2PError, ValueError) as e:
            self.failures[donor] = f"{type(e).__name__}: {e}"
            logger.info("State donor %s dropped after %.1f MB: %s", donor[-8:], self.served[donor] / 1e6,
                        self.failures[donor])
            if self.spare:
                self.nursery.start_soon(self._worker, self.spare.pop())
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await (stream.close() if clean else stream.reset())

    async def _fetch(self, stream: FramedStream, start: int, end: int) -> None:
        await stream.send_msg(["read", {"sha256": self.offer.sha256, "start": start, "end": end}])
        head = await stream.recv_msg()
        if isinstance(head, list) and len(head) == 3 and head[0] == "err":
            raise RemoteError(stream.peer_id, "read", str(head[1]), str(head[2]))
        if not isinstance(head, dict) or head.get("size") != end - start:
            raise ProtocolViolation(f"donor answered {head!r:.100} to a {end - start}-byte range request")
        view, offset = memoryview(self.buffer)[start:end], 0
        async with receive_payload(stream, timeout=self.stall_timeout, max_bytes=end - start) as chunks:
            async for chunk in chunks:
                view[offset:offset + len(chunk)] = chunk
                offset += len(chunk)
        if offset != end - start:
            raise StreamAborted(f"range ended after {offset} of {end - start} bytes")
        await read_reply(stream, "read")
        await trio.to_thread.run_sync(self._verify, start, end)

    def _verify(self, start: int, end: int) -> None:
        pb, view = self.offer.piece_bytes, memoryview(self.buffer)
        for i in range(start // pb, -(-end // pb)):
            if hashlib.sha256(view[i * pb:(i + 1) * pb]).digest() != self.hashes[32 * i:32 * i + 32]:
                raise StateFormatError(f"piece {i} does not match its sha256")


async def fetch_hashes(node, service: str, offer: Offer, donors: list[str], timeout: float) -> bytes:
    """The piece hashes from the first donor whose list matches the announced sha256; bad donors are removed."""
    expected = 32 * -(-offer.nbytes // offer.piece_bytes)
    for donor in list(donors):
        try:
            reply = await node.call(donor, service, "pieces", {"sha256": offer.sha256}, timeout=timeout,
                                    max_message_bytes=MAX_PIECES * 32 + 4096)
            hashes = reply.get("hashes") if isinstance(reply, dict) else None
            if isinstance(hashes, bytes) and len(hashes) == expected and state_digest(hashes) == offer.sha256:
                return hashes
            logger.info("State donor %s sent piece hashes that do not match sha256 %s", donor[-8:], offer.sha256[:12])
        except P2PError as e:
            logger.info("State donor %s did not send piece hashes: %s: %s", donor[-8:], type(e).__name__, e)
        donors.remove(donor)
    raise StateDownloadError(f"no donor sent valid piece hashes for state {offer.sha256[:12]}")

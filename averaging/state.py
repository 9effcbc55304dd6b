"""State sharing: a newcomer downloads the current averaged state (tensors + metadata) from peers that have it.

The state travels as a blob of :mod:`averaging.state_format` (msgpack header + raw tensor bytes, no
pickle), identified by the SHA-256 of its piece hashes.

Donor side (:class:`StateSharer`), every ``announce_interval`` seconds:

1. call ``get_state()``; if ``metadata["step"]`` changed, serialize a new snapshot and hash it (in a
   worker thread); the previous snapshot stays servable for ``keep_previous`` seconds;
2. announce ``{"step", "nbytes", "sha256", "piece_bytes", "addrs"}`` under DHT key ``<prefix>.state``,
   sub-key = our peer id (owner-signed), expiring after ``announce_ttl``;
3. serve ``pieces`` (the piece hashes) and ``read`` (a byte range of a named snapshot) on service
   ``state.<prefix>``; a request naming a snapshot we no longer hold gets a clear error.

Downloader side (:func:`download_state`):

1. read every announcement; group donors by (step, sha256); try groups by highest step, then most donors;
2. fetch the piece hashes from one donor and check them against the announced sha256;
3. split the blob into ranges; up to ``max_donors`` donors pull ranges from one shared queue in parallel
   (one stream each). A range that fails (dead donor, stall, error, piece hash mismatch) goes back to the
   queue, its donor is dropped and a spare donor, if any, takes its place;
4. when every piece is verified, decode the blob (validating the header) and return it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import trio

from dht import DHT, get_dht_time, subkey_entries
from p2p import P2PError, ProtocolViolation, RemoteError, ServiceLimits, StreamAborted
from p2p.framing import MAX_FRAME_BYTES, FramedStream
from p2p.rpc import read_reply
from p2p.streams import receive_payload, send_bytes

from .checks import all_finite
from .state_format import MIN_BLOB_BYTES, StateFormatError, check_step, decode_state, encode_state, piece_hashes, \
    state_digest

__all__ = ["StateSharer", "StateDownloadError", "StateFormatError", "adownload_state", "download_state",
           "decode_state", "encode_state", "piece_hashes", "state_digest"]

logger = logging.getLogger(__name__)


def state_key(prefix: str) -> str:
    """The DHT key under which peers of ``prefix`` offer their shared state (sub-key: peer ID)."""
    return f"{prefix}.state"


MAX_PIECES = 1 << 17  # piece hash list of at most 4 MiB
MIN_PIECE_BYTES, MAX_PIECE_BYTES = 4096, 64 << 20   # hashing granularity a donor may choose
READ_BYTES = MAX_FRAME_BYTES  # one read request's range (a downloader asks several donors for ranges at once)


class StateDownloadError(P2PError):
    """State was announced, but no donor delivered a complete, verified copy in time."""


# ------------------------------------------------------------------------------------------ donor
@dataclass
class _Snapshot:
    step: int
    blob: bytearray
    hashes: bytes
    sha256: str
    retired_at: float | None = None


class StateSharer:
    """Serves this peer's state to newcomers and announces it on the DHT (see the module docstring).

    :param dht: a running DHT; the state is served on its node.
    :param prefix: names the state (DHT key ``<prefix>.state``, service ``state.<prefix>``); no '/'.
    :param get_state: returns ``(metadata, tensors)``; ``metadata["step"]`` is an int. Called from a worker
        thread every ``announce_interval``; a new snapshot is taken only when the step changed (or on
        :meth:`refresh` with ``force=True``), so return tensors that are consistent at that moment.
    :param announce_interval: seconds between announcements; ``announce_ttl`` (default twice that, at least
        10 s) is how long one stays valid.
    :param piece_bytes: hashing granularity; a downloader's ranges are multiples of it.
    :param keep_previous: seconds a replaced snapshot stays servable, so in-flight downloads can finish.
    """

    def __init__(self, dht: DHT, prefix: str, get_state: Callable[[], tuple[dict, list[torch.Tensor]]], *,
                 announce_interval: float = 30.0, announce_ttl: float | None = None, piece_bytes: int = 1 << 20,
                 keep_previous: float = 60.0, stall_timeout: float = 10.0):
        if not prefix or "/" in prefix:
            raise ValueError(f"state prefix must be non-empty and contain no '/': {prefix!r}")
        if dht.client_mode:
            raise ValueError("a client-mode peer accepts no streams, so it cannot share state")
        if announce_interval <= 0 or not MIN_PIECE_BYTES <= piece_bytes <= MAX_PIECE_BYTES:
            raise ValueError("announce_interval must be > 0 and piece_bytes within 4 KiB..64 MiB")
        self.dht, self.prefix, self.get_state = dht, prefix, get_state
        self.announce_interval, self.piece_bytes, self.keep_previous = announce_interval, piece_bytes, keep_previous
        self.announce_ttl = announce_ttl or max(2 * announce_interval, 10.0)
        self.stall_timeout = stall_timeout
        self._snapshots: dict[str, _Snapshot] = {}
        self._current: _Snapshot | None = None
        self._lock = trio.Lock()
        self.tasks = dht.node.task_group(f"state sharer {prefix}")
        self.closed = False
        dht.node.serve(f"state.{prefix}", {"pieces": self._serve_pieces, "read": self._serve_read},
                       limits=ServiceLimits(max_message_bytes=MAX_PIECES * 32 + 4096, handler_timeout=120.0))
        self.tasks.spawn(self._announce_loop)

    def announce_soon(self) -> None:
        """Announce the current state now, in the background (not up to ``announce_interval`` later)."""
        self.tasks.spawn(self._announce_once)

    async def _announce_once(self) -> None:
        try:
            await self.arefresh()
        except Exception as e:  # e.g. shutting down; the announce loop tries again within announce_interval
            logger.debug("State %s: announcement failed: %s: %s", self.prefix, type(e).__name__, e)

    def refresh(self, force: bool = False) -> dict:
        """Blocking :meth:`arefresh`."""
        return self.dht.node.run(functools.partial(self.arefresh, force))

    async def arefresh(self, force: bool = False) -> dict:
        """Take a snapshot if the step changed (or ``force``), announce it now and return the announced value."""
        async with self._lock:
            current = None if force else self._current
            fresh = await trio.to_thread.run_sync(self._take_snapshot, current)
            if self.closed:
                raise P2PError("state sharer is shut down")
            if fresh is not current:
                if self._current is not None:
                    self._current.retired_at = time.monotonic()
                self._current, self._snapshots[fresh.sha256] = fresh, fresh
                logger.info("State %s: snapshot of step %d, %.1f MB, sha256 %s", self.prefix, fresh.step,
                            len(fresh.blob) / 1e6, fresh.sha256[:12])
            self._drop_old()
            value = {"step": fresh.step, "nbytes": len(fresh.blob), "sha256": fresh.sha256,
                     "piece_bytes": self.piece_bytes, "addrs": self.dht.node.addrs[:8]}
            record = self.dht.make_record(state_key(self.prefix), value, get_dht_time() + self.announce_ttl,
                                          subkey=self.dht.peer_id)
            if not (await self.dht.astore_many([record]))[0]:
                logger.warning("State %s: no DHT node accepted our announcement", self.prefix)
            return value

    def _take_snapshot(self, current: _Snapshot | None) -> _Snapshot:
        metadata, tensors = self.get_state()
        step = check_step(metadata)
        if current is not None and current.step == step:
            return current
        blob = encode_state(metadata, tensors)
        hashes = piece_hashes(blob, self.piece_bytes)
        return _Snapshot(step, blob, hashes, state_digest(hashes))

    def _drop_old(self) -> None:
        now = time.monotonic()
        for sha, snap in list(self._snapshots.items()):
            if snap.retired_at is not None and now - snap.retired_at > self.keep_previous:
                del self._snapshots[sha]

    async def _announce_loop(self) -> None:
        """Announce every ``announce_interval`` until :meth:`shutdown` cancels our tasks."""
        while True:
            try:
                await self.arefresh()
            except Exception as e:  # a failing get_state or DHT must not end sharing; retry next period
                logger.warning("State %s: announcement failed: %s: %s", self.prefix, type(e).__name__, e)
            await trio.sleep(self.announce_interval)

    def _snapshot(self, args: Any) -> _Snapshot:
        sha = args.get("sha256") if isinstance(args, dict) else None
        self._drop_old()
        snap = self._snapshots.get(sha) if isinstance(sha, str) else None
        if snap is None:
            step = self._current.step if self._current else None
            raise ValueError(f"no snapshot {str(sha)[:12]} here (our state is at step {step})")
        return snap

    async def _serve_pieces(self, ctx, args: Any) -> dict:
        snap = self._snapshot(args)
        return {"piece_bytes": self.piece_bytes, "nbytes": len(snap.blob), "hashes": snap.hashes}

    async def _serve_read(self, ctx, args: Any) -> None:
        snap = self._snapshot(args)
        start, end = args.get("start"), args.get("end")
        if not (type(start) is int and type(end) is int and 0 <= start < end <= len(snap.blob)):
            raise ValueError(f"bad range {start!r}..{end!r} of a {len(snap.blob)}-byte state")
        await send_bytes(ctx.stream, await self._read_range(snap, start, end), timeout=self.stall_timeout)
        logger.debug("State %s: served bytes %d..%d of %s to %s", self.prefix, start, end, snap.sha256[:12],
                     ctx.peer_id[-8:])

    async def _read_range(self, snap: "_Snapshot", start: int, end: int) -> memoryview | bytes:
        """The bytes a ``read`` of ``start..end`` serves (fault-injection tests override this)."""
        return memoryview(snap.blob)[start:end]

    def shutdown(self) -> None:
        """Stop announcing and serving (the last announcement expires within ``announce_ttl``)."""
        self.closed = True      # serves nothing from now on (reads in flight fail on a missing snapshot)
        self.tasks.close()
        if self.dht.node.is_running:
            self.dht.node.run_sync_soon(self._forget_snapshots)
        else:
            self._forget_snapshots()

    def _forget_snapshots(self) -> None:
        self._snapshots.clear()
        self._current = None


# ------------------------------------------------------------------------------------------ downloader
@dataclass(frozen=True)
class _Offer:
    step: int
    sha256: str
    nbytes: int
    piece_bytes: int


def _parse_offers(entry: Any, exclude: str, max_nbytes: int) -> dict[_Offer, list[tuple[str, list[str]]]]:
    """Valid announcements grouped by offered state; malformed ones are skipped."""
    offers: dict[_Offer, list[tuple[str, list[str]]]] = {}
    for peer_id, v, _ in subkey_entries(entry):
        try:
            offer = _Offer(v["step"], v["sha256"], v["nbytes"], v["piece_bytes"])
            ok = (type(offer.step) is int and offer.step >= 0 and type(offer.nbytes) is int
                  and MIN_BLOB_BYTES <= offer.nbytes <= max_nbytes and type(offer.piece_bytes) is int
                  and MIN_PIECE_BYTES <= offer.piece_bytes <= MAX_PIECE_BYTES and -(-offer.nbytes // offer.piece_bytes) <= MAX_PIECES
                  and isinstance(offer.sha256, str) and len(offer.sha256) == 64 and isinstance(v["addrs"], list))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            logger.debug("Ignoring a malformed state announcement from %r", peer_id)
        elif peer_id != exclude:
            offers.setdefault(offer, []).append((peer_id, [a for a in v["addrs"][:8] if isinstance(a, str)]))
    return offers


class _Transfer:
    """One download of one offer: donors pull ranges from a shared queue until every piece is verified."""

    def __init__(self, node, service: str, offer: _Offer, hashes: bytes, donors: list[str], max_donors: int,
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


async def _fetch_hashes(node, service: str, offer: _Offer, donors: list[str], timeout: float) -> bytes:
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


async def adownload_state(dht: DHT, prefix: str, *, timeout: float = 300.0, max_donors: int = 3,
                          chunk_bytes: int = READ_BYTES, stall_timeout: float = 10.0,
                          max_nbytes: int = 16 << 30, newer_than: int = -1
                          ) -> tuple[dict, list[torch.Tensor]] | None:
    """Download the newest announced state of ``prefix``: ``(metadata, tensors)``, or None if none is announced
    (or none with a step above ``newer_than``: a peer that holds step N passes N and downloads nothing older).

    Picks the highest step, then the sha256 most donors announce (falling back to the next offers if all
    its donors fail), fetches ranges of about ``chunk_bytes`` from up to ``max_donors`` donors in parallel,
    verifies every piece and decodes the result. Raises :class:`StateDownloadError` if state was announced
    but no verified copy arrived within ``timeout`` seconds.

    :param stall_timeout: a donor that sends nothing for this long is dropped and its range re-assigned.
    :param max_nbytes: offers of bigger states are ignored (the whole state is held in memory).
    """
    if max_donors < 1 or chunk_bytes < 1:
        raise ValueError("max_donors and chunk_bytes must be >= 1")
    service, started = f"state.{prefix}", time.monotonic()
    errors: list[str] = []
    with trio.move_on_after(timeout):
        offers = _parse_offers(await dht.aget(state_key(prefix), latest=True), dht.peer_id, max_nbytes)
        offers = {offer: donors for offer, donors in offers.items() if offer.step > newer_than}
        if not offers:
            return None
        for offer, announced in sorted(offers.items(), key=lambda kv: (kv[0].step, len(kv[1])), reverse=True):
            for peer_id, addrs in announced:
                dht.node.add_addrs(peer_id, addrs)
            donors = random.sample([p for p, _ in announced], len(announced))
            try:
                hashes = await _fetch_hashes(dht.node, service, offer, donors, stall_timeout)
                range_bytes = max(1, chunk_bytes // offer.piece_bytes) * offer.piece_bytes
                transfer = _Transfer(dht.node, service, offer, hashes, donors, max_donors, range_bytes, stall_timeout)
                blob = await transfer.run()
                metadata, tensors = await trio.to_thread.run_sync(decode_state, blob)
                broken = [i for i, t in enumerate(tensors) if t.is_floating_point() and not all_finite(t)]
                if broken:  # a donor's hashes only prove it sent what it announced, not that it is sane
                    raise StateFormatError(f"tensors {broken[:5]} contain NaN/inf")
            except (StateDownloadError, StateFormatError) as e:
                logger.warning("State %s: step %d from %d donors failed: %s", prefix, offer.step, len(announced), e)
                errors.append(str(e))
                continue
            elapsed = time.monotonic() - started
            logger.info("State %s: downloaded step %d (%.1f MB) in %.2fs (%.1f MB/s); MB per donor %s; dropped %s",
                        prefix, offer.step, offer.nbytes / 1e6, elapsed, offer.nbytes / 1e6 / max(elapsed, 1e-9),
                        {d[-8:]: round(n / 1e6, 1) for d, n in transfer.served.items()},
                        {d[-8:]: why for d, why in transfer.failures.items()})
            return metadata, tensors
        raise StateDownloadError(f"state {prefix!r} was announced but every offer failed: {errors}")
    raise StateDownloadError(f"no verified state {prefix!r} within {timeout}s (errors so far: {errors})")


def download_state(dht: DHT, prefix: str, *, timeout: float = 300.0, max_donors: int = 3,
                   chunk_bytes: int = READ_BYTES, stall_timeout: float = 10.0,
                   max_nbytes: int = 16 << 30, newer_than: int = -1) -> tuple[dict, list[torch.Tensor]] | None:
    """Blocking :func:`adownload_state`, for training code outside the trio loop."""
    return dht.node.run(functools.partial(adownload_state, dht, prefix, timeout=timeout, max_donors=max_donors,
                                          chunk_bytes=chunk_bytes, stall_timeout=stall_timeout, max_nbytes=max_nbytes,
                                          newer_than=newer_than))
